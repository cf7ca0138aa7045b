"""The time of one training step of each stage, against a dense fine-tuning step of the same model and length.

    uv run python bench/train_step.py --out /tmp/train_step.json                      # the tiny model, offline
    OMP_NUM_THREADS=1 uv run python bench/train_step.py --model /root/.cache/dsa-cpu-qwen/hf-fp32 \\
        --lengths 1024 --bf16 --out bench/results/intel_xeon_amx/train_step/after.json

One step = forward + backward + gradient-norm clipping (to 1) + AdamW step + zero_grad on one sequence of L random
tokens (batch 1): what dsa.train_utils.run_training does per optimizer step with --grad-accum 1. Step kinds
(`STEP_KINDS`; one more kind is one more entry):

  dense_ft  the plain Qwen2 model (DSA mode "dense": the stock attention, the indexers unused), every base
            parameter trained on the LM loss (every token a label)
  warmup    warmup_train.warmup_loss: DSA mode "warmup", base frozen, only the indexers train on their KL
  sparse    train.sparse_loss (train.py --loss lm): DSA mode "sparse", the base on the LM loss, the indexers on their KL
  distill   train.distill_loss (train.py --loss distill, T = 1): as sparse, the base on the KL to a frozen dense copy
            of the model (the teacher, one forward without grad) instead of the LM loss

All kinds run on one model in one process, taking turns repeat by repeat (the machine's drift over minutes hits
them alike), with one AdamW over every parameter (a step updates only the parameters that got a gradient, as the
stage's own optimizer would). --model: a dense Qwen2 checkpoint (indexers added, random: timing does not depend
on their weights; sizes --index-n-heads/--index-head-dim/--index-rope-dim) or a DSA checkpoint (its indexers);
default the tiny preset's model shape (dsa.tiny, random weights, 2048-token vocabulary), so it runs offline.
--layers N keeps only the first N decoder layers (a long length of a big model may not fit in memory otherwise).
k: --topk, default L / 8 at each length. --bf16: bf16 autocast around the forward, as accelerate's --bf16.

Per length and kind: the wall-clock times of --repeats steps after --warmup-runs untimed ones, their median and
interquartile range, CPU time, and ratio_to_dense_ft = median / the dense_ft median of the same length and run.
--profile: instead, one step of each kind after --warmup-runs, under torch.profiler: the operators by CPU self time
(as bench/profile_prefill.py), printed; no JSON.
--count-ops: instead of times, the aten operators one step of each kind dispatches (after --warmup-runs), into the
JSON as `operators`. On a GPU each is at least one kernel launch, so this counts on any machine what a GPU step pays
in launches. --work-sizes DEVICE: the --backend's work sizes of that device type (dsa.backends.DEVICE_SIZES), e.g.
`--count-ops --work-sizes cuda --backend torch` on a CPU counts a GPU step's operators (but for the CPU-only key
tiles of the index scores, which a GPU computes in one tile).
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: dsa, train.py, warmup_train.py
import dsa  # noqa: E402
import train  # noqa: E402
import warmup_train  # noqa: E402
from dsa import tiny  # noqa: E402
from dsa.backends import BACKENDS, DEVICE_SIZES, named_backend  # noqa: E402


def lm_loss(model, batch):
    """The dense fine-tuning loss: mean next-token cross-entropy."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    return out.loss, {}


def distill_loss(model):
    """train.py's loss_fn for --loss distill (temperature 1), its teacher a frozen dense-mode copy of `model`."""
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    dsa.set_mode(teacher, "dense")
    args = argparse.Namespace(loss="distill", lm_weight=1.0, distill_weight=1.0, distill_temperature=1.0)
    return partial(train.distill_loss, teacher=teacher, args=args, autocast=contextlib.nullcontext)


@dataclass(frozen=True)
class StepKind:
    name: str
    mode: str  # dsa.set_mode
    trains: str  # "base", "indexer" or "all": the parameters that get a gradient
    make_loss: Callable  # model -> loss_fn(model, batch) -> (loss, metrics), as run_training takes it


STEP_KINDS = [
    StepKind("dense_ft", "dense", "base", lambda model: lm_loss),
    StepKind("warmup", "warmup", "indexer", lambda model: warmup_train.warmup_loss),
    StepKind("sparse", "sparse", "all", lambda model: train.sparse_loss),
    StepKind("distill", "sparse", "all", distill_loss),
]
BASELINE = "dense_ft"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return f"CPU {model}, {os.cpu_count()} cores"


