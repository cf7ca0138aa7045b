"""Direct Preference Optimization (DPO, Rafailov et al. 2023) on COIG-P preference pairs, dense or DSA.

Data. A COIG-P row (docs/method.md, data formats): `conversations` = [{"from": "human" | "gpt" | "system",
"value": str}, ...] ending with a human turn; `chosen` and `rejected` = {"from": "gpt", "value": str}.
It becomes chat messages (human -> user, gpt -> assistant) and two replies, rendered with the chat
template of the tokenizer:

    prompt = template(messages, add_generation_prompt=True)           # "...<|im_start|>assistant\n"
    reply  = template(messages + [assistant: text])[len(prompt):]     # "text<|im_end|>\n"

Prompt and reply are tokenized separately and concatenated, so chosen and rejected carry exactly the
same prompt tokens. Labels are -100 on the prompt and the token ids on the reply (end of turn included).
A row of another shape (missing field, wrong type, unknown role, no final human turn, empty or equal
replies, bad JSON) is skipped and counted.

Truncation (--max-length L, per sequence). If prompt + the longer reply exceed L, the prompt keeps its
last P = max(L // 2, L - longest reply) tokens (the latest turns and the assistant header stay next to
the reply), then each reply keeps its first L - P tokens (a cut reply loses its end of turn). Both
replies always share the same prompt.

Loss. With sequence log-probabilities summed over reply tokens,
    logp(y | x) = sum_{t in reply} log p(y_t | x, y_<t),
the policy pi (the model being trained) and the reference (a frozen copy of the starting model):
    chosen_reward   = beta * (logp_pi(y_c | x) - logp_ref(y_c | x))
    rejected_reward = beta * (logp_pi(y_r | x) - logp_ref(y_r | x))
    reward_margin   = chosen_reward - rejected_reward
    loss            = -log sigmoid(reward_margin)            (mean over pairs)
    reward_accuracy = share of pairs with reward_margin > 0
At the start (policy == reference) every reward is 0 and the loss is log 2.

DSA models run DPO in sparse mode (the mode they are served in; the reference too, with its own frozen
indexer). The indexer keeps learning by default: loss = DPO loss + indexer loss, the indexer KL on the
selected sets of the chosen and rejected sequences (`out.indexer_loss`), the indexer in its own
parameter group. Why: DPO moves the main attention's q/k projections, so the attention the indexer was
trained to predict drifts; the indexer input is detached, so its loss costs the DPO gradient of the base
model nothing, and keeping it learning keeps the top-k selection aligned with the attention the policy
actually uses -- as DeepSeek-V3.2 did, whose post-training kept sparse attention trained the same way as
the sparse stage. `freeze_indexer` (--freeze-indexer) instead trains only the base model; the KL is then
still logged (`indexer_kl`) to show the drift.
"""

import json
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX as IGNORE
from .errors import UsageError
from .sources import resolve_preference_data

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


# ---------------------------------------------------------------------------------------------------
# Rows -> (prompt messages, chosen, rejected)
# ---------------------------------------------------------------------------------------------------


def parse_row(row) -> tuple[list[dict], str, str] | None:
    """A COIG-P row -> (messages [{"role", "content"}], chosen text, rejected text), or None if malformed."""
    if not isinstance(row, dict):
        return None
    turns, chosen, rejected = row.get("conversations"), reply_text(row.get("chosen")), reply_text(row.get("rejected"))
    if not isinstance(turns, list) or not turns or chosen is None or rejected is None or chosen == rejected:
        return None
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return None
        if turn["from"] == "system" and i > 0:
            return None
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return None
    return messages, chosen, rejected


def reply_text(reply) -> str | None:
    """The text of a {"from": "gpt", "value": str} reply, or None if it is not one (or is blank)."""
    if not isinstance(reply, dict) or reply.get("from") != "gpt" or not isinstance(reply.get("value"), str):
        return None
    return reply["value"] if reply["value"].strip() else None


# ---------------------------------------------------------------------------------------------------
# Tokenization: labels on reply tokens only, truncation to max_length
# ---------------------------------------------------------------------------------------------------


