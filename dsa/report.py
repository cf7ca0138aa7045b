"""Render compare.py results: results.json, PNG plots (matplotlib) and a self-contained report.md.

`write_report(results, output_dir)` takes the dict built by `dsa.evaluation.compare` plus its "meta" entry
(schema: docs/results_schema.md).
"""

import json
import os
from pathlib import Path

import matplotlib

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


def ratio(value, reference) -> str:
    return f" ({value / reference:.2f}×)" if value is not None and reference else ""


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
    ppl = r["perplexity"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ppl["lengths"], ppl["dense"], "o-", color="black", label="dense", linewidth=2)
    for k, values in ppl["dsa"].items():
        ax.plot(ppl["lengths"], values, "s--", label=f"DSA k={k}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ppl["lengths"], [str(n) for n in ppl["lengths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Held-out perplexity vs context length")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_recall(r: dict, path: Path) -> str:
    rec = r["recall"]
    ks = list(rec["per_layer"])
    cols = min(len(ks), 2)
    rows = (len(ks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, k in zip(axes.flat, ks):
        per_layer = rec["per_layer"][k]
        for method, label in METHOD_LABELS.items():
            if per_layer[method][0] is not None:
                ax.plot(range(len(per_layer[method])), per_layer[method], "o-", label=label, markersize=3)
        if per_layer["indexer"][0] is None:
            ax.text(0.5, 0.5, "k >= L: every key selected", ha="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        ax.set_title(f"k = {k}, L = {rec['length']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("dense attention mass captured")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ks) :]:
        ax.axis("off")
    return save(fig, path)


def plot_passkey(r: dict, path: Path) -> str:
    pk = r["passkey"]
    grids = [("dense", pk["dense"])] + [(f"DSA k={k}", acc) for k, acc in pk["dsa"].items()]
    fig, axes = plt.subplots(1, len(grids), figsize=(2.2 + 0.9 * len(pk["lengths"]) * len(grids), 3.4), squeeze=False)
    for ax, (title, acc) in zip(axes[0], grids):
        grid = [[acc[i][j] for i in range(len(pk["lengths"]))] for j in range(len(pk["depths"]))]  # depth x length
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for j in range(len(pk["depths"])):
            for i in range(len(pk["lengths"])):
                ax.text(i, j, f"{grid[j][i]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]])
        ax.set_yticks(range(len(pk["depths"])), [f"{d:.0%}" for d in pk["depths"]])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
    fig.suptitle(f"Passkey retrieval accuracy ({pk['trials']} trial(s) per cell, greedy, exact match)")
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


def passkey_mean(grid: list[list[float]]) -> float:
    return sum(map(sum, grid)) / sum(map(len, grid))


def summary_section(r: dict) -> str:
    meta, ppl, rec, pk, sp, dec = r["meta"], r["perplexity"], r["recall"], r["passkey"], r["speed"], r["decode_perplexity"]
    ks = list(ppl["dsa"])
    header = ["", "dense"] + [f"DSA k={k}" for k in ks]
    L, i = ppl["lengths"][-1], len(ppl["lengths"]) - 1
    j = len(sp["lengths"]) - 1
    rows = [
        [f"perplexity, L={L}", fmt(ppl["dense"][i])] + [fmt(ppl["dsa"][k][i]) + ratio(ppl["dsa"][k][i], ppl["dense"][i]) for k in ks],
        [f"indexer recall, L={rec['length']} (oracle / last-k / random)", "—"]
        + [
            fmt(m["indexer"], 2) + f" ({fmt(m['oracle'], 2)} / {fmt(m['last_k'], 2)} / {fmt(m['random'], 2)})"
            if m["indexer"] is not None
            else "k >= L"
            for m in (rec["mean"][k] for k in ks)
        ],
        ["passkey accuracy (all cells)", fmt(passkey_mean(pk["dense"]), 2)] + [fmt(passkey_mean(pk["dsa"][k]), 2) for k in ks],
    ]
    for metric, label in SPEED_METRICS.items():
        dense = sp[metric]["dense"][j]
        rows.append([f"{label}, L={sp['lengths'][j]}", fmt(dense)] + [fmt(sp[metric]["dsa"][k][j]) + ratio(sp[metric]["dsa"][k][j], dense) for k in ks])
    return "\n".join(
        [
            "## Summary",
            "",
            f"Model `{meta['model']}` ({meta['n_params'] / 1e6:.1f}M parameters, {meta['n_layers']} layers, vocabulary "
            f"{meta['vocab_size']}) on **{meta['device']}**, {meta['dtype']}. Dense side: {meta['baseline']}. "
            f"DSA: top-k sparse attention in every layer. Ratios in parentheses are DSA / dense.",
            "",
            table(header, rows),
            "",
            f"Decode path: DSA k={dec['topk']} perplexity at L={dec['length']} token by token through the cache is "
            f"{fmt(dec['decode'], 6)}, prefill {fmt(dec['prefill'], 6)} (relative difference {dec['rel_diff']:.1e}).",
            "",
            "For sequences no longer than k every causal key is selected and DSA equals dense attention, so DSA "
            "differs from dense only where L > k.",
        ]
    )


def perplexity_section(r: dict, plot: str) -> str:
    ppl = r["perplexity"]
    ks = list(ppl["dsa"])
    rows = [
        [str(L), str(n), fmt(ppl["dense"][i])] + [fmt(ppl["dsa"][k][i]) for k in ks]
        for i, (L, n) in enumerate(zip(ppl["lengths"], ppl["windows"]))
    ]
    return "\n".join(
        [
            "## 1. Perplexity vs context length",
            "",
            "exp(mean next-token loss) over every position of non-overlapping held-out windows of L tokens (prefill, one forward).",
            "",
            table(["L", "windows", "dense"] + [f"DSA k={k}" for k in ks], rows),
            "",
            f"![perplexity]({plot})",
        ]
    )


def recall_section(r: dict, plot: str) -> str:
    rec = r["recall"]
    rows = [[k] + [fmt(m[method], 3) for method in METHOD_LABELS] for k, m in rec["mean"].items()]
    return "\n".join(
        [
            "## 2. Indexer recall",
            "",
            f"The DSA model runs dense attention on {rec['windows']} held-out window(s) of L={rec['length']}. For each layer "
            "and query token t with more than k causal keys, the dense attention probabilities summed over heads and "
            "normalized over keys give p[t, s]; recall is the mass sum_{s in S_t} p[t, s] of a k-key set S_t: the "
            "indexer's top-k (what DSA attends), the oracle top-k of p (upper bound), the last k tokens, and k random "
            "keys (in expectation, k / (t+1)). Mean over layers:",
            "",
            table(["k"] + list(METHOD_LABELS.values()), rows),
            "",
            f"![recall per layer]({plot})",
        ]
    )


def side_name(side: str) -> str:
    return side if side == "dense" else f"DSA k={side}"


def passkey_caveat(pk: dict) -> list[str]:
    """A warning paragraph when the dense model fails every trial: then the grid says nothing about DSA."""
    if passkey_mean(pk["dense"]) > 0:
        return []
    return [
        "**The dense model fails every trial: this model cannot retrieve the pass key at all, so the DSA grids "
        "below say nothing about sparse attention.** (A model too small or too briefly trained to copy a 5-digit "
        "number, such as the tiny preset's, fails this way.)",
        "",
    ]


def passkey_section(r: dict, plot: str) -> str:
    pk = r["passkey"]
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
            f"{pk['trials']} trial(s) per cell, the same prompts for every side.",
            "",
            *passkey_caveat(pk),
            f"![passkey]({plot})",
            "",
            "Example answers:",
            "",
            samples,
        ]
    )


def generations_section(r: dict) -> str:
    gen = r["generations"]
    blocks = [
        "## 4. Generations",
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
        "## 5. Speed and memory",
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
    """Write results.json, the PNG plots and report.md into output_dir; returns the report path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "perplexity": plot_perplexity(results, out / "perplexity.png"),
        "recall": plot_recall(results, out / "recall.png"),
        "passkey": plot_passkey(results, out / "passkey.png"),
        "speed": plot_speed(results, out / "speed.png"),
    }
    atomic_write(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    sections = [
        f"# Dense vs DSA: {Path(results['meta']['model']).name}",
        summary_section(results),
        perplexity_section(results, plots["perplexity"]),
        recall_section(results, plots["recall"]),
        passkey_section(results, plots["passkey"]),
        generations_section(results),
        speed_section(results, plots["speed"]),
        setup_section(results),
    ]
    report = out / "report.md"
    atomic_write(report, "\n\n".join(sections) + "\n")
    return report


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
