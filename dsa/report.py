"""Render compare.py results: results.json, PNG plots (matplotlib) and a self-contained report.md.

`write_report(results, output_dir)` takes the dict built by `dsa.evaluation.compare` plus its "meta" entry
(schema: docs/results_schema.md). Figures are shown as "mean [ci_low, ci_high]" (95% intervals, dsa/stats.py),
DSA vs dense differences as "+2.1% [+0.8, +3.4]" with "*" (MARK) where the interval excludes 0; plots draw the
intervals as error bars or bands. Sections absent from the results (--only / --skip) are listed as skipped.
"""

import json
import os
from pathlib import Path

import matplotlib

from .evaluation import SECTIONS
from .stats import excludes_zero

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

METHOD_LABELS = {"indexer": "indexer top-k", "oracle": "oracle top-k", "last_k": "last-k window", "random": "random k"}
SPEED_METRICS = {
    "prefill_s": "prefill latency (s)",
    "decode_ms_per_token": "decode latency (ms / token)",
    "peak_memory_mb": "prefill peak memory (MiB)",
}


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell; '—' for a missing one."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def fmt_figure(fig: dict | None, digits: int = 3) -> str:
    """A figure (dsa.stats) as "mean [ci_low, ci_high]"; the mean alone without an interval; '—' for None."""
    if fig is None:
        return "—"
    if fig["ci_low"] is None:
        return fmt(fig["mean"], digits)
    return f"{fmt(fig['mean'], digits)} [{fmt(fig['ci_low'], digits)}, {fmt(fig['ci_high'], digits)}]"


def fmt_change(fig: dict | None, unit: str = "%") -> str:
    """A difference figure (a fraction) in percent, "+2.1% [+0.8, +3.4]" (unit " pts": percentage points of an
    accuracy), with MARK when its interval excludes 0."""
    if fig is None:
        return "—"
    text = f"{percent(fig['mean'])}{unit}"
    if fig["ci_low"] is not None:
        text += f" [{percent(fig['ci_low'])}, {percent(fig['ci_high'])}]"
    return text + (MARK if excludes_zero(fig) else "")


def percent(value: float) -> str:
    """A fraction as signed percent with one decimal; "+0.0" rather than "-0.0" for a value that rounds to 0."""
    return f"{round(100 * value, 1) + 0.0:+.1f}"


MARK = "*"
MARK_LEGEND = f"`{MARK}`: the 95% interval of the difference excludes 0."


def ratio(value, reference) -> str:
    return f" ({value / reference:.2f}×)" if value is not None and reference else ""


def means(figures: list[dict]) -> list[float]:
    return [f["mean"] for f in figures]


def scaled(fig: dict, factor: float) -> dict:
    """A figure with its mean and interval multiplied by factor (e.g. 100: in percent)."""
    return {key: value if key == "n" or value is None else factor * value for key, value in fig.items()}


def dodge(lengths: list[int], i: int, n: int) -> list[float]:
    """x positions of the i-th of n series on a log2 length axis, shifted a little so error bars do not overlap."""
    return [L * 2 ** (0.04 * (i - (n - 1) / 2)) for L in lengths]


def error_bars(figures: list[dict]) -> list[list[float]]:
    """matplotlib yerr ([below], [above]) of a list of figures; 0 where a figure has no interval."""
    below = [f["mean"] - f["ci_low"] if f["ci_low"] is not None else 0.0 for f in figures]
    above = [f["ci_high"] - f["mean"] if f["ci_high"] is not None else 0.0 for f in figures]
    return [below, above]


def quality_columns(entry: dict) -> list[tuple[str, str]]:
    """(group, k) of the sparse sides in a results entry: DSA (the indexer's selection) at each k, then the
    oracle selection at each k where it ran."""
    return [(group, k) for group in ("dsa", "oracle") if group in entry for k in entry[group]]


