"""The DSA-vs-dense perplexity gap against training tokens, one line per recipe: a table and a plot from
compare.py results (each point one compare.py output directory: `--only perplexity,recall` of one checkpoint).

    uv run python scripts/gap_curve.py --length 4096 --png docs/gap_curve.png \
        --point "1K warm-up:204800:runs/r21/eval_base1k" \
        --point "1K then 4K:303104:runs/r21/eval_cont4k_12" ...

A point is RECIPE:TOKENS:DIR, TOKENS the training tokens the checkpoint has seen (warm-up and later stages
together). The gap is compare.py's paired per-window perplexity ratio DSA / dense - 1 with its 95% interval
(dsa/stats.py); recall is the indexer's recall of the true top-k attention at the largest length measured.

--dense-from DIR takes the dense side of every point from DIR's per-window perplexities (the compare.py output of
the dense model the recipes start from): a sparse stage that trains the base weights is then measured against that
original dense model, not against its own dense mode (the warm-up freezes the base, so its points do not change).
That is fair only for a recipe that leaves the dense model where it was (the warm-up, --loss distill): an LM loss
also fits the model to the training data, which a dense fine-tune gets too, so measure such a run against its dense
control instead (`train.py --attention dense` on the same data: --dense-from that control's compare.py output).

The second table extrapolates each recipe from its last two points: the change of the gap between them, paired per
window (compare.py picks the same windows for the same --data, length and --ppl-windows), with its 95% interval,
and, where the gap falls measurably, the training tokens at which that straight line reaches --target (a linear
extrapolation: optimistic where the curve flattens). Where the change's interval holds 0 the recipe has plateaued,
and where the gap rises measurably the recipe makes it worse; neither is extrapolated.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsa.stats import mean_interval  # noqa: E402


def parse_point(text: str) -> tuple[str, int, Path]:
    recipe, tokens, directory = text.rsplit(":", 2)
    return recipe, int(tokens), Path(directory)


def read_results(directory: Path, length: int) -> tuple[dict, int, dict]:
    """(compare.py's perplexity results, the index of `length` in them, its recall results)."""
    results = json.loads((directory / "results.json").read_text())
    ppl = results["perplexity"]
    if length not in ppl["lengths"]:
        raise ValueError(f"{directory}: no perplexity at length {length} (has {ppl['lengths']})")
    return ppl, ppl["lengths"].index(length), results.get("recall") or {}


def dense_windows(directory: Path, length: int) -> list[float]:
    """The dense per-window perplexities at `length` of one compare.py output (for --dense-from)."""
    ppl, at, _ = read_results(directory, length)
    if "per_window" not in ppl:
        raise ValueError(f"{directory}: no per-window perplexities")
    return ppl["per_window"]["dense"][at]


def read_point(recipe: str, tokens: int, directory: Path, length: int, dense: list[float] | None = None) -> list[dict]:
    """One row per k: recipe, tokens, k, L/k, gap {mean, ci_low, ci_high, n}, per-window gaps (or None), recall {..}
    or None. With `dense` (per-window perplexities of the same windows) the gap is DSA vs those, paired per window."""
    ppl, at, recall = read_results(directory, length)
    windows = ppl.get("per_window")
    if dense is not None and windows is None:
        raise ValueError(f"{directory}: no per-window perplexities to pair with --dense-from")
    if dense is not None and len(dense) != len(windows["dense"][at]):
        raise ValueError(f"{directory}: {len(windows['dense'][at])} windows, --dense-from has {len(dense)}")
    baseline = dense or (windows["dense"][at] if windows else None)
    rows = []
    for k, gaps in sorted(ppl["dsa_vs_dense"].items(), key=lambda item: int(item[0])):
        rec = recall.get("mean", {}).get(k, {}).get("indexer") if recall.get("length") == length else None
        per_window = None if windows is None else [dsa / base - 1 for dsa, base in zip(windows["dsa"][k][at], baseline)]
        gap = gaps[at] if dense is None else mean_interval(per_window)  # compare.py's paired interval, re-paired
        rows.append({"recipe": recipe, "tokens": tokens, "k": int(k), "L/k": length // int(k), "gap": gap,
                     "per_window": per_window, "recall": rec})
    return rows


def percent(x: dict) -> str:
    star = "*" if x["ci_low"] > 0 or x["ci_high"] < 0 else ""
    return f"{100 * x['mean']:+.1f}% [{100 * x['ci_low']:+.1f}, {100 * x['ci_high']:+.1f}]{star}"


def table(rows: list[dict]) -> str:
    lines = ["| recipe | tokens | k | L/k | gap vs dense | indexer recall |", "|---|---|---|---|---|---|"]
    for r in rows:
        rec = "" if r["recall"] is None else f"{r['recall']['mean']:.3f} [{r['recall']['ci_low']:.3f}, {r['recall']['ci_high']:.3f}]"
        lines.append(f"| {r['recipe']} | {r['tokens']:,} | {r['k']} | {r['L/k']} | {percent(r['gap'])} | {rec} |")
    return "\n".join(lines)


def extrapolation(rows: list[dict], target: float) -> str:
    """Per recipe and k, from its last two points A -> B (tokens t_A < t_B, per-window gaps a_i, b_i): the change
    mean(b_i - a_i) with its t interval, and where the interval lies below 0 and the gap is above `target`, the
    tokens t_B + (gap_B - target) * (t_B - t_A) / -change for the change's mean and for both ends of its interval."""
    lines = [f"| recipe | k | tokens A -> B | change in gap (paired 95%) | tokens to reach {100 * target:+.0f}% at this rate |",
             "|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for k in sorted({r["k"] for r in rows if r["recipe"] == recipe}):
            points = sorted((r for r in rows if r["recipe"] == recipe and r["k"] == k), key=lambda r: r["tokens"])
            if len(points) < 2:
                continue
            a, b = points[-2:]
            span = f"{a['tokens']:,} -> {b['tokens']:,}"
            if a["per_window"] is None or b["per_window"] is None or len(a["per_window"]) != len(b["per_window"]):
                lines.append(f"| {recipe} | {k} | {span} | no per-window gaps to pair | |")
                continue
            change = mean_interval([y - x for x, y in zip(a["per_window"], b["per_window"])])
            gap, dt = b["gap"]["mean"], b["tokens"] - a["tokens"]
            if gap <= target:
                reach = f"the gap's mean is already <= {100 * target:+.0f}%"
            elif change["ci_low"] is not None and change["ci_low"] > 0:
                reach = "the gap grows: no extrapolation"
            elif change["ci_high"] is None or change["ci_high"] >= 0:
                reach = "no measurable change: plateau, no extrapolation"
            else:
                at = [b["tokens"] + (gap - target) * dt / -c for c in (change["mean"], change["ci_low"], change["ci_high"])]
                reach = f"{at[0]:,.0f} [{at[1]:,.0f}, {at[2]:,.0f}]"
            lines.append(f"| {recipe} | {k} | {span} | {percent(change).replace('%', ' points')} | {reach} |")
    return "\n".join(lines)


def plot(rows: list[dict], length: int, png: Path) -> None:
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            points = sorted((r["tokens"], r["gap"]) for r in rows if r["k"] == k and r["recipe"] == recipe)
            x = [t for t, _ in points]
            y = [100 * g["mean"] for _, g in points]
            err = [[100 * (g["mean"] - g["ci_low"]) for _, g in points], [100 * (g["ci_high"] - g["mean"]) for _, g in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=recipe)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(3, color="grey", lw=0.8, ls="--")
        ax.set_title(f"L = {length}, k = {k} (L/k = {length // k})")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("perplexity gap vs dense (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", action="append", required=True, help="RECIPE:TOKENS:DIR (repeat)")
    parser.add_argument("--length", type=int, default=4096, help="sequence length of the gap")
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.03, help="the gap to extrapolate to (0.03 = +3%%)")
    parser.add_argument("--dense-from", type=Path, help="compare.py output whose dense per-window perplexities are the "
                        "dense side of every point (the model the recipes start from)")
    args = parser.parse_args(argv)
    try:
        dense = None if args.dense_from is None else dense_windows(args.dense_from, args.length)
    except (ValueError, OSError, KeyError) as e:
        sys.exit(f"error: --dense-from {str(args.dense_from)!r}: {e}")
    rows = []
    for text in args.point:
        try:
            recipe, tokens, directory = parse_point(text)
            rows += read_point(recipe, tokens, directory, args.length, dense)
        except (ValueError, OSError, KeyError) as e:
            sys.exit(f"error: --point {text!r}: {e}")
    print(table(rows))
    print()
    print(extrapolation(rows, args.target))
    plot(rows, args.length, args.png)


if __name__ == "__main__":
    main()
