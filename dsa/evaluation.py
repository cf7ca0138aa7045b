"""Dense vs DSA measurements: perplexity, indexer recall, passkey, lm-eval benchmarks, generations, speed.

Each side of a comparison is a `Variant`: a model plus the DSA mode / top-k it runs in. The DSA checkpoint
serves both sides when no separate baseline is given (`dsa.set_mode(model, "dense")` is stock attention).
`compare()` runs the measurements of the chosen SECTIONS and returns the JSON-able results dict that
`dsa.report` renders (schema: docs/results_schema.md); figures carry 95% intervals (dsa.stats).
"""

import ctypes
import itertools
import math
import platform
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig

from .data import PackedSFT, encode_conversation
from .core import allowed_keys, attention_target, query_chunks, select_topk
from .modeling import DSAModel, dsa_cache, set_mode, set_selection, set_topk
from .stats import mean_interval, paired_accuracy_difference, paired_relative_difference, perplexity_interval, wilson_interval


@dataclass
class Variant:
    """One side of the comparison. mode None: a plain (non-DSA) model, run as it is."""

    name: str  # "dense", "dsa" or "oracle"
    model: torch.nn.Module
    mode: str | None = None
    topk: int | None = None
    selection: str | None = None  # sparse mode: "indexer" (DSA) or "oracle" (dsa.set_selection)

    def activate(self) -> torch.nn.Module:
        if self.mode is not None:
            set_mode(self.model, self.mode)
        if self.topk is not None:
            set_topk(self.model, self.topk)
        if self.selection is not None:
            set_selection(self.model, self.selection)
        return self.model


ORACLE = "oracle:"  # side name prefix of the oracle selection: "oracle:128"; DSA's sides are named by k alone


def grouped(values: dict) -> dict:
    """Per-side values keyed by side name ("dense", "128", "oracle:128") -> the results' layout:
    {"dense": ..., "dsa": {"128": ...}, "oracle": {"128": ...}} ("oracle" only when oracle sides ran)."""
    out = {"dense": values["dense"], "dsa": {k: v for k, v in values.items() if k != "dense" and not k.startswith(ORACLE)}}
    oracle = {k.removeprefix(ORACLE): v for k, v in values.items() if k.startswith(ORACLE)}
    if oracle:
        out["oracle"] = oracle
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# Held-out data, prompts, greedy decoding
# ---------------------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt tokens for the next assistant turn: the chat template with its generation prompt, or the
    contents joined by newlines when the tokenizer has no template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return tokenizer("\n".join(m["content"] for m in messages)).input_ids


CJK = re.compile(r"[\u4e00-\u9fff]")


def held_out_data(paths, tokenizer, n_tokens: int, prompts_per_language: int, skip: int = 0) -> tuple[list[int], list[list[dict]], int]:
    """Read conversations (dsa.data format) after the first `skip` until there are n_tokens tokens and
    `prompts_per_language` Chinese and English prompts (or the files end).

    Returns the token stream (every conversation rendered with the chat template, concatenated), the
    prompt conversations (a conversation is Chinese when its last user turn has a CJK character) and the
    number of malformed lines skipped.
    """
    data = PackedSFT(paths, tokenizer, seq_len=1)  # only its conversation reader is used
    tokens, prompts = [], {"zh": [], "en": []}
    for messages in itertools.islice(data.conversations(), skip, None):
        language = "zh" if CJK.search(messages[-2]["content"]) else "en"
        if len(prompts[language]) < prompts_per_language:
            prompts[language].append(messages)
        if len(tokens) < n_tokens:
            tokens += encode_conversation(tokenizer, messages, labels="all")[0]
        if len(tokens) >= n_tokens and all(len(p) == prompts_per_language for p in prompts.values()):
            break
    return tokens, prompts["zh"] + prompts["en"], data.skipped


