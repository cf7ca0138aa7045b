"""Where DSA loses the needle: per layer, on RULER's needle prompts, whether the needle token that the retrieval head
reads is among the k keys the indexer selects when the model writes the answer, beside the oracle's k keys (the
largest head-summed dense attention, what the indexer is trained towards), and how much attention the needle gets.

Each prompt is an lm-eval RULER document (the ones compare.py --lm-eval evaluates: same generator, seed and order)
followed by its reference answer, teacher-forced. The needle is the reference value's tokens where the value stands in
the haystack (a prompt whose value is not found exactly once is skipped and counted). The answer rows are the last
prompt token and every answer token but the last: the rows that predict the answer. Per layer, averaged over the
answer rows of every prompt:

    mass_max     the largest share of one attention head's probability on the needle (the retrieval head reads
                 the needle: high in a few layers, near 0 in the others)
    mass_sum     the needle's share of p, the head-summed dense attention the indexer is trained towards
                 (dsa.core.attention_target)
    hit_indexer  whether the needle token that retrieval head attends most (the digit it copies) is among the
                 indexer's top-k (dsa.core.select_topk, what DSA attends): the share of rows
    hit_oracle   the same for the top-k of p (the best the indexer's target allows)
    rank_indexer that token's rank among the row's keys by index score (1 = first; the median over rows)

Per prompt also `correct`: the model's argmax equals the reference at every answer row (teacher-forced greedy).
The model runs in --mode sparse (DSA, what the user runs: a layer sees the earlier layers' sparse outputs) or dense
(every layer on the dense residual stream, the warm-up's setting); a forward pre-hook on each attention layer
recomputes its q, k and indexer outputs from the layer input, as the layer does, at the answer rows only.

    uv run python scripts/needle_by_layer.py --models warmup=runs/warmup sparse=runs/sparse --task niah_multikey_2 \\
        --length 4096 --topk 128 --limit 20 --output needle.json --plot needle.png
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa  # noqa: F401  (registers the DSA model types)
from dsa.core import allowed_keys, attention_target, break_zero_ties, index_scores
from dsa.modeling import dsa_attention_layers, set_mode, set_topk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STATS = ("mass_max", "mass_sum", "hit_indexer", "hit_oracle", "rank_indexer")


def needle_span(text: str, value: str, offsets: list[tuple[int, int]]) -> list[int] | None:
    """Indices of the tokens overlapping the one occurrence of `value` in `text` (offsets: each token's character
    range), or None when `value` occurs there zero or several times."""
    start = text.find(value)
    if start < 0 or text.find(value, start + 1) >= 0:
        return None
    end = start + len(value)
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]


def needle_stats(logits: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor, needle: torch.Tensor, k: int) -> dict:
    """Per row: the attention on the needle and whether the indexer's and the oracle's top-k keep the needle token
    the most attentive head reads most.

    logits: H, R, S attention logits of the heads (scaled q . k); scores: R, S index scores; allowed: R, S bool (the
    causal keys); needle: S bool (the needle's keys, allowed in every row)  ->  {stat: R tensor} (module doc)."""
    per_head = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)  # H, R, S
    p = attention_target(logits[None], allowed[None])[0]  # R, S
    on_needle = per_head * needle  # H, R, S
    head_mass = on_needle.sum(-1)  # H, R
    head = head_mass.argmax(0)  # R: the most attentive head of each row
    rows = torch.arange(len(head), device=logits.device)
    read = on_needle[head, rows].argmax(-1)  # R: the needle token that head attends most
    scores = break_zero_ties(scores.float()).masked_fill(~allowed, float("-inf"))
    kk = min(k, scores.shape[-1])
    indexer = scores.topk(kk, dim=-1).indices  # R, kk
    oracle = p.masked_fill(~allowed, -1.0).topk(kk, dim=-1).indices
    return {
        "mass_max": head_mass.amax(0),
        "mass_sum": (p * needle).sum(-1),
        "hit_indexer": (indexer == read[:, None]).any(-1).float(),
        "hit_oracle": (oracle == read[:, None]).any(-1).float(),
        "rank_indexer": (scores > scores[rows, read][:, None]).sum(-1).float() + 1,
    }


