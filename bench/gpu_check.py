"""One command for a machine with a GPU: is DSA correct there, what does it cost, and do the multi-GPU configs run.

    uv run python bench/gpu_check.py --out bench/results/<gpu-name>              # on a GPU (bf16, Qwen2.5-0.5B shapes)
    uv run python bench/gpu_check.py --out DIR --model PATH                      # training on a real checkpoint
    uv run python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # the same code paths, tiny shapes

Writes DIR/gpu_check.json and DIR/gpu_check.md (the tables to send back). Exit status 0 when every check passed,
1 when a correctness check failed, a step raised anything but out-of-memory, or a launch failed; 2 on bad input.
Sections (--sections, default all, in this order):

  correctness  every backend of dsa.available_backends() against "reference", on the device ("auto" is one of the
               others; "cpu" is left out on a GPU, its kernels take CPU tensors only).
               fp32, a model with random, sharpened weights (peaked attention, spread index scores), on a batch
               with a left-padded row; forward, train and warmup on 1 layer, decode on 2:
                 forward      sparse mode, no grad: the logits
                 train        sparse mode, LM loss + indexer loss: both losses and every gradient (backends that train)
                 warmup       warm-up mode: the indexer loss and its gradients (backends that train)
                 decode       a prefix, then token by token through the cache, against the backend's own full forward
                 sensitivity  the reference's sparse and dense logits must differ by more than 10x the tolerance
                              (else a wrong selection could pass unnoticed)
               One layer against the reference: a backend's arithmetic may round differently (on a GPU it does), and
               a rounding difference in a layer's output can swap two keys tied at the next layer's k-th place; that
               layer then attends another key, a legitimate result far above the tolerance (docs/performance.md#gpu).
               The first layer's selection sees the same embeddings in every backend.
               bf16:
                 forward, train, warmup   the backend's pieces (attend; attend_trainable + sparse_kl; warmup_loss)
                              on one layer's inputs, bf16 as under autocast, one selection shared by all, against
                              the reference in fp32 on the same inputs. (Whole bf16 models are not compared: bf16
                              index scores often tie at the k-th place, and backends may break ties differently,
                              e.g. the C++ top-k takes the lowest positions; they then attend other keys.)
                 decode       as in fp32, the model in bf16
                 finite       no NaN or inf in the bf16 model's logits, nor in the losses and gradients of a training
                              step under bf16 autocast
               Error: the relative L2 norm |x - ref| / |ref| of each compared tensor; the worst one is reported.
               Tolerances (TOLERANCE): fp32 1e-4; bf16 5e-2 (on CPU the backends' bf16 errors are at most 1.5e-2,
               flat from L = 128 to 2048).
  training     one optimizer step of each bench/train_step.py STEP_KINDS (dense_ft, warmup, sparse, distill; its
               step function, timed_step) on a Qwen2.5-0.5B-shaped model: --model PATH (a dense Qwen2 checkpoint
               gets fresh indexers), else random weights of Qwen2.5-0.5B's config (bench/dsa_bench.py SHAPES,
               24 layers); bf16 autocast, batch 1, at each --lengths (k = --topk). Kinds take turns; medians of
               --repeats steps after one untimed. tokens/s = L / median; peak memory: the largest
               torch.cuda.max_memory_allocated over the kind's timed steps (CPU: the process's peak resident set,
               VmHWM; distill's frozen teacher, a copy of the model, is resident throughout); both also as ratios to
               dense_ft at the same length. Out of memory is recorded, not a failure.
  inference    random weights with the model's shapes, bf16 on a GPU (fp32 on CPU), batch 1. prefill: the latency
               of model(ids, use_cache=True, logits_to_keep=1) with --prefill-layers layers, median of --runs after
               one untimed; decode: per-token latency with --decode-layers layers at a context of S random cached
               tokens, median of --steps after 2. Variants: stock SDPA (decode: StaticCache), stock flash-attention
               2 where flash_attn imports on CUDA (DynamicCache), DSA (sparse mode, k = --topk, backend auto, its
               own cache); ratios DSA / each stock variant (of the medians).
  launch       `accelerate launch --config_file configs/<name>.yaml` of warmup_train.py for 2 steps (a checkpoint
               at step 2) on the GPUs present (--num_processes = their count; on CPU 2 processes), then the saved
               model must reload with AutoModelForCausalLM and keep the base weights (warm-up freezes them). Configs
               that cannot run here are recorded as skipped with the reason (FSDP and DeepSpeed on CPU; DeepSpeed
               without the deepspeed package).

--quick: tiny shapes (QUICK_SHAPES, 2 layers, lengths 64-128, k = L / 8), 1-2 timed repeats: the same code paths in
about a minute on a CPU. No timing here is a pass/fail criterion.
"""

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen2Config, Qwen2ForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: dsa, bench, the scripts
import dsa  # noqa: E402
from bench import train_step  # noqa: E402
from bench.dsa_bench import DSA_SHAPES, SHAPES, timed  # noqa: E402
from dsa.backends import resolve  # noqa: E402
from dsa.core import Backend, select_topk  # noqa: E402
from dsa.errors import UsageError  # noqa: E402
from dsa.presets import TINY_DATA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SECTIONS = ("correctness", "training", "inference", "launch")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # relative L2 error against the reference (see the module docstring)
SENSITIVITY = 10  # sparse vs dense logits must differ by more than this many tolerances
SHARPEN = 4.0  # correctness model: factor on the q/k projections and on the indexer's wq/wk
QUICK_SHAPES = dict(hidden_size=224, intermediate_size=256, num_attention_heads=14, num_key_value_heads=2, vocab_size=512,
                    max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=True)  # fmt: skip  (GQA with 7 query heads per KV head, as Qwen2.5-0.5B)
