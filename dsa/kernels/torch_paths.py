"""Faster PyTorch implementations of the steps of dsa.core (the "torch" backend): same contracts, same results.

  selection   `selection_scores` (the index scores without autograd, in key tiles, into reused buffers, the
              recency nudge and the masks in place) and `topk_by_blocks` (top-k of group maxima first)
  attention   `sparse_attention_blocks` (index_select + embedding_bag: no gathered values),
              `masked_dense_attention` (SDPA under a mask of the selected keys, for chunks with few keys),
              `dense_attention` (SDPA, for chunks whose every allowed key is selected)
  training    `SparseAttention` (the sparse attention's own backward: nothing recomputed but the gathers),
              `SparseKL` (the sparse-stage indexer KL, its target computed once)
  warm-up     `WarmupLoss` (the loss with its gradient computed chunk by chunk in the forward pass)

docs/performance.md and bench/results/README.md give the measurements behind each one and its constants.
"""

import functools
import math

import torch
import torch.nn.functional as F

from ..core import (
    NEG,
    allowed_keys,
    attention_target,
    dense_target,
    gathered_index_scores,
    grouped_logits,
    kl_rows,
    masked_log_softmax,
    query_chunks,
    query_rows,
    recency_nudge,
)


class Scratch:
    """Buffers that the query chunks of one call reuse: each chunk's index logits and scores would otherwise be
    fresh tensors of several MB, whose page faults on CPU cost a noticeable share of the selection. A buffer
    grows (to twice the size asked) when a chunk needs more."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A tensor of `shape` (contents undefined) in buffer `name`."""
        n = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != torch.device(device):
            buffer = self.buffers[name] = torch.empty(2 * n, dtype=dtype, device=device)
        return buffer[:n].view(shape)


# ---------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------


