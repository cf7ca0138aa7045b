"""Baseline (c) of the benchmark: DSA written as a mask over dense attention, as public reproductions do.

The same selection as the project's DSA (index scores, zero-tie break, top-k over allowed keys), then the
full attention logits (B, Hq, T, S) with -inf outside each query's selected keys. Same output, but
O(Hq * T * S) memory and the full dense attention cost: DSA saves nothing this way.
"""

import torch
from transformers.models.qwen2.modeling_qwen2 import repeat_kv

from dsa.attention import allowed_keys, break_zero_ties
from dsa.indexer import index_scores
from dsa.modeling import Qwen2DSAAttention


class MaskedDSAAttention(Qwen2DSAAttention):
    def sparse_attention(self, q, k, v, q_idx, k_idx, w_idx, query_index, key_padding) -> torch.Tensor:
        S = k.shape[2]
        allowed = allowed_keys(query_index, key_padding, S)  # B|1, T, S
        scores = break_zero_ties(index_scores(q_idx, k_idx, w_idx)).masked_fill(~allowed, float("-inf"))  # B, T, S
        top = scores.topk(min(self.topk, S), dim=-1).indices
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & allowed
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)  # B, Hq, S, D
        logits = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # B, Hq, T, S
        logits = logits.masked_fill(~selected[:, None], float("-inf"))
        return torch.matmul(torch.softmax(logits, dim=-1), v).transpose(1, 2)  # B, T, Hq, D


def use_masked_attention(model) -> None:
    """Switch every DSA attention layer of `model` to the mask-based strawman (weights unchanged)."""
    for layer in model.model.layers:
        layer.self_attn.__class__ = MaskedDSAAttention
