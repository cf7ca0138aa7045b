"""Every backend equals the reference (dsa.core), fp32 at 1e-5: outputs, indexer losses, gradients, decoding.

The backends' pieces first (kernels/torch_paths.py against dsa.core), then whole models run with each available
backend against the same model on "reference". Tuning constants are shrunk (`small`) so that tiny shapes reach
every path: several query chunks, the dense shortcut, masked dense attention, blocked attention, key tiles, top-k
by blocks. Then choosing backends by name.
"""

import pytest
import torch

import dsa
from bench.train_step import OperatorCount
from dsa.backends import BACKENDS, DEVICE_SIZES, TRAIN_BLOCK_ELEMENTS, CpuBackend, TorchBackend, available_backends, resolve
from dsa.core import Backend, break_zero_ties, dsa_attention, index_scores, select_topk, sparse_attention, sparse_kl
from dsa.kernels.torch_paths import (
    Scratch,
    SparseAttention,
    SparseKL,
    dense_attention,
    index_scores_tiled,
    masked_dense_attention,
    sparse_attention_blocks,
    topk_by_blocks,
)
from tiny_models import gqa_dsa, random_selection

VOCAB = 96
FAST = [name for name in available_backends() if name not in ("auto", "reference")]


def small(name: str, **tuning) -> Backend:
    """Backend `name` with tuning constants that tiny shapes exercise: chunks of 4 queries at 30 keys, index logits
    in tiles of 7 keys, blocks of 3 queries, masked dense attention up to 2 K keys, top-k by groups of 2, training
    blocks of 2 queries (SparseAttention at K = 6, head_dim 8) and 1 query (SparseKL, 2 KV heads)."""
    values = dict(chunk_elements=30 * 4, tile_elements=4 * 2 * 7, query_block=3, masked_dense_keys=2, topk_block=2,
                  train_block_elements=2 * 6 * 8) | tuning  # fmt: skip
    return BACKENDS[name](**values)


def grads(out: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * weights).sum(), inputs)


