"""The fast paths equal the reference path (fp32, 1e-5): outputs, gradients, indexer loss, decode cache.

Fast paths (dsa.attention.FAST_PATHS): `sparse_attention_fast` (index_select + embedding_bag),
`masked_dense_attention` (SDPA under a mask of the selected keys, for chunks with few keys) and
`dense_attention` (SDPA when each query selects all its allowed keys), the fast selection, the warm-up loss
with its gradient computed in the forward pass, keys truncated to each chunk's last
query. Reference: `sparse_attention` over all keys. Decode cache: `GrowingIndexedLayer` against
transformers' `DynamicIndexedLayer` (torch.cat).
"""

import pytest
import torch
from transformers.cache_utils import DynamicIndexedLayer

import dsa
import dsa.attention
import dsa.cache
from dsa import cpu_attention
from dsa.attention import (
    allowed_keys,
    break_zero_ties,
    dense_attention,
    index_scores_fast,
    masked_dense_attention,
    select_topk,
    sparse_attention,
    sparse_attention_fast,
    topk_by_blocks,
    topk_plain,
)
from dsa.cache import GrowingIndexedLayer
from dsa.indexer import index_scores
from tiny_models import tiny_dsa, tiny_qwen2

VOCAB = 96


def gqa_dsa(topk: int) -> dsa.Qwen2DSAForCausalLM:
    """A 2-layer DSA model with GQA (6 query heads on 2 KV heads), peaked attention and spread index scores."""
    return tiny_dsa(tiny_qwen2(VOCAB, hidden_size=48, heads=6, sharpen=4.0), topk, spread=4.0)


