"""The C++ kernels of dsa/kernels/cpu_attention.py (the "cpu" backend) equal the reference (dsa.core): the sparse
attention, the index scores with the recency nudge and the causal mask (fp32, 1e-5; the nudges of exact-zero
scores bit for bit), and the top-k (torch.topk's values). Skipped, with the reason, where they cannot be built
(no AVX2, no C++ compiler); the first test run compiles them (about a minute)."""

import pytest
import torch

import dsa
from dsa.backends import CpuBackend
from dsa.core import Backend, allowed_keys, break_zero_ties, index_scores, sparse_attention
from dsa.kernels import cpu_attention
from tiny_models import gqa_dsa, random_selection

MISSING = cpu_attention.missing_requirement()
needs_kernels = pytest.mark.skipif(MISSING is not None, reason=f"the CPU kernels cannot be built here: {MISSING}")


@needs_kernels
@pytest.mark.parametrize(
    "T,S,K,D,Hq,Hkv",
    [
        (7, 20, 5, 8, 6, 2),  # fewer than 8 keys per query: the scalar tail only
        (12, 40, 13, 16, 6, 2),  # one block of 8 keys and a tail of 5
        (5, 300, 130, 64, 14, 2),  # Qwen2.5-0.5B's heads: G = 7, head_dim 64
        (5, 64, 24, 32, 16, 2),  # G = 8
        (4, 50, 16, 128, 9, 1),  # G = 9, head_dim 128
    ],
)
def test_kernel_equals_reference(T, S, K, D, Hq, Hkv):
    q, k, v, _, selected, valid = random_selection(T=T, S=S, K=K, D=D, Hq=Hq, Hkv=Hkv)
    assert not valid.all() and not valid[1].any(dim=-1).all()  # invalid slots, and queries with no valid key
    with torch.no_grad():
        ref = sparse_attention(q, k, v, selected, valid, 0.3)
        out = cpu_attention.sparse_attention_cpu(q, k, v, selected, valid, 0.3)
        assert out.shape == ref.shape and (out[1][~valid[1].any(dim=-1)] == 0).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        every = torch.ones_like(valid)
        torch.testing.assert_close(cpu_attention.sparse_attention_cpu(q, k, v, selected, every, 0.3), sparse_attention(q, k, v, selected, every, 0.3), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_kernel_reads_cache_views_on_several_threads():
    """Keys and values as prefix views of a longer cache (heads not adjacent), queries transposed, two threads."""
    q, k, v, _, selected, valid = random_selection(T=9, S=40, K=17, D=32, Hq=6, Hkv=2)
    cache = torch.randn(2, 2, 2, 64, 32)
    cache[0, :, :, :40], cache[1, :, :, :40] = k.detach(), v.detach()
    k_view, v_view = cache[0, :, :, :40], cache[1, :, :, :40]
    q_t = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # B, Hq, T, D with T the slowest dimension
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = cpu_attention.sparse_attention_cpu(q_t, k_view, v_view, selected, valid, 0.3)
            torch.testing.assert_close(out, sparse_attention(q, k, v, selected, valid, 0.3), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_kernel_rejects_an_index_outside_the_keys():
    q, k, v, _, selected, valid = random_selection()
    selected[0, 2, 1] = 20  # S = 20 keys
    with torch.no_grad(), pytest.raises(RuntimeError, match="key index 20 is not in"):
        cpu_attention.sparse_attention_cpu(q, k, v, selected, valid, 0.3)


@needs_kernels
def test_cpu_backend_calls_every_kernel_at_inference_and_equals_reference(monkeypatch):
    model = gqa_dsa(topk=10)  # a block of 8 selected keys and a tail of 2
    x = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    inputs = dict(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    calls = {"sparse_attention_cpu": 0, "index_scores_cpu": 0, "topk_cpu": 0}
    for name in calls:
        kernel = getattr(cpu_attention, name)
        monkeypatch.setattr(cpu_attention, name, lambda *a, name=name, kernel=kernel: calls.update({name: calls[name] + 1}) or kernel(*a))
    with torch.no_grad():
        ref = dsa.set_backend(model, Backend())(**inputs).logits
        out = dsa.set_backend(model, CpuBackend(chunk_elements=30 * 4, masked_dense_keys=2))(**inputs).logits
    assert all(n > 0 for n in calls.values()), calls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_kernels_build_where_nothing_is_missing():
    """Where the requirements are there the kernels build (a failure here is a real build error); where they are
    not, asking for the "cpu" backend names the missing piece."""
    if MISSING is None:
        assert cpu_attention.kernel() is not None and "cpu" in dsa.available_backends()
    else:
        assert "cpu" not in dsa.available_backends()
        with pytest.raises(ValueError, match="not available here"):
            dsa.set_backend(gqa_dsa(topk=4), "cpu")


def reference_selection_scores(q_I, k_I, w_I, first: int):
    """break_zero_ties(index_scores) with -inf after each query's last key (query t at cache index first + t)."""
    T, S = q_I.shape[1], k_I.shape[1]
    allowed = allowed_keys(torch.arange(first, first + T), None, S)
    return break_zero_ties(index_scores(q_I, k_I, w_I)).masked_fill(~allowed, float("-inf"))


@needs_kernels
@pytest.mark.parametrize(
    "B,T,S,H,d,first",
    [
        (1, 1, 70, 4, 64, 69),  # a decode step: groups of 8 keys and a tail of 6
        (2, 9, 70, 3, 8, 61),  # 3 heads: register tiles of 4 rows span two queries; 2 panels of 24 keys and a tail
        (1, 70, 100, 4, 64, 30),  # more queries than QUERY_BLOCK (3 blocks); the first ones see fewer than 24 keys
        (2, 5, 13, 2, 16, 8),  # fewer keys than a panel: the tail only
        (1, 40, 48, 1, 128, 8),  # one head, head_dim 128, whole panels
        (1, 6, 40, 4, 32, 50),  # queries past the last key see every key
    ],
)
def test_index_scores_kernel_equals_reference(B, T, S, H, d, first):
    g = torch.Generator().manual_seed(T + S)
    q_I, k_I, w_I = torch.randn(B, T, H, d, generator=g), torch.randn(B, S, d, generator=g), torch.randn(B, T, H, generator=g)
    k_I[:, ::3] = 0  # exact-zero scores: only the nudge is left, which orders ties by recency
    ref = reference_selection_scores(q_I, k_I, w_I, first)
    out = cpu_attention.index_scores_cpu(q_I, k_I, w_I, first, torch.full((B, T, S), float("nan")))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ties = ref.isfinite() & (ref.abs() < 1e-20)  # every head's ReLU is 0: the score is the nudge alone
    assert ties.any() and torch.equal(out[ties], ref[ties])  # the nudges themselves, bit for bit
    assert torch.equal(out.isinf(), ref.isinf())


@needs_kernels
def test_index_scores_kernel_reads_cache_views_on_several_threads():
    """Indexer keys as a prefix view of a longer cache, queries as a slice of a longer chunk, two threads."""
    g = torch.Generator().manual_seed(0)
    q_all, cache, w_all = torch.randn(2, 80, 4, 16, generator=g), torch.randn(2, 128, 16, generator=g), torch.randn(2, 80, 4, generator=g)
    q_I, k_I, w_I = q_all[:, 40:], cache[:, :90], w_all[:, 40:]  # 40 queries at cache indices 50 .. 89
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = cpu_attention.index_scores_cpu(q_I, k_I, w_I, 50, torch.empty(2, 40, 90))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, reference_selection_scores(q_I, k_I, w_I, 50), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_index_scores_kernel_rejects_mismatched_shapes():
    q_I, k_I, w_I = torch.randn(1, 3, 4, 16), torch.randn(1, 10, 16), torch.randn(1, 3, 2)
    with pytest.raises(RuntimeError, match="index_scores_cpu: shapes of q"):
        cpu_attention.index_scores_cpu(q_I, k_I, w_I, 7, torch.empty(1, 3, 10))


@needs_kernels
@pytest.mark.parametrize("S,K", [(100, 7), (3000, 512), (40, 40), (5000, 512), (13, 5)])
def test_topk_kernel_selects_the_values_torch_topk_selects(S, K):
    """Rows with -inf, with fewer finite entries than K (the K-th largest is -inf), all -inf, +0 and -0, many
    ties, and random ones; K = S. Same values as torch.topk, K distinct positions, equal values at the
    lowest positions."""
    g = torch.Generator().manual_seed(S)
    x = torch.randn(2, 6, S, generator=g)
    x[0, 0, ::2] = float("-inf")
    x[0, 1] = 0.0
    x[0, 1, S // 2 :] = -0.0
    x[0, 2, 3:] = float("-inf")
    x[0, 3] = float("-inf")
    x[1, 0] = torch.randint(0, 5, (S,), generator=g).float()  # ties at the K-th largest
    x[1, 1] = 1 + torch.rand(S, generator=g) * 2**-10  # the top 20 bits equal: the candidates go through every level
    with torch.no_grad():
        indices = cpu_attention.topk_cpu(x, K)
    assert indices.shape == (2, 6, K) and indices.dtype == torch.long
    assert all(len(set(row.tolist())) == K for row in indices.view(-1, K))
    assert torch.equal(x.gather(-1, indices).sort(-1).values, x.topk(K, dim=-1).values.sort(-1).values)
    kth = x.topk(K, dim=-1).values[..., -1:]  # the K-th largest value of each row
    ties = (x == kth) & (x.gather(-1, indices).min(-1, keepdim=True).values == kth)
    taken = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, indices, True)
    for row_ties, row_taken in zip(ties.view(-1, S), taken.view(-1, S)):  # equal values: the lowest positions
        positions = row_ties.nonzero().flatten()
        n = int((row_taken & row_ties).sum())
        assert torch.equal(row_taken[positions], torch.arange(len(positions)) < n)


@needs_kernels
def test_topk_kernel_rejects_k_larger_than_the_row():
    with torch.no_grad(), pytest.raises(RuntimeError, match="topk_cpu: k = 9 is not in"):
        cpu_attention.topk_cpu(torch.randn(1, 2, 8), 9)