QUICK_DSA = dsa.DSAConfig(index_n_heads=2, index_head_dim=32, index_rope_dim=16, index_topk=16)


@dataclass
class Plan:
    """The sizes of one run: --quick or full, flags applied."""

    shapes: dict
    layers: int  # decoder layers of the random training and launch models
    sizes: dsa.DSAConfig
    correctness_length: int
    decode_tokens: int
    lengths: list[int]
    prefill: list[int]
    decode: list[int]
    prefill_layers: int
    decode_layers: int
    repeats: int
    runs: int
    steps: int
    launch_length: int
    topk: int | None  # None: length / 8


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line on stderr ("error: ...") and exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------------


def progress(line: str) -> None:
    """One line on stderr as a long section goes (the report is written when the section ends)."""
    print(f"gpu_check: {line}", file=sys.stderr, flush=True)


def reset_peak(device) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or the process's VmHWM (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_mib(device) -> float | None:
    """Peak memory since reset_peak, MiB: torch.cuda.max_memory_allocated, or the peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return train_step.peak_rss_mib()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error) or "out of memory" in str(error)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def failure_status(error: BaseException) -> str:
    return "out of memory" if is_oom(error) else f"error: {one_line(error)}"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| in the L2 norm, in fp32 (inf if out has NaN or inf)."""
    out, ref = out.detach().float(), ref.detach().float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def dense_model(shapes: dict, layers: int, seed: int = 0) -> Qwen2ForCausalLM:
    """A random-weight Qwen2 model (fp32, CPU, SDPA) with these shapes and this many layers."""
    torch.manual_seed(seed)
    config = Qwen2Config(**shapes, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


def correctness_model(plan: Plan, layers: int) -> torch.nn.Module:
    """`layers` layers, random weights; q/k and the indexer's wq/wk scaled by SHARPEN: peaked attention and distinct index
    scores, so that selecting other keys changes the output (random initialisation alone gives near-uniform
    attention, which hides selection errors)."""
    model = dsa.add_indexers(dense_model(plan.shapes, layers), plan.sizes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "indexer.wq.weight", "indexer.wk.weight")):
                p.mul_(SHARPEN)
    return model


def training_model(model_path: str | None, plan: Plan, device) -> torch.nn.Module:
    """The training section's DSA model in fp32: --model (train_step.load), else random Qwen2.5-0.5B-shaped weights
    (24 layers; QUICK_SHAPES and 2 layers with --quick)."""
    if model_path is not None:
        model = train_step.load(model_path, plan.sizes)
    else:
        model = dsa.add_indexers(dense_model(plan.shapes, plan.layers), plan.sizes)
    return model.to(device).train()


# ----------------------------------------------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------------------------------------------


def padded_batch(vocab: int, length: int, device) -> dict:
    """Two rows of random tokens; row 1 left-padded by length / 8 (its labels -100 there)."""
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    mask[1, : length // 8] = 0
    labels = ids.masked_fill(mask == 0, -100)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=position_ids)
    return {k: v.to(device) for k, v in batch.items()}


