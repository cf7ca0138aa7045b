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