# ---------------------------------------------------------------------------------------------------------------
# The pieces of the torch backend against dsa.core
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attend", ["blocks", "masked_dense", "trainable"])
@pytest.mark.parametrize("T,S,K", [(7, 20, 5), (1, 20, 5), (12, 12, 4)])
def test_sparse_attention_paths_equal_reference_with_gradients(T, S, K, attend):
    q, k, v, _, selected, valid = random_selection(T=T, S=S, K=K)
    assert not valid.all()  # invalid slots (padding, rows with fewer than K keys)
    ref = sparse_attention(q, k, v, selected, valid, 0.3)
    if attend == "blocks":
        out = sparse_attention_blocks(q, k, v, selected, valid, 0.3, None, query_block=3)
    elif attend == "trainable":
        out = SparseAttention.apply(q, k, v, selected, valid, 0.3, 3 * K * 8)  # blocks of 3 queries
    else:
        out = masked_dense_attention(q, k, v, selected, valid, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(out, q, k, v), grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def indexer_inputs(B: int, T: int, S: int, seed: int = 7):
    """q_I (B, T, 3, 8), k_I (B, S, 8), w_I (B, T, 3) with grad, scaled so that the KL is far from 0."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, T, 3, 8), (B, S, 8), (B, T, 3))
    return [(2 * torch.randn(shape, generator=g)).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("block_elements", [1, 2**40])  # a query per block; one block
def test_sparse_kl_with_its_own_backward_equals_reference(block_elements):
    q, k, _, _, selected, valid = random_selection(T=7, S=20, K=5)
    q_I, k_I, w_I = indexer_inputs(2, 7, 20)
    ref = sparse_kl(q.detach(), k.detach(), q_I, k_I, w_I, selected, valid, 0.3)
    out = SparseKL.apply(q_I, k_I, w_I, q.detach(), k.detach(), selected, valid, 0.3, block_elements)
    assert (ref > 1e-3).any() and (ref[~valid.any(-1)] == 0).all()  # real KLs, and rows without a valid key
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(out, q_I, k_I, w_I), grads(ref, q_I, k_I, w_I)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_training_paths_under_bf16_autocast_stay_close_to_reference():
    """Under bf16 autocast, SparseAttention and SparseKL round like the reference (bf16 matmuls, fp32 softmax): outputs
    and gradients agree to bf16 precision."""
    q, k, v, _, selected, valid = random_selection(T=7, S=20, K=5)
    q_I, k_I, w_I = indexer_inputs(2, 7, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [
            (SparseAttention.apply(q, k, v, selected, valid, 0.3, 3 * 5 * 8), sparse_attention(q, k, v, selected, valid, 0.3), (q, k, v)),
            (SparseKL.apply(q_I, k_I, w_I, q.detach(), k.detach(), selected, valid, 0.3, 5 * 8),
             sparse_kl(q.detach(), k.detach(), q_I, k_I, w_I, selected, valid, 0.3), (q_I, k_I, w_I)),
        ]  # fmt: skip
    for out, ref, inputs in pairs:
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        for a, b in zip(grads(out.float(), *inputs), grads(ref.float(), *inputs)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_blocked_attention_reuses_one_key_buffer_without_autograd():
    q, k, v, _, selected, valid = random_selection(T=7, S=20, K=5)
    scratch = Scratch()
    with torch.no_grad():
        out = sparse_attention_blocks(q, k, v, selected, valid, 0.3, scratch, query_block=3)
    assert scratch.buffers["selected_keys"].numel() == 2 * 3 * 5 * 8  # one block's keys, twice over (Scratch)
    torch.testing.assert_close(out, sparse_attention(q, k, v, selected, valid, 0.3), atol=1e-5, rtol=1e-5)


def test_dense_attention_equals_sparse_attention_over_every_allowed_key():
    q, k, v, allowed, _, _ = random_selection(T=12, S=12)
    assert not allowed[1, 0].any()  # a padding query with no key at all
    B, T, S = allowed.shape
    every = torch.arange(S).expand(B, T, S)
    ref = sparse_attention(q, k, v, every, allowed, 0.3)
    out = dense_attention(q, k, v, allowed, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    for a, b in zip(grads(out, q, k, v), grads(ref, q, k, v)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("S", [64, 67, 203])
def test_topk_by_blocks_selects_what_torch_topk_selects(S, block):
    """Rows long enough for the block path, a tail after the last full group, exact-zero ties broken by recency,
    masked keys, and a row with fewer allowed keys than k."""
    k = 4
    scores = torch.randn(2, 5, S, generator=torch.Generator().manual_seed(S))
    scores[0, :, ::3] = 0  # ReLU zeros
    scores[0, 0, :] = 0  # a row of zeros only: the k most recent keys win
    scores[1, 0, S // 2 :] = float("-inf")  # masked keys
    scores[1, 1, 3:] = float("-inf")  # 3 allowed keys < k
    scores = break_zero_ties(scores)
    assert S // block >= 2 * k  # the block path is taken
    plain, fast = scores.topk(k, dim=-1).indices, topk_by_blocks(scores, k, block)
    assert fast.shape == plain.shape and (fast.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct keys
    torch.testing.assert_close(scores.gather(-1, fast).sort(-1).values, scores.gather(-1, plain).sort(-1).values)
    finite = scores.gather(-1, plain).isfinite().all(-1)  # rows whose k-th score is a real one
    assert torch.equal(fast.sort(-1).values[finite], plain.sort(-1).values[finite])
    assert set(fast[1, 1].tolist()) >= {0, 1, 2}
    assert torch.equal(fast[0, 0].sort().values, torch.arange(S - k, S))


@pytest.mark.parametrize("tile_elements", [2**40, 27 * 16, 27 * 70 - 1])  # one tile; 16 keys a tile; 69 and 1
def test_tiled_index_scores_equal_the_reference(tile_elements):
    g = torch.Generator().manual_seed(5)
    scratch = Scratch()
    for T, S in [(9, 70), (4, 30), (1, 30)]:  # T * H_I = 27, 12, and a decode step
        q_I, k_I, w_I = torch.randn(2, T, 3, 8, generator=g), torch.randn(2, S, 8, generator=g), torch.randn(2, T, 3, generator=g)
        ref = index_scores(q_I, k_I, w_I)
        assert (ref == 0).any() and (ref != 0).any()  # ReLU zeros and real scores
        torch.testing.assert_close(index_scores_tiled(q_I, k_I, w_I, scratch, tile_elements), ref, atol=1e-5, rtol=1e-5)
    assert scratch.buffers["index_logits"].numel() == 2 * 2 * 27 * min(tile_elements // 27, 70)  # the largest tile, twice


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("T,S", [(1, 70), (9, 9), (9, 70)])  # a decode step, a first chunk, a later chunk
def test_selection_selects_what_the_reference_selects(name, T, S):
    """Backend.select against core.select_topk with padding, ReLU zeros (ties) and a row with fewer allowed keys
    than k: the same valid keys, the same validity."""
    backend = small(name, tile_elements=T * 3 * 16)
    g = torch.Generator().manual_seed(S + T)
    B, H, d, K = 2, 3, 8, 6
    q_I, k_I, w_I = torch.randn(B, T, H, d, generator=g), torch.randn(B, S, d, generator=g), torch.randn(B, T, H, generator=g)
    k_I[:, ::4] = 0  # exact-zero scores: ties broken by recency
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, : S - 4] = False  # row 1: 4 real keys < K
    query_pos = torch.arange(S - T, S)
    ref_selected, ref_valid = select_topk(q_I, k_I, w_I, query_pos, padding, K)
    selected, valid = backend.select(q_I, k_I, w_I, query_pos, padding, K, backend.workspace())
    assert (~ref_valid).any() and ref_valid.any()
    valid_keys = lambda i, v: i.masked_fill(~v, -1).sort(-1).values  # noqa: E731  (-1: an invalid slot)
    assert torch.equal(valid_keys(selected, valid), valid_keys(ref_selected, ref_valid))


@pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ kernels do not build here")
def test_cpu_selection_takes_bf16_indexer_queries_as_the_torch_path_does():
    """Under bf16 autocast q_I is bf16 and k_I fp32: the torch path scores in fp32 (their promoted dtype); the cpu
    backend casts q_I to fp32 for its kernel and selects the same keys."""
    g = torch.Generator().manual_seed(11)
    B, T, S, H, d, K = 2, 9, 70, 3, 8, 6
    q_I, k_I, w_I = torch.randn(B, T, H, d, generator=g).bfloat16(), torch.randn(B, S, d, generator=g), torch.randn(B, T, H, generator=g)
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, :10] = False
    query_pos = torch.arange(S - T, S)
    picks = []
    for name in ("torch", "cpu"):
        backend = small(name, tile_elements=T * H * 16)
        selected, valid = backend.select(q_I, k_I, w_I, query_pos, padding, K, backend.workspace())
        picks.append(selected.masked_fill(~valid, -1).sort(-1).values)
    assert torch.equal(*picks)


def test_scratch_reuses_its_buffer_until_a_chunk_needs_more():
    scratch = Scratch()
    first = scratch.tensor("scores", (2, 3), torch.float32, "cpu")
    smaller = scratch.tensor("scores", (5,), torch.float32, "cpu")
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (5,)
    larger = scratch.tensor("scores", (4, 4), torch.float32, "cpu")
    assert larger.shape == (4, 4) and scratch.buffers["scores"].numel() == 32  # grown to twice the size asked
    assert scratch.tensor("scores", (4, 8), torch.float32, "cpu").data_ptr() == larger.data_ptr()
    assert scratch.tensor("scores", (2,), torch.bfloat16, "cpu").dtype == torch.bfloat16  # another dtype: a new buffer


# ---------------------------------------------------------------------------------------------------------------
# Whole models: each backend against "reference"
# ---------------------------------------------------------------------------------------------------------------


def padded_inputs(seed: int) -> dict:
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    return dict(input_ids=x, attention_mask=mask, labels=x, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)


def run(model, backend, **inputs):
    dsa.set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    if model.training and torch.is_grad_enabled():
        (out.loss + out.indexer_loss).backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", ["eval", "sparse", "warmup"])
@pytest.mark.parametrize("topk", [6, 40])  # 40 >= length: every chunk takes the dense shortcut
def test_model_with_each_backend_equals_reference(name, mode, topk):
    model = gqa_dsa(topk)
    dsa.set_mode(model, "sparse" if mode == "eval" else mode).train(mode != "eval")
    inputs = padded_inputs(2)
    with torch.set_grad_enabled(mode != "eval"):
        ref, ref_grads = run(model, Backend(chunk_elements=30 * 4), **inputs)
        out, out_grads = run(model, small(name), **inputs)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    if mode != "eval":
        assert ref.indexer_loss > 1e-3
        torch.testing.assert_close(out.indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)
        assert any(".indexer." in n and g is not None and g.abs().max() > 0 for n, g in ref_grads.items())
        for n, g in ref_grads.items():
            assert (g is None) == (out_grads[n] is None), n
            if g is not None:
                torch.testing.assert_close(out_grads[n], g, atol=1e-5, rtol=1e-5)
    if topk == 6 and mode == "eval":  # the sparse selection matters: dense attention gives other logits
        dsa.set_mode(model, "dense")
        with torch.no_grad():
            assert (model(**inputs).logits - out.logits).abs().max() > 1e-2


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
@pytest.mark.parametrize("topk", [6, 40])
def test_max_target_heads_with_each_backend_equals_reference(name, mode, topk):
    """The "max" head aggregation of the indexer target reaches every backend's loss path (SparseKL, WarmupLoss, the
    dense shortcut): losses and gradients equal the reference's, and differ from the "sum" target's."""
    model = dsa.set_mode(gqa_dsa(topk), mode).train()
    inputs = padded_inputs(3)
    summed, _ = run(model, Backend(chunk_elements=30 * 4), **inputs)
    dsa.set_target_heads(model, "max")
    ref, ref_grads = run(model, Backend(chunk_elements=30 * 4), **inputs)
    out, out_grads = run(model, small(name), **inputs)
    assert abs(ref.indexer_loss - summed.indexer_loss) > 1e-4
    torch.testing.assert_close(out.indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)
    for n, g in ref_grads.items():
        if ".indexer." in n:
            torch.testing.assert_close(out_grads[n], g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_row_weights_with_each_backend_equal_reference(name, mode):
    """indexer_row_weight (--retrieval-weight) reaches every backend's loss path: losses and indexer gradients equal
    the reference's, and differ from the unweighted ones."""
    model = dsa.set_mode(gqa_dsa(topk=6), mode).train()
    inputs = padded_inputs(5)
    unweighted, _ = run(model, Backend(chunk_elements=30 * 4), **inputs)
    row_weight = torch.ones(2, 30)
    row_weight[:, -6:] = 20.0
    ref, ref_grads = run(model, Backend(chunk_elements=30 * 4), indexer_row_weight=row_weight, **inputs)
    out, out_grads = run(model, small(name), indexer_row_weight=row_weight, **inputs)
    assert abs(ref.indexer_loss - unweighted.indexer_loss) > 1e-4
    torch.testing.assert_close(out.indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)
    for n, g in ref_grads.items():
        if ".indexer." in n:
            torch.testing.assert_close(out_grads[n], g, atol=1e-5, rtol=1e-5)