def render(tokenizer, messages: list[dict], reply: str) -> tuple[str, str]:
    """(prompt text, reply text) of one conversation rendered with the tokenizer's chat template."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    return prompt, full[len(prompt) :]


def tokenize_pair(tokenizer, messages: list[dict], chosen: str, rejected: str, max_length: int) -> dict:
    """-> {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} (lists of ints),
    each sequence at most max_length tokens, labels -100 on the prompt (truncation: module docstring),
    and "truncated" (bool)."""
    prompt_text, chosen_text = render(tokenizer, messages, chosen)
    _, rejected_text = render(tokenizer, messages, rejected)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, replies = encode(prompt_text), {"chosen": encode(chosen_text), "rejected": encode(rejected_text)}
    longest = max(len(r) for r in replies.values())
    truncated = len(prompt) + longest > max_length
    if truncated:
        prompt = prompt[len(prompt) - min(len(prompt), max(max_length // 2, max_length - longest)) :]
    pair = {"truncated": truncated}
    for name, reply in replies.items():
        reply = reply[: max_length - len(prompt)]
        pair[f"{name}_input_ids"] = prompt + reply
        pair[f"{name}_labels"] = [IGNORE] * len(prompt) + reply
    return pair


def collate(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """N pairs -> {chosen,rejected}_{input_ids,attention_mask,labels}, each N, T: right-padded to one
    common length T, so that the loss runs chosen and rejected through the model as one batch of 2N
    (labels -100 on prompt and padding). Separate keys keep each pair together when accelerate splits a
    batch between processes."""
    T = max(len(p[f"{side}_input_ids"]) for p in pairs for side in ("chosen", "rejected"))
    batch = {}
    for side in ("chosen", "rejected"):
        input_ids = torch.full((len(pairs), T), pad_token_id, dtype=torch.long)
        labels = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)
        for i, pair in enumerate(pairs):
            n = len(pair[f"{side}_input_ids"])
            input_ids[i, :n] = torch.tensor(pair[f"{side}_input_ids"])
            labels[i, :n] = torch.tensor(pair[f"{side}_labels"])
            attention_mask[i, :n] = 1
        batch |= {f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention_mask, f"{side}_labels": labels}
    return batch


# ---------------------------------------------------------------------------------------------------
# Reading COIG-P: local .jsonl / .parquet (or a directory of them), the hub, ModelScope
# ---------------------------------------------------------------------------------------------------


def read_rows(source: str) -> Iterator[dict | None]:
    """Raw rows of a COIG-P source, in file order; a line that is not JSON yields None (counted as malformed).

    source: what `dsa.sources.resolve_preference_data` accepts: a local .jsonl / .parquet file, a local
    directory (all its .jsonl / .parquet files, sorted), "modelscope:<dataset id>" (downloaded with
    modelscope, then read as a directory), or a Hugging Face hub dataset id such as m-a-p/COIG-P (streamed
    with datasets, split "train"). A bad source is a UsageError at the first row."""
    data = resolve_preference_data(source)
    if not isinstance(data, list):  # a hub dataset's rows
        yield from data
        return
    for path in data:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json_or_none(line)
        else:  # .parquet
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()


def json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class PreferencePairs(torch.utils.data.IterableDataset):
    """Tokenized pairs streamed from a COIG-P source, pass after pass, each pass shuffled through a
    buffer of `shuffle_buffer` pairs (seeded by seed and pass number). Counters over the first pass:
    `skipped` malformed rows, `truncated` pairs cut to max_length; `passes` counts completed passes."""

    def __init__(self, source: str, tokenizer, max_length: int, seed: int = 0, shuffle_buffer: int = 1024):
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.skipped = self.truncated = self.passes = 0

    def pairs(self) -> Iterator[dict]:
        """One pass over the source in file order."""
        first_pass = self.passes == 0
        for row in read_rows(self.source):
            parsed = parse_row(row)
            if parsed is None:
                self.skipped += first_pass
                continue
            pair = tokenize_pair(self.tokenizer, *parsed, self.max_length)
            self.truncated += first_pass and pair["truncated"]
            yield pair

    def __iter__(self) -> Iterator[dict]:
        while True:
            rng, buffer, n = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes), [], 0
            for pair in self.pairs():
                n += 1
                buffer.append(pair)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(torch.randint(len(buffer), (1,), generator=rng).item())
            while buffer:
                yield buffer.pop(torch.randint(len(buffer), (1,), generator=rng).item())
            if n == 0:
                raise UsageError(f"no valid preference pair in {self.source} ({self.skipped} malformed rows)")
            self.passes += 1


# ---------------------------------------------------------------------------------------------------
# Log-probabilities and the DPO loss
# ---------------------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits: N, T, V (position t predicts token t+1); labels: N, T (-100 = not counted)
    -> N: sum over the labelled tokens of log p(token | everything before it), in fp32."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # N, T-1
    return (token_logps * (labels != IGNORE)).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence log-probs (N each) -> (mean DPO loss, metrics); formulas in the module docstring."""
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss": loss.item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
        "chosen_reward": chosen_reward.mean().item(),
        "rejected_reward": rejected_reward.mean().item(),
    }
    return loss, metrics


class DPOLoss:
    """loss_fn(model, batch) -> (loss, metrics) for the training loop, on batches from `collate`.

    ref_model: the frozen reference (put in eval mode, requires_grad off, run under no_grad).
    train_indexer: add the DSA indexer loss to the DPO loss (dense models have none).
    autocast: a context manager factory for the reference forward, so that it runs in the same
    precision as the policy (pass `accelerator.autocast`).
    metrics["loss"] is the DPO loss; `indexer_kl` is logged for DSA models, learning or frozen."""

    def __init__(self, ref_model: torch.nn.Module, beta: float = 0.1, train_indexer: bool = True, autocast=nullcontext):
        self.ref_model = ref_model.eval().requires_grad_(False)
        self.beta, self.train_indexer, self.autocast = beta, train_indexer, autocast

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cat = lambda key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])  # noqa: E731  2N, T
        inputs = {"input_ids": cat("input_ids"), "attention_mask": cat("attention_mask"), "use_cache": False}
        labels, n = cat("labels"), batch["chosen_input_ids"].shape[0]
        out = model(**inputs)
        policy = sequence_logps(out.logits, labels)  # 2N: chosen, then rejected
        with torch.no_grad(), self.autocast():
            ref = sequence_logps(self.ref_model(**inputs).logits, labels)  # 2N
        loss, metrics = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)
        indexer_loss = getattr(out, "indexer_loss", None)
        if indexer_loss is not None:
            metrics["indexer_kl"] = indexer_loss.item()
            if self.train_indexer:
                loss = loss + indexer_loss
        return loss, metrics
