"""scripts/needle_by_layer.py: where the indexer loses the answer needle, per layer."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_dsa, tiny_qwen2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import needle_by_layer  # noqa: E402


def test_needle_span_finds_the_one_occurrence():
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 11)]  # "ab" "c12" "3" "4 x" "yz"
    assert needle_by_layer.needle_span("abc1234 xyz", "1234", offsets) == [1, 2, 3]
    assert needle_by_layer.needle_span("abc1234 xyz", "999", offsets) is None
    assert needle_by_layer.needle_span("12 and 12", "12", [(0, 2), (2, 7), (7, 9)]) is None


def test_needle_stats_by_hand():
    # 2 heads, 1 row, 6 keys; the needle is keys 3 and 4. Head 0 looks at key 1, head 1 at key 4.
    logits = torch.full((2, 1, 6), -20.0)
    logits[0, 0, 1] = 20.0
    logits[1, 0, 4] = 20.0
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0]])  # key 5 scores highest but is not allowed
    allowed = torch.tensor([[True, True, True, True, True, False]])
    needle = torch.tensor([False, False, False, True, True, False])
    s = needle_by_layer.needle_stats(logits, scores, allowed, needle, k=2)
    assert s["mass_max"].item() == pytest.approx(1.0, abs=1e-6)  # head 1 puts everything on key 4
    assert s["mass_sum"].item() == pytest.approx(0.5, abs=1e-6)  # half of the head-summed target
    assert s["hit_indexer"].item() == 0.0  # the indexer's top-2 allowed keys are 0 and 1
    assert s["hit_oracle"].item() == 1.0  # p's top-2 are keys 1 and 4
    assert s["rank_indexer"].item() == 5.0  # keys 0-3 score above key 4; key 5 is not counted
    assert needle_by_layer.needle_stats(logits, scores, allowed, needle, k=5)["hit_indexer"].item() == 1.0


def synthetic_prompts(n: int, length: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompts.append({"ids": ids, "answer": 3, "needle": [5 + i, 6 + i, 7 + i]})
    return prompts


def test_measure_matches_transformers_attention_and_is_exact_at_full_k():
    stock = tiny_qwen2(layers=3, sharpen=4.0, attn_implementation="eager")  # the same weights, without DSA
    model = tiny_dsa(tiny_qwen2(layers=3, sharpen=4.0), topk=8, spread=4.0)
    prompts = synthetic_prompts(2, 40, 128)
    # The per-head attention on the needle against transformers' own eager attention probabilities.
    dsa_modes = needle_by_layer.measure(model, prompts, k=8, mode="dense")
    expected = [[] for _ in model.model.layers]
    for prompt in prompts:
        ids = torch.tensor(prompt["ids"])[None]
        with torch.no_grad():
            attentions = stock(input_ids=ids, use_cache=False, output_attentions=True).attentions
        rows = torch.arange(len(prompt["ids"]) - 4, len(prompt["ids"]) - 1)
        for i, a in enumerate(attentions):
            expected[i].append(a[0][:, rows][:, :, prompt["needle"]].sum(-1).amax(0))  # per row: the top head's mass
    for i in range(len(model.model.layers)):
        assert dsa_modes["mass_max"][i] == pytest.approx(torch.cat(expected[i]).mean().item(), rel=1e-4)
    assert len(dsa_modes["correct"]) == 2
    # k >= every row's keys: both selections keep every key, and DSA is dense attention, so the modes agree.
    full_sparse = needle_by_layer.measure(model, prompts, k=64, mode="sparse")
    full_dense = needle_by_layer.measure(model, prompts, k=64, mode="dense")
    assert full_sparse["hit_indexer"] == [1.0] * 3 and full_sparse["hit_oracle"] == [1.0] * 3
    for name in needle_by_layer.STATS:
        assert full_sparse[name] == pytest.approx(full_dense[name], rel=1e-5)
    # a small k keeps less of the needle for some layer than k = 64 does, and never more
    assert all(a <= b for a, b in zip(dsa_modes["hit_oracle"], full_dense["hit_oracle"]))


def test_bad_models_argument_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        needle_by_layer.main(["--models", f"x={tmp_path}/missing", "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_command_on_ruler_prompts(checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts, skipped = needle_by_layer.ruler_prompts("niah_multikey_2", 512, 2, tokenizer)
    assert len(prompts) + skipped == 2 and prompts
    for p in prompts:
        answer = tokenizer.decode(p["ids"][-p["answer"] :]).strip()
        assert answer.isdigit()  # niah_multikey_2's values are numbers
        assert answer in tokenizer.decode([p["ids"][i] for i in p["needle"]])  # the needle tokens hold the value
        assert max(p["needle"]) < len(p["ids"]) - p["answer"]  # in the haystack, not in the answer
    out = tmp_path / "new" / "needle.json"  # folders that do not exist yet are made
    args = ["--models", f"tiny={checkpoint}", "--length", "512", "--topk", "16", "--limit", "2", "--output", str(out)]
    needle_by_layer.main([*args, "--plot", str(tmp_path / "plots" / "needle.png")])
    needle_by_layer.main([*args[:1], f"again={checkpoint}", *args[2:], "--mode", "dense"])  # appends to the JSON
    results = json.loads(out.read_text())
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert set(results) == {"tiny", "again"} and results["again"]["mode"] == "dense"
    for r in results.values():
        assert all(len(r[name]) == layers for name in needle_by_layer.STATS)  # one value per layer
        assert all(0.0 <= v <= 1.0 for name in ("mass_max", "mass_sum", "hit_indexer", "hit_oracle") for v in r[name])
    assert (tmp_path / "plots" / "needle.png").stat().st_size > 0
    assert "| tiny | 1 |" in capsys.readouterr().out
