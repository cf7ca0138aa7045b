"""Speed and memory of DSA against stock Qwen2 (SDPA) and a mask-based DSA, at Qwen2.5-0.5B shapes.

    uv run python bench/dsa_bench.py --out /tmp/bench/all.json                     # everything (long)
    uv run python bench/dsa_bench.py --out /tmp/b.json --kinds prefill,decode --prefill 2048 --decode 4096 --runs 1
    uv run python bench/dsa_bench.py --out /tmp/p.json --kinds prefill --prefill 16384 --runs 1 --rounds 3

Every figure (one variant at one length) is measured in fresh processes (--rounds of them, each timing
--runs runs; the figure is the median over all runs), with the baselines in the same invocation: the
variants of one length run back to back, taking turns round by round, so that the machine's drift over
minutes (10-20% on a shared CPU) hits them alike. Models have random weights
(timing does not depend on them) with the attention shapes of Qwen2.5-0.5B: hidden 896, 14 query heads,
2 KV heads, head_dim 64, MLP 4864, vocab 151936, tied embeddings; DSA indexer 4 heads x 64, RoPE on 32
features, k = 512. No grad unless stated.

  prefill   model(ids, use_cache=True, logits_to_keep=1) on L tokens, as generate() prefills, with
            --prefill-layers layers. Latency: median of --runs runs after a 256-token warm-up. Peak
            memory: the high-water mark of one run above the memory just before it. GPU:
            torch.cuda.max_memory_allocated. CPU: the resident set (/proc/self/status VmHWM after
            resetting it with /proc/self/clear_refs), in a separate process whose glibc maps every
            block of >= 1 MiB on its own and unmaps it when freed (MEMORY_ENV), so the peak counts the
            live tensors, not whatever the heap kept from earlier ones (with glibc's defaults the same
            run's peak varies by up to 2x from process to process; that run's speed is not reported,
            as the extra page faults slow it).
            "prefill-attention" is the same with the MLP and vocabulary shrunk to almost nothing
            (intermediate 64, vocab 1024): what the attention blocks cost, without the MLP floor.
  decode    per-token latency of model(next_token, cache=...) at context S, with --decode-layers
            layers (default 24, the whole model), for --decode-batch sequences at once (default 1; a
            step then makes one token for each). The cache is filled with S random tokens (a real
            prefill at 64K would take hours here; values do not change the cost); then --warm steps,
            and the median of --steps timed steps, cache appends included. Caches: DSA the one its
            generate() uses (dsa_cache), stock transformers' StaticCache (its fastest) and DynamicCache
            (its default). "decode-attention" is the same with the MLP and vocabulary shrunk to almost
            nothing (intermediate 64, vocab 1024): the attention blocks and their caches alone.
  train     one warm-up-stage training step at --train-length (indexers trainable, base frozen, the
            call warmup_train.py makes, AdamW step), after one step at 256 tokens; peak as above (on
            CPU: from a second process, with MEMORY_ENV).

Variants: "stock" (Qwen2ForCausalLM, SDPA), "dsa" (Qwen2DSAForCausalLM, sparse mode, on --backend),
"mask" (bench/strawman.py: dense logits + -inf mask; only up to --mask-max tokens, its B*Hq*L*L logits
alone would need 14 * 4 * L^2 bytes: 15 GB at 16K). --variants runs only some of them.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: dsa, bench
import dsa  # noqa: E402
from bench.strawman import MaskedDenseBackend  # noqa: E402
from dsa.config import dsa_config_from  # noqa: E402
from dsa.modeling import dsa_cache  # noqa: E402

SHAPES = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)
ATTENTION_ONLY = dict(intermediate_size=64, vocab_size=1024)  # "decode-attention": MLP and vocabulary ~ nothing
KINDS = ("prefill", "prefill-attention", "decode", "decode-attention", "train")
VARIANTS = ("stock", "dsa", "mask")
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # glibc: blocks >= 1 MiB mmapped, returned when freed
DSA_SHAPES = dsa.DSAConfig(index_n_heads=4, index_head_dim=64, index_rope_dim=32, index_topk=512)


# ----------------------------------------------------------------------------------------------------------
# One figure (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def build_model(variant: str, layers: int, device, dtype, backend: str = "auto", **overrides):
    """A random-weight model of `variant`; DSA runs on `backend` (the mask-based strawman on its own backend)."""
    torch.manual_seed(0)
    config = Qwen2Config(**{**SHAPES, **overrides}, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    if variant == "stock":
        model = Qwen2ForCausalLM(config)
    else:
        model = dsa.Qwen2DSAForCausalLM(dsa_config_from(config, dsa.Qwen2DSAConfig, DSA_SHAPES))
        dsa.set_backend(model, MaskedDenseBackend() if variant == "mask" else backend)
        dsa.backends.resolve(backend, device)  # build "auto"'s kernels now, not inside a timed run
    return model.to(device=device, dtype=dtype).eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the starting point, in MiB, of the code inside `with`."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = proc_status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return self

    def __exit__(self, *exc):
        sync(self.device)
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else proc_status("VmHWM")
        self.mib = (peak - self.start) / 2**20


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def timed(fn, device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of fn()."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(timings: list[tuple[float, float]], **extra) -> dict:
    wall, cpu = zip(*timings)
    return {"times_s": wall, "median_s": statistics.median(wall), "cpu_s": cpu, "median_cpu_s": statistics.median(cpu), **extra}


@torch.no_grad()
def prefill_figure(variant: str, length: int, layers: int, runs: int, attention_only: bool, backend: str) -> dict:
    device, dtype = device_and_dtype()
    model = build_model(variant, layers, device, dtype, backend, **(ATTENTION_ONLY if attention_only else {}))
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    model(ids[:, :256], use_cache=True, logits_to_keep=1)  # warm-up
    times, peaks = [], []
    for _ in range(runs):
        with PeakMemory(device) as peak:
            times.append(timed(lambda: model(ids, use_cache=True, logits_to_keep=1), device))
        peaks.append(peak.mib)
    return summary(times, peak_mib=peaks[0])


def make_cache(cache_kind: str, model, max_len: int):
    if cache_kind == "dsa":
        return dsa_cache(model.config)
    if cache_kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


@torch.no_grad()
def decode_figure(variant: str, cache_kind: str, context: int, layers: int, warm: int, steps: int, attention_only: bool, batch: int, backend: str) -> dict:
    device, dtype = device_and_dtype()
    model = build_model(variant, layers, device, dtype, backend, **(ATTENTION_ONLY if attention_only else {}))
    config = model.config
    cache = make_cache(cache_kind, model, context + warm + steps)
    g = torch.Generator(device=device).manual_seed(0)
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in cache.layers:  # context tokens of random keys/values (and indexer keys)
        kv = [torch.randn(batch, config.num_key_value_heads, context, head_dim, generator=g, device=device, dtype=dtype) for _ in range(2)]
        layer.update(*kv)
        if hasattr(layer, "update_indexer"):
            layer.update_indexer(torch.randn(batch, context, config.index_head_dim, generator=g, device=device, dtype=dtype))
    del kv
    tokens = torch.randint(0, config.vocab_size, (warm + steps, batch, 1), generator=torch.Generator().manual_seed(1)).to(device)
    times = [timed(lambda: model(tokens[i], cache=cache, use_cache=True), device) for i in range(warm + steps)]
    assert cache.get_seq_length() == context + warm + steps
    return summary(times[warm:])


def train_figure(length: int, layers: int, backend: str) -> dict:
    """One warm-up-stage step (warmup_train.py): only the indexers train, on the indexer KL."""
    device, dtype = device_and_dtype()
    model = build_model("dsa", layers, device, dtype, backend)
    model.requires_grad_(False)
    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    for p in indexer:
        p.requires_grad_(True)
    dsa.set_mode(model, "warmup")
    model.train()
    optimizer = torch.optim.AdamW(indexer, lr=1e-3)

    def step(ids):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        out.indexer_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ids = torch.randint(0, SHAPES["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    step(ids[:, :256])  # warm-up, and the optimizer state
    with PeakMemory(device) as peak:
        timing = timed(lambda: step(ids), device)
    return summary([timing], peak_mib=peak.mib)


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind in ("prefill", "prefill-attention"):
        return prefill_figure(spec["variant"], spec["length"], spec["layers"], spec["runs"], kind == "prefill-attention", spec["backend"])
    if kind in ("decode", "decode-attention"):
        return decode_figure(
            spec["variant"], spec["cache"], spec["length"], spec["layers"], spec["warm"], spec["steps"], kind == "decode-attention", spec["batch"], spec["backend"]
        )
    if kind == "train":
        return train_figure(spec["length"], spec["layers"], spec["backend"])
    raise ValueError(f"unknown figure kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# The suite (parent process): one subprocess per figure
# ----------------------------------------------------------------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (bf16)"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"CPU {model}, {os.cpu_count()} cores (fp32)"


def figures(args) -> list[dict]:
    specs = []
    for kind in ("prefill", "prefill-attention"):
        for length in args.prefill:
            for variant in ("stock", "dsa", "mask"):
                if variant == "mask" and length > args.mask_max:
                    continue
                specs.append(dict(kind=kind, variant=variant, length=length, layers=args.prefill_layers, runs=args.runs))
    for kind in ("decode", "decode-attention"):
        for length in args.decode:
            for variant, cache in (("stock", "static"), ("stock", "dynamic"), ("dsa", "dsa"), ("mask", "dsa")):
                specs.append(
                    dict(kind=kind, variant=variant, cache=cache, length=length, layers=args.decode_layers, warm=args.warm, steps=args.steps, batch=args.decode_batch)
                )
    if args.train_length:
        specs.append(dict(kind="train", variant="dsa", length=args.train_length, layers=args.prefill_layers))
    return [{**spec, "threads": args.threads, "backend": args.backend} for spec in specs if spec["kind"] in (args.kinds or KINDS) and spec["variant"] in args.variants]


def figure_groups(specs: list[dict]) -> list[list[dict]]:
    """Consecutive figures of the same kind and length (the variants compared with each other)."""
    groups = []
    for spec in specs:
        if groups and (groups[-1][0]["kind"], groups[-1][0]["length"]) == (spec["kind"], spec["length"]):
            groups[-1].append(spec)
        else:
            groups.append([spec])
    return groups


def merge_rounds(rounds: list[dict]) -> dict:
    """One figure from its rounds (processes): every run's times, the median over all of them, and each
    round's median CPU time. The first failed round, if any, stands for the figure."""
    failed = [r for r in rounds if r["status"] != "ok"]
    if failed:
        return failed[0]
    wall = [t for r in rounds for t in r["times_s"]]
    cpu = [t for r in rounds for t in r["cpu_s"]]
    merged = {**rounds[0], **summary(list(zip(wall, cpu)))}
    return {**merged, "rounds": len(rounds), "round_median_cpu_s": [r["median_cpu_s"] for r in rounds]}


