"""DSA on a real pretrained Qwen2 checkpoint (optional: a 0.5B model takes 1-2 minutes on 2 CPU cores).

Skipped unless DSA_REAL_MODEL names a local Hugging Face Qwen2 checkpoint, ideally fp32, e.g.
    DSA_REAL_MODEL=/root/.cache/dsa-cpu-qwen/hf-fp32 uv run pytest tests/test_real_model.py
(../shared/tools/get_cpu_qwen.sh builds one: Qwen2.5-Coder-0.5B-Instruct, a stand-in for Qwen2.5-0.5B).
"""

import inspect
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa

MODEL = os.environ.get("DSA_REAL_MODEL")
pytestmark = pytest.mark.skipif(not MODEL, reason="set DSA_REAL_MODEL to a local Qwen2 checkpoint to run")


@pytest.fixture(scope="module")
def real():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    stock = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    model = dsa.add_indexers(stock, dsa.DSAConfig(index_topk=512)).eval()
    text = inspect.getsource(json.decoder)  # real text the model has seen the like of
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]  # 1, 128
    return stock, model, ids


@torch.no_grad()
def test_dense_mode_is_the_stock_model(real):
    stock, model, ids = real
    dsa.set_mode(model, "dense")
    torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_sparse_with_k_at_least_length_is_dense_and_small_k_is_not(real):
    _, model, ids = real
    x = ids
    dsa.set_mode(model, "dense")
    dense = model(x).logits
    dsa.set_mode(model, "sparse")
    dsa.set_topk(model, 128)
    full = model(x).logits
    assert (full.argmax(-1) == dense.argmax(-1)).all()
    torch.testing.assert_close(full, dense, atol=2e-3, rtol=0)  # 24 layers of fp32 rounding, logits ~ +-30
    dsa.set_topk(model, 8)
    sparse = model(x).logits
    assert torch.isfinite(sparse).all()
    assert (sparse[0, 8:] - dense[0, 8:]).abs().max() > 1e-2  # rows with more than 8 keys do change
    torch.testing.assert_close(sparse[0, :8], dense[0, :8], atol=2e-3, rtol=0)  # rows with <= 8 keys do not


def test_warmup_steps_lower_the_indexer_kl_and_touch_only_indexers(real):
    _, model, ids = real
    dsa.set_mode(model, "warmup")
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    kls = []
    for _ in range(5):
        kl = model(ids, use_cache=False).indexer_loss
        kl.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(kl.item())
    model.eval()
    assert all(torch.isfinite(torch.tensor(kls)))
    assert kls[-1] < 0.9 * kls[0], kls
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