def random_selection(B=2, Hq=6, Hkv=2, T=7, S=20, K=5, D=8, seed=0):
    """q, k, v with grad, and a causal top-K selection with padding (batch row 1 has only 3 real keys, at the
    end: its queries have fewer than K valid keys, or none)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_() for H, L in ((Hq, T), (Hkv, S), (Hkv, S)))
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, : S - 3] = False
    allowed = allowed_keys(torch.arange(S - T, S), padding, S)
    scores = torch.randn(B, T, S, generator=g)
    q_idx, k_idx, w_idx = scores[:, :, None, :], torch.eye(S)[None].expand(B, S, S), torch.ones(B, T, 1)
    indices, valid = select_topk(q_idx, k_idx, w_idx, torch.arange(S - T, S), padding, K)  # index score of key s = scores[..., s]
    return q, k, v, allowed, indices, valid


def grads(out: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("attend", [sparse_attention_fast, masked_dense_attention])
@pytest.mark.parametrize("T,S,K", [(7, 20, 5), (1, 20, 5), (12, 12, 4)])
def test_fast_sparse_attention_equals_reference_with_gradients(T, S, K, attend):
    q, k, v, _, indices, valid = random_selection(T=T, S=S, K=K)
    assert not valid.all()  # some slots are invalid (padding, rows with fewer than K keys)
    ref = sparse_attention(q, k, v, indices, valid, 0.3)
    fast = attend(q, k, v, indices, valid, 0.3)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(fast, q, k, v), grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [7, 12])
def test_fast_sparse_attention_in_blocks_with_a_reused_key_buffer(T, monkeypatch):
    """Several query blocks (the last one partial) sharing one selected-key buffer from a Scratch (autograd off),
    and the same call with autograd on, where the buffer is not used: both equal the reference."""
    monkeypatch.setattr(dsa.attention, "FAST_BLOCK", 3)
    q, k, v, _, indices, valid = random_selection(T=T, S=20, K=5)
    ref = sparse_attention(q, k, v, indices, valid, 0.3)
    scratch = dsa.attention.Scratch()
    with torch.no_grad():
        fast = sparse_attention_fast(q, k, v, indices, valid, 0.3, scratch=scratch)
    assert scratch.buffers["selected_keys"].numel() == 2 * 3 * 5 * 8  # one block's keys, twice over (Scratch)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    with_grad = sparse_attention_fast(q, k, v, indices, valid, 0.3, scratch=dsa.attention.Scratch())
    for a, b in zip(grads(with_grad, q, k, v), grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [4, 8])  # the group sizes topk_group_size picks
@pytest.mark.parametrize("S", [64, 67, 203])
def test_topk_by_blocks_selects_what_torch_topk_selects(S, block):
    """Rows long enough for the block path, a tail after the last full group, exact-zero ties broken by
    recency, masked keys, and a row with fewer allowed keys than k."""
    k = 4
    scores = torch.randn(2, 5, S, generator=torch.Generator().manual_seed(S))
    scores[0, :, ::3] = 0  # ReLU zeros
    scores[0, 0, :] = 0  # a row of zeros only: the k most recent keys win
    scores[1, 0, S // 2 :] = float("-inf")  # masked keys
    scores[1, 1, 3:] = float("-inf")  # 3 allowed keys < k
    scores = break_zero_ties(scores)
    assert S // block >= 2 * k  # the block path is taken
    plain, fast = topk_plain(scores, k), topk_by_blocks(scores, k, block)
    assert fast.shape == plain.shape and (fast.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct keys
    torch.testing.assert_close(scores.gather(-1, fast).sort(-1).values, scores.gather(-1, plain).sort(-1).values)
    finite = scores.gather(-1, plain).isfinite().all(-1)  # rows whose k-th score is a real one
    assert torch.equal(fast.sort(-1).values[finite], plain.sort(-1).values[finite])
    assert set(fast[1, 1].tolist()) >= {0, 1, 2}
    assert torch.equal(fast[0, 0].sort().values, torch.arange(S - k, S))


@pytest.mark.parametrize("tile_elements", [2**40, 27 * 16, 27 * 70 - 1])  # one tile; 16 keys a tile (the last 6); 69 and 1
def test_fast_index_scores_in_key_tiles_equal_the_reference(tile_elements, monkeypatch):
    """index_scores_fast computes the logits tile by tile (at most TILE_ELEMENTS = T * H_I * tile each) into
    one Scratch buffer and writes each tile's head sum into its columns: every score as `index_scores`, for
    each batch row, and the same Scratch serves a second call with other shapes."""
    monkeypatch.setattr(dsa.attention, "TILE_ELEMENTS", tile_elements)
    g = torch.Generator().manual_seed(5)
    scratch = dsa.attention.Scratch()
    for T, S in [(9, 70), (4, 30)]:  # T * H_I = 27, then 12
        q_idx, k_idx, w_idx = torch.randn(2, T, 3, 8, generator=g), torch.randn(2, S, 8, generator=g), torch.randn(2, T, 3, generator=g)
        ref = index_scores(q_idx, k_idx, w_idx)
        assert (ref == 0).any() and (ref != 0).any()  # ReLU zeros and real scores
        torch.testing.assert_close(index_scores_fast(q_idx, k_idx, w_idx, scratch), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(index_scores_fast(q_idx, k_idx, w_idx), ref, atol=1e-5, rtol=1e-5)
    tile = min(tile_elements // 27, 70)
    assert scratch.buffers["index_logits"].numel() == 2 * 2 * 27 * tile  # the largest tile's logits, twice (Scratch)


@pytest.mark.parametrize("cpu_selection", [False, True])  # PyTorch ops / the C++ kernels where they build
@pytest.mark.parametrize("T,S", [(1, 70), (9, 9), (9, 70)])  # a decode step, a first chunk, a later chunk
def test_fast_selection_selects_what_the_reference_selects(T, S, cpu_selection, monkeypatch):
    """select_topk(fast=True): `selection_scores_fast` (index_scores_fast, the in-place tie break and masks,
    `mask_disallowed_`, the queries' last one at key S - 1) and `topk_fast` (topk_by_blocks), or with
    CPU_SELECTION the C++ kernels index_scores_cpu and topk_cpu, against the reference, with padding, ReLU
    zeros (ties) and a row with fewer allowed keys than k. Same keys, same validity."""
    monkeypatch.setattr(dsa.attention, "CPU_SELECTION", cpu_selection)
    calls = []
    for name in ("index_scores_cpu", "topk_cpu"):
        kernel = getattr(cpu_attention, name)
        monkeypatch.setattr(cpu_attention, name, lambda *a, kernel=kernel: calls.append(kernel) or kernel(*a))
    monkeypatch.setattr(dsa.attention, "TOPK_BLOCK", 2)  # rows of >= 4 * K keys take the block path
    monkeypatch.setattr(dsa.attention, "TILE_ELEMENTS", T * 3 * 16)  # index logits in tiles of 16 keys
    g = torch.Generator().manual_seed(S + T)
    B, H, d, K = 2, 3, 8, 6
    q_idx, k_idx, w_idx = torch.randn(B, T, H, d, generator=g), torch.randn(B, S, d, generator=g), torch.randn(B, T, H, generator=g)
    k_idx[:, ::4] = 0  # exact-zero scores: ties broken by recency
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, : S - 4] = False  # row 1: 4 real keys < K
    query_index = torch.arange(S - T, S)
    ref_indices, ref_valid = select_topk(q_idx, k_idx, w_idx, query_index, padding, K)
    indices, valid = select_topk(q_idx, k_idx, w_idx, query_index, padding, K, fast=True)
    assert (~ref_valid).any() and ref_valid.any()
    valid_keys = lambda i, v: i.masked_fill(~v, -1).sort(-1).values  # noqa: E731  (-1: an invalid slot)
    assert torch.equal(valid_keys(indices, valid), valid_keys(ref_indices, ref_valid))
    assert torch.equal(valid, allowed_keys(query_index, padding, S).expand(B, T, S).gather(-1, indices))
    assert len(set(calls)) == (2 if cpu_selection and cpu_attention.kernel() is not None else 0)  # both kernels where they build


def test_scratch_reuses_its_buffer_until_a_chunk_needs_more():
    scratch = dsa.attention.Scratch()
    first = scratch.tensor("scores", (2, 3), torch.float32, "cpu")
    smaller = scratch.tensor("scores", (5,), torch.float32, "cpu")
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (5,)
    larger = scratch.tensor("scores", (4, 4), torch.float32, "cpu")
    assert larger.shape == (4, 4) and scratch.buffers["scores"].numel() == 32  # grown to twice the size asked
    assert scratch.tensor("scores", (4, 8), torch.float32, "cpu").data_ptr() == larger.data_ptr()
    assert scratch.tensor("scores", (2,), torch.bfloat16, "cpu").dtype == torch.bfloat16  # another dtype: a new buffer


def test_dense_attention_equals_sparse_gather_when_every_allowed_key_is_selected():
    q, k, v, allowed, _, _ = random_selection(T=12, S=12)
    assert not allowed[1, 0].any()  # a padding query with no key at all
    B, T, S = allowed.shape
    indices = torch.arange(S).expand(B, T, S)  # every key, masked by `allowed`
    ref = sparse_attention(q, k, v, indices, allowed, 0.3)
    dense = dense_attention(q, k, v, allowed, 0.3)
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(dense[1, 0], torch.zeros_like(dense[1, 0]))
    for a, b in zip(grads(dense, q, k, v), grads(ref, q, k, v)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def run_model(model, fast: bool, monkeypatch, **inputs):
    monkeypatch.setattr(dsa.attention, "FAST_PATHS", fast)
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    if model.training:
        (out.loss + out.indexer_loss).backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("topk", [6, 40])  # 40 >= length: every chunk takes the dense shortcut
def test_model_fast_paths_equal_reference(mode, topk, monkeypatch):
    model = gqa_dsa(topk)
    model.train(mode == "train")
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    inputs = dict(input_ids=x, attention_mask=mask, labels=x, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    monkeypatch.setattr(dsa.attention, "CHUNK_ELEMENTS", 30 * 4)  # chunks of 4 queries: the first are dense
    monkeypatch.setattr(dsa.attention, "TOPK_BLOCK", 2)  # rows of >= 24 keys take topk_by_blocks
    monkeypatch.setattr(dsa.attention, "TILE_ELEMENTS", 4 * 2 * 7)  # 4 queries x 2 indexer heads: tiles of 7 keys
    monkeypatch.setattr(dsa.attention, "MASKED_DENSE_KEYS", 2)  # chunks of <= 12 keys: masked_dense_attention
    with torch.set_grad_enabled(mode == "train"):
        ref, ref_grads = run_model(model, False, monkeypatch, **inputs)
        fast, fast_grads = run_model(model, True, monkeypatch, **inputs)
    torch.testing.assert_close(fast.logits, ref.logits, atol=1e-5, rtol=1e-5)
    if mode == "train":
        assert ref.indexer_loss > 1e-3
        torch.testing.assert_close(fast.indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)
        for name, g in ref_grads.items():
            assert g is not None and fast_grads[name] is not None, name
            torch.testing.assert_close(fast_grads[name], g, atol=1e-5, rtol=1e-5)
    if topk == 6:  # and the sparse selection matters: dense attention gives other logits
        dsa.set_mode(model, "dense")
        with torch.no_grad():
            assert (model(**inputs, use_cache=False).logits - fast.logits).abs().max() > 1e-2


def test_warmup_loss_with_its_gradient_in_the_forward_equals_autograd(monkeypatch):
    """losses.WarmupLoss against the reference (warmup_kl per chunk, autograd through a checkpoint): the loss
    and every gradient, with left padding and several query chunks; and the loss alone without grad."""
    model = dsa.set_mode(gqa_dsa(topk=6), "warmup").train()
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    inputs = dict(input_ids=x, attention_mask=mask, labels=x, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    monkeypatch.setattr(dsa.attention, "CHUNK_ELEMENTS", 30 * 4)  # chunks of 4 queries
    ref, ref_grads = run_model(model, False, monkeypatch, **inputs)
    fast, fast_grads = run_model(model, True, monkeypatch, **inputs)
    assert ref.indexer_loss > 1e-3
    torch.testing.assert_close(fast.indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)
    indexer_grads = [name for name in ref_grads if ".indexer." in name]
    assert indexer_grads and all(ref_grads[name].abs().max() > 0 for name in indexer_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], g, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, use_cache=False).indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked_dense_keys", [2, 5])  # contexts of > 12 keys: sparse_attention_fast, or none
def test_fast_decode_equals_reference_full_forward(masked_dense_keys, monkeypatch):
    model = gqa_dsa(topk=6)
    monkeypatch.setattr(dsa.attention, "TOPK_BLOCK", 2)  # contexts of >= 24 keys take topk_by_blocks
    monkeypatch.setattr(dsa.attention, "MASKED_DENSE_KEYS", masked_dense_keys)
    x = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        monkeypatch.setattr(dsa.attention, "FAST_PATHS", False)
        full = model(x, use_cache=False).logits
        monkeypatch.setattr(dsa.attention, "FAST_PATHS", True)
        out = model(x[:, :10])
        steps = [out.logits]
        for t in range(10, 24):
            out = model(x[:, t : t + 1], cache=out.cache)
            steps.append(out.logits)
    assert isinstance(out.cache.layers[0], GrowingIndexedLayer)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def layer_pair():
    return GrowingIndexedLayer(), DynamicIndexedLayer()


def feed(layers, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    k, v, ki = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g), torch.randn(2, t, 5, generator=g)
    return [(layer.update(k, v), layer.update_indexer(ki)) for layer in layers]


def assert_same(growing, stock):
    (k1, v1), i1 = growing
    (k2, v2), i2 = stock
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(i1, i2)


def test_growing_cache_layer_equals_dynamic_indexed_layer(monkeypatch):
    monkeypatch.setattr(dsa.cache, "MIN_CAPACITY", 8)
    growing, stock = layer_pair()
    for step, t in enumerate([5, 1, 1, 3, 1, 7, 1]):
        assert_same(*feed((growing, stock), t, step))
    assert growing.get_seq_length() == stock.get_seq_length() == 19
    for layer in (growing, stock):
        layer.crop(-4)
        layer.reorder_cache(torch.tensor([1, 0]))
    assert_same(*feed((growing, stock), 2, 10))
    for layer in (growing, stock):
        layer.reset()
    assert_same(*feed((growing, stock), 3, 11))
    assert growing.get_seq_length() == 3


def test_growing_cache_appends_in_place_and_grows_geometrically(monkeypatch):
    monkeypatch.setattr(dsa.cache, "MIN_CAPACITY", 8)
    layer = GrowingIndexedLayer()
    feed([layer], 40, 0)
    storage = layer.storage["keys"]
    assert storage.shape[-2] == int(dsa.cache.GROWTH * 40)
    for step in range(storage.shape[-2] - 40):  # appends while there is room: no new storage, no copy
        feed([layer], 1, step + 1)
        assert layer.storage["keys"] is storage and layer.keys.data_ptr() == storage.data_ptr()
    feed([layer], 1, 99)
    assert layer.storage["keys"] is not storage and layer.storage["keys"].shape[-2] == int(dsa.cache.GROWTH * 51)


def test_bench_strawman_is_the_same_attention_as_the_model():
    from bench.strawman import use_masked_attention

    model = gqa_dsa(topk=6)
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = model(x).logits
        use_masked_attention(model)
        torch.testing.assert_close(model(x).logits, fast, atol=1e-5, rtol=1e-5)
