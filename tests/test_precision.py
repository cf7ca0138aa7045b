"""Precision as the reference implementation has it: the indexer weights w and the head-weighted index scores are
fp32, also under bf16 autocast (every bf16 GPU run, and --bf16 on CPU), and weights_proj stays fp32 in a bf16
model and its checkpoint. The indexer losses under autocast stay finite and close to fp32."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import dsa
from dsa.core import index_scores, selected_index_scores
from dsa.kernels.torch_paths import Scratch, index_scores_tiled
from tiny_models import TINY_DSA, tiny_dsa, tiny_qwen2


def test_indexer_weights_and_scores_are_fp32_under_autocast():
    model = tiny_dsa(tiny_qwen2(), topk=8)
    indexer = model.model.layers[0].self_attn.indexer
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9)[None]
    q_ref, k_ref, w_ref = indexer(x, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_I, k_I, w_I = indexer(x, positions)
        scores = index_scores(q_I, k_I, w_I)
        selected = torch.arange(4).expand(2, 9, 4)
        picked = selected_index_scores(q_I, k_I, w_I, selected)
    assert q_I.dtype == torch.bfloat16 and k_I.dtype == torch.bfloat16  # the projections run in bf16 as autocast says
    assert w_I.dtype == torch.float32 and torch.equal(w_I, w_ref)  # w: fp32, exactly as without autocast
    assert scores.dtype == torch.float32 and picked.dtype == torch.float32
    torch.testing.assert_close(picked, scores.gather(-1, selected), atol=0, rtol=0)
    torch.testing.assert_close(scores, index_scores(q_ref, k_ref, w_ref), atol=0.05, rtol=0.05)


def test_tiled_index_scores_are_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    q, k, w = torch.randn(1, 5, 2, 8, generator=g).bfloat16(), torch.randn(1, 9, 8, generator=g).bfloat16(), torch.randn(1, 5, 2, generator=g)
    plain = index_scores_tiled(q, k, w, Scratch(), 1 << 19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = index_scores_tiled(q, k, w, Scratch(), 1 << 19)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, plain, atol=0, rtol=0)


def test_bf16_model_keeps_weights_proj_in_fp32_through_save_and_load(tmp_path):
    tiny_qwen2(sharpen=4.0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    model = dsa.add_indexers(base, dsa.DSAConfig(**TINY_DSA, index_topk=8))
    indexer = model.model.layers[0].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32 and indexer.wq.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "dsa")
    for dtype in (torch.bfloat16, "auto"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dsa", dtype=dtype)
        reloaded_indexer = reloaded.model.layers[0].self_attn.indexer
        assert reloaded_indexer.weights_proj.weight.dtype == torch.float32, dtype
        assert reloaded_indexer.wq.weight.dtype == torch.bfloat16, dtype
        assert torch.equal(reloaded_indexer.weights_proj.weight, indexer.weights_proj.weight)
    x = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)


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


def test_casting_the_model_keeps_weights_proj_in_fp32():
    model = tiny_dsa(tiny_qwen2(), topk=8)
    fp32 = model.model.layers[0].self_attn.indexer.weights_proj.weight.detach().clone()
    model.to(torch.bfloat16)
    indexer = model.model.layers[0].self_attn.indexer
    assert indexer.wq.weight.dtype == torch.bfloat16 and indexer.weights_proj.weight.dtype == torch.float32
    assert torch.equal(indexer.weights_proj.weight, fp32)  # not rounded through bf16
    model.half().float()
    assert torch.equal(model.model.layers[0].self_attn.indexer.weights_proj.weight, fp32)