def layer_losses(model) -> torch.Tensor:
    return torch.stack([layer.self_attn.indexer_loss for layer in model.model.layers])


@pytest.mark.parametrize("name", ["reference"] + FAST)
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_row_weights_combine_single_sequences_by_their_weight_sums(name, mode):
    """A padded batch of two, 4-row query chunks, other weights per sequence, spans across chunk boundaries: each
    layer's loss is (L_0 C_0 + L_1 C_1) / (C_0 + C_1), with L_b the weighted loss of sequence b run alone and C_b
    the sum of its real rows' weights; weights of 1 give the unweighted loss."""
    model = dsa.set_backend(dsa.set_mode(gqa_dsa(topk=6), mode).train(), Backend(chunk_elements=30 * 4) if name == "reference" else small(name))
    inputs = padded_inputs(5)  # sequence 1 has 5 padding tokens in front
    row_weight = torch.ones(2, 30)
    row_weight[0, 22:30], row_weight[1, 7:11] = 20.0, 5.0
    x = inputs["input_ids"]
    with torch.no_grad():
        unweighted = model(**inputs).indexer_loss
        torch.testing.assert_close(model(**inputs, indexer_row_weight=torch.ones(2, 30)).indexer_loss, unweighted)
        batched = model(**inputs, indexer_row_weight=row_weight).indexer_loss
        per_layer = layer_losses(model)
        model(x[:1], indexer_row_weight=row_weight[:1], use_cache=False)
        first = layer_losses(model)
        model(x[1:, 5:], indexer_row_weight=row_weight[1:, 5:], use_cache=False)
        second = layer_losses(model)
    weight_0, weight_1 = row_weight[0].sum(), row_weight[1, 5:].sum()
    expected = (first * weight_0 + second * weight_1) / (weight_0 + weight_1)
    torch.testing.assert_close(per_layer, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, expected.mean(), atol=1e-5, rtol=1e-5)
    assert abs(batched - unweighted) > 1e-4