def index_scores_tiled(q_I, k_I, w_I, scratch: Scratch, tile_elements: int) -> torch.Tensor:
    """`core.index_scores` without autograd, in tiles of keys: per tile one matmul for all indexer heads
    (B x T*H_I x tile logits; on CPU at most `tile_elements` per batch row, on a GPU one tile), ReLU in place,
    then the weighted head sum as a batched matmul into that tile's columns of the B x T x S scores (the tile's
    logits are summed while still in cache). A single query (decoding) multiplies k_I @ q^T, streaming the
    S x d_I keys once. Logits and scores are written into `scratch` (valid until its next use). The head sum is
    fp32, also under autocast."""
    B, T, H, d = q_I.shape
    S = k_I.shape[1]
    dtype = torch.promote_types(q_I.dtype, k_I.dtype)
    q_I, k_I, w_I = q_I.to(dtype), k_I.to(dtype), w_I.float()
    with torch.autocast(q_I.device.type, enabled=False):
        if T == 1:
            logits = torch.matmul(k_I, q_I.view(B, H, d).transpose(1, 2)).relu_()  # B, S, H
            return torch.matmul(logits.float(), w_I.reshape(B, H, 1)).view(B, 1, -1)
        scores = scratch.tensor("index_scores", (B * T, S), torch.float32, q_I.device)
        q_rows, w_rows = q_I.reshape(B, T * H, d), w_I.reshape(B * T, 1, H)
        tile = max(1, tile_elements // (T * H)) if q_I.device.type == "cpu" else S
        for start in range(0, S, tile):
            keys = slice(start, min(start + tile, S))
            n = keys.stop - start
            logits = scratch.tensor("index_logits", (B, T * H, n), dtype, q_I.device)
            torch.matmul(q_rows, k_I[:, keys].transpose(1, 2), out=logits).relu_()  # B, T * H, n
            torch.bmm(w_rows, logits.view(B * T, H, n).float(), out=scores[:, keys].unsqueeze(1))  # B * T, 1, n
        return scores.view(B, T, S)


def mask_disallowed_(scores: torch.Tensor, query_pos: torch.Tensor, key_padding) -> torch.Tensor:
    """scores.masked_fill_(~allowed_keys(...), -inf) for queries whose last one is key S - 1: every key before
    the first query is then allowed to all of them, and only the last T columns need the causal test."""
    T, S = scores.shape[-2:]
    tail = min(T, S)
    keys = torch.arange(S - tail, S, device=scores.device)
    scores[..., S - tail :].masked_fill_(keys[None, :] > query_pos[:, None], float("-inf"))  # B, T, tail
    if key_padding is not None:
        scores.masked_fill_(~key_padding[:, None, :], float("-inf"))
    return scores


def selection_scores(q_I, k_I, w_I, query_pos, key_padding, scratch: Scratch, tile_elements: int) -> torch.Tensor:
    """break_zero_ties(index_scores(...)) with -inf at the keys that are not allowed, for consecutive queries whose
    last one is key S - 1 (a chunk of `dsa_attention`, or a decode step). B, T, S fp32, in `scratch`."""
    scores = index_scores_tiled(q_I, k_I, w_I, scratch, tile_elements).add_(recency_nudge(k_I.shape[1], k_I.device))
    return mask_disallowed_(scores, query_pos, key_padding)


def topk_group_size(n_keys: int, k: int) -> int:
    """Keys per group for `topk_by_blocks` (0: a plain torch.topk), by row length: plain below 12 k keys, groups
    of 4 below 48 k, of 8 above (what was fastest on CPU, docs/performance.md)."""
    return 0 if n_keys < 12 * k else 4 if n_keys < 48 * k else 8


def topk_by_blocks(scores: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """The positions of the k largest entries of each row (the same set of values as torch.topk), with fewer
    elements through torch.topk.

    A row's first n * block entries form n groups of `block` (group j: entries j, j + n, j + 2n, ...), the rest
    a tail. The k largest entries lie in the k groups with the largest maxima, or in the tail (an entry of any
    other group is exceeded by each of those k maxima). So: group maxima, top-k of the n maxima, then top-k of
    the k * block (+ tail) candidates. block: default `topk_group_size`; rows with fewer than 2 k groups take
    torch.topk. Equal values may be picked at other positions than torch.topk picks them.
    """
    *lead, S = scores.shape
    block = block or topk_group_size(S, k)
    if not block or S // block < 2 * k:
        return scores.topk(k, dim=-1, sorted=False).indices
    n = S // block
    maxima = scores[..., : n * block].unflatten(-1, (block, n)).amax(dim=-2)  # ..., n
    top_groups = maxima.topk(k, dim=-1, sorted=False).indices  # ..., k
    members = torch.arange(block, device=scores.device) * n
    candidates = (top_groups[..., None] + members).flatten(-2)  # ..., k * block
    if S > n * block:
        tail = torch.arange(n * block, S, device=scores.device).expand(*lead, -1)
        candidates = torch.cat([candidates, tail], dim=-1)
    picked = scores.gather(-1, candidates).topk(k, dim=-1, sorted=False).indices
    return candidates.gather(-1, picked)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def per_head_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x: B, H, S, D with every x[b, h] a contiguous S x D block (copied only if it is not already: cache tensors
    and their prefix views are; freshly projected keys are not)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def sparse_attention_blocks(q, k, v, selected, valid, scaling: float, scratch: Scratch | None, query_block: int) -> torch.Tensor:
    """`core.sparse_attention` without gathering the values or all heads' keys at once.

    Per batch row, KV head and block of `query_block` queries: the selected keys by index_select (a row copy),
    the G query heads' logits by one batched matmul, and the output sum_j p[j] * v[selected[j]] by
    embedding_bag(mode="sum", per_sample_weights=p), which reads the selected value rows without copying them.
    With autograd off, the blocks' selected keys go into one `scratch` buffer instead of a fresh tensor each.
    """
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], selected.shape[-1]
    G = Hq // Hkv
    k, v = per_head_contiguous(k), per_head_contiguous(v)
    out = q.new_empty(B, T, Hkv, G, D)
    q = (q * scaling).view(B, Hkv, G, T, D).transpose(2, 3)  # B, Hkv, T, G, D
    masked = q.is_cuda or not bool(valid.all())  # CPU: skip the mask work when every slot is valid (no sync on GPU)
    reuse = scratch is not None and not torch.is_grad_enabled()  # autograd keeps the selected keys for backward
    for b in range(B):
        for start in range(0, T, query_block):
            rows = slice(start, min(start + query_block, T))
            idx, mask = selected[b, rows], valid[b, rows, None, :]  # C, K and C, 1, K
            C = idx.shape[0]
            bags = idx[:, None, :].expand(C, G, K).reshape(C * G, K)  # each query's keys, once per query head
            buffer = {"out": scratch.tensor("selected_keys", (C * K, D), k.dtype, k.device)} if reuse else {}
            for h in range(Hkv):
                k_sel = torch.index_select(k[b, h], 0, idx.reshape(-1), **buffer).view(C, K, D)
                logits = torch.matmul(q[b, h, rows], k_sel.transpose(1, 2)).float()  # C, G, K
                probs = F.softmax(logits.masked_fill_(~mask, NEG) if masked else logits, dim=-1)
                probs = (probs * mask if masked else probs).to(v.dtype)  # a query with no valid key: zeros
                o = F.embedding_bag(bags, v[b, h], mode="sum", per_sample_weights=probs.reshape(C * G, K))
                out[b, rows, h] = o.view(C, G, D)
    return out.view(B, T, Hq, D)


def dense_attention(q, k, v, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax over every allowed key (SDPA): `core.sparse_attention` when each query selects all its allowed keys.

    q: B, Hq, T, D; k, v: B, Hkv, S, D; allowed: B|1, T, S  ->  B, T, Hq, D. A query with no allowed key outputs
    zeros (it attends every key, finite, and is then zeroed: no NaN in forward or backward).
    """
    has_key = allowed.any(dim=-1, keepdim=True)  # B|1, T, 1
    mask = (allowed | ~has_key)[:, None]  # B|1, 1, T, S
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)  # B, Hq, T, D
    return (out * has_key[:, None]).transpose(1, 2)


def masked_dense_attention(q, k, v, selected, valid, scaling: float) -> torch.Tensor:
    """`core.sparse_attention` as dense attention (SDPA) under a mask of the selected keys: all S keys per query
    instead of the K gathered ones, at dense-kernel speed (it pays when S is a small multiple of K).
    Memory: one B x T x S bool mask."""
    B, T, _ = selected.shape
    mask = torch.zeros(B, T, k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, selected, valid)
    return dense_attention(q, k, v, mask, scaling)


# ---------------------------------------------------------------------------------------------------------------
# Training: the sparse attention and the sparse-stage indexer KL with their own backward
# ---------------------------------------------------------------------------------------------------------------


def compute_dtype(device: torch.device, *dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the matmuls on inputs of `dtypes`: autocast's where it is on (as the reference's matmuls run),
    else their common one."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return functools.reduce(torch.promote_types, dtypes)


class SparseAttention(torch.autograd.Function):
    """`core.sparse_attention` (same contract) for training. The forward keeps for backward only its inputs, the
    output O and each row's log-sum-exp; the backward gathers the selected keys and values again, per batch row, KV
    head and block of queries (at most `block_elements` gathered numbers per block), and, with
    l[t, h, j] = q_h[t] . k[sel[t, j]] * scaling over the valid slots j and P = exp(l - lse) = softmax_j(l):

        dv[s]    += sum_{t, h, j: sel[t, j] = s} P[t, h, j] dO_h[t]
        dl       = P * (dO_h[t] . v[sel[t, j]] - dO_h[t] . O_h[t])
        dq_h[t]  = scaling * sum_j dl[t, h, j] k[sel[t, j]],    dk[s] += scaling * sum_{t, h, j: sel[t, j] = s} dl[t, h, j] q_h[t]

    Nothing is recomputed but the gathers and l (the reference, checkpointed, runs its forward twice). Matmuls in
    `compute_dtype` (bf16 under bf16 autocast, as the reference's), softmax and gradient sums in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, selected, valid, scaling: float, block_elements: int):
        B, Hq, T, D = q.shape
        Hkv, K = k.shape[1], selected.shape[-1]
        G = Hq // Hkv
        dtype = compute_dtype(q.device, q.dtype, k.dtype, v.dtype)
        with torch.autocast(q.device.type, enabled=False):
            qs = q.to(dtype).view(B, Hkv, G, T, D).transpose(2, 3)  # B, Hkv, T, G, D
            ks, vs = per_head_contiguous(k.to(dtype)), per_head_contiguous(v.to(dtype))
            out = q.new_empty(B, T, Hkv, G, D, dtype=dtype)
            lse = q.new_empty(B, Hkv, T, G, dtype=torch.float32)
            for b in range(B):
                for rows in query_chunks(T, K * D, block_elements):  # C queries: C * K * D gathered
                    idx, mask = selected[b, rows].reshape(-1), valid[b, rows, None, :]  # C * K; C, 1, K
                    C = rows.stop - rows.start
                    for h in range(Hkv):
                        k_sel = torch.index_select(ks[b, h], 0, idx).view(C, K, D)
                        logits = torch.matmul(qs[b, h, rows], k_sel.transpose(1, 2)).float().mul_(scaling).masked_fill_(~mask, NEG)
                        row_lse = torch.logsumexp(logits, dim=-1)  # C, G
                        probs = logits.sub_(row_lse[..., None]).exp_().mul_(mask)  # a row with no valid slot: zeros
                        v_sel = torch.index_select(vs[b, h], 0, idx).view(C, K, D)
                        out[b, rows, h] = torch.matmul(probs.to(dtype), v_sel)
                        lse[b, h, rows] = row_lse
        ctx.save_for_backward(q, k, v, selected, valid, out, lse)
        ctx.scaling, ctx.block_elements, ctx.dtype = scaling, block_elements, dtype
        return out.view(B, T, Hq, D)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, selected, valid, out, lse = ctx.saved_tensors
        scaling, dtype = ctx.scaling, ctx.dtype
        B, Hq, T, D = q.shape
        Hkv, K = k.shape[1], selected.shape[-1]
        G = Hq // Hkv
        with torch.autocast(q.device.type, enabled=False):
            qs = q.to(dtype).view(B, Hkv, G, T, D).transpose(2, 3)  # B, Hkv, T, G, D
            ks, vs = per_head_contiguous(k.to(dtype)), per_head_contiguous(v.to(dtype))
            d_out = d_out.view(B, T, Hkv, G, D)
            delta = (d_out.float() * out.float()).sum(dim=-1)  # B, T, Hkv, G: dO_h[t] . O_h[t]
            d_out = d_out.to(dtype)
            dq = torch.empty(B, T, Hkv, G, D, dtype=torch.float32, device=q.device)
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            for b in range(B):
                for rows in query_chunks(T, K * D, ctx.block_elements):
                    idx, mask = selected[b, rows].reshape(-1), valid[b, rows, None, :]
                    C = rows.stop - rows.start
                    for h in range(Hkv):
                        k_sel = torch.index_select(ks[b, h], 0, idx).view(C, K, D)
                        v_sel = torch.index_select(vs[b, h], 0, idx).view(C, K, D)
                        q_h, d_o = qs[b, h, rows], d_out[b, rows, h]  # C, G, D
                        logits = torch.matmul(q_h, k_sel.transpose(1, 2)).float().mul_(scaling).masked_fill_(~mask, NEG)
                        probs = logits.sub_(lse[b, h, rows, :, None]).exp_().mul_(mask)  # C, G, K
                        d_logits = torch.matmul(d_o, v_sel.transpose(1, 2)).float().sub_(delta[b, rows, h, :, None]).mul_(probs)
                        d_logits = d_logits.mul_(scaling)  # C, G, K
                        dq[b, rows, h] = torch.matmul(d_logits.to(dtype), k_sel)
                        # the key and value gradients in fp32 (sums over G = Hq / Hkv heads: few products, no big casts)
                        dk[b, h].index_add_(0, idx, torch.matmul(d_logits.transpose(1, 2), q_h.float()).view(C * K, D))
                        dv[b, h].index_add_(0, idx, torch.matmul(probs.transpose(1, 2), d_o.float()).view(C * K, D))
        dq = dq.view(B, T, Hq, D).transpose(1, 2).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[n, idx[n, ...]] for each n: x: N, S, F; idx: N, ...  ->  N, ..., F. One index_select per n (a row copy per
    index), which is several times faster on CPU than the advanced indexing x[arange(N)[:, None], idx]."""
    N, F = x.shape[0], x.shape[-1]
    out = x.new_empty(N, idx[0].numel(), F)
    for n in range(N):
        torch.index_select(x[n], 0, idx[n].reshape(-1), out=out[n])
    return out.view(*idx.shape, F)


class SparseKL(torch.autograd.Function):
    """`core.sparse_kl` (same contract: the KL of each query row over its selected keys, B, T) with its target
    computed once, query block by query block (at most `block_elements` gathered numbers per block). Forward: the
    target p (from q and k as the reference computes it: fp32 inputs, matmul in autocast's dtype where it is on), the
    index scores I at the selected keys, KL_t, and d = softmax(I[t]) - p over the valid slots, saved (B, T, K fp32).
    Backward, with g[t] the gradient of KL_t and the indexer logits l[t, h, j] = q_I[t, h] . k_I[sel[t, j]]
    recomputed (the reference recomputes the target too), in fp32:

        dI[t, j]     = g[t] * d[t, j]
        dw[t, h]     = sum_j dI[t, j] * relu(l[t, h, j]),        dl[t, h, j] = dI[t, j] * w[t, h] * [l[t, h, j] > 0]
        dq_I[t, h]   = sum_j dl[t, h, j] * k_I[sel[t, j]],      dk_I[s] = sum_{t, h, j: sel[t, j] = s} dl[t, h, j] * q_I[t, h]
    """

    @staticmethod
    def forward(ctx, q_I, k_I, w_I, q, k, selected, valid, scaling: float, block_elements: int, heads: str = "sum"):
        B, Hq, T, D = q.shape
        Hkv, K = k.shape[1], selected.shape[-1]
        dtype = compute_dtype(q.device, torch.float32)  # the reference's target: fp32 q and k, under the caller's autocast
        k_heads = per_head_contiguous(k.to(dtype)).reshape(B * Hkv, -1, D)
        k_Ic = k_I.to(q_I.dtype)  # what gathered_index_scores casts the keys to
        target = torch.empty(B, T, K, dtype=torch.float32, device=q.device)
        scores = torch.empty(B, T, K, dtype=torch.float32, device=q.device)
        for rows in query_chunks(T, Hkv * K * D, block_elements):
            sel = selected[:, rows]
            C = rows.stop - rows.start
            k_sel = gather_rows(k_heads, sel[:, None].expand(B, Hkv, C, K).reshape(B * Hkv, C, K)).view(B, Hkv, C, K, D)
            logits = grouped_logits(q[:, :, rows].to(dtype), k_sel, scaling)  # B, Hkv, C, G, K
            target[:, rows] = attention_target(logits.permute(0, 1, 3, 2, 4).reshape(B, Hq, C, K), valid[:, rows], heads)
            scores[:, rows] = gathered_index_scores(q_I[:, rows], gather_rows(k_Ic, sel), w_I[:, rows])
        log_q = masked_log_softmax(scores, valid)
        ctx.save_for_backward(q_I, k_I, w_I, selected, log_q.exp() * valid - target)
        ctx.block_elements = block_elements
        return kl_rows(target, log_q)

    @staticmethod
    def backward(ctx, grad_kl):
        q_I, k_I, w_I, selected, d = ctx.saved_tensors
        B, T, H, d_I = q_I.shape
        K = selected.shape[-1]
        d_q = torch.empty(B, T, H, d_I, dtype=torch.float32, device=q_I.device)
        d_w = torch.empty(B, T, H, dtype=torch.float32, device=q_I.device)
        d_k = torch.zeros(k_I.shape, dtype=torch.float32, device=k_I.device)
        k_Ic = k_I.to(q_I.dtype)  # the keys as the forward's logits read them
        with torch.autocast(q_I.device.type, enabled=False):
            for rows in query_chunks(T, K * d_I, ctx.block_elements):
                sel, q_r = selected[:, rows], q_I[:, rows]
                k_sel = gather_rows(k_Ic, sel)  # B, C, K, d_I
                logits = torch.einsum("bthd,btkd->bthk", q_r, k_sel)  # as the forward computed them
                d_scores = grad_kl[:, rows, None] * d[:, rows]  # B, C, K
                d_w[:, rows] = torch.einsum("btk,bthk->bth", d_scores, F.relu(logits).float())
                d_logits = d_scores[:, :, None] * w_I[:, rows].float()[..., None] * (logits > 0)  # B, C, H_I, K
                d_q[:, rows] = torch.einsum("bthk,btkd->bthd", d_logits, k_sel.float())
                d_k_sel = torch.einsum("bthk,bthd->btkd", d_logits, q_r.float())  # B, C, K, d_I
                for b in range(B):
                    d_k[b].index_add_(0, sel[b].reshape(-1), d_k_sel[b].reshape(-1, d_I))
        return d_q.to(q_I.dtype), d_k.to(k_I.dtype), d_w.to(w_I.dtype), None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Warm-up loss
# ---------------------------------------------------------------------------------------------------------------


class WarmupLoss(torch.autograd.Function):
    """`core.warmup_indexer_loss` with its gradient computed in the forward pass, chunk by chunk, while the chunk's
    attention target is at hand (the reference recomputes every chunk, target included, in backward), each chunk over
    the keys up to its last query only (the reference scores every key, the later ones all masked). Saved for
    backward: only the gradients of q_I, k_I and w_I. With loss = sum_t c_t KL_t / n (c_t: the row weights, 1 for a
    real token times row_weight[t], 0 for padding; n = sum_t c_t), l = q_I . k_I the indexer logits and I the index scores:

        dloss/dI[t, s]   = c_t / n * (softmax(I[t])[s] - p[t, s])       (allowed s; else 0)
        dloss/dw[t, j]   = sum_s dI[t, s] * relu(l[t, j, s]),   dl[t, j, s] = dI[t, s] * w[t, j] * [l[t, j, s] > 0]
        dloss/dq_I[t, j] = sum_s dl[t, j, s] * k_I[s],          dloss/dk_I[s] = sum_t,j dl[t, j, s] * q_I[t, j]
    """

    @staticmethod
    def forward(ctx, q_I, k_I, w_I, q, k, query_pos, key_padding, scaling, chunk_elements, heads="sum", row_weight=None):
        wanted = ctx.needs_input_grad[:3]
        ctx.dtypes = [x.dtype for x in (q_I, k_I, w_I)]
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need else None for x, need in zip((q_I, k_I, w_I), wanted)]
        counted = query_rows(query_pos, key_padding, row_weight)  # B|1, T
        n_rows = counted.sum().clamp_min(1)
        S, T, loss = k.shape[2], len(query_pos), q_I.new_zeros((), dtype=torch.float32)
        w_I = w_I.float()
        for rows in query_chunks(T, S, chunk_elements):
            keys = slice(0, S - T + rows.stop)  # the later keys are allowed to none of the chunk's queries: all terms 0
            allowed = allowed_keys(query_pos[rows], key_padding, keys.stop)  # B|1, C, S'
            target = dense_target(q[:, :, rows], k[:, :, keys], allowed, scaling, heads)  # B, C, S'
            with torch.autocast(q_I.device.type, enabled=False):
                logits = torch.einsum("bthd,bsd->bths", q_I[:, rows], k_I[:, keys].to(q_I.dtype))  # B, C, H_I, S'
                relu = F.relu(logits).float()
                scores = torch.einsum("bths,bth->bts", relu, w_I[:, rows])  # B, C, S (fp32)
            log_q = masked_log_softmax(scores, allowed)
            weight = counted[:, rows, None] / n_rows  # B|1, C, 1
            loss += (kl_rows(target, log_q)[..., None] * weight).sum()
            if not any(wanted):
                continue
            d_scores = (log_q.exp() * allowed - target) * weight  # B, C, S'
            d_logits = d_scores[:, :, None] * w_I[:, rows, :, None] * (logits > 0)  # B, C, H_I, S'
            if grads[0] is not None:
                grads[0][:, rows] += torch.einsum("bths,bsd->bthd", d_logits, k_I[:, keys].float())
            if grads[1] is not None:
                grads[1][:, keys] += torch.einsum("bths,bthd->bsd", d_logits, q_I[:, rows].float())
            if grads[2] is not None:
                grads[2][:, rows] += torch.einsum("bts,bths->bth", d_scores, relu)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss if g is not None else None for g in ctx.saved_tensors]
        grads = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return *grads, None, None, None, None, None, None, None, None
