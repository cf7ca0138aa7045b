"""The indexer's training signal: KL(attention target || softmax(index scores)), per query row.

Target for query t over a key set R_t (the whole causal row in warm-up, the selected set S_t in the
sparse stage):

    p[t, s] = sum_h softmax_{s in R_t}(q_h[t] . k_h[s] * scaling)  /  (L1 norm over s)

computed from detached main q/k in fp32 (the main model never gets gradient from this loss).
Indexer distribution over the same keys: softmax_{s in R_t}(I[t, s]).

    KL_t = sum_{s in R_t} p[t, s] * (log p[t, s] - log softmax(I)[t, s])

Masked keys contribute exactly 0 (no -inf * 0); rows without any key give 0 and are left out of the
mean by the caller. Reduction (in the model): sum over keys, mean over valid query tokens, mean
over layers.
"""

import torch
import torch.nn.functional as F

from .attention import allowed_keys, gather_keys, grouped_logits, query_chunks
from .indexer import index_scores, selected_index_scores

NEG = torch.finfo(torch.float32).min  # a finite "minus infinity": softmax of a fully masked row stays finite


def attention_target(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits: B, H, T, R; allowed: B, T, R  ->  p: B, T, R (fp32), rows summing to 1 (or 0 if empty).
    The logits are upcast first: under bf16 autocast the matmul that made them returns bf16, where NEG overflows."""
    mask = allowed[:, None]
    probs = F.softmax(logits.float().masked_fill(~mask, NEG), dim=-1) * mask
    p = probs.sum(dim=1)  # sum over heads
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def masked_log_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log softmax(scores) over the allowed keys of each row (fp32), 0 at the others. B, T, R -> B, T, R."""
    return F.log_softmax(scores.float().masked_fill(~allowed, NEG), dim=-1).masked_fill(~allowed, 0.0)


def kl_rows(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(target || q) per row, from log q = `masked_log_softmax` (masked keys contribute 0). B, T, R -> B, T."""
    return (torch.xlogy(target, target) - target * log_q).sum(dim=-1)


@torch.no_grad()
def dense_target(q, k, allowed, scaling: float) -> torch.Tensor:
    """The warm-up target over every allowed key. q: B, Hq, T, D; k: B, Hkv, S, D; allowed: B, T, S -> B, T, S."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    q32 = q.detach().float().view(B, Hkv, Hq // Hkv, T, D)
    logits = torch.matmul(q32, k.detach().float()[:, :, None].transpose(-1, -2)) * scaling  # B,Hkv,G,T,S
    return attention_target(logits.reshape(B, Hq, T, -1), allowed)


def warmup_kl(q, k, q_idx, k_idx, w_idx, allowed, scaling: float) -> torch.Tensor:
    """Dense warm-up: target over the whole causal row.

    q: B, Hq, T, D; k: B, Hkv, S, D; q_idx: B, T, H_I, d_I; k_idx: B, S, d_I; w_idx: B, T, H_I;
    allowed: B, T, S  ->  KL per row: B, T.
    """
    return kl_rows(dense_target(q, k, allowed, scaling), masked_log_softmax(index_scores(q_idx, k_idx, w_idx), allowed))


def query_rows(query_index: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Which query rows count in the loss mean: the real (non-padding) tokens, B (or 1), T. (Each has at least
    one allowed key, itself; a padding query may have none.)"""
    if key_padding is None:
        return torch.ones(1, len(query_index), dtype=torch.bool, device=query_index.device)
    return key_padding[:, query_index]


class WarmupLoss(torch.autograd.Function):
    """The warm-up loss of one layer, with its gradient computed in the forward pass, chunk by chunk, while the
    chunk's attention target is at hand. Same value and gradients as the reference (Qwen2DSAAttention.warmup_loss
    without FAST_PATHS), which recomputes every chunk, target included (Hq heads of q . k and a softmax over
    every causal pair), in backward. Saved for backward: only the gradients of q_idx, k_idx and w_idx (their
    own sizes). With loss = sum_t c_t KL_t / n (c_t: the row counts, n: the number of such rows):

        dloss/dI[t, s] = c_t / n * (softmax(I[t])[s] - p[t, s])     (allowed s; else 0; p[t] sums to 1)
        dloss/dw[t, j] = sum_s dI[t, s] * relu(l[t, j, s]),  dl[t, j, s] = dI[t, s] * w[t, j] * [l[t, j, s] > 0]
        dloss/dq_idx[t, j] = sum_s dl[t, j, s] * k_idx[s],   dloss/dk_idx[s] = sum_t,j dl[t, j, s] * q_idx[t, j]

    with l = q_idx . k_idx the indexer logits and I the index scores (indexer.py).
    """

    @staticmethod
    def forward(ctx, q_idx, k_idx, w_idx, q, k, query_index, key_padding, scaling):
        wanted = ctx.needs_input_grad[:3]
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need else None for x, need in zip((q_idx, k_idx, w_idx), wanted)]
        counted = query_rows(query_index, key_padding)  # B|1, T
        n_rows = counted.sum().clamp_min(1)
        S, loss = k.shape[2], q_idx.new_zeros((), dtype=torch.float32)
        for rows in query_chunks(len(query_index), S):
            allowed = allowed_keys(query_index[rows], key_padding, S)  # B|1, C, S
            target = dense_target(q[:, :, rows], k, allowed, scaling)  # B, C, S
            logits = torch.einsum("bthd,bsd->bths", q_idx[:, rows], k_idx)  # B, C, H_I, S
            relu = F.relu(logits).float()
            scores = torch.einsum("bths,bth->bts", relu, w_idx[:, rows])  # B, C, S
            log_q = masked_log_softmax(scores, allowed)  # fp32 (scores are bf16 under autocast)
            weight = counted[:, rows, None] / n_rows  # B|1, C, 1
            loss += (kl_rows(target, log_q)[..., None] * weight).sum()
            if not any(wanted):
                continue
            d_scores = (log_q.exp() * allowed - target) * weight  # B, C, S
            d_logits = d_scores[:, :, None] * w_idx[:, rows, :, None] * (logits > 0)  # B, C, H_I, S
            if grads[0] is not None:
                grads[0][:, rows] += torch.einsum("bths,bsd->bthd", d_logits, k_idx.float())
            if grads[1] is not None:
                grads[1] += torch.einsum("bths,bthd->bsd", d_logits, q_idx[:, rows].float())
            if grads[2] is not None:
                grads[2][:, rows] += torch.einsum("bts,bths->bth", d_scores, relu)
        ctx.dtypes = [x.dtype for x in (q_idx, k_idx, w_idx)]
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss if g is not None else None for g in ctx.saved_tensors]
        grads = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return *grads, None, None, None, None, None


def warmup_loss(q, k, q_idx, k_idx, w_idx, query_index, key_padding, scaling: float) -> torch.Tensor:
    """The warm-up indexer loss of one layer (`WarmupLoss`): mean over the real query rows of KL(p || softmax(I)).

    q: B, Hq, T, D; k: B, Hkv, S, D; q_idx: B, T, H_I, d_I; k_idx: B, S, d_I; w_idx: B, T, H_I; query_index: T;
    key_padding: B, S bool or None  ->  a scalar.
    """
    return WarmupLoss.apply(q_idx, k_idx, w_idx, q, k, query_index, key_padding, scaling)


def sparse_kl(q, k, q_idx, k_idx, w_idx, indices, valid, scaling: float) -> torch.Tensor:
    """Sparse stage: target = the sparse attention itself, over each query's selected keys.

    q: B, Hq, T, D; k: B, Hkv, S, D; indices, valid: B, T, K  ->  KL per row: B, T.
    """
    with torch.no_grad():
        B, Hq, T, _ = q.shape
        logits = grouped_logits(q.detach().float(), gather_keys(k.detach().float(), indices), scaling)
        logits = logits.permute(0, 1, 3, 2, 4).reshape(B, Hq, T, -1)  # B, Hq, T, K
        target = attention_target(logits, valid)
    return kl_rows(target, masked_log_softmax(selected_index_scores(q_idx, k_idx, w_idx, indices), valid))
