"""Indexer recall of several DSA checkpoints on the same held-out windows: how the training stages move the
indexer (untrained -> after warm-up -> after sparse training), against the oracle / last-k / random baselines.

Uses compare.py's own measurement (`dsa.evaluation.indexer_recall`: share of the dense, head-summed attention
mass inside the selected k keys, over rows with more than k causal keys), one checkpoint at a time.

    uv run python -m scripts.recall_by_stage --models untrained=runs/real/untrained warmup=runs/real/warmup \\
        --data runs/real/data/heldout.jsonl --length 2048 --topk 64,128,256,512 \\
        --output runs/real/recall_by_stage.json --plot docs/real_recall_by_stage.png
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa  # noqa: F401  (registers the DSA model types)
from dsa.evaluation import RECALL_METHODS, held_out_data, indexer_recall, token_windows
from dsa.sources import resolve_data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def measure(path: str, data: list[Path], length: int, windows: int, topks: list[int], dtype: torch.dtype) -> dict:
    """{k: {method: [recall per layer], "mean": {method: mean over layers}}} for one checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens, _, _ = held_out_data(data, tokenizer, windows * length, 0)
    recall = indexer_recall(model, token_windows(tokens, length, windows), topks)
    return {
        str(k): {**{m: v[m] for m in RECALL_METHODS}, "mean": {m: sum(v[m]) / len(v[m]) for m in RECALL_METHODS}}
        for k, v in recall.items()
    }


def plot(results: dict, topk: str, length: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, r in results.items():
        ax.plot(r[topk]["indexer"], "o-", label=f"indexer top-k ({stage})")
    first = next(iter(results.values()))[topk]
    for method, style in (("oracle", "k:"), ("last_k", "s--"), ("random", "x--")):
        ax.plot(first[method], style, label=method.replace("_", "-"), alpha=0.7)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of dense attention mass")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Indexer recall per layer, k={topk}, L={length}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="stage=checkpoint directory, in order")
    parser.add_argument("--data", required=True, help="held-out JSONL (deepctrl schema)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--topk", default="64,128,256,512")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--output", required=True, help="JSON file of the results")
    parser.add_argument("--plot", help="PNG: recall per layer of every stage at --plot-topk")
    parser.add_argument("--plot-topk", default="128")
    args = parser.parse_args()

    topks = [int(k) for k in args.topk.split(",")]
    if args.plot and int(args.plot_topk) not in topks:
        parser.error(f"--plot-topk {args.plot_topk} is not among --topk {args.topk}")
    data = resolve_data(args.data)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}  # stages measured before are kept
    for spec in args.models:
        stage, _, path = spec.partition("=")
        start = time.time()
        results[stage] = measure(path, data, args.length, args.windows, topks, getattr(torch, args.dtype))
        print(f"{stage}: {time.time() - start:.0f} s")
    output.write_text(json.dumps(results, indent=1) + "\n")

    print("| selection | " + " | ".join(f"k={k}" for k in topks) + " |\n|---|" + "---|" * len(topks))
    for stage, r in results.items():
        print(f"| indexer ({stage}) | " + " | ".join(f"{r[str(k)]['mean']['indexer']:.3f}" for k in topks) + " |")
    first = next(iter(results.values()))
    for method in ("oracle", "last_k", "random"):
        print(f"| {method} | " + " | ".join(f"{first[str(k)]['mean'][method]:.3f}" for k in topks) + " |")
    if args.plot:
        plot(results, args.plot_topk, args.length, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
