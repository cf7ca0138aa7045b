"""Plot columns of training metrics.jsonl files against the step, one panel per column.

    uv run python scripts/plot_metrics.py runs/real/warmup/metrics.jsonl runs/real/sparse/metrics.jsonl \
        --keys kl,lm_loss --png docs/real_training.png

A run is labelled by its directory name; a column a run does not log is left out of that run's lines.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, nargs="+", help="metrics.jsonl files")
    parser.add_argument("--keys", default="loss", help="columns to plot, comma-separated")
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    missing = [str(p) for p in args.metrics if not p.is_file()]
    if missing:
        parser.error(f"metrics file not found: {', '.join(missing)}")
    keys = args.keys.split(",")
    runs = {p.parent.name: read_metrics(p) for p in args.metrics}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
        ax.set(xlabel="step", ylabel=key, title=key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
