"""Baseline (c) of the benchmark: DSA written as a mask over dense attention, as public reproductions do.

The same selection as the reference (index scores, zero-tie break, top-k over allowed keys), then the full
attention logits (B, Hq, T, S) with -inf outside each query's selected keys, in one chunk. Same output, but
O(Hq * T * S) memory and the full dense attention cost: DSA saves nothing this way.

    dsa.set_backend(model, MaskedDenseBackend())
"""

import torch

from dsa.core import Backend


class MaskedDenseBackend(Backend):
    name = "mask-based strawman"

    def __init__(self):
        super().__init__(chunk_elements=1 << 62)  # every query in one chunk

    def attend(self, q, k, v, selected, valid, scaling, work) -> torch.Tensor:
        B, Hq, T, _ = q.shape
        Hkv = k.shape[1]
        chosen = torch.zeros(B, T, k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, selected, valid)
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)  # B, Hq, S, D
        logits = torch.matmul(q, k.transpose(2, 3)) * scaling  # B, Hq, T, S
        logits = logits.masked_fill(~chosen[:, None], float("-inf"))
        return torch.matmul(torch.softmax(logits, dim=-1), v).transpose(1, 2)  # B, T, Hq, D
