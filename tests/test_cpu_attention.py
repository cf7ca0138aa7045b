"""The C++ sparse-attention kernel (CPU inference path, dsa/cpu_attention.py) equals the reference
`sparse_attention` (fp32, 1e-5), alone and inside the model. It is compiled on first use (about a minute)."""

import pytest
import torch

import dsa
import dsa.attention
from dsa import cpu_attention
from dsa.attention import fast_sparse_attention_for, sparse_attention
from test_performance_paths import VOCAB, gqa_dsa, random_selection

AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2 = pytest.mark.skipif(not AVX2, reason="the kernel is built for x86 CPUs with AVX2 only")


def test_kernel_builds_where_the_cpu_has_avx2():
    q = torch.randn(1, 4, 3, 16)
    with torch.no_grad():
        assert cpu_attention.supports(q) == AVX2
        assert (cpu_attention.kernel() is not None) == AVX2


@needs_avx2
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
    q, k, v, _, indices, valid = random_selection(T=T, S=S, K=K, D=D, Hq=Hq, Hkv=Hkv)
    assert not valid.all() and not valid[1].any(dim=-1).all()  # invalid slots, and queries with no valid key
    with torch.no_grad():
        ref = sparse_attention(q, k, v, indices, valid, 0.3)
        out = cpu_attention.sparse_attention_cpu(q, k, v, indices, valid, 0.3)
        assert out.shape == ref.shape and (out[1][~valid[1].any(dim=-1)] == 0).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        every = torch.ones_like(valid)
        torch.testing.assert_close(cpu_attention.sparse_attention_cpu(q, k, v, indices, every, 0.3), sparse_attention(q, k, v, indices, every, 0.3), atol=1e-5, rtol=1e-5)


@needs_avx2
def test_kernel_reads_cache_views_on_several_threads():
    """Keys and values as prefix views of a longer cache (heads not adjacent), queries transposed, two threads."""
    q, k, v, _, indices, valid = random_selection(T=9, S=40, K=17, D=32, Hq=6, Hkv=2)
    cache = torch.randn(2, 2, 2, 64, 32)
    cache[0, :, :, :40], cache[1, :, :, :40] = k.detach(), v.detach()
    k_view, v_view = cache[0, :, :, :40], cache[1, :, :, :40]
    q_t = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # B, Hq, T, D with T the slowest dimension
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = cpu_attention.sparse_attention_cpu(q_t, k_view, v_view, indices, valid, 0.3)
            torch.testing.assert_close(out, sparse_attention(q, k, v, indices, valid, 0.3), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_avx2
def test_kernel_rejects_an_index_outside_the_keys():
    q, k, v, _, indices, valid = random_selection()
    indices[0, 2, 1] = 20  # S = 20 keys
    with torch.no_grad(), pytest.raises(RuntimeError, match="key index 20 is not in"):
        cpu_attention.sparse_attention_cpu(q, k, v, indices, valid, 0.3)


def test_fast_path_uses_the_kernel_only_for_what_it_supports(monkeypatch):
    q = torch.randn(1, 4, 3, 16)
    with torch.no_grad():
        chosen = fast_sparse_attention_for(q, 100, 4)
        assert (chosen is cpu_attention.sparse_attention_cpu) == AVX2
        for other in (q[..., :12], q.to(torch.bfloat16)):  # head_dim 12, bf16
            assert fast_sparse_attention_for(other, 100, 4).func is dsa.attention.sparse_attention_fast
        monkeypatch.setattr(dsa.attention, "CPU_KERNEL", False)
        assert fast_sparse_attention_for(q, 100, 4).func is dsa.attention.sparse_attention_fast
    monkeypatch.setattr(dsa.attention, "CPU_KERNEL", True)
    assert fast_sparse_attention_for(q, 100, 4).func is dsa.attention.sparse_attention_fast  # autograd on


@needs_avx2
@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_model_at_inference_equals_reference_with_and_without_the_kernel(cpu_kernel, monkeypatch):
    model = gqa_dsa(topk=10)  # a block of 8 selected keys and a tail of 2
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    inputs = dict(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    calls = []
    kernel = cpu_attention.sparse_attention_cpu
    monkeypatch.setattr(cpu_attention, "sparse_attention_cpu", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(dsa.attention, "CHUNK_ELEMENTS", 30 * 4)  # chunks of 4 queries
    monkeypatch.setattr(dsa.attention, "MASKED_DENSE_KEYS", 2)  # chunks of > 20 keys: sparse attention
    monkeypatch.setattr(dsa.attention, "CPU_KERNEL", cpu_kernel)
    with torch.no_grad():
        monkeypatch.setattr(dsa.attention, "FAST_PATHS", False)
        ref = model(**inputs).logits
        monkeypatch.setattr(dsa.attention, "FAST_PATHS", True)
        out = model(**inputs).logits
    assert (len(calls) > 0) == cpu_kernel
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