def load(path: str | None, dsa_config: dsa.DSAConfig, layers: int | None = None) -> torch.nn.Module:
    """A DSA model in fp32: the tiny preset's shape with random weights (path None), a DSA checkpoint as it is, or a
    dense Qwen2 checkpoint with fresh indexers; only its first `layers` decoder layers if given."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, **tiny.TINY_MODEL) if path is None else AutoConfig.from_pretrained(path)
    if layers:
        config.num_hidden_layers, config.layer_types = layers, config.layer_types[:layers]
    if path is None:
        dense = Qwen2ForCausalLM(config)
    elif isinstance(config, dsa.DSAModelConfig):
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    else:
        dense = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return dsa.add_indexers(dense, dsa_config)


def configure(model, kind: StepKind) -> None:
    """The mode and trainable parameters of `kind`."""
    dsa.set_mode(model, kind.mode)
    for name, p in model.named_parameters():
        is_indexer = ".indexer." in name
        p.requires_grad_(kind.trains == "all" or (kind.trains == "indexer") == is_indexer)


def commit() -> str | None:
    """The repository's short commit hash, or None where there is no git or no repository (a copied tree)."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return None
    return found.stdout.strip() or None


def peak_rss_mib() -> float | None:
    """The resident-set high-water mark of this process (Linux), MiB."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), None)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(model, kind: StepKind, loss_fn, batch: dict, optimizer, bf16: bool, device) -> tuple[float, float]:
    """(wall-clock s, CPU s) of one optimizer step of `kind`."""
    configure(model, kind)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(timings: list[tuple[float, float]]) -> dict:
    wall, cpu = [t for t, _ in timings], [c for _, c in timings]
    q1, _, q3 = statistics.quantiles(wall, n=4, method="inclusive") if len(wall) > 1 else (wall[0],) * 3
    return {"times_s": wall, "median_s": statistics.median(wall), "iqr_s": [q1, q3], "cpu_s": cpu, "median_cpu_s": statistics.median(cpu)}


def random_batch(model, length: int, device) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    return {"input_ids": ids, "labels": ids}


def measure(model, steps: list, length: int, topk: int, repeats: int, warmup_runs: int, bf16: bool, device) -> list[dict]:
    """Each step kind at `length` (steps: (StepKind, loss_fn) pairs), the kinds taking turns: --warmup-runs untimed
    rounds, then --repeats timed."""
    dsa.set_topk(model, topk)
    batch = random_batch(model, length, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0)
    timings = {kind.name: [] for kind, _ in steps}
    for repeat in range(warmup_runs + repeats):
        for kind, loss_fn in steps:
            timing = timed_step(model, kind, loss_fn, batch, optimizer, bf16, device)
            if repeat >= warmup_runs:
                timings[kind.name].append(timing)
    del optimizer
    results = [{"length": length, "topk": topk, "kind": kind.name, "mode": kind.mode, "trains": kind.trains, **summary(timings[kind.name])}
               for kind, _ in steps]  # fmt: skip
    baseline = next((r["median_s"] for r in results if r["kind"] == BASELINE), None)
    for r in results:
        r["ratio_to_dense_ft"] = r["median_s"] / baseline if baseline else None
    return results


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(model, steps: list, length: int, topk: int, warmup_runs: int, bf16: bool, device) -> list[dict]:
    """The aten operators of one step of each kind, after --warmup-runs untimed ones."""
    dsa.set_topk(model, topk)
    batch = random_batch(model, length, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0)
    results = []
    for kind, loss_fn in steps:
        for _ in range(warmup_runs):
            timed_step(model, kind, loss_fn, batch, optimizer, bf16, device)
        with OperatorCount() as counter:
            timed_step(model, kind, loss_fn, batch, optimizer, bf16, device)
        results.append({"length": length, "topk": topk, "kind": kind.name, "mode": kind.mode, "trains": kind.trains,
                        "operators": counter.count})  # fmt: skip
    return results


def profile(model, steps: list, length: int, topk: int, warmup_runs: int, bf16: bool, device, rows: int) -> None:
    """Print the operators of one step of each kind by CPU self time."""
    dsa.set_topk(model, topk)
    batch = random_batch(model, length, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0)
    for kind, loss_fn in steps:
        for _ in range(warmup_runs):
            timed_step(model, kind, loss_fn, batch, optimizer, bf16, device)
        with torch.profiler.profile() as prof:
            wall, _ = timed_step(model, kind, loss_fn, batch, optimizer, bf16, device)
        print(f"--- {kind.name} at {length} tokens: {wall:.3f} s under the profiler")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    names = [kind.name for kind in STEP_KINDS]
    parser.add_argument("--out", type=Path, help="the JSON file to write (required unless --profile)")
    parser.add_argument("--model", help="a Qwen2 or DSA checkpoint directory (default: the tiny preset's shape, random)")
    parser.add_argument("--lengths", type=ints, default=ints("1024,4096"), help="tokens per sequence, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per kind and length")
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed steps per kind and length first")
    parser.add_argument("--topk", type=int, help="k (default: each length / 8)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward (as --bf16 in training)")
    parser.add_argument("--kinds", type=lambda text: text.split(","), default=names, help=f"step kinds: {','.join(names)}")
    parser.add_argument("--backend", default="auto", help="the DSA backend (dsa.available_backends())")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers (to fit long lengths in memory)")
    parser.add_argument("--profile", type=int, metavar="ROWS", help="print the top ROWS operators of one step per kind instead")
    parser.add_argument("--count-ops", action="store_true", help="count the operators of one step per kind instead of timing")
    parser.add_argument("--work-sizes", choices=sorted({"cpu", *DEVICE_SIZES}), help="the --backend's work sizes of this device type")
    parser.add_argument("--index-n-heads", type=int, help="indexer heads for a dense --model (default 4; tiny: 2)")
    parser.add_argument("--index-head-dim", type=int, help="indexer head size (default 64; tiny: 32)")
    parser.add_argument("--index-rope-dim", type=int, help="indexer RoPE features (default 32; tiny: 16)")
    args = parser.parse_args(argv)
    if not set(args.kinds) <= set(names):
        parser.error(f"--kinds: unknown kind(s) {sorted(set(args.kinds) - set(names))}; choose from {','.join(names)}")
    if args.out is None and not args.profile:
        parser.error("--out FILE is required")
    if args.work_sizes and args.backend not in BACKENDS:
        parser.error(f"--work-sizes needs a named --backend ({', '.join(BACKENDS)}), got {args.backend!r}")
    if args.repeats < 1 or args.warmup_runs < 0 or not args.lengths or min(args.lengths) < 2:
        parser.error("--repeats must be >= 1, --warmup-runs >= 0, --lengths >= 2 each")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dsa.DSAConfig(2, 32, 16, 64) if args.model is None else dsa.DSAConfig(4, 64, 32, 512)
    sizes = dsa.DSAConfig(args.index_n_heads or sizes.index_n_heads, args.index_head_dim or sizes.index_head_dim,
                          args.index_rope_dim or sizes.index_rope_dim, sizes.index_topk)  # fmt: skip
    model = load(args.model, sizes, args.layers).to(device).train()
    dsa.set_backend(model, named_backend(args.backend, args.work_sizes) if args.work_sizes else args.backend)
    steps = [(kind, kind.make_loss(model)) for kind in STEP_KINDS if kind.name in args.kinds]
    if args.profile:
        for length in args.lengths:
            profile(model, steps, length, args.topk or max(1, length // 8), args.warmup_runs, args.bf16, device, args.profile)
        return {}
    config = model.config
    report = {
        "command": " ".join(["uv run python", *(sys.argv if argv is None else [__file__, *argv])]),
        "device": device_name(device),
        "threads": args.threads,
        "bf16": args.bf16,
        "backend": args.backend,
        "work_sizes": args.work_sizes or device.type,
        "model": args.model or "tiny (dsa.tiny.TINY_MODEL, random weights, vocab 2048)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "shapes": {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
                   "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size, "index_n_heads": config.index_n_heads,
                   "index_head_dim": config.index_head_dim, "index_rope_dim": config.index_rope_dim},  # k: per result
        "repeats": None if args.count_ops else args.repeats,
        "warmup_runs": args.warmup_runs,
        "torch": torch.__version__,
        "commit": commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        topk = args.topk or max(1, length // 8)
        if args.count_ops:
            results = count_operators(model, steps, length, topk, args.warmup_runs, args.bf16, device)
            print("\n".join(f"{r['length']:6} {r['kind']:9} {r['operators']:8} operators" for r in results), flush=True)
        else:
            results = measure(model, steps, length, topk, args.repeats, args.warmup_runs, args.bf16, device)
        report["results"] += results
        report["peak_rss_mib"] = peak_rss_mib()  # of the whole run so far
        for r in results if not args.count_ops else []:
            ratio = f"{r['ratio_to_dense_ft']:.2f}x" if r["ratio_to_dense_ft"] is not None else "-"
            print(f"{r['length']:6} {r['kind']:9} median {r['median_s']:8.3f} s  IQR {r['iqr_s'][0]:.3f}-{r['iqr_s'][1]:.3f}  {ratio} of {BASELINE}", flush=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.out)  # atomic: a partial run leaves a valid file
    return report


if __name__ == "__main__":
    main()