@pytest.mark.parametrize("name", FAST)
def test_warmup_loss_without_autograd_equals_reference(name):
    model = dsa.set_mode(gqa_dsa(topk=6), "warmup").train()
    inputs = padded_inputs(4)
    with torch.no_grad():
        ref, _ = run(model, Backend(), **inputs)
        out, _ = run(model, small(name), **inputs)
    torch.testing.assert_close(out.indexer_loss, ref.indexer_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("masked_dense_keys", [2, 5])  # contexts of > 12 keys: blocked attention, or none
def test_cached_decode_with_each_backend_equals_reference_forward(name, masked_dense_keys):
    model = gqa_dsa(topk=6)
    x = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dsa.set_backend(model, "reference")
        full = model(x, use_cache=False).logits
        dsa.set_backend(model, small(name, masked_dense_keys=masked_dense_keys))
        out = model(x[:, :10])
        steps = [out.logits]
        for t in range(10, 24):
            out = model(x[:, t : t + 1], cache=out.cache)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Backends by name
# ---------------------------------------------------------------------------------------------------------------


def test_available_backends_and_auto():
    names = available_backends()
    assert names[:3] == ["auto", "reference", "torch"] and set(names) <= {"auto", *BACKENDS}
    expected = CpuBackend if "cpu" in names else TorchBackend
    assert type(resolve("auto", torch.device("cpu"))) is expected
    assert type(resolve("reference", torch.device("cpu"))) is Backend


def test_set_backend_is_per_model_and_rejects_bad_names():
    a, b = gqa_dsa(topk=6), gqa_dsa(topk=6)
    dsa.set_backend(a, "reference")
    assert all(layer.self_attn.backend == "reference" for layer in a.model.layers)
    assert all(layer.self_attn.backend == "auto" for layer in b.model.layers)  # the default; the other model unchanged
    with pytest.raises(ValueError, match=r"unknown DSA backend 'fastest'.*'reference'"):
        dsa.set_backend(a, "fastest")
    for name in set(BACKENDS) - set(available_backends()):  # e.g. "triton" without a GPU
        with pytest.raises(ValueError, match=f"'{name}' is not available here"):
            dsa.set_backend(a, name)


def test_bench_strawman_is_the_same_attention_as_the_model():
    from bench.strawman import MaskedDenseBackend

    model = gqa_dsa(topk=6)
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x).logits
        dsa.set_backend(model, MaskedDenseBackend())
        torch.testing.assert_close(model(x).logits, out, atol=1e-5, rtol=1e-5)


