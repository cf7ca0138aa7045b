"""Where a prefill spends its time: torch.profiler over one model call, by operator (CPU self time).

    uv run python bench/profile_prefill.py --variant dsa --length 16384 --layers 1

Same models as bench/dsa_bench.py (random weights, Qwen2.5-0.5B shapes). One thread by default.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.profiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.dsa_bench import ATTENTION_ONLY, build_model, device_and_dtype  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("stock", "dsa", "mask"), default="dsa")
    parser.add_argument("--backend", default="auto", help="the DSA backend (dsa.available_backends())")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15, help="operators shown")
    parser.add_argument("--attention-only", action="store_true", help="MLP and vocabulary shrunk (as prefill-attention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype()
    model = build_model(args.variant, args.layers, device, dtype, args.backend, **(ATTENTION_ONLY if args.attention_only else {}))
    ids = torch.randint(0, 1000, (1, args.length), device=device)
    with torch.no_grad():
        model(ids[:, :256], logits_to_keep=1)  # warm-up
        with torch.profiler.profile() as prof:
            model(ids, logits_to_keep=1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