def column_label(group: str, k: str) -> str:
    return f"{'DSA' if group == 'dsa' else 'oracle'} k={k}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def plot_perplexity(r: dict, path: Path) -> str:
    """Left: perplexity vs length per side; right: the paired DSA vs dense difference; 95% error bars."""
    ppl = r["perplexity"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    columns = quality_columns(ppl)
    n = 1 + len(columns)
    x = ppl["lengths"]
    style = {"dsa": "s--", "oracle": "^:"}
    left.errorbar(dodge(x, 0, n), means(ppl["dense"]), yerr=error_bars(ppl["dense"]), fmt="o-", color="black", label="dense", linewidth=2, capsize=3)
    for i, (group, k) in enumerate(columns, 1):
        figures = ppl[group][k]
        left.errorbar(dodge(x, i, n), means(figures), yerr=error_bars(figures), fmt=style[group], label=column_label(group, k), capsize=3)
        percent = [scaled(f, 100) for f in ppl[f"{group}_vs_dense"][k]]
        right.errorbar(dodge(x, i, n), means(percent), yerr=error_bars(percent), fmt=style[group], label=column_label(group, k), capsize=3)
    right.axhline(0, color="black", linewidth=1)
    left.set_ylabel("perplexity")
    left.set_title("Held-out perplexity vs context length")
    right.set_ylabel("sparse / dense - 1 (%), paired per window")
    right.set_title("Perplexity change vs dense (DSA: indexer top-k; oracle: true top-k)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ppl["lengths"], [str(n) for n in ppl["lengths"]])
        ax.set_xlabel("context length (tokens)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Error bars: 95% intervals over windows (none with one window)", fontsize=9)
    return save(fig, path)


def plot_recall(r: dict, path: Path) -> str:
    """Recall per layer of each method; the band is the 95% interval of the mean over (window, layer)."""
    rec = r["recall"]
    ks = list(rec["per_layer"])
    cols = min(len(ks), 2)
    rows = (len(ks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, k in zip(axes.flat, ks):
        per_layer = rec["per_layer"][k]
        for method, label in METHOD_LABELS.items():
            if per_layer[method][0] is None:
                continue
            line = ax.plot(range(len(per_layer[method])), per_layer[method], "o-", label=label, markersize=3)[0]
            overall = rec["mean"][k][method]
            if overall["ci_low"] is not None:
                ax.axhspan(overall["ci_low"], overall["ci_high"], color=line.get_color(), alpha=0.15, linewidth=0)
        if per_layer["indexer"][0] is None:
            ax.text(0.5, 0.5, "k >= L: every key selected", ha="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        ax.set_title(f"k = {k}, L = {rec['length']} (bands: 95% interval of the mean)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("dense attention mass captured")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ks) :]:
        ax.axis("off")
    return save(fig, path)


def plot_passkey(r: dict, path: Path) -> str:
    """Accuracy per (length, depth) cell and side, each cell labelled with its 95% Wilson interval."""
    pk = r["passkey"]
    grids = [("dense", pk["dense"])] + [(column_label(group, k), pk[group][k]) for group, k in quality_columns(pk)]
    fig, axes = plt.subplots(1, len(grids), figsize=(max(6.0, 2.2 + 1.3 * len(pk["lengths"]) * len(grids)), 4), squeeze=False)
    for ax, (title, acc) in zip(axes[0], grids):
        grid = [[acc[i][j] for i in range(len(pk["lengths"]))] for j in range(len(pk["depths"]))]  # depth x length
        ax.imshow([[cell["mean"] for cell in row] for row in grid], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for j in range(len(pk["depths"])):
            for i in range(len(pk["lengths"])):
                cell = grid[j][i]
                ax.text(i, j, f"{cell['mean']:.2f}\n[{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]])
        ax.set_yticks(range(len(pk["depths"])), [f"{d:.0%}" for d in pk["depths"]])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
    fig.suptitle(f"Passkey retrieval accuracy [95% Wilson interval]\n{pk['trials']} trial(s) per cell, greedy, exact match", fontsize=10)
    return save(fig, path)


def plot_lm_eval(r: dict, path: Path) -> str:
    """Score vs context length per task and side, 95% error bars; a length where a side has no score is left out."""
    lm = r["lm_eval"]
    tasks = list(lm["scores"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    style = {"dense": "o-", "dsa": "s--", "oracle": "^:"}
    for ax, task in zip(axes[0], tasks):
        scores = lm["scores"][task]
        series = [("dense", "dense", scores["dense"])] + [(g, column_label(g, k), scores[g][k]) for g, k in quality_columns(scores)]
        for i, (group, label, figures) in enumerate(series):
            kept = [(L, f) for L, f in zip(dodge(lm["lengths"], i, len(series)), figures) if f is not None]
            if kept:
                x, figs = zip(*kept)
                color = {"color": "black", "linewidth": 2} if group == "dense" else {}
                ax.errorbar(x, means(figs), yerr=error_bars(figs), fmt=style[group], label=label, capsize=3, **color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lm["lengths"], [str(n) for n in lm["lengths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task} ({lm['limit']} samples per length)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("lm-eval scores, 95% intervals (Wilson for 0/1 scores)", fontsize=9)
    return save(fig, path)


def plot_speed(r: dict, path: Path) -> str:
    sp = r["speed"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (metric, label) in zip(axes, SPEED_METRICS.items()):
        ax.plot(sp["lengths"], sp[metric]["dense"], "o-", color="black", label="dense", linewidth=2)
        for k, values in sp[metric]["dsa"].items():
            ax.plot(sp["lengths"], values, "s--", label=f"DSA k={k}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sp["lengths"], [str(n) for n in sp["lengths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Speed and memory on {r['meta']['device']}")
    return save(fig, path)


# ---------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------


def change_cell(ppl: dict, group: str, k: str, i: int) -> str:
    """The paired perplexity change vs dense of a sparse side (group "dsa" or "oracle") at k and the i-th length;
    "k >= L" where sparse attention is dense attention (the difference is then rounding noise, not worth a mark)."""
    return "k >= L" if int(k) >= ppl["lengths"][i] else fmt_change(ppl[f"{group}_vs_dense"][k][i])


def side_figure(entry: dict, group: str, k: str, i: int | None = None, digits: int = 3) -> str:
    """The figure of a sparse side in a results entry ([i]: of the i-th length), '—' where that side did not run."""
    if group not in entry:
        return "—"
    figure = entry[group][k]
    return fmt_figure(figure if i is None else figure[i], digits)


def summary_rows(r: dict, columns: list[tuple[str, str]]) -> list[list[str]]:
    """The summary table's rows of the sections that ran, at the largest length of each; one cell per
    (group, k) column ('—' where a section does not measure that side: recall and speed are DSA's own)."""
    rows = []
    if "perplexity" in r:
        ppl = r["perplexity"]
        i = len(ppl["lengths"]) - 1
        L, n = ppl["lengths"][i], ppl["windows"][i]
        rows.append([f"perplexity, L={L} ({n} windows)", fmt_figure(ppl["dense"][i])] + [side_figure(ppl, g, k, i) for g, k in columns])
        rows.append([f"perplexity vs dense, L={L} (paired)", "—"] + [change_cell(ppl, g, k, i) if g in ppl else "—" for g, k in columns])
    if "recall" in r:
        rec = r["recall"]
        rows.append([f"indexer recall, L={rec['length']} (oracle / last-k / random)", "—"] + [recall_cell(rec["mean"][k]) if g == "dsa" else "—" for g, k in columns])
    if "passkey" in r:
        pk = r["passkey"]["all_cells"]
        rows.append(["passkey accuracy (all cells)", fmt_figure(pk["dense"], 2)] + [side_figure(pk, g, k, digits=2) for g, k in columns])
    if "lm_eval" in r:
        lm = r["lm_eval"]
        j = len(lm["lengths"]) - 1
        for task, scores in lm["scores"].items():
            L = lm["lengths"][j]
            rows.append([f"{task}, L={L}", fmt_figure(scores["dense"][j], 2)] + [side_figure(scores, g, k, j, digits=2) for g, k in columns])
            diffs = lm["vs_dense"][task]
            changes = [fmt_change(diffs[g][k][j], " pts") if g in diffs else "—" for g, k in columns]
            rows.append([f"{task} vs dense, L={L} (paired)", "—"] + changes)
    if "speed" in r:
        sp = r["speed"]
        j = len(sp["lengths"]) - 1
        for metric, label in SPEED_METRICS.items():
            dense = sp[metric]["dense"][j]
            cells = [fmt(sp[metric]["dsa"][k][j]) + ratio(sp[metric]["dsa"][k][j], dense) if g == "dsa" else "—" for g, k in columns]
            rows.append([f"{label}, L={sp['lengths'][j]}", fmt(dense)] + cells)
    return rows


def recall_cell(m: dict) -> str:
    """The indexer's recall at one k with the oracle / last-k / random recalls beside it."""
    if m["indexer"] is None:
        return "k >= L"
    return fmt_figure(m["indexer"], 2) + f" ({fmt(m['oracle']['mean'], 2)} / {fmt(m['last_k']['mean'], 2)} / {fmt(m['random']['mean'], 2)})"


INTERVALS = (
    "Brackets: 95% intervals. Perplexity: exp of the t interval over windows of the per-window mean loss; DSA vs "
    "dense: per window DSA / dense − 1 on the same tokens (paired), t interval over windows; recall: t interval "
    "over every (window, layer) value; passkey and 0/1 benchmark scores: Wilson interval over the trials; benchmark "
    "vs dense: sparse − dense on the same samples (paired; Newcombe's interval for 0/1 scores, else t), in "
    "percentage points (pts). "
    "No interval from a single window."
)


def skipped_sections(r: dict) -> list[str]:
    """The sections left out by --only / --skip (lm-eval counts only when tasks were given)."""
    asked = r["settings"].get("lm_eval_tasks")
    return [name for name in SECTIONS if name not in r["settings"]["sections"] and (name != "lm-eval" or asked)]


def summary_section(r: dict) -> str:
    meta = r["meta"]
    ks = [str(k) for k in r["settings"]["topks"]]
    columns = [("dsa", k) for k in ks] + ([("oracle", k) for k in ks] if r["settings"].get("oracle") else [])
    header = ["", "dense"] + [column_label(g, k) for g, k in columns]
    blocks = [
        "## Summary",
        "",
        f"Model `{meta['model']}` ({meta['n_params'] / 1e6:.1f}M parameters, {meta['n_layers']} layers, vocabulary "
        f"{meta['vocab_size']}) on **{meta['device']}**, {meta['dtype']}. Dense side: {meta['baseline']}. "
        f"DSA: top-k sparse attention in every layer, the keys chosen by the lightning indexer. Oracle: the same "
        f"sparse attention with the top-k keys of the true head-summed dense attention (evaluation only): its loss is "
        f"what k costs with the indexer's target keys, DSA vs oracle what the indexer misses of that target. Ratios in parentheses (speed, "
        f"memory) are DSA / dense.",
        "",
    ]
    skipped = skipped_sections(r)
    if skipped:
        blocks += [f"Sections skipped in this run (--only / --skip): {', '.join(skipped)}.", ""]
    rows = summary_rows(r, columns)
    if rows:
        blocks += [table(header, rows), "", INTERVALS + " " + MARK_LEGEND]
    if "decode_perplexity" in r:
        dec = r["decode_perplexity"]
        blocks += [
            "",
            f"Decode path: DSA k={dec['topk']} perplexity at L={dec['length']} token by token through the cache is "
            f"{fmt(dec['decode'], 6)}, prefill {fmt(dec['prefill'], 6)} (relative difference {dec['rel_diff']:.1e}).",
        ]
    blocks += [
        "",
        "For sequences no longer than k every causal key is selected and DSA equals dense attention, so DSA "
        "differs from dense only where L > k.",
    ]
    return "\n".join(blocks)


def perplexity_section(r: dict, plot: str) -> str:
    ppl = r["perplexity"]
    columns = quality_columns(ppl)
    labels = [column_label(g, k) for g, k in columns]
    windows = list(enumerate(zip(ppl["lengths"], ppl["windows"])))
    values = [[str(L), str(n), fmt_figure(ppl["dense"][i])] + [side_figure(ppl, g, k, i) for g, k in columns] for i, (L, n) in windows]
    changes = [[str(L), str(n)] + [change_cell(ppl, g, k, i) for g, k in columns] for i, (L, n) in windows]
    return "\n".join(
        [
            "## 1. Perplexity vs context length",
            "",
            "Non-overlapping held-out windows of L tokens, the same for every side (prefill, one forward). Per window "
            "its mean next-token loss x; perplexity = exp(mean of x over the windows) (= exp of the mean loss over "
            "every position), with exp of the 95% t interval of x over the windows:",
            "",
            table(["L", "windows", "dense"] + labels, values),
            "",
            "Sparse vs dense, paired: per window the relative difference of perplexity exp(x_sparse) / exp(x_dense) − 1 "
            "on the same tokens, mean and 95% t interval over the windows. " + MARK_LEGEND,
            "",
            table(["L", "windows"] + labels, changes),
            "",
            f"![perplexity]({plot})",
        ]
    )


def recall_section(r: dict, plot: str) -> str:
    rec = r["recall"]
    rows = [[k] + [fmt_figure(m[method], 3) if m[method] is not None else "k >= L" for method in METHOD_LABELS] for k, m in rec["mean"].items()]
    return "\n".join(
        [
            "## 2. Indexer recall",
            "",
            f"The DSA model runs dense attention on {rec['windows']} held-out window(s) of L={rec['length']}. For each layer "
            "and query token t with more than k causal keys, the dense attention probabilities summed over heads and "
            "normalized over keys give p[t, s]; recall is the mass sum_{s in S_t} p[t, s] of a k-key set S_t: the "
            "indexer's top-k (what DSA attends), the oracle top-k of p (upper bound), the last k tokens, and k random "
            "keys (in expectation, k / (t+1)). Mean over layers and windows, with the 95% t interval over every "
            "(window, layer) value (its spread is mostly the differences between layers):",
            "",
            table(["k"] + list(METHOD_LABELS.values()), rows),
            "",
            f"![recall per layer]({plot})",
        ]
    )


def side_name(side: str) -> str:
    """A side's name in the results ("dense", "128", "oracle:128") as the report's column label."""
    if side == "dense":
        return side
    group, _, k = side.rpartition(":")
    return column_label(group or "dsa", k)


def passkey_caveat(pk: dict) -> list[str]:
    """A warning paragraph when the dense model fails every trial: then the grid says nothing about DSA."""
    if pk["all_cells"]["dense"]["mean"] > 0:
        return []
    return [
        "**The dense model fails every trial: this model cannot retrieve the pass key at all, so the DSA grids "
        "below say nothing about sparse attention.** (A model too small or too briefly trained to copy a 5-digit "
        "number, such as the tiny preset's, fails this way.)",
        "",
    ]


def passkey_section(r: dict, plot: str) -> str:
    pk = r["passkey"]
    overall = pk["all_cells"]
    columns = quality_columns(overall)
    accuracy_row = ["all cells", fmt_figure(overall["dense"], 2)] + [side_figure(overall, g, k, digits=2) for g, k in columns]
    samples = "\n".join(
        f"- {side_name(s['side'])} (L={s['length']}, depth {s['depth']:.0%}, key {s['key']}): `{s['answer'].strip()!r}`" for s in pk["samples"]
    )
    return "\n".join(
        [
            "## 3. Passkey retrieval",
            "",
            'A user turn "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.", '
            'the filler "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." '
            'repeated to about L tokens with the needle "The pass key is N. Remember it. N is the pass key." (N: 5 random '
            'digits) at the given depth, and "What is the pass key?"; the answer starts with "The pass key is" and is '
            "decoded greedily; a trial counts if the first number in the answer is N (exact match). "
            f"{pk['trials']} trial(s) per cell, the same prompts for every side. Accuracy with its 95% Wilson "
            "interval over the trials:",
            "",
            table(["", "dense"] + [column_label(g, k) for g, k in columns], [accuracy_row]),
            "",
            *passkey_caveat(pk),
            f"![passkey]({plot})",
            "",
            "Example answers:",
            "",
            samples,
        ]
    )


def lm_eval_section(r: dict, plot: str | None) -> str:
    lm = r["lm_eval"]
    blocks = [
        "## 4. Standard benchmarks (lm-evaluation-harness)",
        "",
        f"lm-eval tasks on the same loaded model for every side (lm-eval's HFLM wrapper, batch size 1, greedy), "
        f"the first {lm['limit']} samples of each task at each context length (RULER: its max_seq_lengths, the "
        f"samples generated with this model's tokenizer; the same samples for every side)"
        + (f", at most {lm['max_gen_toks']} generated tokens per sample" if lm["max_gen_toks"] else "")
        + ". Score per sample: RULER's string match (fraction of the reference answers found in the output), "
        "else the task's first metric; 0/1 scores get a Wilson interval, fractional ones a t interval. "
        "Sparse vs dense, paired on the samples: sparse − dense in percentage points, with Newcombe's interval for "
        "paired proportions (0/1 scores) or the t interval of the per-sample differences. " + MARK_LEGEND,
    ]
    for task, scores in lm["scores"].items():
        columns = quality_columns(scores)
        labels = [column_label(g, k) for g, k in columns]
        lengths = list(enumerate(lm["lengths"]))
        values = [[str(L), fmt_figure(scores["dense"][i], 2)] + [side_figure(scores, g, k, i, digits=2) for g, k in columns] for i, L in lengths]
        diffs = lm["vs_dense"][task]
        changes = [[str(L)] + [fmt_change(diffs[g][k][i], " pts") if g in diffs else "—" for g, k in columns] for i, L in lengths]
        blocks += ["", f"**{task}**", "", table(["L", "dense"] + labels, values), "", table(["L"] + [f"{x} vs dense" for x in labels], changes)]
    for task, message in lm["failed"].items():
        blocks += ["", f"- {task}: not run, {message}"]
    if plot:
        blocks += ["", f"![lm-eval scores]({plot})"]
    return "\n".join(blocks)


def generations_section(r: dict) -> str:
    gen = r["generations"]
    blocks = [
        "## 5. Generations",
        "",
        f"Held-out conversations without their last answer, in the chat template; greedy decoding, at most "
        f"{gen['max_new_tokens']} new tokens, dense vs DSA k={gen['topk']}.",
    ]
    for n, s in enumerate(gen["samples"], 1):
        earlier = len(s["messages"]) - 1
        blocks += [
            "",
            f"### Prompt {n} ({s['prompt_tokens']} tokens" + (f", {earlier} earlier turns" if earlier else "") + ")",
            "",
            "> " + shorten(s["messages"][-1]["content"]).replace("\n", "\n> "),
            "",
            table(["reference", "dense", f"DSA k={gen['topk']}"], [[cell(s["reference"]), cell(s["dense"]), cell(s["dsa"])]]),
        ]
    return "\n".join(blocks)


def shorten(text: str, keep: int = 300) -> str:
    """The first and last `keep` characters of a long text."""
    return text if len(text) <= 2 * keep + 20 else f"{text[:keep]} […] {text[-keep:]}"


def cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def speed_section(r: dict, plot: str) -> str:
    sp = r["speed"]
    ks = list(sp["prefill_s"]["dsa"])
    memory = "torch.cuda.max_memory_allocated" if r["meta"]["device"].endswith("(cuda)") else "malloc'd bytes in use, glibc mallinfo2, sampled every ms"
    blocks = [
        "## 6. Speed and memory",
        "",
        f"On {r['meta']['device']}, {r['meta']['dtype']}: one prefill of L tokens into a fresh cache (last-position logits "
        f"only), then {sp['decode_tokens']} greedy decode steps at context ~L; median of {sp['repeats']} run(s) after a "
        f"warm-up run. Peak memory: the prefill's peak above the memory held before it ({memory}).",
    ]
    for metric, label in SPEED_METRICS.items():
        dense = sp[metric]["dense"]
        rows = [
            [str(L), fmt(dense[i])] + [fmt(sp[metric]["dsa"][k][i]) + ratio(sp[metric]["dsa"][k][i], dense[i]) for k in ks]
            for i, L in enumerate(sp["lengths"])
        ]
        blocks += ["", f"**{label}**", "", table(["L", "dense"] + [f"DSA k={k}" for k in ks], rows)]
    blocks += ["", f"![speed and memory]({plot})"]
    return "\n".join(blocks)


def setup_section(r: dict) -> str:
    meta = r["meta"]
    return "\n".join(
        [
            "## Setup",
            "",
            f"- DSA model: `{meta['model']}` (indexer: {meta['dsa_config']})",
            f"- dense side: {meta['baseline']}",
            f"- held-out data: {meta['data']}",
            f"- device: {meta['device']}, dtype {meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}",
            f"- wall time: {meta['seconds']:.0f} s, {meta['date']}",
            f"- command: `{meta['command']}`",
        ]
    )


def write_report(results: dict, output_dir) -> Path:
    """Write results.json, the PNG plots and report.md into output_dir; returns the report path.
    Sections absent from results (skipped with --only / --skip) get no plot and no report section."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    sections = [f"# Dense vs DSA: {Path(results['meta']['model']).name}", summary_section(results)]
    if "perplexity" in results:
        sections.append(perplexity_section(results, plot_perplexity(results, out / "perplexity.png")))
    if "recall" in results:
        sections.append(recall_section(results, plot_recall(results, out / "recall.png")))
    if "passkey" in results:
        sections.append(passkey_section(results, plot_passkey(results, out / "passkey.png")))
    if "lm_eval" in results:
        lm_plot = plot_lm_eval(results, out / "lm_eval.png") if results["lm_eval"]["scores"] else None
        sections.append(lm_eval_section(results, lm_plot))
    if "generations" in results:
        sections.append(generations_section(results))
    if "speed" in results:
        sections.append(speed_section(results, plot_speed(results, out / "speed.png")))
    sections.append(setup_section(results))
    report = out / "report.md"
    atomic_write(report, "\n\n".join(sections) + "\n")
    return report


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
