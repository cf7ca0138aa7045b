"""The compare.py metrics (dsa.evaluation) on hand-made attention and tiny random Qwen2 models."""

import pytest
import torch

import dsa
from dsa.core import break_zero_ties, index_scores
from dsa.evaluation import (
    PASSKEY_FILLER,
    PASSKEY_NEEDLE,
    RECALL_METHODS,
    CompareSettings,
    decode_nll,
    indexer_recall,
    passkey_answer,
    passkey_prompt_ids,
    prefill_nll,
    progress_total,
    recall_rows,
    section_units,
    token_windows,
    tokens_needed,
)
from dsa.presets import SAMPLES_DIR
from dsa.tiny import build_tokenizer
from tiny_models import tiny_dsa, tiny_qwen2

VOCAB = 96


def peaked_dsa(topk: int):
    """A tiny DSA model with peaked attention and spread index scores."""
    return tiny_dsa(tiny_qwen2(VOCAB, sharpen=4.0), topk, spread=8.0)


def causal_rows(T: int, seed: int = 0) -> torch.Tensor:
    """Random attention rows over causal keys: 1, T, T, each row summing to 1."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(1, T, T, generator=g).tril()
    return p / p.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# recall on hand-made attention
# ---------------------------------------------------------------------------------------------------


def test_recall_is_one_for_every_method_when_k_covers_the_row():
    T = 12
    p, rows = causal_rows(T), torch.arange(T)
    selected = torch.arange(T).expand(1, T, T)  # with k >= L every key is selected
    for k in (T, T + 5):
        for method, recall in recall_rows(p, selected, rows, k).items():
            assert torch.allclose(recall, torch.ones(1, T)), method


def test_recall_on_a_local_attention_pattern():
    """Attention only on the last 4 keys: a last-4 window captures everything, the oldest 4 keys nothing."""
    T, w = 16, 4
    keys, rows = torch.arange(T), torch.arange(T)
    local = (keys[None, :] <= rows[:, None]) & (keys[None, :] > rows[:, None] - w)
    p = (local.float() * torch.rand(T, T, generator=torch.Generator().manual_seed(0)) + 1e-9 * local)[None]
    p = p / p.sum(-1, keepdim=True)
    oldest = torch.arange(w).expand(1, T, w)  # an "indexer" that picks keys 0..3

    recall = recall_rows(p, oldest, rows, w)
    assert torch.allclose(recall["last_k"], torch.ones(1, T))
    assert torch.allclose(recall["oracle"], torch.ones(1, T))
    assert torch.allclose(recall["indexer"][0, 2 * w - 1 :], torch.zeros(T - 2 * w + 1), atol=1e-6)
    assert torch.allclose(recall["random"][0], (w / (rows + 1.0)).clamp(max=1))

    recall = recall_rows(p, torch.arange(2).expand(1, T, 2), rows, 2)  # a budget below the pattern width
    expected_last2 = p[0, rows, rows] + torch.cat([torch.zeros(1), p[0, rows[1:], rows[1:] - 1]])
    assert torch.allclose(recall["last_k"][0], expected_last2)
    assert (recall["oracle"] >= recall["last_k"] - 1e-6).all()
    assert (recall["oracle"][0, w:] < 1).all()


def test_indexer_recall_matches_eager_attention_weights():
    """The hook-based recall (q/k recomputed from the layer input) against the attention weights that an eager
    dense model returns, and the indexer scores of the hidden states it returns."""
    torch.manual_seed(0)
    base = tiny_qwen2(VOCAB, sharpen=4.0, attn_implementation="eager")
    model = tiny_dsa(base, topk=4, spread=8.0)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    topks = [3, 6]
    recall = indexer_recall(model, ids, topks)

    with torch.no_grad():
        out = base(ids, output_attentions=True, output_hidden_states=True)
    T = ids.shape[1]
    rows = torch.arange(T)
    for i, layer in enumerate(model.model.layers):
        p = out.attentions[i].sum(1)  # 1, T, T
        p = p / p.sum(-1, keepdim=True)
        x = base.model.layers[i].input_layernorm(out.hidden_states[i])
        with torch.no_grad():
            q, k, w = layer.self_attn.indexer(x, rows[None])
            scores = break_zero_ties(index_scores(q, k, w)).masked_fill(rows[None, :] > rows[:, None], float("-inf"))
        for kk in topks:
            counted = rows + 1 > kk
            indexer = p.gather(-1, scores.topk(kk, dim=-1).indices).sum(-1)[0, counted].mean()
            oracle = p.topk(kk, dim=-1).values.sum(-1)[0, counted].mean()
            assert recall[kk]["indexer"][i] == pytest.approx(indexer.item(), abs=1e-4)
            assert recall[kk]["oracle"][i] == pytest.approx(oracle.item(), abs=1e-4)
            assert recall[kk]["rows"] == counted.sum().item()
            assert recall[kk]["indexer"][i] <= recall[kk]["oracle"][i] + 1e-6


def test_indexer_recall_is_undefined_when_k_covers_the_window():
    model = peaked_dsa(topk=4)
    recall = indexer_recall(model, torch.randint(0, VOCAB, (1, 8)), [8, 16])
    assert recall[8]["rows"] == 0 and recall[8]["indexer"] == [None, None]
    assert recall[8]["per_window"]["indexer"] == [[None, None]]


def test_indexer_recall_keeps_each_window():
    """Several windows: per window the values of that window alone; per layer their mean; one step per window."""
    model = peaked_dsa(topk=4)
    windows = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    steps = []
    recall = indexer_recall(model, windows, [4], step=lambda: steps.append(1))
    assert len(steps) == 3 and recall[4]["rows"] == 3 * (16 - 4)
    for w in range(3):
        alone = indexer_recall(model, windows[w : w + 1], [4])
        for method in RECALL_METHODS:
            assert recall[4]["per_window"][method][w] == pytest.approx(alone[4][method], abs=1e-6)
    for method in RECALL_METHODS:
        per_window = recall[4]["per_window"][method]
        assert recall[4][method] == pytest.approx([sum(layer) / 3 for layer in zip(*per_window)], abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# sections: settings, progress units, held-out tokens
# ---------------------------------------------------------------------------------------------------


def test_sections_decide_progress_units_and_tokens():
    every = CompareSettings(lengths=[64, 128], topks=[16, 32], headline_topk=16, ppl_windows=3, recall_windows=2,
                            passkey_depths=[0, 1], passkey_trials=5, speed_lengths=[256], lm_eval_tasks=["a", "b", "c"],
                            lm_eval_lengths=[512])  # fmt: skip
    sides = 3  # dense and DSA at k = 16, 32 (speed)
    quality_sides = sides + 2  # and the oracle at k = 16, 32 (perplexity, passkey, lm-eval)
    units = section_units(every, n_prompts=4)
    assert units == {
        "perplexity": quality_sides * 2 * 3 + 2,
        "recall": 2,
        "passkey": quality_sides * 2 * 2 * 5,
        "lm-eval": quality_sides * 3 * 1,
        "generations": 2 * 4,
        "speed": sides * (1 + 1),
    }
    assert progress_total(every, 4) == sum(units.values())
    no_oracle = CompareSettings(lengths=[64], topks=[16, 32], headline_topk=16, passkey_trials=5, passkey_depths=[0], oracle=False)
    assert section_units(no_oracle, 0)["passkey"] == sides * 5 and "lm-eval" not in no_oracle.sections  # no tasks: no lm-eval
    assert tokens_needed(every) == (3 * 128, 256)

    some = CompareSettings(lengths=[64, 128], topks=[16, 32], headline_topk=16, ppl_windows=3, recall_windows=2,
                           speed_lengths=[256], sections=["speed", "recall"])  # fmt: skip
    assert some.sections == ["recall", "speed"]  # in running order
    assert section_units(some, 4) == {"recall": 2, "speed": sides * 2} and progress_total(some, 4) == 8
    assert tokens_needed(some) == (2 * 128, 256)
    only_passkey = CompareSettings(lengths=[64], topks=[16], headline_topk=16, sections=["passkey"])
    assert tokens_needed(only_passkey) == (0, 0)
    for bad, message in ((["lm-eval"], "lm_eval_tasks"), (["nope"], "sections"), ([], "sections")):
        with pytest.raises(ValueError, match=message):
            CompareSettings(lengths=[64], topks=[16], headline_topk=16, sections=bad)


# ---------------------------------------------------------------------------------------------------
# perplexity: decode path vs prefill
# ---------------------------------------------------------------------------------------------------


def test_decode_path_perplexity_equals_prefill():
    model = peaked_dsa(topk=5)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    sparse_prefill = prefill_nll(model, ids)
    assert sparse_prefill.shape == (23,)
    assert torch.allclose(decode_nll(model, ids), sparse_prefill, atol=1e-4)

    dsa.set_mode(model, "dense")
    dense_prefill = prefill_nll(model, ids)
    assert torch.allclose(decode_nll(model, ids), dense_prefill, atol=1e-4)
    # k < L: the sparse stage really differs from dense after the first k positions, and not before
    assert torch.allclose(sparse_prefill[:4], dense_prefill[:4], atol=1e-5)
    assert not torch.allclose(sparse_prefill, dense_prefill, atol=1e-3)


def test_prefill_nll_is_the_model_loss():
    model = peaked_dsa(topk=5)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None], use_cache=False).loss
    assert prefill_nll(model, ids).mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_token_windows():
    windows = token_windows(list(range(100)), 30, 5)
    assert windows.shape == (3, 30) and windows[1, 0].item() == 30
    with pytest.raises(ValueError, match="fewer than one window of 200"):
        token_windows(list(range(100)), 200, 1)


# ---------------------------------------------------------------------------------------------------
# passkey
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([SAMPLES_DIR / "sft_heldout.jsonl"], vocab_size=400)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_puts_the_needle_at_the_depth(tokenizer, depth):
    length, key = 400, 48213
    ids = passkey_prompt_ids(tokenizer, length, depth, key)
    text = tokenizer.decode(ids)
    needle = PASSKEY_NEEDLE.format(key=key)
    assert text.count(needle) == 1 and text.endswith("The pass key is")
    n_fillers = text.count(PASSKEY_FILLER)
    before = text[: text.index(needle)].count(PASSKEY_FILLER)
    assert before == round(depth * n_fillers)
    # as long as fits: one more filler paragraph would exceed the length
    per_filler = len(tokenizer(" " + PASSKEY_FILLER, add_special_tokens=False).input_ids)
    assert length - 2 * per_filler < len(ids) <= length
    assert n_fillers >= 3


def test_passkey_answer_parses_the_first_number():
    assert passkey_answer(" 48213. Remember it.") == 48213
    assert passkey_answer("The pass key is 7 and 9") == 7
    assert passkey_answer(" unknown") is None
