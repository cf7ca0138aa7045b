"""Each C++ kernel of dsa/cpu_attention.py against the PyTorch fast path it replaces, at Qwen2.5-0.5B shapes.

    uv run python bench/cpu_kernels.py --lengths 4096,16384,32768 --reps 21

For S keys, the queries of one chunk of the model (CHUNK_ELEMENTS // S; one query for "decode"), random
inputs (time does not depend on the values): indexer 4 heads x 64, attention 14 query heads, 2 KV heads,
head_dim 64, k = 512.
  scores      attention.index_scores_fast + recency_nudge + mask_disallowed_  vs  index_scores_cpu
  topk        attention.topk_by_blocks  vs  topk_cpu, on the kernel's scores
  attention   sparse_attention_fast  vs  sparse_attention_cpu, one block of FAST_BLOCK queries, random selections
One process, one thread, autograd off; the two take turns rep by rep (the machine's drift hits both alike);
medians of --reps, and kernel / PyTorch.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.dsa_bench import device_name  # noqa: E402
from dsa import attention, cpu_attention  # noqa: E402

TOPK, INDEX_HEADS, INDEX_DIM, HEADS, KV_HEADS, HEAD_DIM = 512, 4, 64, 14, 2, 64


def pairs(S: int) -> dict:
    """name -> (PyTorch fast path, kernel), both callables without arguments, for S keys."""
    T = max(1, attention.CHUNK_ELEMENTS // S)
    q_idx, k_idx, w_idx = torch.randn(1, T, INDEX_HEADS, INDEX_DIM), torch.randn(1, S, INDEX_DIM), torch.randn(1, T, INDEX_HEADS)
    query_index, scratch, out = torch.arange(S - T, S), attention.Scratch(), torch.empty(1, T, S)
    q1, w1 = q_idx[:, -1:], w_idx[:, -1:]
    scores = cpu_attention.index_scores_cpu(q_idx, k_idx, w_idx, S - T, torch.empty(1, T, S))
    C = attention.FAST_BLOCK
    q, k, v = torch.randn(1, HEADS, C, HEAD_DIM), torch.randn(1, KV_HEADS, S, HEAD_DIM), torch.randn(1, KV_HEADS, S, HEAD_DIM)
    indices = torch.randint(0, S, (1, C, TOPK))
    valid = torch.ones(1, C, TOPK, dtype=torch.bool)
    return {
        f"scores ({T} queries)": (
            lambda: attention.mask_disallowed_(attention.index_scores_fast(q_idx, k_idx, w_idx, scratch).add_(attention.recency_nudge(S, "cpu")), query_index, None),
            lambda: cpu_attention.index_scores_cpu(q_idx, k_idx, w_idx, S - T, out),
        ),
        "scores (decode, 1 query)": (
            lambda: attention.mask_disallowed_(attention.index_scores_fast(q1, k_idx, w1).add_(attention.recency_nudge(S, "cpu")), query_index[-1:], None),
            lambda: cpu_attention.index_scores_cpu(q1, k_idx, w1, S - 1, out[:, :1]),
        ),
        f"topk ({T} rows)": (lambda: attention.topk_by_blocks(scores, TOPK), lambda: cpu_attention.topk_cpu(scores, TOPK)),
        f"attention ({C} queries)": (
            lambda: attention.sparse_attention_fast(q, k, v, indices, valid, 0.125, scratch),
            lambda: cpu_attention.sparse_attention_cpu(q, k, v, indices, valid, 0.125),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,32768", help="comma-separated key counts S")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if cpu_attention.kernel() is None:
        sys.exit("error: the C++ kernels are not available on this machine (they need x86 with AVX2 and a compiler)")
    print(f"{device_name()}, one thread, medians of {args.reps}; ms per call")
    print("| S | what | PyTorch ms | kernel ms | kernel / PyTorch |\n|---|---|---|---|---|")
    with torch.no_grad():
        for S in (int(s) for s in args.lengths.split(",")):
            for name, (plain, kernel) in pairs(S).items():
                times = {plain: [], kernel: []}
                for rep in range(args.reps):
                    for fn in (plain, kernel) if rep % 2 == 0 else (kernel, plain):
                        start = time.process_time()
                        fn()
                        times[fn].append(time.process_time() - start)
                a, b = statistics.median(times[plain]), statistics.median(times[kernel])
                print(f"| {S} | {name} | {a * 1e3:.3f} | {b * 1e3:.3f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
