"""`core.sparse_attention` as one Triton kernel, for GPUs at inference (forward only; the "triton" backend).

One program per (query, batch row, KV head) walks the query's K selected keys in blocks of BLOCK_K:
it loads their key and value rows straight from the cache by index, computes the logits of the G query
heads of that KV head with one small matmul, and keeps a running (flash-attention) softmax, so nothing
of size K * D is ever written to memory. Slots that are not valid get index -1 and are never read; a
query without any valid slot outputs zeros. dsa.core stays the reference and the PyTorch paths the fallback;
tests run this kernel on CPU with TRITON_INTERPRET=1.
"""

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # selected keys per step


@triton.jit
def sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, scaling, K,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, si_b, si_t, so_b, so_t, so_h,  # strides; the last dim is contiguous
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, d = tl.arange(0, G_PAD), tl.arange(0, D)
    heads = h * G + g  # the query heads of KV head h (padded to G_PAD rows, masked)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + t * sq_t + d[None, :], mask=(g < G)[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max of the logits
    l = tl.zeros([G_PAD], tl.float32)  # running softmax denominator
    acc = tl.zeros([G_PAD, D], tl.float32)  # running sum of p * v
    for start in range(0, K, BLOCK):
        j = start + tl.arange(0, BLOCK)
        idx = tl.load(idx_ptr + b * si_b + t * si_t + j, mask=j < K, other=-1)
        ok = idx >= 0
        keys = tl.load(k_ptr + b * sk_b + h * sk_h + idx[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
        logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scaling  # G_PAD, BLOCK
        logits = tl.where(ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet: exp(-inf) = 0
        p = tl.exp(logits - m_ref[:, None])
        alpha = tl.exp(m - m_ref)
        values = tl.load(v_ptr + b * sv_b + h * sv_h + idx[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + b * so_b + t * so_t + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


def sparse_attention_triton(q, k, v, selected, valid, scaling: float) -> torch.Tensor:
    """core.sparse_attention (same contract): q: B, Hq, T, D; k, v: B, Hkv, S, D; selected, valid: B, T, K
    ->  B, T, Hq, D. D must be a power of two >= 16."""
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], selected.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton sparse attention needs a power-of-two head_dim >= 16, got {D}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    idx = selected.masked_fill(~valid, -1).contiguous()
    out = q.new_empty(B, T, Hq, D)
    G = Hq // Hkv
    sparse_attention_kernel[(T, B, Hkv)](
        q, k, v, idx, out, scaling, K,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:2], *out.stride()[:3],
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK=BLOCK_K,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