def test_gpu_work_sizes_are_chosen_on_cuda_and_change_no_number():
    """On CUDA the named and auto backends take DEVICE_SIZES (fewer, larger blocks); on CPU the defaults. A sparse
    training step of one layer at the GPU sizes gives the CPU sizes' output, loss and gradients with a small
    fraction of the operators (T = S = 2048, k = 64, head_dim 64: 4 chunks and 8 blocks per KV head at the CPU
    sizes, one of each at the GPU sizes)."""
    gpu = resolve("torch", torch.device("cuda"))
    assert gpu.train_block_elements == DEVICE_SIZES["cuda"]["train_block_elements"] > TRAIN_BLOCK_ELEMENTS
    assert (gpu.chunk_elements, gpu.query_block) == (DEVICE_SIZES["cuda"]["chunk_elements"], DEVICE_SIZES["cuda"]["query_block"])
    assert resolve("auto", torch.device("cuda")).chunk_elements == gpu.chunk_elements  # triton, or torch without it
    assert resolve("reference", torch.device("cuda")).chunk_elements == gpu.chunk_elements
    assert resolve("torch", torch.device("cpu")).train_block_elements == TRAIN_BLOCK_ELEMENTS

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, H_I, d_I, K = 1, 4, 2, 2048, 64, 2, 16, 64
    inputs = [torch.randn(*shape, generator=g) for shape in
              [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, T, H_I, d_I), (B, T, d_I), (B, T, H_I)]]  # fmt: skip
    results, counts = [], []
    for backend in (TorchBackend(), TorchBackend(**DEVICE_SIZES["cuda"])):
        x = [t.clone().requires_grad_(True) for t in inputs]
        with OperatorCount() as counter:
            out, loss = dsa_attention(*x, torch.arange(T), None, K, D**-0.5, True, backend)
            (out.square().mean() + loss).backward()
        results.append([out, loss, *(t.grad for t in x)])
        counts.append(counter.count)
    for cpu_sized, gpu_sized in zip(*results):
        torch.testing.assert_close(gpu_sized, cpu_sized, rtol=1e-5, atol=1e-6)
    assert counts[1] * 5 < counts[0], counts
