"""Each C++ kernel of the "cpu" backend (dsa/kernels/cpu_attention.py) against the PyTorch path it replaces (the
"torch" backend's, dsa/kernels/torch_paths.py), at Qwen2.5-0.5B shapes.

    uv run python bench/cpu_kernels.py --lengths 4096,16384,32768 --reps 21

For S keys, the queries of one chunk of the model (CHUNK_ELEMENTS // S; one query for "decode"), random
inputs (time does not depend on the values): indexer 4 heads x 64, attention 14 query heads, 2 KV heads,
head_dim 64, k = 512.
  scores      torch_paths.selection_scores  vs  index_scores_cpu
  decode      the same for one query, over the indexer keys of 24 layers in turn (as a decode step reads
              them: from memory, not from cache); the time is per layer
  topk        torch_paths.topk_by_blocks  vs  topk_cpu, on the kernel's scores
  attention   torch_paths.sparse_attention_blocks  vs  sparse_attention_cpu, one block of QUERY_BLOCK queries
One process, one thread, autograd off; the two take turns rep by rep (the machine's drift hits both alike);
medians of --reps, and kernel / PyTorch.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.dsa_bench import device_name  # noqa: E402
from dsa.backends import QUERY_BLOCK, TILE_ELEMENTS  # noqa: E402
from dsa.core import CHUNK_ELEMENTS  # noqa: E402
from dsa.kernels import cpu_attention, torch_paths  # noqa: E402

TOPK, INDEX_HEADS, INDEX_DIM, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 512, 4, 64, 14, 2, 64, 24


def pytorch_paths(scratch: torch_paths.Scratch) -> SimpleNamespace:
    """The "torch" backend's paths, with the kernels' signatures."""

    def index_scores(q_I, k_I, w_I, first, out):
        query_pos = torch.arange(first, first + q_I.shape[1])
        return torch_paths.selection_scores(q_I, k_I, w_I, query_pos, None, scratch, TILE_ELEMENTS)

    def sparse_attention(q, k, v, selected, valid, scaling):
        return torch_paths.sparse_attention_blocks(q, k, v, selected, valid, scaling, scratch, QUERY_BLOCK)

    return SimpleNamespace(index_scores_cpu=index_scores, topk_cpu=torch_paths.topk_by_blocks, sparse_attention_cpu=sparse_attention)


def pairs(S: int, a, b) -> dict:
    """name -> (a's call, b's call, kernel calls per call), the calls without arguments, for S keys; a and b have the
    kernels' functions."""
    T = max(1, CHUNK_ELEMENTS // S)
    q_I, k_I, w_I = torch.randn(1, T, INDEX_HEADS, INDEX_DIM), torch.randn(1, S, INDEX_DIM), torch.randn(1, T, INDEX_HEADS)
    layer_keys = [torch.randn(1, S, INDEX_DIM) for _ in range(LAYERS)]
    out = torch.empty(1, T, S)
    q1, w1 = q_I[:, -1:], w_I[:, -1:]
    scores = cpu_attention.index_scores_cpu(q_I, k_I, w_I, S - T, torch.empty(1, T, S))
    C = QUERY_BLOCK
    q, k, v = torch.randn(1, HEADS, C, HEAD_DIM), torch.randn(1, KV_HEADS, S, HEAD_DIM), torch.randn(1, KV_HEADS, S, HEAD_DIM)
    selected = torch.randint(0, S, (1, C, TOPK))
    valid = torch.ones(1, C, TOPK, dtype=torch.bool)

    def decode(m):  # one layer's time
        for keys in layer_keys:
            m.index_scores_cpu(q1, keys, w1, S - 1, out[:, :1])

    return {
        f"scores ({T} queries)": (*(lambda m=m: m.index_scores_cpu(q_I, k_I, w_I, S - T, out) for m in (a, b)), 1),
        f"scores (decode, 1 query; per layer, {LAYERS} layers' keys in turn)": (*(lambda m=m: decode(m) for m in (a, b)), LAYERS),
        f"topk ({T} rows)": (*(lambda m=m: m.topk_cpu(scores, TOPK) for m in (a, b)), 1),
        f"attention ({C} queries)": (*(lambda m=m: m.sparse_attention_cpu(q, k, v, selected, valid, 0.125) for m in (a, b)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,32768", help="comma-separated key counts S")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        kernels = cpu_attention.kernel()
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    a, a_name, b_name = pytorch_paths(torch_paths.Scratch()), "PyTorch", "kernel"
    print(f"{device_name()}, one thread, medians of {args.reps}; ms per kernel call; a = {a_name}, b = {b_name}")
    print(f"| S | what | {a_name} ms | {b_name} ms | b / a |\n|---|---|---|---|---|")
    with torch.no_grad():
        for S in (int(s) for s in args.lengths.split(",")):
            for name, (call_a, call_b, calls) in pairs(S, a, kernels).items():
                times = {call_a: [], call_b: []}
                for rep in range(args.reps):
                    for fn in (call_a, call_b) if rep % 2 == 0 else (call_b, call_a):
                        start = time.process_time()
                        fn()
                        times[fn].append((time.process_time() - start) / calls)
                ta, tb = statistics.median(times[call_a]), statistics.median(times[call_b])
                print(f"| {S} | {name} | {ta * 1e3:.3f} | {tb * 1e3:.3f} | {tb / ta:.2f} |", flush=True)


if __name__ == "__main__":
    main()
