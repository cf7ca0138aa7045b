"""Tables (markdown, on stdout) and a plot (PNG) of bench/dsa_bench.py results.

    uv run python bench/plot.py bench/results/xeon/*.json --png docs/performance.png

Ratios are DSA (or the mask-based strawman) over stock Qwen2 at the same length and thread count, from
the same suite. Tables are printed per torch thread count and decode batch (--decode-batch); the plot shows
the figures of --plot-threads at batch 1.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    ("stock", "static"): "stock, StaticCache",
    ("stock", "dynamic"): "stock, DynamicCache",
    ("dsa", "dsa"): "DSA, dsa_cache",
    ("mask", "dsa"): "mask DSA, dsa_cache",
    ("stock", None): "stock (SDPA)",
    ("dsa", None): "DSA",
    ("mask", None): "mask DSA",
}
COLORS = {"stock": "tab:blue", "dsa": "tab:orange", "mask": "tab:green"}


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    reports = [json.loads(p.read_text()) for p in paths]
    return reports, [r for report in reports for r in report["results"]]


def figure(results, kind, variant, length, cache=None) -> dict | None:
    for r in results:
        if (r["kind"], r["variant"], r["length"], r.get("cache")) == (kind, variant, length, cache) and r["status"] == "ok":
            return r
    return None


def peak(r: dict | None) -> float | None:
    """The figure's peak memory in MiB; None if not measured (its memory run failed: see memory_status)."""
    return r.get("peak_mib") if r else None


def batch(r: dict) -> int:
    """Sequences per decode step (--decode-batch); 1 for every other figure and for suites from before the flag."""
    return r.get("batch", 1)


def lengths(results, kind) -> list[int]:
    return sorted({r["length"] for r in results if r["kind"] == kind})


def k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def prefill_table(results, kind) -> str:
    rows = [
        "| L | stock s (cpu s) | DSA s (cpu s) | mask s (cpu s) | DSA/stock cpu (wall) | stock MiB | DSA MiB | mask MiB | DSA/stock mem | mask/DSA mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths(results, kind):
        s, d, m = (figure(results, kind, v, n) for v in ("stock", "dsa", "mask"))
        cell = lambda r: f"{r['median_s']:.2f} ({r['median_cpu_s']:.2f})" if r else "-"  # noqa: E731
        mem = lambda r: f"{peak(r):.0f}" if peak(r) else "-"  # noqa: E731
        ratio = f"{d['median_cpu_s'] / s['median_cpu_s']:.2f} ({d['median_s'] / s['median_s']:.2f})" if s and d else "-"
        mem_ratio = f"{peak(d) / peak(s):.2f}" if peak(s) and peak(d) else "-"
        mask_ratio = f"{peak(m) / peak(d):.1f}" if peak(m) and peak(d) else "-"
        rows.append(f"| {k(n)} | {cell(s)} | {cell(d)} | {cell(m)} | {ratio} | {mem(s)} | {mem(d)} | {mem(m)} | {mem_ratio} | {mask_ratio} |")
    return "\n".join(rows)


def decode_table(results, kind) -> str:
    pairs = [("stock", "static"), ("stock", "dynamic"), ("dsa", "dsa"), ("mask", "dsa")]
    head = " | ".join(f"{LABELS[p]} ms (cpu ms)" for p in pairs)
    rows = [f"| context | {head} | DSA/static cpu (wall) | DSA/dynamic cpu (wall) |", "|---" * 7 + "|"]
    for n in lengths(results, kind):
        figs = [figure(results, kind, v, n, c) for v, c in pairs]
        cells = [f"{1e3 * r['median_s']:.1f} ({1e3 * r['median_cpu_s']:.1f})" if r else "-" for r in figs]
        ratios = []
        for base in figs[:2]:
            d = figs[2]
            ratios.append(f"{d['median_cpu_s'] / base['median_cpu_s']:.2f} ({d['median_s'] / base['median_s']:.2f})" if base and d else "-")
        rows.append(f"| {k(n)} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(rows)


def plot(results, png: Path) -> None:
    panels = [("prefill", "median_cpu_s", "prefill CPU s (model)"), ("prefill-attention", "median_cpu_s", "prefill CPU s (attention)"),
              ("prefill", "peak_mib", "prefill peak MiB (model)"),
              ("decode", "median_cpu_s", "decode CPU s / token (model)"), ("decode-attention", "median_cpu_s", "decode CPU s / token (attention)")]
    panels = [panel for panel in panels if lengths(results, panel[0])]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (kind, key, title) in zip(axes.flat, panels):
        caches = [None] if kind.startswith("prefill") else ["static", "dynamic", "dsa"]
        for variant in ("stock", "dsa", "mask"):
            for cache in caches:
                points = [(n, r[key]) for n in lengths(results, kind) if (r := figure(results, kind, variant, n, cache)) and r.get(key) is not None]
                if points and (variant, cache) in LABELS:
                    xs, ys = zip(*points)
                    style = "--" if cache == "dynamic" else "-"
                    ax.plot(xs, ys, style, marker="o", color=COLORS[variant], label=LABELS[(variant, cache)])
        ax.set(xscale="log", yscale="log", xlabel="tokens (prompt or context)", title=title)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(lengths(results, kind), [k(n) for n in lengths(results, kind)])
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--png", type=Path, default=Path("docs/performance.png"))
    parser.add_argument("--plot-threads", type=int, default=1, help="the thread count whose figures are plotted")
    args = parser.parse_args()
    reports, results = load(args.results)
    for report in reports:
        print(f"- `{report['command']}` on {report['device']}, {report.get('threads')} thread(s), "
              f"commit {report.get('commit', '?')}, started {report['started']}")
    for threads, b in sorted({(r["threads"], batch(r)) for r in results}):
        subset = [r for r in results if (r["threads"], batch(r)) == (threads, b)]
        print(f"\n## {threads} torch thread(s)" + (f", {b} sequences per decode step" if b > 1 else "") + "\n")
        for kind in ("prefill", "prefill-attention"):
            if lengths(subset, kind):
                print(f"{kind}\n\n" + prefill_table(subset, kind) + "\n")
        for kind in ("decode", "decode-attention"):
            if lengths(subset, kind):
                print(f"{kind}\n\n" + decode_table(subset, kind) + "\n")
        for r in subset:
            if r["kind"] == "train" and r["status"] == "ok":
                shown = f"{peak(r):.0f} MiB" if peak(r) else f"not measured ({r.get('memory_status')})"
                print(f"warm-up training step at {k(r['length'])}: {r['median_s']:.1f} s (cpu {r['median_cpu_s']:.1f} s), peak {shown}\n")
            if r["status"] != "ok":
                print(f"not measured: {r['kind']} {r['variant']} {r.get('cache') or ''} {k(r['length'])}: {r['status']}\n")
    plot([r for r in results if r["threads"] == args.plot_threads and batch(r) == 1], args.png)


if __name__ == "__main__":
    main()