@torch.no_grad()
def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of prompt_ids (generate(), the model's own cache), decoded without the prompt."""
    ids = torch.tensor([prompt_ids], device=model_device(model))
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------
# 1. Perplexity: prefill (one forward) and decode path (token by token through the cache)
# ---------------------------------------------------------------------------------------------------


def token_windows(tokens: list[int], length: int, n: int) -> torch.Tensor:
    """Up to n consecutive, non-overlapping windows of `length` tokens from the start of a token stream.
    Returns n', length (long) with 1 <= n' <= n; ValueError if the stream is shorter than one window."""
    n_avail = min(n, len(tokens) // length)
    if n_avail < 1:
        raise ValueError(f"held-out data has {len(tokens)} tokens, fewer than one window of {length}")
    return torch.tensor(tokens[: n_avail * length], dtype=torch.long).view(n_avail, length)


LOGIT_ROWS = 1024  # the lm_head runs on this many positions at a time (full L x vocab logits are GBs at 4K)


@torch.no_grad()
def prefill_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every position of one forward. ids: L  ->  L-1 (fp32)."""
    ids = ids.to(model_device(model))
    hidden = model.model(input_ids=ids[None], use_cache=False).last_hidden_state[0, :-1]  # L-1, hidden
    targets = ids[1:]
    nll = [
        F.cross_entropy(model.lm_head(hidden[s : s + LOGIT_ROWS]).float(), targets[s : s + LOGIT_ROWS], reduction="none")
        for s in range(0, len(targets), LOGIT_ROWS)
    ]
    return torch.cat(nll)


def new_cache(model) -> DynamicCache:
    """The cache generate() would use: with indexer-key layers for a DSA model."""
    return dsa_cache(model.config) if isinstance(model, DSAModel) else DynamicCache(config=model.config)


@torch.no_grad()
def decode_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """The same NLL as prefill_nll, computed one token per forward through the KV (+ indexer key) cache.
    For DSA this exercises the indexer cache: each new query is scored against all cached indexer keys."""
    ids = ids.to(model_device(model))
    cache = new_cache(model)
    nll = []
    for t in range(len(ids) - 1):
        logits = model(input_ids=ids[None, t : t + 1], cache=cache, use_cache=True).logits[0, -1].float()
        nll.append(F.cross_entropy(logits, ids[t + 1]))
    return torch.stack(nll)


def perplexity(nll: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL over all predicted positions of all windows)."""
    return math.exp(torch.cat(nll).double().mean().item())


# ---------------------------------------------------------------------------------------------------
# 2. Indexer recall: share of the dense, head-summed attention mass inside a selected set of k keys
# ---------------------------------------------------------------------------------------------------

RECALL_METHODS = ("indexer", "oracle", "last_k", "random")


def recall_rows(p: torch.Tensor, indexer_keys: torch.Tensor, query_index: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Recall of each query row for a budget of k keys.

    p: B, T, S dense attention target (head-summed, rows L1-normalized, 0 on non-causal keys);
    indexer_keys: B, T, min(k, S) the keys the indexer selects (dsa.core.select_topk);
    query_index: T (cache index of each query: its causal keys are 0..i).
    Returns method -> B, T, the mass sum_{s in S_t} p[t, s] of the set chosen by
      indexer  the indexer's top-k (what DSA attends),
      oracle   the k largest p[t, s] (the best any k-set can do),
      last_k   the window i-k+1 .. i,
      random   a uniformly random k-subset of the i+1 causal keys, in expectation: min(1, k / (i+1)).
    A selected non-causal key (a row with fewer than k causal keys) has p = 0 and adds nothing.
    """
    keys = torch.arange(p.shape[-1], device=p.device)
    window = (keys[None, :] <= query_index[:, None]) & (keys[None, :] > query_index[:, None] - k)  # T, S
    return {
        "indexer": p.gather(-1, indexer_keys).sum(-1),
        "oracle": p.topk(min(k, p.shape[-1]), dim=-1).values.sum(-1),
        "last_k": (p * window).sum(-1),
        "random": (k / (query_index + 1).float()).clamp(max=1.0).expand(p.shape[:2]),
    }


def layer_recall_sums(attn, hidden: torch.Tensor, position_embeddings, position_ids, topks: list[int]) -> dict:
    """Recall sums of one DSA attention layer over the query rows that have more than k causal keys
    (rows with fewer are exactly dense for every method). The main q/k and the indexer q/k/w are
    recomputed from the layer input with the module's own projections, as its forward does.

    hidden: 1, T, hidden (output of input_layernorm). Returns {k: {method: sum, "rows": n}}.
    """
    B, T, _ = hidden.shape
    q, k, _ = attn.project(hidden, position_embeddings)  # B, Hq, T, D; B, Hkv, T, D
    q_I, k_I, w_I = attn.indexer(hidden, position_ids)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    query_index = torch.arange(T, device=hidden.device)
    sums = {kk: dict.fromkeys((*RECALL_METHODS, "rows"), 0.0) for kk in topks}
    for rows in query_chunks(T, T):
        C = rows.stop - rows.start
        q_rows = q[:, :, rows].float().view(B, Hkv, Hq // Hkv, C, D)
        logits = torch.matmul(q_rows, k.float()[:, :, None].transpose(-1, -2)) * attn.scaling  # B, Hkv, G, C, T
        allowed = allowed_keys(query_index[rows], None, T)  # 1, C, T
        p = attention_target(logits.reshape(B, Hq, C, T), allowed)  # B, C, T
        for kk in topks:
            selected, _ = select_topk(q_I[:, rows], k_I, w_I[:, rows], query_index[rows], None, kk)  # B, C, K
            counted = (query_index[rows] + 1 > kk).float()  # C
            for method, recall in recall_rows(p, selected, query_index[rows], kk).items():
                sums[kk][method] += (recall * counted).sum().item()
            sums[kk]["rows"] += counted.sum().item() * B
    return sums


@torch.no_grad()
def indexer_recall(model, windows: torch.Tensor, topks: list[int], step=None) -> dict:
    """Per window, layer and k, the mean recall (see recall_rows) over the window's rows with more than k keys.

    The model runs in dense mode; a forward pre-hook on every attention layer receives the layer input
    and computes the recall of that layer. step: called once after each window (progress), or None.
    Returns {k: {method: [per layer], "rows": n, "per_window": {method: [[per layer] per window]}}}:
    [per layer] is the mean over all windows' counted rows (= the mean of the per-window values, every
    window having the same rows), n the rows counted over all windows. The values are None when no row has
    more than k keys (k >= window length: DSA is then dense attention).
    """
    set_mode(model, "dense")
    layers = [layer.self_attn for layer in model.model.layers]
    sums = [None] * len(layers)  # of the current window

    def hook(i, attn, args, kwargs):
        sums[i] = layer_recall_sums(attn, kwargs["hidden_states"], kwargs["position_embeddings"], kwargs["position_ids"], topks)

    per_window = {kk: {m: [] for m in RECALL_METHODS} for kk in topks}
    rows = dict.fromkeys(topks, 0)
    handles = [attn.register_forward_pre_hook(lambda m, a, kw, i=i: hook(i, m, a, kw), with_kwargs=True) for i, attn in enumerate(layers)]
    try:
        for ids in windows:
            model.model(input_ids=ids[None].to(model_device(model)), use_cache=False)
            for kk in topks:
                n = sums[0][kk]["rows"]
                rows[kk] += int(n)
                for m in RECALL_METHODS:
                    per_window[kk][m].append([layer[kk][m] / n if n else None for layer in sums])
            if step is not None:
                step()
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for kk in topks:
        result[kk] = {}
        for m in RECALL_METHODS:
            by_layer = zip(*per_window[kk][m])  # per layer: its value in every window
            result[kk][m] = [sum(v) / len(v) if rows[kk] else None for v in by_layer]
        result[kk]["rows"] = rows[kk]
        result[kk]["per_window"] = per_window[kk]
    return result


# ---------------------------------------------------------------------------------------------------
# 3. Passkey retrieval (the standard pass-key test), as a chat turn
# ---------------------------------------------------------------------------------------------------

PASSKEY_HEADER = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it."
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER = "The pass key is"
PASSKEY_NEW_TOKENS = 10  # room for a 5-digit key (Qwen tokenizes digits one by one) and a space


def passkey_text(n_fillers: int, depth: float, key: int) -> str:
    """Header, n filler paragraphs with the needle after round(depth * n) of them, the question."""
    before = round(depth * n_fillers)
    fillers = [PASSKEY_FILLER] * n_fillers
    body = " ".join(fillers[:before] + [PASSKEY_NEEDLE.format(key=key)] + fillers[before:])
    return f"{PASSKEY_HEADER}\n{body} {PASSKEY_QUESTION}"


def passkey_prompt_ids(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """The prompt tokens of one passkey trial: passkey_text as a user turn (chat template, or raw text when
    the tokenizer has none) followed by the answer prefix "The pass key is"; the filler count is the largest
    that keeps the prompt within `length` tokens (at least 1)."""

    def ids(n: int) -> list[int]:
        prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": passkey_text(n, depth, key)}])
        return prompt + tokenizer(PASSKEY_ANSWER, add_special_tokens=False).input_ids

    per_filler = len(ids(2)) - len(ids(1))
    n = max(1, (length - len(ids(0))) // max(per_filler, 1))
    while n > 1 and len(ids(n)) > length:
        n -= 1
    return ids(n)


def passkey_answer(text: str) -> int | None:
    """The first integer in the generated text, or None."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


# ---------------------------------------------------------------------------------------------------
# 4. Speed and memory
# ---------------------------------------------------------------------------------------------------


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_bytes() -> int | None:
    """Bytes the process has allocated with malloc and not freed (glibc mallinfo2: heap + mmapped chunks;
    torch's CPU tensors live there), or None without glibc >= 2.33. Unlike the RSS, it drops when memory is
    freed, even if the allocator keeps the pages."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak memory above the level at entry, in bytes (`.bytes`, None if unmeasurable).
    cuda: torch.cuda.max_memory_allocated. cpu: heap_bytes(), sampled every millisecond by a thread
    (a peak shorter than that can be missed)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = heap_bytes()
            self.running = self.start is not None
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, heap_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.start


@torch.no_grad()
def speed_probe(model, ids: torch.Tensor, decode_tokens: int) -> dict:
    """One prefill of ids (1, L) into a fresh cache (logits of the last position only, as generation does),
    then `decode_tokens` greedy steps through that cache.
    Returns prefill_s, peak_memory_mb (prefill, above the memory held before it), decode_ms_per_token."""
    device = model_device(model)
    ids = ids.to(device)
    cache = new_cache(model)
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        synchronize(device)
        prefill_s = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    synchronize(device)
    decode_s = time.perf_counter() - start
    return {
        "prefill_s": prefill_s,
        "peak_memory_mb": memory.bytes / 2**20 if memory.bytes is not None else None,
        "decode_ms_per_token": 1000 * decode_s / max(decode_tokens, 1),
    }


def median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, torch threads: {torch.get_num_threads()}"


# ---------------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------------


SECTIONS = ("perplexity", "recall", "passkey", "lm-eval", "generations", "speed")  # compare.py --only / --skip


@dataclass
class CompareSettings:
    lengths: list[int]
    topks: list[int]
    headline_topk: int  # one of topks: the k of the decode-path check, the generations and the summary
    ppl_windows: int = 8
    recall_length: int | None = None  # default: the largest length
    recall_windows: int = 1
    passkey_lengths: list[int] | None = None  # default: lengths
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 10
    decode_length: int | None = None  # the decode-path check's window (None: the smallest length; 0: no check)
    max_new_tokens: int = 64
    speed_lengths: list[int] | None = None  # default: lengths
    speed_repeats: int = 1
    speed_decode_tokens: int = 8
    seed: int = 0
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-eval task names (the "lm-eval" section runs with some)
    lm_eval_lengths: list[int] | None = None  # default: lengths
    lm_eval_limit: int = 20  # samples per (task, length)
    lm_eval_max_gen_toks: int | None = None  # cap on generated tokens per sample (None: the task's own)
    oracle: bool = True  # also run every quality section with the oracle selection (dsa.core.oracle_topk)
    sections: list[str] | None = None  # the measurements to run, a subset of SECTIONS (default: all, lm-eval if tasks given)

    def __post_init__(self):
        if self.headline_topk not in self.topks:
            raise ValueError(f"headline_topk={self.headline_topk} is not in topks={self.topks}")
        if self.sections is None:
            self.sections = [name for name in SECTIONS if name != "lm-eval" or self.lm_eval_tasks]
        unknown = [name for name in self.sections if name not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections must be a non-empty subset of {SECTIONS}, got {self.sections}")
        self.sections = [name for name in SECTIONS if name in self.sections]  # in running order
        if "lm-eval" in self.sections and not self.lm_eval_tasks:
            raise ValueError("the lm-eval section needs lm_eval_tasks")
        self.lm_eval_lengths = self.lm_eval_lengths or list(self.lengths)
        self.recall_length = self.recall_length or max(self.lengths)
        self.passkey_lengths = self.passkey_lengths or list(self.lengths)
        if self.decode_length is None:
            self.decode_length = min(self.lengths)
        self.speed_lengths = self.speed_lengths or list(self.lengths)


def section_units(s: CompareSettings, n_prompts: int) -> dict[str, int]:
    """Progress units of each section in s.sections: a forward pass (or generate call, or speed probe) each."""
    sides = 1 + len(s.topks)  # dense and DSA at each k
    quality_sides = sides + (len(s.topks) if s.oracle else 0)  # and the oracle at each k
    units = {
        "perplexity": quality_sides * len(s.lengths) * s.ppl_windows + (2 if s.decode_length else 0),  # + decode-path check
        "recall": s.recall_windows,
        "passkey": quality_sides * len(s.passkey_lengths) * len(s.passkey_depths) * s.passkey_trials,
        "lm-eval": quality_sides * len(s.lm_eval_tasks) * len(s.lm_eval_lengths),  # one lm-eval run each
        "generations": 2 * n_prompts,
        "speed": sides * (1 + len(s.speed_lengths) * s.speed_repeats),  # + one warm-up probe per side
    }
    return {name: units[name] for name in s.sections}


def progress_total(s: CompareSettings, n_prompts: int) -> int:
    """Units of the one progress bar over every section that runs."""
    return sum(section_units(s, n_prompts).values())


def tokens_needed(s: CompareSettings) -> tuple[int, int]:
    """(tokens of held-out text the sections in s.sections read, the longest window among them: the text must
    hold at least that one window). Passkey and generations read no held-out tokens."""
    needed, longest = [0], [0]
    if "perplexity" in s.sections:
        needed.append(s.ppl_windows * max(s.lengths))
        longest.append(max(s.lengths))
    if "recall" in s.sections:
        needed.append(s.recall_windows * s.recall_length)
        longest.append(s.recall_length)
    if "speed" in s.sections:
        needed.append(max(s.speed_lengths))
        longest.append(max(s.speed_lengths))
    return max(needed), max(longest)


def perplexity_results(sides, headline: Variant, tokens: list[int], s: CompareSettings, bar, step) -> dict:
    """The "perplexity" and "decode_perplexity" entries of the results (docs/results_schema.md).

    Per length, the same windows for every side; per window its mean next-token NLL x (prefill). Each
    (length, side) figure is stats.perplexity_interval of the windows' x: exp(mean x) and the exp of its t
    interval. DSA vs dense is paired per window: stats.paired_relative_difference of the windows'
    perplexities exp(x)."""
    window_nll = {name: [] for name, _ in sides}  # per side: [[x per window] per length]
    n_windows = []
    for length in s.lengths:
        windows = token_windows(tokens, length, s.ppl_windows)
        n_windows.append(len(windows))
        for name, variant in sides:
            model = variant.activate()
            nll = []
            for ids in windows:
                nll.append(prefill_nll(model, ids).double().mean().item())
                step(f"L={length} {name}")
            bar.update(s.ppl_windows - len(windows))
            window_nll[name].append(nll)
    window_ppl = {name: [[math.exp(x) for x in per_length] for per_length in v] for name, v in window_nll.items()}
    vs_dense = grouped(
        {name: [paired_relative_difference(a, b) for a, b in zip(ppl, window_ppl["dense"])] for name, ppl in window_ppl.items()}
    )
    results = {
        "perplexity": {
            "lengths": s.lengths,
            "windows": n_windows,
            **grouped({name: [perplexity_interval(x) for x in nll] for name, nll in window_nll.items()}),
            **{f"{group}_vs_dense": vs_dense[group] for group in ("dsa", "oracle") if group in vs_dense},
            "per_window": grouped(window_ppl),
        }
    }

    if not s.decode_length:
        return results
    # decode path at one length, headline k: prefill and token by token
    model = headline.activate()
    ids = token_windows(tokens, s.decode_length, 1)[0]
    prefill = perplexity([prefill_nll(model, ids)])
    step("decode path (prefill)")
    decode = perplexity([decode_nll(model, ids)])
    step("decode path (token by token)")
    results["decode_perplexity"] = {
        "length": s.decode_length,
        "topk": s.headline_topk,
        "prefill": prefill,
        "decode": decode,
        "rel_diff": abs(decode - prefill) / prefill,
    }
    return results


def recall_results(dsa_model, tokens: list[int], s: CompareSettings, bar, step) -> dict:
    """The "recall" entry: indexer_recall per layer, and per k and method the figure
    stats.mean_interval over every (window, layer) value (None where k >= the window length)."""
    windows = token_windows(tokens, s.recall_length, s.recall_windows)
    recall = indexer_recall(dsa_model, windows, s.topks, step=lambda: step(f"L={s.recall_length}"))
    bar.update(s.recall_windows - len(windows))
    mean = {}
    for k, v in recall.items():
        values = {m: [x for per_layer in v["per_window"][m] for x in per_layer] for m in RECALL_METHODS}
        mean[str(k)] = {m: mean_interval(values[m]) if v["rows"] else None for m in RECALL_METHODS}
    return {
        "recall": {
            "length": s.recall_length,
            "windows": len(windows),
            "per_layer": {str(k): {m: v[m] for m in (*RECALL_METHODS, "rows")} for k, v in recall.items()},
            "mean": mean,
        }
    }


def passkey_results(sides, tokenizer, s: CompareSettings, step) -> dict:
    """The "passkey" entry: per side the accuracy of each (length, depth) cell and of all cells together,
    each with its Wilson interval (stats.wilson_interval over the trials); the same prompts for every side."""
    rng = random.Random(s.seed)
    cells = []  # (length, depth, key, prompt ids)
    for length in s.passkey_lengths:
        for depth in s.passkey_depths:
            for _ in range(s.passkey_trials):
                key = rng.randint(10000, 99999)
                cells.append((length, depth, key, passkey_prompt_ids(tokenizer, length, depth, key)))
    shown = next(i for i, c in enumerate(cells) if c[0] == max(s.passkey_lengths) and c[1] == s.passkey_depths[len(s.passkey_depths) // 2])
    grid, overall, samples = {}, {}, []
    for name, variant in sides:
        model = variant.activate()
        hits = {}
        for i, (length, depth, key, prompt_ids) in enumerate(cells):
            answer = greedy(model, tokenizer, prompt_ids, PASSKEY_NEW_TOKENS)
            hits.setdefault((length, depth), []).append(passkey_answer(answer) == key)
            if i == shown:  # one example answer per side, in the report
                samples.append({"side": name, "length": length, "depth": depth, "key": key, "answer": answer})
            step(f"L={length} {name}")
        grid[name] = [[wilson_interval(sum(hits[(L, d)]), len(hits[(L, d)])) for d in s.passkey_depths] for L in s.passkey_lengths]
        overall[name] = wilson_interval(sum(map(sum, hits.values())), len(cells))
    return {
        "passkey": {
            "lengths": s.passkey_lengths,
            "depths": s.passkey_depths,
            "trials": s.passkey_trials,
            **grouped(grid),
            "all_cells": grouped(overall),
            "samples": samples,
        }
    }


def paired_score_difference(scores: list[float], baseline: list[float]) -> dict | None:
    """sparse - dense on the same samples: Newcombe's paired interval for 0/1 scores
    (stats.paired_accuracy_difference), else the t interval of the per-sample differences."""
    if not scores:
        return None
    if all(x in (0.0, 1.0) for x in scores + baseline):
        return paired_accuracy_difference([int(x) for x in scores], [int(x) for x in baseline])
    return mean_interval([a - b for a, b in zip(scores, baseline)])


def lm_eval_results(sides, tokenizer, s: CompareSettings, step) -> dict:
    """The "lm_eval" entry: every task at every length for every side (dsa.lm_eval.LmEvalSuite, the same
    samples for every side). Per (task, side, length) the figure of the per-sample scores (Wilson interval
    for 0/1 scores, else t interval); per sparse side the paired difference to dense, sparse - dense per sample
    (paired_score_difference), in score units (accuracy: a fraction).
    A task that could not be loaded at any length is left out of "scores" and named in "failed"."""
    from .lm_eval import LmEvalSuite  # lm-eval is imported only when the section runs (~5 s)

    suite = LmEvalSuite(s.lm_eval_tasks, s.lm_eval_lengths, tokenizer, s.lm_eval_limit, s.lm_eval_max_gen_toks, seed=s.seed)
    try:
        runs = {name: suite.evaluate(variant.activate(), step=lambda label, name=name: step(f"{label} {name}")) for name, variant in sides}
    finally:
        suite.close()
    scores, vs_dense, per_sample = {}, {}, {}
    for task in s.lm_eval_tasks:
        if all(run is None for run in runs["dense"][task]):
            continue
        scores[task] = grouped({name: [run and run["figure"] for run in v[task]] for name, v in runs.items()})
        per_sample[task] = grouped({name: [run and run["scores"] for run in v[task]] for name, v in runs.items()})
        dense = runs["dense"][task]
        differences = {
            name: [paired_score_difference(run["scores"], base["scores"]) if run and base else None for run, base in zip(v[task], dense)]
            for name, v in runs.items()
            if name != "dense"
        }
        vs_dense[task] = {group: v for group, v in grouped({"dense": None, **differences}).items() if group != "dense"}
    return {
        "lm_eval": {
            "tasks": s.lm_eval_tasks,
            "lengths": s.lm_eval_lengths,
            "limit": s.lm_eval_limit,
            "max_gen_toks": s.lm_eval_max_gen_toks,
            "scores": scores,
            "vs_dense": vs_dense,
            "per_sample": per_sample,
            "failed": suite.failed,
        }
    }


def generation_results(dense: Variant, headline: Variant, tokenizer, prompts: list[list[dict]], s: CompareSettings, step) -> dict:
    """The "generations" entry: side-by-side greedy continuations, dense vs the headline k."""
    generations = []
    for messages in prompts:
        prompt_ids = chat_prompt_ids(tokenizer, messages[:-1])
        row = {"messages": messages[:-1], "reference": messages[-1]["content"], "prompt_tokens": len(prompt_ids)}
        for name, variant in (("dense", dense), ("dsa", headline)):
            row[name] = greedy(variant.activate(), tokenizer, prompt_ids, s.max_new_tokens)
            step(name)
        generations.append(row)
    return {"generations": {"topk": s.headline_topk, "max_new_tokens": s.max_new_tokens, "samples": generations}}


def speed_results(sides, tokens: list[int], s: CompareSettings, step) -> dict:
    """The "speed" entry: medians over repeats, after one warm-up probe per side (at the smallest length)."""
    probe_ids = token_windows(tokens, max(s.speed_lengths), 1)
    speed = {metric: {name: [] for name, _ in sides} for metric in ("prefill_s", "peak_memory_mb", "decode_ms_per_token")}
    for name, variant in sides:
        model = variant.activate()
        speed_probe(model, probe_ids[:, : min(s.speed_lengths)], s.speed_decode_tokens)
        step(f"warm-up {name}")
        for length in s.speed_lengths:
            probes = []
            for _ in range(s.speed_repeats):
                probes.append(speed_probe(model, probe_ids[:, :length], s.speed_decode_tokens))
                step(f"L={length} {name}")
            for metric in speed:
                speed[metric][name].append(median([p[metric] for p in probes]))
    return {
        "speed": {
            "lengths": s.speed_lengths,
            "repeats": s.speed_repeats,
            "decode_tokens": s.speed_decode_tokens,
            **{metric: grouped(v) for metric, v in speed.items()},
        }
    }


def compare(dense: Variant, dsa_model, tokenizer, tokens: list[int], prompts: list[list[dict]], s: CompareSettings, bar) -> dict:
    """The measurements of s.sections; returns the results dict (docs/results_schema.md) without "meta":
    an entry per section that ran (perplexity also adds "decode_perplexity") and "settings".

    dense: the baseline side; dsa_model: the DSA checkpoint (swept over s.topks in sparse mode);
    tokens: held-out token stream; prompts: conversations whose last (assistant) turn is the reference and
    the rest the prompt of the side-by-side generations; bar: a tqdm bar (total progress_total(s,
    len(prompts))), its description set to the running section.
    """
    sparse = {k: Variant("dsa", dsa_model, "sparse", k, "indexer") for k in s.topks}
    sides = [("dense", dense)] + [(str(k), v) for k, v in sparse.items()]  # (side name, variant)
    oracle = [(f"{ORACLE}{k}", Variant("oracle", dsa_model, "sparse", k, "oracle")) for k in s.topks] if s.oracle else []
    quality_sides = sides + oracle  # the speed section times dense and DSA only
    headline = sparse[s.headline_topk]

    def step(label: str):
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    measure = {
        "perplexity": lambda: perplexity_results(quality_sides, headline, tokens, s, bar, step),
        "recall": lambda: recall_results(dsa_model, tokens, s, bar, step),
        "passkey": lambda: passkey_results(quality_sides, tokenizer, s, step),
        "lm-eval": lambda: lm_eval_results(quality_sides, tokenizer, s, step),
        "generations": lambda: generation_results(dense, headline, tokenizer, prompts, s, step),
        "speed": lambda: speed_results(sides, tokens, s, step),
    }
    results = {}
    for name in s.sections:
        bar.set_description(name, refresh=False)
        results.update(measure[name]())
    results["settings"] = asdict(s)
    return results