def run(model, backend, mode: str, batch: dict, train: bool, autocast: bool, device) -> dict[str, torch.Tensor]:
    """One forward (and backward when train) of `model` on `backend`: the tensors to compare, by name."""
    dsa.set_backend(model, backend)
    dsa.set_mode(model, mode)
    model.train(train)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch, use_cache=False)
    if not train:
        return {"logits": out.logits}
    loss = out.indexer_loss if mode == "warmup" else out.loss + out.indexer_loss
    loss.backward()
    result = {"indexer_loss": out.indexer_loss.detach()}
    if mode != "warmup":
        result["lm_loss"] = out.loss.detach()
    result |= {f"grad {name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return result


def decode_logits(model, backend, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits at positions prefix - 1 .. L - 1: a prefill of `prefix` tokens, then one token at a time."""
    dsa.set_backend(model, backend)
    dsa.set_mode(model, "sparse")
    model.eval()
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True)
        steps = [out.logits[:, -1:]]
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


def compare(backend: str, dtype: str, check: str, out: dict, ref: dict) -> dict:
    """One correctness row: the worst relative error over the tensors of `ref` (a tensor missing from `out`, or one
    the reference does not have, fails)."""
    errors = {key: relative_error(out[key], value) if key in out else float("inf") for key, value in ref.items()}
    errors |= {f"unexpected {key}": float("inf") for key in out if key not in ref}
    worst = max(errors, key=errors.get)
    return row(backend, dtype, check, errors[worst], worst)


def row(backend: str, dtype: str, check: str, error: float, worst: str = "", tolerance: float | None = None) -> dict:
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    return {"backend": backend, "dtype": dtype, "check": check, "error": error, "tolerance": tolerance, "worst": worst,
            "passed": error <= tolerance}  # fmt: skip


def backends_to_check(device, extra: dict[str, Backend]) -> tuple[dict[str, str | Backend], list[dict]]:
    """{name: backend} of the reference and of every backend to compare with it; the others with the reason."""
    checked, skipped = {"reference": Backend()}, []
    for name in dsa.backends.BACKENDS:
        reason = dsa.backends.missing_requirement(name)
        if reason is None and name == "cpu" and device.type == "cuda":
            reason = "its kernels take CPU tensors (on a GPU it is the torch backend)"
        if reason:
            skipped.append({"backend": name, "status": f"skipped: {reason}"})
        elif name != "reference":
            checked[name] = name
    return checked | extra, skipped


def guarded(rows: list, backend: str, dtype: str, check):
    """rows.append(check()); a backend that raises fails this check, and the others still run."""
    try:
        rows.append(check())
    except Exception as error:
        rows.append(row(backend, dtype, "error", float("inf"), one_line(error)))


def non_finite(tensors: dict) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors.values())


def model_checks(plan: Plan, device, backends: dict) -> list[dict]:
    """fp32: forward, train, warmup against the reference, and cached decode against the backend's own full forward;
    bf16: cached decode (the model in bf16) and finite outputs and gradients (also of a bf16-autocast training
    step). Against the reference: the 1-layer sharpened model (see the module docstring); the rest: the 2-layer one."""
    single = correctness_model(plan, 1).to(device)
    base = correctness_model(plan, 2).to(device)
    half = copy.deepcopy(base).to(torch.bfloat16)
    batch = padded_batch(plan.shapes["vocab_size"], plan.correctness_length, device)
    ids = batch["input_ids"][:1]  # decode: the unpadded row
    prefix = plan.correctness_length - plan.decode_tokens
    reference = backends["reference"]
    ref = {"forward": run(single, reference, "sparse", batch, False, False, device),
           "train": run(single, reference, "sparse", batch, True, False, device),
           "warmup": run(single, reference, "warmup", batch, True, False, device)}  # fmt: skip
    dense = run(single, reference, "dense", batch, False, False, device)["logits"]
    sensitivity = relative_error(dense, ref["forward"]["logits"])
    needed = SENSITIVITY * TOLERANCE["fp32"]
    rows = [{**row("reference", "fp32", "sensitivity", sensitivity, "sparse vs dense logits (must exceed)", needed),
             "passed": sensitivity > needed}]  # fmt: skip

    # each called with the loop's `name` and `backend` below
    def versus_reference(check: str, mode: str, train: bool):
        return compare(name, "fp32", check, run(single, backend, mode, batch, train, False, device), ref[check])

    def decode(model, dtype: str):
        full = run(model, backend, "sparse", {"input_ids": ids}, False, False, device)["logits"][:, prefix - 1 :]
        return row(name, dtype, "decode", relative_error(decode_logits(model, backend, ids, prefix), full), "logits")

    def finite():
        tensors = run(half, backend, "sparse", batch, False, False, device) | run(base, backend, "sparse", batch, True, True, device)
        return row(name, "bf16", "finite", non_finite(tensors), "non-finite values in logits, losses, gradients", 0)

    for name, backend in backends.items():
        if name != "reference":
            guarded(rows, name, "fp32", lambda: versus_reference("forward", "sparse", False))
            if resolve(backend, device).trains:
                guarded(rows, name, "fp32", lambda: versus_reference("train", "sparse", True))
                guarded(rows, name, "fp32", lambda: versus_reference("warmup", "warmup", True))
        guarded(rows, name, "fp32", lambda: decode(base, "fp32"))
        guarded(rows, name, "bf16", lambda: decode(half, "bf16"))
        guarded(rows, name, "bf16", finite)
    del single, base, half
    free(device)
    return rows


def layer_inputs(plan: Plan, device) -> dict:
    """One attention layer's inputs as a bf16 model produces them under autocast: q, k, v (the model's heads), q_I in
    bf16; k_I (LayerNorm output) and w_I in fp32; and the reference's top-k selection of them (query_pos 0..L-1)."""
    g = torch.Generator().manual_seed(1)
    shapes, sizes, L = plan.shapes, plan.sizes, plan.correctness_length
    Hq, Hkv = shapes["num_attention_heads"], shapes["num_key_value_heads"]
    D, H_I, d_I = shapes["hidden_size"] // Hq, sizes.index_n_heads, sizes.index_head_dim
    x = {"q": torch.randn(1, Hq, L, D, generator=g), "k": torch.randn(1, Hkv, L, D, generator=g),
         "v": torch.randn(1, Hkv, L, D, generator=g), "q_I": torch.randn(1, L, H_I, d_I, generator=g),
         "k_I": torch.randn(1, L, d_I, generator=g), "w_I": torch.randn(1, L, H_I, generator=g) * (H_I * d_I) ** -0.5}  # fmt: skip
    x = {name: t.to(device, torch.bfloat16 if name in ("q", "k", "v", "q_I") else torch.float32) for name, t in x.items()}
    x["query_pos"] = torch.arange(L, device=device)
    x["selected"], x["valid"] = select_topk(x["q_I"], x["k_I"], x["w_I"], x["query_pos"], None, sizes.index_topk)
    return x


def layer_run(backend: Backend, check: str, x: dict, scaling: float, device, autocast: bool) -> dict[str, torch.Tensor]:
    """A backend's pieces on one layer with the shared selection (under bf16 autocast, as in training, if
    `autocast`): the attention output ("forward", no grad), the sparse attention and the sparse-stage indexer KL
    with their gradients ("train"), the warm-up indexer loss with its gradients ("warmup")."""
    inputs = ("q", "k", "v", "q_I", "k_I", "w_I")
    names = inputs if check == "train" else inputs[3:]  # the inputs whose gradients are compared
    leaves = {name: x[name].detach().requires_grad_(check != "forward" and name in names) for name in inputs}
    q, k, v, q_I, k_I, w_I = leaves.values()
    sel, valid, pos = x["selected"], x["valid"], x["query_pos"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        if check == "forward":
            with torch.no_grad():
                return {"out": backend.attend(q, k, v, sel, valid, scaling, backend.workspace())}
        if check == "train":
            out = backend.attend_trainable(q, k, v, sel, valid, scaling, backend.workspace())
            kl = backend.sparse_kl(q.detach(), k.detach(), q_I, k_I, w_I, sel, valid, scaling)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
            loss, result = (out.float() * weights).sum() + kl.mean(), {"out": out.detach(), "kl": kl.detach()}
        else:
            loss = backend.warmup_loss(q, k, q_I, k_I, w_I, pos, None, scaling)
            result = {"loss": loss.detach()}
    grads = torch.autograd.grad(loss, [leaves[name] for name in names])
    return result | {f"grad {name}": grad for name, grad in zip(names, grads)}


def layer_checks(plan: Plan, device, backends: dict) -> list[dict]:
    """bf16: each backend's pieces in bf16 against the reference's in fp32 on the same (bf16-rounded) inputs, on one
    layer with one selection shared by all. (Whole bf16 models cannot be compared: bf16 index scores often tie at
    the k-th place, and backends may break ties differently, attending different keys.)"""
    x = layer_inputs(plan, device)
    x32 = {name: t.float() if t.is_floating_point() else t for name, t in x.items()}
    scaling = x["q"].shape[-1] ** -0.5
    reference = backends["reference"]
    checks = ("forward", "train", "warmup")
    ref = {check: layer_run(reference, check, x32, scaling, device, autocast=False) for check in checks}
    rows = []
    for name, backend in backends.items():
        if name == "reference":
            continue
        instance = resolve(backend, device)
        for check in checks if instance.trains else checks[:1]:
            guarded(rows, name, "bf16", lambda: compare(name, "bf16", check, layer_run(instance, check, x, scaling, device, True),
                                                        ref[check]))  # fmt: skip
    return rows


def correctness_section(plan: Plan, device, extra_backends: dict[str, Backend]) -> dict:
    """Every backend against the reference in fp32 and bf16 (see the module docstring)."""
    backends, skipped = backends_to_check(device, extra_backends)
    rows = model_checks(plan, device, backends) + layer_checks(plan, device, backends)
    return {"length": plan.correctness_length, "topk": plan.sizes.index_topk, "layers": 1, "decode_layers": 2, "checks": rows,
            "skipped": skipped, "passed": all(r["passed"] for r in rows)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# 2. Training steps
# ----------------------------------------------------------------------------------------------------------------


def training_section(plan: Plan, model_path: str | None, device) -> dict:
    """Each train_step.STEP_KINDS step at each length (see the module docstring)."""
    model = training_model(model_path, plan, device)
    steps = [(kind, kind.make_loss(model)) for kind in train_step.STEP_KINDS]
    results = []
    for length in plan.lengths:
        topk = plan.topk or max(1, length // 8)
        dsa.set_topk(model, topk)
        batch = train_step.random_batch(model, length, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0)
        times = {kind.name: [] for kind, _ in steps}
        peaks = {kind.name: [] for kind, _ in steps}
        status = {kind.name: "ok" for kind, _ in steps}
        for repeat in range(1 + plan.repeats):  # one untimed round first
            for kind, loss_fn in steps:
                if status[kind.name] != "ok":
                    continue
                reset_peak(device)
                try:
                    wall, _ = train_step.timed_step(model, kind, loss_fn, batch, optimizer, True, device)
                except Exception as error:  # out of memory is a result; anything else a failure
                    status[kind.name] = failure_status(error)
                    optimizer.zero_grad(set_to_none=True)
                    free(device)
                    continue
                progress(f"training L={length} {kind.name} {'timed' if repeat else 'untimed'} step: {wall:.3f} s")
                if repeat:
                    times[kind.name].append(wall)
                    peaks[kind.name].append(peak_mib(device))
        del optimizer, batch
        free(device)
        results += step_results(length, topk, steps, times, peaks, status)
    config = model.config
    del model, steps
    free(device)
    shapes = "QUICK_SHAPES" if plan.shapes is QUICK_SHAPES else "the Qwen2.5-0.5B config"
    return {"model": model_path or f"random weights, {shapes}", "layers": config.num_hidden_layers, "results": results}


def step_results(length: int, topk: int, steps, times: dict, peaks: dict, status: dict) -> list[dict]:
    """One row per kind: median time, tokens/s = length / median, peak memory, and both as ratios to dense_ft."""
    rows = []
    for kind, _ in steps:
        r = {"length": length, "topk": topk, "kind": kind.name, "status": status[kind.name], "times_s": times[kind.name]}
        if status[kind.name] == "ok":
            median = statistics.median(times[kind.name])
            known = [p for p in peaks[kind.name] if p is not None]
            r |= {"median_s": median, "tokens_per_s": length / median, "peak_memory_mib": max(known) if known else None}
        rows.append(r)
    base = next(r for r in rows if r["kind"] == train_step.BASELINE)
    for r in rows:
        ok = r["status"] == "ok" and base["status"] == "ok"
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
        both = ok and r["peak_memory_mib"] is not None and base["peak_memory_mib"]
        r["peak_memory_ratio"] = r["peak_memory_mib"] / base["peak_memory_mib"] if both else None
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3. Inference latency
# ----------------------------------------------------------------------------------------------------------------


def inference_models(shapes: dict, sizes: dsa.DSAConfig, layers: int, device, dtype) -> tuple[dict, str]:
    """({variant: model}, what became of flash-attention 2), the models sharing random base weights: stock SDPA,
    stock flash-attention 2 (where flash_attn imports, on CUDA), DSA (sparse mode, backend auto)."""
    stock = dense_model(shapes, layers)
    models = {"stock_sdpa": stock}
    fa2 = "needs a CUDA device" if device.type != "cuda" else "flash_attn is not installed"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            models["stock_fa2"] = copy.deepcopy(stock)
            models["stock_fa2"].set_attn_implementation("flash_attention_2")
            fa2 = "measured"
        except Exception as error:
            models.pop("stock_fa2")
            fa2 = f"not usable: {one_line(error)}"
    models["dsa"] = dsa.set_mode(dsa.add_indexers(stock, sizes), "sparse")
    return {name: model.to(device=device, dtype=dtype).eval() for name, model in models.items()}, fa2


def fill_cache(model, variant: str, context: int, extra: int, device, dtype):
    """A cache of `variant` holding `context` random tokens (values do not change the cost): DSA's own cache type
    (from a 1-token forward, so it holds context + 1), StaticCache for stock SDPA, DynamicCache for flash-attention."""
    config = model.config
    g = torch.Generator(device=device).manual_seed(0)
    if variant == "dsa":
        cache = model(torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).cache
    elif variant == "stock_sdpa":
        cache = StaticCache(config=config, max_cache_len=context + extra)
    else:
        cache = DynamicCache(config=config)
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        k, v = (torch.randn(1, config.num_key_value_heads, context, head_dim, generator=g, device=device, dtype=dtype) for _ in range(2))
        layer.update(k, v)
        if hasattr(layer, "update_indexer"):
            layer.update_indexer(torch.randn(1, context, config.index_head_dim, generator=g, device=device, dtype=dtype))
    return cache


@torch.no_grad()
def prefill_times(model, length: int, runs: int, device) -> tuple[list[float], float | None]:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    times = []
    for run_index in range(1 + runs):  # the first untimed
        reset_peak(device)
        t, _ = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), device)  # wall-clock, CPU seconds
        if run_index:
            times.append(t)
    return times, peak_mib(device)


@torch.no_grad()
def decode_times(model, variant: str, context: int, steps: int, device, dtype) -> list[float]:
    warm = 2
    cache = fill_cache(model, variant, context, warm + steps + 1, device, dtype)
    tokens = torch.randint(0, model.config.vocab_size, (warm + steps, 1, 1), generator=torch.Generator().manual_seed(1)).to(device)
    times = [timed(lambda: model(tokens[i], cache=cache, use_cache=True), device)[0] for i in range(warm + steps)]
    return times[warm:]


def inference_section(plan: Plan, model_path: str | None, device) -> dict:
    """Prefill and decode latency, DSA against stock attention (see the module docstring)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = plan.shapes if model_path is None else shapes_of(model_path)
    results = []
    for kind, layers, lengths in (("prefill", plan.prefill_layers, plan.prefill), ("decode", plan.decode_layers, plan.decode)):
        models, fa2 = inference_models(shapes, plan.sizes, layers, device, dtype)
        for length in lengths:
            group = []
            for variant, model in models.items():
                r = {"kind": kind, "length": length, "variant": variant, "layers": layers, "status": "ok"}
                if variant == "dsa":
                    r["topk"] = plan.topk or max(1, length // 8)
                    dsa.set_topk(model, r["topk"])
                try:
                    if kind == "prefill":
                        r["times_s"], r["peak_memory_mib"] = prefill_times(model, length, plan.runs, device)
                    else:
                        r["times_s"] = decode_times(model, variant, length, plan.steps, device, dtype)
                    r["median_s"] = statistics.median(r["times_s"])
                except Exception as error:  # out of memory is a result; anything else a failure
                    r["status"] = failure_status(error)
                progress(f"{kind} L={length} {variant}: " + (f"median {r['median_s']:.4f} s" if r["status"] == "ok" else r["status"]))
                free(device)
                group.append(r)
            *stock, ours = group
            for r in stock:
                both = r["status"] == "ok" and ours["status"] == "ok"
                ours[f"ratio_to_{r['variant']}"] = ours["median_s"] / r["median_s"] if both else None
            results += group
        del models
        free(device)
    return {"dtype": str(dtype).removeprefix("torch."), "flash_attention_2": fa2, "results": results}


def shapes_of(model_path: str) -> dict:
    """The fields of SHAPES from a checkpoint's config (inference runs random weights of these shapes)."""
    config = AutoConfig.from_pretrained(model_path)
    return {k: getattr(config, k) for k in SHAPES if getattr(config, k, None) is not None}


# ----------------------------------------------------------------------------------------------------------------
# 4. accelerate launch with each committed config
# ----------------------------------------------------------------------------------------------------------------


def launch_skip_reason(config: Path, device) -> str | None:
    """Why `config` cannot run on this device type (None: it can)."""
    from accelerate.commands.config.config_args import load_config_from_file

    kind = str(load_config_from_file(str(config)).distributed_type.value)
    if kind == "DEEPSPEED":
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed (pip install deepspeed)"
        if device.type != "cuda":
            return "DeepSpeed runs on GPUs only"
    if kind == "FSDP" and device.type != "cuda":
        return "accelerate runs FSDP on accelerators only"
    return None


def launch_base(model_path: str | None, plan: Plan, out: Path) -> Path:
    """The model the launches warm up: --model, else random weights (Qwen2.5-0.5B's config, or QUICK_SHAPES with
    --quick) saved in bf16 with the tiny preset's tokenizer (trained on the bundled samples)."""
    if model_path is not None:
        return Path(model_path)
    path = out / "launch" / "base"
    if not (path / "config.json").is_file():
        from dsa.tiny import build_tokenizer

        tokenizer = build_tokenizer([Path(p) for p in TINY_DATA.split(",")], vocab_size=min(2048, plan.shapes["vocab_size"]))
        model = dense_model(plan.shapes, plan.layers).to(torch.bfloat16)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_one(config: Path, base: Path, plan: Plan, out: Path, device, timeout: int) -> dict:
    """Two warm-up steps through `accelerate launch --config_file config`, then the reload check."""
    processes = torch.cuda.device_count() if device.type == "cuda" else 2
    target = out / "launch" / config.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    base_config = AutoConfig.from_pretrained(base)
    sizes = [getattr(base_config, f, None) or getattr(plan.sizes, f) for f in ("index_n_heads", "index_head_dim", "index_rope_dim")]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), str(REPO / "warmup_train.py"), "--model", str(base), "--data", TINY_DATA,
               "--output-dir", str(target), "--max-steps", "2", "--seq-len", str(plan.launch_length), "--batch-size", "1",
               "--grad-accum", "1", "--topk", str(plan.topk or plan.launch_length // 8), "--save-every", "2",
               "--index-n-heads", str(sizes[0]), "--index-head-dim", str(sizes[1]), "--index-rope-dim", str(sizes[2])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if device.type == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"  # DDP over gloo with CPU processes (what `accelerate launch --cpu` sets)
    log = target.with_suffix(".log")  # the launch's stdout and stderr
    result = {"config": str(config.relative_to(REPO)), "processes": processes, "log": str(log),
              "command": "accelerate launch " + " ".join(command[3:])}  # fmt: skip
    start = time.perf_counter()
    with open(log, "w") as output:
        try:
            done = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**result, "status": f"failed: timeout after {timeout} s (see {log.name})"}
    result["seconds"] = time.perf_counter() - start
    if done.returncode != 0:
        errors = [line for line in log.read_text().splitlines() if "Error:" in line or line.startswith("error: ")] or ["no error line"]
        return {**result, "status": f"failed (exit {done.returncode}, see {log.name}): {errors[0].strip()[:300]}"}
    return {**result, **reload_check(base, target)}


def reload_check(base: Path, target: Path) -> dict:
    """The saved model reloads with AutoModelForCausalLM, has indexers, and its base weights equal the input's
    (within bf16 rounding: ZeRO-3 saves 16-bit weights)."""
    try:
        saved = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).state_dict()
        original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    except Exception as error:
        return {"status": f"failed: the saved model does not reload ({one_line(error)})", "reloads": False}
    if not any(".indexer." in name for name in saved):
        return {"status": "failed: the saved model has no indexer weights", "reloads": True}
    changed = [name for name, w in original.items() if name in saved and not torch.allclose(saved[name], w, rtol=2**-8, atol=0)]
    if changed:
        return {"status": f"failed: the frozen base weights changed ({changed[0]})", "reloads": True}
    return {"status": "ok", "reloads": True, "checkpoint": (target / "checkpoints" / "step-2").is_dir()}