@torch.no_grad()
def layer_needle_stats(attn, hidden, position_embeddings, position_ids, rows: torch.Tensor, needle: torch.Tensor, k: int) -> dict:
    """needle_stats of one DSA attention layer at the query rows `rows` (T) from its input hidden (1, T, hidden),
    with the layer's own projections and indexer. Returns {stat: R tensor}."""
    q, key, _ = attn.project(hidden, position_embeddings)  # 1, Hq, T, D; 1, Hkv, T, D
    q_I, k_I, w_I = attn.indexer(hidden, position_ids)  # 1, T, H_I, d_I; 1, T, d_I; 1, T, H_I
    Hq, Hkv = q.shape[1], key.shape[1]
    k_rep = key[0].float().repeat_interleave(Hq // Hkv, dim=0)  # Hq, T, D (query head h reads KV head h // G)
    logits = torch.matmul(q[0, :, rows].float(), k_rep.transpose(-1, -2)) * attn.scaling  # Hq, R, T
    scores = index_scores(q_I[:, rows], k_I, w_I[:, rows])[0]  # R, T
    allowed = allowed_keys(rows, None, hidden.shape[1])[0]  # R, T
    return needle_stats(logits, scores, allowed, needle, k)


def ruler_prompts(task: str, length: int, limit: int, tokenizer) -> tuple[list[dict], int]:
    """[{"ids": prompt + answer tokens, "answer": n answer tokens, "needle": [token indices]}], skipped: the first
    `limit` documents of the RULER task at `length`, as compare.py --lm-eval builds them."""
    from dsa.lm_eval import LmEvalSuite

    suite = LmEvalSuite([task], [length], tokenizer, limit)
    try:
        t = suite.task(task, length)
        if t is None:
            raise SystemExit(f"needle_by_layer: {suite.failed[task]}")
        docs = list(t.eval_docs)[:limit]
        prompts, skipped = [], 0
        for doc in docs:
            context = t.fewshot_context(doc, 0, gen_prefix=t.doc_to_prefix(doc))
            if not doc.get("outputs"):
                raise SystemExit(f"needle_by_layer: {task} is not a needle task (its documents have no reference outputs)")
            value = doc["outputs"][0]
            enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
            span = needle_span(context, value, enc["offset_mapping"])
            if span is None:
                skipped += 1
                continue
            answer = tokenizer(" " + value, add_special_tokens=False)["input_ids"]
            prompts.append({"ids": enc["input_ids"] + answer, "answer": len(answer), "needle": span})
        return prompts, skipped
    finally:
        suite.close()


@torch.no_grad()
def measure(model, prompts: list[dict], k: int, mode: str) -> dict:
    """{stat: [per layer: mean (rank: median) over every answer row of every prompt]}, "correct": [per prompt]."""
    set_mode(model, mode)
    set_topk(model, k)
    layers = dsa_attention_layers(model)
    device = next(model.parameters()).device
    current: dict = {}
    values = [{name: [] for name in STATS} for _ in layers]  # per layer: per-row values of every prompt
    correct = []

    def hook(i, attn, kwargs):
        stats = layer_needle_stats(attn, kwargs["hidden_states"], kwargs["position_embeddings"], kwargs["position_ids"],
                                   current["rows"], current["needle"], k)  # fmt: skip
        for name, v in stats.items():
            values[i][name].append(v.cpu())

    handles = [attn.register_forward_pre_hook(lambda m, a, kw, i=i: hook(i, m, kw), with_kwargs=True) for i, attn in enumerate(layers)]
    try:
        for prompt in prompts:
            ids = torch.tensor(prompt["ids"], device=device)
            T, n = len(ids), prompt["answer"]
            current["rows"] = torch.arange(T - n - 1, T - 1, device=device)
            current["needle"] = torch.zeros(T, dtype=torch.bool, device=device)
            current["needle"][prompt["needle"]] = True
            logits = model(input_ids=ids[None], use_cache=False, logits_to_keep=n + 1).logits[0, :-1]  # n, V
            correct.append(bool((logits.argmax(-1) == ids[T - n :]).all()))
    finally:
        for handle in handles:
            handle.remove()
    result = {name: [] for name in STATS}
    for layer in values:
        for name in STATS:
            v = torch.cat(layer[name])
            result[name].append((v.median() if name == "rank_indexer" else v.mean()).item())
    result["correct"] = correct
    return result


def plot(results: dict, k: int, title: str, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, r in results.items():
        layers = range(len(r["hit_indexer"]))
        (line,) = top.plot(layers, r["hit_indexer"], "o-", label=f"indexer top-{k} ({name})")
        color = line.get_color()
        top.plot(layers, r["hit_oracle"], ":", color=color, alpha=0.7, label=f"oracle top-{k} ({name})")
        bottom.plot(layers, r["mass_max"], "s-", color=color, label=f"most attentive head ({name})")
        bottom.plot(layers, r["mass_sum"], "x--", color=color, alpha=0.7, label=f"head-summed p ({name})")
    top.set_ylabel("copied needle token in top-k")
    top.set_ylim(-0.02, 1.02)
    top.set_title(title)
    bottom.set_ylabel("attention on the needle")
    bottom.set_xlabel("layer")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="name=DSA checkpoint directory, one or more")
    parser.add_argument("--task", default="niah_multikey_2", help="an lm-eval RULER needle task")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--limit", type=int, default=20, help="documents (the first ones, as compare.py --lm-eval-limit)")
    parser.add_argument("--mode", choices=["sparse", "dense"], default="sparse")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--output", required=True, help="JSON file of the results (models measured before are kept)")
    parser.add_argument("--plot", help="PNG: needle kept and attention per layer, every model")
    args = parser.parse_args(argv)

    specs = []
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / "config.json").is_file():
            parser.error(f"--models {spec!r}: expected name=checkpoint directory holding a config.json")
        specs.append((name, path))
    if args.topk < 1 or args.limit < 1:
        parser.error(f"--topk {args.topk} and --limit {args.limit} must be >= 1")
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    for path in filter(None, (args.output, args.plot)):  # before the minutes of measuring, not after
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    prompts = None
    for name, path in specs:
        start = time.time()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        if prompts is None:
            prompts, skipped = ruler_prompts(args.task, args.length, args.limit, AutoTokenizer.from_pretrained(path))
            if not prompts:
                raise SystemExit(f"needle_by_layer: no prompt of {args.task} at {args.length} has its answer once in the haystack")
            print(f"{len(prompts)} prompts of {args.task} at {args.length}" + (f", {skipped} skipped (value not found once)" if skipped else ""))
        r = measure(model, prompts, args.topk, args.mode)
        results[name] = {"task": args.task, "length": args.length, "topk": args.topk, "mode": args.mode, **r}
        print(f"{name}: {sum(r['correct'])}/{len(r['correct'])} answers correct (teacher-forced), {time.time() - start:.0f} s")
        del model
    output.write_text(json.dumps(results, indent=1) + "\n")

    print("| model | layer | " + " | ".join(STATS) + " |\n|---|---|" + "---|" * len(STATS))
    for name, r in results.items():
        for i in range(len(r["hit_indexer"])):
            print(f"| {name} | {i} | " + " | ".join(f"{r[s][i]:.3f}" for s in STATS) + " |")
    if args.plot:
        plot(results, args.topk, f"{args.task} at L={args.length}: the answer needle per layer", Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
