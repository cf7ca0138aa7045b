"""The lightning indexer (DeepSeek-V3.2-Exp, adapted to a GQA model without a query latent).

For query token t and an earlier token s:

    I[t, s] = sum_j  w[t, j] * relu(q[t, j] . k[s])
    w[t, j] = weights_proj(x_t)_j * H_I^-0.5 * d_I^-0.5          (computed in fp32)

q[t, j] (H_I heads of size d_I) = wq(x_t); k[s] (one key of size d_I shared by all heads)
= k_norm(wk(x_s)). RoPE (rotate-half, the Qwen2 layout) is applied to the first `index_rope_dim`
features of q and k, with frequencies computed for that width. x is the attention block's input
(the output of `input_layernorm`), detached: the indexer learns only from its own loss.
"""

import torch
from torch import nn
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x (rotate-half layout); the rest pass through."""
    rope_dim = cos.shape[-1]
    x_rope, x_pass = x[..., :rope_dim], x[..., rope_dim:]
    x_rope = x_rope * cos + rotate_half(x_rope) * sin
    return torch.cat((x_rope, x_pass), dim=-1)


class LightningIndexer(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, rope_dim: int, rope_theta: float):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.wq = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.weight_scale = n_heads**-0.5 * head_dim**-0.5
        self.rope_theta = rope_theta

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: B, L, rope_dim; frequencies for the indexer's own rope width (not a slice of the
        main model's). Computed on the fly: rope_dim/2 numbers, and no buffer to restore on load."""
        dims = torch.arange(0, self.rope_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.rope_theta ** (dims / self.rope_dim))
        freqs = position_ids[..., None].float() * inv_freq  # B, L, rope_dim/2
        emb = torch.cat((freqs, freqs), dim=-1)  # B, L, rope_dim
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """x: B, L, hidden; position_ids: B or 1, L.

        Returns q: B, L, H_I, d_I; k: B, L, d_I; w: B, L, H_I (fp32, scale folded in).
        """
        B, L, _ = x.shape
        x = x.detach()
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.weight_scale
        if self.rope_dim:
            cos, sin = self.rope(position_ids, q.dtype)  # B, L, rope_dim
            q = apply_partial_rope(q, cos[:, :, None, :], sin[:, :, None, :])
            k = apply_partial_rope(k, cos, sin)
        return q, k, w


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = sum_j w[b, t, j] * relu(q[b, t, j] . k[b, s]).

    q: B, T, H_I, d_I; k: B, S, d_I; w: B, T, H_I  ->  B, T, S (fp32).
    Memory: one B*T*H_I*S tensor; callers pass query chunks.
    """
    logits = torch.einsum("bthd,bsd->bths", q, k)  # B, T, H_I, S
    return torch.einsum("bths,bth->bts", F.relu(logits).float(), w)


def selected_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """index_scores restricted to each query's selected keys.

    q: B, T, H_I, d_I; k: B, S, d_I; w: B, T, H_I; indices: B, T, K  ->  B, T, K (fp32).
    """
    batch = torch.arange(k.shape[0], device=k.device)[:, None, None]
    k_sel = k[batch, indices]  # B, T, K, d_I
    logits = torch.einsum("bthd,btkd->bthk", q, k_sel)  # B, T, H_I, K
    return torch.einsum("bthk,bth->btk", F.relu(logits).float(), w)
