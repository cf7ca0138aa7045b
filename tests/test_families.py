"""DSA on every supported family (Qwen2, Qwen3 with its q/k norms, Llama with llama3 rope scaling, Mistral), each on a
tiny random config built here: the model-level contracts per family (causality, cached decode and generate are
checked only here, Qwen2 included; tests/test_dsa.py goes deeper into Qwen2).

The naive layer below is independent of dsa/: the family's projections, norms and RoPE tables are read from the stock
modules, everything DSA (index scores, top-k with ties to the most recent key, sparse attention per head, the
indexer KL) is written out loop by loop. The indexer's own RoPE frequencies are checked in tests/test_indexer_rope.py.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import dsa
from dsa.backends import TorchBackend
from dsa.core import Backend
from tiny_models import tiny_dsa

VOCAB = 128
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip  (short: the scaling changes the tested positions)
FAMILIES = {  # name: (config class, model class, the family's own settings)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LLAMA3_ROPE)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}


def tiny_base(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer model of the family: hidden 64, 4 query heads on 2 KV heads, q/k projections scaled up (peaked
    attention), eval mode."""
    config_class, model_class, own = FAMILIES[family]
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    config = config_class(**(sizes | own | overrides))
    model = model_class(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def dense_and_dsa(family: str, topk: int):
    base = tiny_base(family)
    return base, tiny_dsa(base, topk, spread=8.0, spread_weights=8.0).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate-half RoPE of the first len(cos) features of x with the given cos / sin (one position)."""
    r, half = len(cos), len(cos) // 2
    y = x.clone()
    a, b = x[:half], x[half:r]
    y[:r] = torch.cat([a, b]) * cos + torch.cat([-b, a]) * sin
    return y


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return norm.weight * (x / torch.sqrt(x.pow(2).mean() + norm.variance_epsilon))


def naive_layer(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, topk: int):
    """One DSA layer in sparse mode for one sequence x: T, hidden; cos, sin: T, D (the model's RoPE tables).
    Returns (output T x hidden, the mean indexer KL over the queries, target over the selected keys)."""
    cfg, ix = attn.config, attn.indexer
    T = x.shape[0]
    Hq, Hkv, D, G = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    H_I, d_I, r = cfg.index_n_heads, cfg.index_head_dim, cfg.index_rope_dim

    def heads(linear, n):
        return F.linear(x, linear.weight, linear.bias).view(T, n, D)

    q, k, v = heads(attn.q_proj, Hq), heads(attn.k_proj, Hkv), heads(attn.v_proj, Hkv)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm of every head before RoPE
        q = torch.stack([torch.stack([rms_norm(q[t, h], attn.q_norm) for h in range(Hq)]) for t in range(T)])
        k = torch.stack([torch.stack([rms_norm(k[t, h], attn.k_norm) for h in range(Hkv)]) for t in range(T)])
    q = torch.stack([torch.stack([rotate(q[t, h], cos[t], sin[t]) for h in range(Hq)]) for t in range(T)])
    k = torch.stack([torch.stack([rotate(k[t, h], cos[t], sin[t]) for h in range(Hkv)]) for t in range(T)])

    angles = [[t * f for f in ix.inv_freq] * 2 for t in range(T)]  # the indexer's RoPE at width r
    icos = [torch.tensor([math.cos(a) for a in row]) * ix.rope_scale for row in angles]
    isin = [torch.tensor([math.sin(a) for a in row]) * ix.rope_scale for row in angles]
    qi = (x @ ix.wq.weight.T).view(T, H_I, d_I)
    ki = F.layer_norm(x @ ix.wk.weight.T, (d_I,), ix.k_norm.weight, ix.k_norm.bias, eps=1e-6)
    qi = torch.stack([torch.stack([rotate(qi[t, j], icos[t], isin[t]) for j in range(H_I)]) for t in range(T)]) if r else qi
    ki = torch.stack([rotate(ki[t], icos[t], isin[t]) for t in range(T)]) if r else ki
    w = (x @ ix.weights_proj.weight.T) * H_I**-0.5 * d_I**-0.5

    outs, kls = [], []
    for t in range(T):
        scores = [sum(w[t, j] * torch.relu(qi[t, j] @ ki[s]) for j in range(H_I)) for s in range(t + 1)]
        keys = sorted(range(t + 1), key=lambda s: (-float(scores[s].detach()), -s))[:topk]
        head_outs, target = [], torch.zeros(len(keys))
        for h in range(Hq):
            p = torch.softmax(torch.stack([q[t, h] @ k[s, h // G] for s in keys]) * attn.scaling, 0)
            target += p
            head_outs.append(sum(p[i] * v[s, h // G] for i, s in enumerate(keys)))
        outs.append(torch.cat(head_outs))
        target = target / target.sum()
        log_q = torch.log_softmax(torch.stack([scores[s] for s in keys]), 0)
        kls.append((target * (target.log() - log_q)).sum())
    out = F.linear(torch.stack(outs), attn.o_proj.weight, attn.o_proj.bias)
    return out, torch.stack(kls).mean()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_dense_mode_is_the_stock_model_bit_for_bit_and_large_k_is_dense(family):
    base, model = dense_and_dsa(family, topk=32)
    assert isinstance(model, dsa.DSAModel) and isinstance(model, type(base)) and model.config.model_type == f"{family}_dsa"
    x = tokens(2, 24)
    with torch.no_grad():
        stock = base(x).logits
        torch.testing.assert_close(model(x).logits, stock, atol=1e-5, rtol=0)  # k >= L: every key selected
        dsa.set_topk(model, 6)
        assert (model(x).logits - stock).abs().max() > 1e-2
        dsa.set_mode(model, "dense")
        assert torch.equal(model(x).logits, stock)


def test_sparse_layer_equals_the_naive_implementation(family):
    _, model = dense_and_dsa(family, topk=4)
    dsa.set_mode(model, "sparse").train()
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    attn = model.model.layers[0].self_attn
    out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
    expected_out, expected_kl = naive_layer(attn, x[0], cos[0], sin[0], topk=4)
    torch.testing.assert_close(out[0], expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.indexer_loss, expected_kl, atol=1e-5, rtol=1e-5)
    assert attn.indexer_loss > 1e-3


def test_sparse_is_causal(family):
    _, model = dense_and_dsa(family, topk=4)
    x = tokens(1, 24)
    y = x.clone()
    y[0, 15] = (y[0, 15] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :15], b[:, :15])
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_cached_decode_and_generate_equal_the_full_forward(family, backend):
    _, model = dense_and_dsa(family, topk=4)
    dsa.set_backend(model, backend)
    x = tokens(2, 20)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :8], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(8, 20):
            out = model(x[:, t : t + 1], cache=cache, use_cache=True)
            cache, steps = out.cache, steps + [out.logits]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.layers[0].indexer_keys.shape == (2, 20, 16)  # every token's indexer key, d_I = 16

    prompt = tokens(1, 12, seed=5)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_left_padded_batch_gives_each_row_what_it_gets_alone(family):
    _, model = dense_and_dsa(family, topk=4)
    long, short = tokens(1, 16, seed=1), tokens(1, 10, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    with torch.no_grad():
        together = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        torch.testing.assert_close(together[0], model(long).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[1, 6:], model(short).logits[0], atol=1e-5, rtol=0)
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[1, 16:], model.generate(short, max_new_tokens=6, do_sample=False)[0, 10:])


def test_save_and_reload_through_the_auto_classes(family, tmp_path):
    _, model = dense_and_dsa(family, topk=4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and reloaded.config.model_type == f"{family}_dsa"
    assert reloaded.config.dsa == model.config.dsa
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    x = tokens(1, 20)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_a_warmup_step_lowers_the_indexer_kl_and_keeps_the_base(family):
    _, model = dense_and_dsa(family, topk=4)
    dsa.set_mode(model, "warmup").train()
    dsa.set_backend(model, TorchBackend())
    model.requires_grad_(False)
    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    for p in indexer:
        p.requires_grad_(True)
    base = {name: p.clone() for name, p in model.named_parameters() if ".indexer." not in name}
    optimizer = torch.optim.AdamW(indexer, lr=1e-2)
    x = tokens(2, 24)
    before = model(x, use_cache=False).indexer_loss
    before.backward()
    optimizer.step()
    after = model(x, use_cache=False).indexer_loss
    assert after < before
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name


@pytest.mark.parametrize("backend", [Backend, TorchBackend])
def test_training_losses_and_gradients_of_the_backends_agree(family, backend):
    _, model = dense_and_dsa(family, topk=5)
    dsa.set_mode(model, "sparse").train()
    x = tokens(2, 24)
    grads = []
    for b in (Backend(), backend(chunk_elements=24 * 5)):
        dsa.set_backend(model, b)
        model.zero_grad(set_to_none=True)
        out = model(x, labels=x, use_cache=False)
        (out.loss + out.indexer_loss).backward()
        grads.append((out.loss.detach(), out.indexer_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (lm, kl, ref), (lm2, kl2, other) = grads
    torch.testing.assert_close(lm2, lm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl2, kl, atol=1e-5, rtol=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(other[name], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family,overrides", [("mistral", {"sliding_window": 8}),
                                               ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})])
def test_sliding_window_layers_are_refused_naming_the_window(family, overrides):
    base = tiny_base(family, **overrides)
    with pytest.raises(ValueError, match="layer [01] .* uses sliding-window attention \\(window 8\\)"):
        dsa.add_indexers(base, dsa.DSAConfig(index_n_heads=2, index_head_dim=16, index_rope_dim=8, index_topk=4))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_script_runs_on_the_family_unchanged(family, tmp_path):
    """warmup_train.py -> train.py -> dpo_train.py, and compare.py, on a tiny dense model of the family (the tiny
    preset's tokenizer and bundled data): each output reloads as the family's DSA model."""
    import compare
    import dpo_train
    import train
    import warmup_train
    from dsa.presets import SAMPLES_DIR
    from dsa.tiny import build_tokenizer

    tokenizer = build_tokenizer([SAMPLES_DIR / "sft_heldout.jsonl"], vocab_size=400)
    base = tiny_base(family, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    short = ["--preset", "tiny", "--max-steps", "2", "--save-every", "0", "--batch-size", "2"]
    warmup_train.main(short + ["--model", str(tmp_path / "base"), "--output-dir", str(tmp_path / "warmup"), "--seq-len", "64",
                               "--topk", "16", "--index-n-heads", "2", "--index-head-dim", "16", "--index-rope-dim", "8"])  # fmt: skip
    train.main(short + ["--model", str(tmp_path / "warmup"), "--output-dir", str(tmp_path / "sparse"), "--seq-len", "64", "--topk", "16"])
    dpo_train.main(short + ["--model", str(tmp_path / "sparse"), "--output-dir", str(tmp_path / "dpo"), "--max-length", "96"])
    dsa_class = dsa.FAMILIES[type(base)]
    for stage in ("warmup", "sparse", "dpo"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / stage)
        assert type(model) is dsa_class and model.config.index_topk == 16, stage
    compare.main(["--model", str(tmp_path / "dpo"), "--output-dir", str(tmp_path / "compare"), "--data", str(SAMPLES_DIR / "sft_heldout.jsonl"),
                  "--lengths", "64", "--topk", "16", "--ppl-windows", "2", "--only", "perplexity,recall", "--decode-length", "0"])  # fmt: skip
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert results["perplexity"] and results["recall"], sorted(results)
