"""The indexer losses under bf16 autocast, as the training loop runs them on CUDA (and on CPU with --bf16).

Autocast turns the fp32 matmul of the attention target into bf16; the loss must stay finite and close to
the fp32 value (masking with the fp32 "minus infinity" in bf16 used to overflow).
"""

import pytest
import torch

import dsa
from tiny_models import tiny_dsa, tiny_qwen2


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_indexer_loss_under_bf16_autocast(mode):
    model = dsa.set_mode(tiny_dsa(tiny_qwen2(), topk=8), mode).train()
    x = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    fp32 = model(x, use_cache=False).indexer_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, use_cache=False)
    out.indexer_loss.backward()
    assert torch.isfinite(out.indexer_loss)
    torch.testing.assert_close(out.indexer_loss.float(), fp32, atol=0.05, rtol=0.05)
    grads = [p.grad for name, p in model.named_parameters() if ".indexer." in name]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fast_index_scores_are_fp32_under_autocast():
    """The fast path's selection scores: fp32 head sum under bf16 autocast, as without it (with a Scratch too)."""
    g = torch.Generator().manual_seed(1)
    q, k, w = torch.randn(1, 5, 2, 8, generator=g).bfloat16(), torch.randn(1, 9, 8, generator=g).bfloat16(), torch.randn(1, 5, 2, generator=g)
    plain = dsa.attention.index_scores_fast(q, k, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for scratch in (None, dsa.attention.Scratch()):
            scores = dsa.attention.index_scores_fast(q, k, w, scratch)
            assert scores.dtype == torch.float32
            torch.testing.assert_close(scores, plain, atol=0, rtol=0)
