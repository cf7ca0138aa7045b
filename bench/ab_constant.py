"""A/B of one `dsa.attention` constant: one model, one process, the two values taking turns.

    uv run python bench/ab_constant.py --name TILE_ELEMENTS --a 1099511627776 --b 524288 --length 32768 --reps 3 --attention-only

Same models as bench/dsa_bench.py (random weights, Qwen2.5-0.5B shapes; `--attention-only` as
prefill-attention, and as in bench/profile_prefill.py). Each rep runs a DSA prefill with value a and with value b (their order alternating, so the
machine's drift hits both alike) and prints CPU seconds; the end line gives the medians and b / a.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dsa.attention  # noqa: E402
from bench.dsa_bench import ATTENTION_ONLY, build_model, device_and_dtype, device_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="a module constant of dsa.attention, e.g. TILE_ELEMENTS")
    parser.add_argument("--a", type=int, required=True)
    parser.add_argument("--b", type=int, required=True)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--attention-only", action="store_true", help="MLP and vocabulary shrunk (as prefill-attention)")
    args = parser.parse_args()
    if not hasattr(dsa.attention, args.name):
        sys.exit(f"error: dsa.attention has no constant {args.name!r}")
    torch.set_num_threads(1)
    device, dtype = device_and_dtype()
    model = build_model("dsa", args.layers, device, dtype, **(ATTENTION_ONLY if args.attention_only else {}))
    ids = torch.randint(0, 1000, (1, args.length), device=device)
    cpu_s = {args.a: [], args.b: []}
    print(f"{device_name()}, {args.layers} layer(s) at {args.length} tokens, {args.name} = {args.a} (a) / {args.b} (b)")
    with torch.no_grad():
        model(ids[:, :256], logits_to_keep=1)  # warm-up
        for rep in range(args.reps):
            for value in (args.a, args.b) if rep % 2 == 0 else (args.b, args.a):
                setattr(dsa.attention, args.name, value)
                start = time.process_time()
                model(ids, logits_to_keep=1)
                cpu_s[value].append(time.process_time() - start)
                print(f"{args.name} = {value}: {cpu_s[value][-1]:.2f} s CPU", flush=True)
    a, b = statistics.median(cpu_s[args.a]), statistics.median(cpu_s[args.b])
    print(f"medians: a {a:.2f} s, b {b:.2f} s CPU; b / a = {b / a:.3f}")


if __name__ == "__main__":
    main()
