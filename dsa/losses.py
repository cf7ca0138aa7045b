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

from .attention import gather_keys, grouped_logits
from .indexer import index_scores, selected_index_scores

NEG = torch.finfo(torch.float32).min  # a finite "minus infinity": softmax of a fully masked row stays finite


def attention_target(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits: B, H, T, R; allowed: B, T, R  ->  p: B, T, R (fp32), rows summing to 1 (or 0 if empty).
    The logits are upcast first: under bf16 autocast the matmul that made them returns bf16, where NEG overflows."""
    mask = allowed[:, None]
    probs = F.softmax(logits.float().masked_fill(~mask, NEG), dim=-1) * mask
    p = probs.sum(dim=1)  # sum over heads
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def kl_rows(target: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(scores)) over the allowed keys of each row. All B, T, R -> B, T."""
    log_q = F.log_softmax(scores.float().masked_fill(~allowed, NEG), dim=-1).masked_fill(~allowed, 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum(dim=-1)


def warmup_kl(q, k, q_idx, k_idx, w_idx, allowed, scaling: float) -> torch.Tensor:
    """Dense warm-up: target over the whole causal row.

    q: B, Hq, T, D; k: B, Hkv, S, D; q_idx: B, T, H_I, d_I; k_idx: B, S, d_I; w_idx: B, T, H_I;
    allowed: B, T, S  ->  KL per row: B, T.
    """
    with torch.no_grad():
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        q32 = q.detach().float().view(B, Hkv, Hq // Hkv, T, D)
        logits = torch.matmul(q32, k.detach().float()[:, :, None].transpose(-1, -2)) * scaling  # B,Hkv,G,T,S
        target = attention_target(logits.reshape(B, Hq, T, -1), allowed)
    return kl_rows(target, index_scores(q_idx, k_idx, w_idx), allowed)


def sparse_kl(q, k, q_idx, k_idx, w_idx, indices, valid, scaling: float) -> torch.Tensor:
    """Sparse stage: target = the sparse attention itself, over each query's selected keys.

    q: B, Hq, T, D; k: B, Hkv, S, D; indices, valid: B, T, K  ->  KL per row: B, T.
    """
    with torch.no_grad():
        B, Hq, T, _ = q.shape
        logits = grouped_logits(q.detach().float(), gather_keys(k.detach().float(), indices), scaling)
        logits = logits.permute(0, 1, 3, 2, 4).reshape(B, Hq, T, -1)  # B, Hq, T, K
        target = attention_target(logits, valid)
    return kl_rows(target, selected_index_scores(q_idx, k_idx, w_idx, indices), valid)