def run_in_subprocess(spec: dict, timeout: int, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"timeout after {timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "status": f"failed (exit {done.returncode}): {last[:300]}"}
    return {**spec, **json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--out", type=Path, help="the JSON file to write (atomically, after each figure); required")
    parser.add_argument("--backend", default="auto", help="the DSA backend of the dsa variant (dsa.available_backends())")
    parser.add_argument("--prefill", type=ints, default=ints("2048,4096,8192,16384,32768"))
    parser.add_argument("--decode", type=ints, default=ints("4096,8192,16384,32768,65536"))
    parser.add_argument("--prefill-layers", type=int, default=2)
    parser.add_argument("--decode-layers", type=int, default=24)
    parser.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together (a step makes one token for each)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=1, help="processes per figure, the variants of a length taking turns")
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mask-max", type=int, default=8192, help="longest prefill for the mask-based strawman")
    parser.add_argument("--train-length", type=int, default=8192, help="0: no training-step figure")
    parser.add_argument("--kinds", type=lambda text: text.split(","), help=f"only these figure kinds, comma-separated: {','.join(KINDS)}")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(VARIANTS), help=f"only these variants: {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per figure (see docs/performance.md)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per figure")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kinds and not set(args.kinds) <= set(KINDS):
        parser.error(f"--kinds: unknown kind(s) {sorted(set(args.kinds) - set(KINDS))}; choose from {','.join(KINDS)}")
    if not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants: unknown variant(s) {sorted(set(args.variants) - set(VARIANTS))}; choose from {','.join(VARIANTS)}")
    if args.decode_batch < 1:
        parser.error(f"--decode-batch must be at least 1, got {args.decode_batch}")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.out is None:
        parser.error("--out FILE is required")
    if args.backend not in dsa.available_backends():
        parser.error(f"--backend: {args.backend!r} does not run here; choose from {','.join(dsa.available_backends())}")

    report = {
        "command": " ".join(["uv run python", *sys.argv]),
        "device": device_name(),
        "threads": args.threads,
        "backend": args.backend,
        "torch": torch.__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shapes": {**SHAPES, **vars(DSA_SHAPES)},
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for group in figure_groups(figures(args)):
        results = [[] for _ in group]
        for _ in range(args.rounds):  # the variants of one length take turns, so drift hits them alike
            for spec, rounds in zip(group, results):
                rounds.append(run_in_subprocess(spec, args.timeout))
        for spec, rounds in zip(group, results):
            result = merge_rounds(rounds)
            if result["status"] == "ok" and "peak_mib" in result and not torch.cuda.is_available():
                memory = run_in_subprocess({**spec, "runs": 1}, args.timeout, env=MEMORY_ENV)
                result["peak_mib"] = memory.get("peak_mib")  # None (and the status says why) if that run failed
                result["memory_status"] = memory["status"]
            report["results"].append(result)
            shown = f"{result['median_s']:.4f} s (cpu {result['median_cpu_s']:.4f} s)" if result["status"] == "ok" else result["status"]
            peak = f", peak {result['peak_mib']:.0f} MiB" if result.get("peak_mib") is not None else ""
            batch = f" x{spec['batch']}" if spec.get("batch", 1) > 1 else ""
            print(f"{spec['kind']:16} {spec['variant']:5} {spec.get('cache', ''):7} {spec['length']:6}{batch}: {shown}{peak}", flush=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            tmp.replace(args.out)  # atomic: a partial suite leaves a valid file


if __name__ == "__main__":
    main()