def launch_section(plan: Plan, model_path: str | None, out: Path, device, timeout: int) -> dict:
    configs = sorted(CONFIGS.glob("*.yaml"))
    base = None
    results = []
    for config in configs:
        reason = launch_skip_reason(config, device)
        if reason:
            results.append({"config": str(config.relative_to(REPO)), "status": f"skipped: {reason}"})
            continue
        base = base or launch_base(model_path, plan, out)
        results.append(launch_one(config, base, plan, out, device, timeout))
    return {"results": results}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def device_name(device) -> str:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(device)}" + (f" (x{count})" if count > 1 else "")
    return train_step.device_name(device)


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "accelerate", "triton", "flash_attn", "deepspeed"):
        with contextlib.suppress(Exception):
            if importlib.util.find_spec(name) is not None:
                found[name] = __import__(name).__version__
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
    return found


def failures(report: dict) -> list[str]:
    """What makes the exit status 1: failed correctness checks, steps that raised (not out of memory), failed launches."""
    found = [f"correctness: {r['backend']} {r['dtype']} {r['check']}: error {r['error']:.3g}, tolerance {r['tolerance']:.0e} ({r['worst']})"
             for r in report.get("correctness", {}).get("checks", []) if not r["passed"]]  # fmt: skip
    for section in ("training", "inference"):
        found += [f"{section}: {r['kind']} {r.get('variant', '')} at {r['length']}: {r['status']}"
                  for r in report.get(section, {}).get("results", []) if r["status"].startswith("error")]  # fmt: skip
    found += [f"launch: {r['config']}: {r['status']}" for r in report.get("launch", {}).get("results", []) if r["status"].startswith("failed")]
    return found


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def markdown(report: dict) -> str:
    """The report as markdown: a header (device, versions, verdict, failures), then one table per section."""
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    lines = [f"# gpu_check: {report['device']}", "", f"{report['started']}, commit {report['commit']}, {versions}",
             f"`{report['command']}`" + (" (--quick: tiny shapes)" if report["quick"] else ""), "",
             f"**{'PASSED' if report['passed'] else 'FAILED'}**", *(f"- {f}" for f in report["failures"]), ""]  # fmt: skip
    if "correctness" in report:
        c = report["correctness"]
        lines += [f"## Correctness: each backend against `reference` ({c['layers']} layers, decode {c.get('decode_layers', c['layers'])}; L = {c['length']}, k = {c['topk']})", "",
                  "Relative L2 error of the worst tensor (sensitivity: the reference's sparse vs dense logits, must exceed).", ""]  # fmt: skip
        lines += table(["backend", "dtype", "check", "error", "tolerance", "worst tensor", "pass"],
                       [[r["backend"], r["dtype"], r["check"], f"{r['error']:.2e}", f"{r['tolerance']:.0e}", r["worst"],
                         "yes" if r["passed"] else "**NO**"] for r in c["checks"]]
                       + [[s["backend"], "", "", "", "", s["status"], ""] for s in c["skipped"]])  # fmt: skip
    if "training" in report:
        t = report["training"]
        lines += [f"## Training step ({t['model']}, {t['layers']} layers, bf16 autocast, batch 1)", ""]
        lines += table(["L", "k", "kind", "median s", "tokens/s", "vs dense_ft", "peak MiB", "vs dense_ft", "status"],
                       [[r["length"], r["topk"], r["kind"], fmt(r.get("median_s"), ".4f"), fmt(r.get("tokens_per_s"), ".0f"),
                         fmt(r["tokens_per_s_ratio"], ".2f"), fmt(r.get("peak_memory_mib"), ".0f"), fmt(r["peak_memory_ratio"], ".2f"),
                         r["status"]] for r in t["results"]])  # fmt: skip
    if "inference" in report:
        i = report["inference"]
        lines += [f"## Inference latency ({i['dtype']}, batch 1; flash-attention 2: {i['flash_attention_2']})", ""]
        lines += table(["kind", "length", "variant", "layers", "median ms", "DSA / SDPA", "DSA / FA2", "peak MiB", "status"],
                       [[r["kind"], r["length"], r["variant"], r["layers"], fmt(r.get("median_s") and 1e3 * r["median_s"], ".2f"),
                         fmt(r.get("ratio_to_stock_sdpa"), ".2f"), fmt(r.get("ratio_to_stock_fa2"), ".2f"),
                         fmt(r.get("peak_memory_mib"), ".0f"), r["status"]] for r in i["results"]])  # fmt: skip
    if "launch" in report:
        lines += ["## accelerate launch: warmup_train.py, 2 steps, with each config", ""]
        lines += table(["config", "processes", "seconds", "reloads", "status"],
                       [[r["config"], r.get("processes", ""), fmt(r.get("seconds"), ".0f"), r.get("reloads", ""), r["status"]]
                        for r in report["launch"]["results"]])  # fmt: skip
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md under `out`, atomically (a partial run leaves valid files)."""
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=vars) + "\n"), ("gpu_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def integers(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: comma-separated integers expected, got {text!r}") from None
    if not values or min(values) < 2:
        raise UsageError(f"{flag}: lengths of at least 2 expected, got {text!r}")
    return values


def make_plan(args) -> Plan:
    """The sizes of this run: --quick's or the full ones, then the flags given."""
    quick = args.quick
    plan = Plan(
        shapes=QUICK_SHAPES if quick else SHAPES,
        layers=2 if quick else 24,
        sizes=QUICK_DSA if quick else DSA_SHAPES,
        correctness_length=128 if quick else 4096,
        decode_tokens=4 if quick else 8,
        lengths=[64, 128] if quick else [4096, 16384, 32768],
        prefill=[64, 128] if quick else [8192, 16384, 32768, 65536, 131072],
        decode=[64, 128] if quick else [8192, 16384, 32768, 65536, 131072],
        prefill_layers=2,
        decode_layers=2 if quick else 24,
        repeats=1 if quick else 2,
        runs=2 if quick else 3,
        steps=4 if quick else 10,
        launch_length=128 if quick else 4096,
        topk=None if quick else DSA_SHAPES.index_topk,
    )
    for name in ("lengths", "prefill", "decode"):
        if getattr(args, name) is not None:
            setattr(plan, name, integers(f"--{name}", getattr(args, name)))
    for name in ("repeats", "runs", "steps", "prefill_layers", "decode_layers", "topk"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(plan, name, value)
    if args.launch_timeout < 1:
        raise UsageError(f"--launch-timeout must be >= 1, got {args.launch_timeout}")
    k = plan.topk or plan.correctness_length // 8
    plan.sizes = dsa.DSAConfig(plan.sizes.index_n_heads, plan.sizes.index_head_dim, plan.sizes.index_rope_dim, k)
    return plan


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if present, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the same code paths in about a minute")
    parser.add_argument("--model", help="a Qwen2 or DSA checkpoint directory for the training and launch sections")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--lengths", help="training lengths, comma-separated (default 4096,16384,32768)")
    parser.add_argument("--prefill", help="prefill lengths (default 8192,...,131072)")
    parser.add_argument("--decode", help="decode contexts (default 8192,...,131072)")
    parser.add_argument("--prefill-layers", type=int, help="decoder layers of the prefill models (default 2)")
    parser.add_argument("--decode-layers", type=int, help="decoder layers of the decode models (default 24)")
    parser.add_argument("--repeats", type=int, help="timed training steps per kind and length (default 2)")
    parser.add_argument("--runs", type=int, help="timed prefills per variant and length (default 3)")
    parser.add_argument("--steps", type=int, help="timed decode steps per variant and context (default 10)")
    parser.add_argument("--topk", type=int, help="k (default 512; --quick: length / 8)")
    parser.add_argument("--launch-timeout", type=int, default=600, help="seconds per accelerate launch")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None, extra_backends: dict[str, Backend] | None = None) -> int:
    """Run the checks; returns the exit status (0 passed, 1 a check failed, 2 bad input). extra_backends: more
    backends to check against the reference, by name (tests inject a broken one)."""
    args = parse(argv)
    try:
        plan = make_plan(args)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible to torch")
        if args.model is not None and not (Path(args.model) / "config.json").is_file():
            raise UsageError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["uv run python bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device_name(device),
        "device_type": device.type,
        "quick": args.quick,
        "versions": versions(),
        "backends": dsa.available_backends(),
        "commit": train_step.commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sections": args.sections,
        "plan": plan,  # the sizes of this run (written by vars)
    }
    sections = {
        "correctness": lambda: correctness_section(plan, device, extra_backends or {}),
        "training": lambda: training_section(plan, args.model, device),
        "inference": lambda: inference_section(plan, args.model, device),
        "launch": lambda: launch_section(plan, args.model, args.out, device, args.launch_timeout),
    }
    for name in args.sections:
        start = time.perf_counter()
        progress(f"{name} ...")
        report[name] = sections[name]()
        report[name]["seconds"] = time.perf_counter() - start
        write(report, args.out)
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
