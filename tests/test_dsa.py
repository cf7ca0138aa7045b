"""The dsa package against the paper's algorithm: exactness, causality, caching, padding, gradients, I/O.

Everything runs on tiny random Qwen2 configs built here. Random-init attention is nearly uniform, which
hides target bugs, so the fixtures scale the q/k projections up (peaked attention, spread index scores).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import dsa
from dsa.backends import TorchBackend
from dsa.core import Backend, LightningIndexer, kl_rows, masked_log_softmax, select_topk
from tiny_models import tiny_dsa, tiny_qwen2

VOCAB = 128


def dense_and_dsa(topk: int = 5, seed: int = 0, layers: int = 2):
    """(dense base, DSA model built from it): peaked attention, spread index scores (no near-ties in top-k)."""
    base = tiny_qwen2(VOCAB, layers=layers, seed=seed, sharpen=4.0)
    return base, tiny_dsa(base, topk, seed=seed + 1, spread=8.0, spread_weights=8.0).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# An independent, loop-by-loop implementation of the formulas (docs/method.md), one layer.
# ---------------------------------------------------------------------------------------------------


def naive_rope(x: torch.Tensor, pos: int, rope_dim: int, theta: float) -> torch.Tensor:
    """rotate-half RoPE of the first rope_dim features of a vector at position pos."""
    half = rope_dim // 2
    out = x.clone()
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / rope_dim)
        a, b = x[i], x[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def naive_layer(attn, x: torch.Tensor, topk: int | None, oracle: bool = False, row_weight: torch.Tensor | None = None):
    """One DSA attention layer for a single sequence x: T, hidden. topk None = dense attention. oracle: the top-k
    keys by the dense attention summed over heads (normalized) instead of the index scores.

    Returns (output T x hidden, indexer KL averaged over queries with the target over the attended set, each query
    weighted by row_weight: T, default 1).
    """
    cfg = attn.config
    T = x.shape[0]
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    H_I, d_I, r = cfg.index_n_heads, cfg.index_head_dim, cfg.index_rope_dim
    theta = cfg.rope_parameters["rope_theta"]
    ix = attn.indexer

    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(T, Hq, D)
    k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(T, Hkv, D)
    v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).view(T, Hkv, D)
    q = torch.stack([torch.stack([naive_rope(q[t, h], t, D, theta) for h in range(Hq)]) for t in range(T)])
    k = torch.stack([torch.stack([naive_rope(k[t, h], t, D, theta) for h in range(Hkv)]) for t in range(T)])

    qi = (x @ ix.wq.weight.T).view(T, H_I, d_I)
    ki = F.layer_norm(x @ ix.wk.weight.T, (d_I,), ix.k_norm.weight, ix.k_norm.bias, eps=1e-6)
    qi = torch.stack([torch.stack([naive_rope(qi[t, j], t, r, theta) for j in range(H_I)]) for t in range(T)])
    ki = torch.stack([naive_rope(ki[t], t, r, theta) for t in range(T)])
    w = (x @ ix.weights_proj.weight.T) * H_I**-0.5 * d_I**-0.5

    outs, kls = [], []
    for t in range(T):
        scores = [sum(w[t, j] * torch.relu(qi[t, j] @ ki[s]) for j in range(H_I)) for s in range(t + 1)]
        keys = list(range(t + 1))
        if topk is not None and oracle:
            heads = [torch.softmax(torch.stack([q[t, h] @ k[s, h // (Hq // Hkv)] for s in keys]) * D**-0.5, 0) for h in range(Hq)]
            p = sum(heads) / Hq
            keys = sorted(keys, key=lambda s: -float(p[s].detach()))[:topk]
        elif topk is not None:
            # highest score first; exact ties (ReLU zeros) go to the most recent key
            keys = sorted(keys, key=lambda s: (-float(scores[s].detach()), -s))[:topk]
        head_outs, target = [], torch.zeros(len(keys))
        for h in range(Hq):
            g = h // (Hq // Hkv)
            logits = torch.stack([q[t, h] @ k[s, g] for s in keys]) * D**-0.5
            p = torch.softmax(logits, 0)
            target += p
            head_outs.append(sum(p[i] * v[s, g] for i, s in enumerate(keys)))
        outs.append(torch.cat(head_outs))
        target = target / target.sum()
        log_q = torch.log_softmax(torch.stack([scores[s] for s in keys]), 0)
        kls.append((target * (target.log() - log_q)).sum())
    out = torch.stack(outs) @ attn.o_proj.weight.T
    row_weight = torch.ones(T) if row_weight is None else row_weight
    return out, (row_weight * torch.stack(kls)).sum() / row_weight.sum()


def first_layer_input(model, T: int = 12):
    """The first layer's attention module and a fixed random input of T tokens with its positions and RoPE."""
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    return model.model.layers[0].self_attn, x, pos, cos, sin


@pytest.mark.parametrize("mode,topk", [("sparse", 4), ("sparse", 64), ("warmup", 4)])
def test_layer_matches_naive_formulas(mode, topk):
    _, model = dense_and_dsa(topk=topk)
    attn, x, pos, cos, sin = first_layer_input(model)
    dsa.set_mode(model, mode)
    model.train()
    out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
    expected_out, expected_kl = naive_layer(attn, x[0], topk if mode == "sparse" else None)
    torch.testing.assert_close(out[0], expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.indexer_loss, expected_kl, atol=1e-5, rtol=1e-5)
    assert attn.indexer_loss > 1e-3  # a random indexer is far from the attention


@pytest.mark.parametrize("mode,topk", [("sparse", 4), ("sparse", 64), ("warmup", 4)])
def test_row_weighted_indexer_loss_matches_naive_formulas(mode, topk):
    """dsa_row_weight (the training flag --retrieval-weight): the loss is sum_t c_t KL_t / sum_t c_t."""
    _, model = dense_and_dsa(topk=topk)
    attn, x, pos, cos, sin = first_layer_input(model)
    dsa.set_mode(model, mode)
    model.train()
    row_weight = torch.tensor([1.0] * 8 + [20.0] * 4)  # the last rows count 20x, like a retrieval window's questions
    attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
    unweighted = attn.indexer_loss
    attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos, dsa_row_weight=row_weight[None])
    _, expected_kl = naive_layer(attn, x[0], topk if mode == "sparse" else None, row_weight=row_weight)
    torch.testing.assert_close(attn.indexer_loss, expected_kl, atol=1e-5, rtol=1e-5)
    assert abs(attn.indexer_loss - unweighted) > 1e-3


@pytest.mark.parametrize("topk", [3, 64])
def test_oracle_selection_matches_naive_formulas(topk):
    _, model = dense_and_dsa(topk=topk)
    attn, x, pos, cos, sin = first_layer_input(model)
    dsa.set_selection(model, "oracle")
    with torch.no_grad():
        out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
        expected_out, _ = naive_layer(attn, x[0], topk, oracle=True)
        indexer_out, _ = naive_layer(attn, x[0], topk)
    torch.testing.assert_close(out[0], expected_out, atol=1e-5, rtol=1e-5)
    if topk < x.shape[1]:  # the oracle picks other keys than the indexer
        assert (expected_out - indexer_out).abs().max() > 1e-3


def test_oracle_with_k_at_least_length_equals_dense_and_indexer_selection_is_restored():
    base, model = dense_and_dsa(topk=32)
    x = tokens(2, 32)
    with torch.no_grad():
        indexer = model(x).logits
        dsa.set_selection(model, "oracle")
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)
        dsa.set_topk(model, 6)
        oracle = model(x).logits
        dsa.set_selection(model, "indexer")
        dsa.set_topk(model, 32)
        torch.testing.assert_close(model(x).logits, indexer, atol=0, rtol=0)
    assert (oracle - indexer).abs().max() > 1e-2
    with pytest.raises(ValueError, match="'best'"):
        dsa.set_selection(model, "best")


@pytest.mark.parametrize("padded", [False, True])
def test_oracle_keys_carry_at_least_the_indexers_attention_mass(padded):
    from dsa.core import dense_target, oracle_topk

    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D, H_I, d_I, topk = 2, 4, 2, 40, 16, 2, 8, 7
    q, k = 3 * torch.randn(B, Hq, T, D, generator=g), 3 * torch.randn(B, Hkv, T, D, generator=g)
    q_I, k_I, w_I = torch.randn(B, T, H_I, d_I, generator=g), torch.randn(B, T, d_I, generator=g), torch.randn(B, T, H_I, generator=g)
    pos = torch.arange(T)
    padding = None
    if padded:
        padding = torch.ones(B, T, dtype=torch.bool)
        padding[0, :5] = False  # left padding of row 0
    p = dense_target(q, k, dsa.core.allowed_keys(pos, padding, T), D**-0.5)  # B, T, S

    def mass(selected, valid):
        return (p.gather(-1, selected) * valid).sum(-1)

    oracle = mass(*oracle_topk(q, k, pos, padding, topk, D**-0.5))
    indexer = mass(*select_topk(q_I, k_I, w_I, pos, padding, topk))
    rows = padding if padded else torch.ones(B, T, dtype=torch.bool)
    assert (oracle[rows] >= indexer[rows] - 1e-6).all()
    assert (oracle[rows] - indexer[rows]).max() > 0.05  # a random indexer misses mass the oracle keeps
    short = torch.arange(T) < topk  # rows with at most k allowed keys: everything selected, mass 1
    assert torch.allclose(oracle[:, short][rows[:, short]], torch.ones(()), atol=1e-6)


def test_topk_at_least_length_equals_stock_qwen2_and_smaller_topk_differs():
    base, model = dense_and_dsa(topk=32)
    x = tokens(2, 32)
    with torch.no_grad():
        stock = base(x).logits
        torch.testing.assert_close(model(x).logits, stock, atol=1e-5, rtol=0)
        dsa.set_topk(model, 6)
        assert (model(x).logits - stock).abs().max() > 1e-2
        dsa.set_mode(model, "dense")
        torch.testing.assert_close(model(x).logits, stock, atol=1e-6, rtol=0)


def test_add_indexers_keeps_base_weights_and_adds_one_indexer_per_layer():
    base, model = dense_and_dsa()
    base_state = base.state_dict()
    for name, tensor in model.state_dict().items():
        if ".indexer." in name:
            continue
        assert torch.equal(tensor, base_state[name]), name
    for layer in model.model.layers:
        ix = layer.self_attn.indexer
        assert isinstance(ix, LightningIndexer)
        assert ix.wq.weight.shape == (2 * 16, 64) and ix.wq.bias is None
        assert ix.wk.weight.shape == (16, 64) and ix.wk.bias is None
        assert ix.weights_proj.weight.shape == (2, 64) and ix.weights_proj.bias is None
        assert ix.k_norm.bias is not None and ix.k_norm.eps == 1e-6
        assert layer.self_attn.mode == "sparse"


@pytest.mark.parametrize("backend", [Backend, TorchBackend])
@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_query_chunking_does_not_change_results(backend, mode):
    _, model = dense_and_dsa(topk=4)
    dsa.set_mode(model, mode).train()
    x = tokens(2, 24)
    dsa.set_backend(model, backend())
    out = model(x, labels=x, use_cache=False)
    dsa.set_backend(model, backend(chunk_elements=24 * 5))  # 5 queries per chunk
    chunked = model(x, labels=x, use_cache=False)
    torch.testing.assert_close(chunked.logits, out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.indexer_loss, out.indexer_loss, atol=1e-6, rtol=1e-5)


def test_left_padding_gives_each_row_what_it_gets_alone():
    _, model = dense_and_dsa(topk=4)
    long, short = tokens(1, 16, seed=1), tokens(1, 10, seed=2)
    pad = torch.zeros(1, 6, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    with torch.no_grad():
        together = model(batch, attention_mask=mask).logits
        alone = model(short).logits
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        together_pos = model(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(together[0], model(long).logits[0], atol=1e-5, rtol=0)
    # with positions counted from the first real token (what generate() passes), padding changes nothing
    torch.testing.assert_close(together_pos[1, 6:], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(together).all()

    generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    generated_alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[1, 16:], generated_alone[0, 10:])


def test_padded_training_loss_is_finite_and_ignores_padding():
    _, model = dense_and_dsa(topk=4)
    model.train()
    x = tokens(2, 16)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    for mode in ("warmup", "sparse"):
        dsa.set_mode(model, mode)
        out = model(x, attention_mask=mask, labels=x, use_cache=False)
        assert torch.isfinite(out.indexer_loss)
        out.indexer_loss.backward()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        model.zero_grad()
        # the loss of the padded row equals the loss of that row alone (padding neither counts nor leaks)
        x2 = x[1:, 5:]
        alone = model(x2, labels=x2, use_cache=False).indexer_loss
        padded = model(x[1:], attention_mask=mask[1:], labels=x[1:], use_cache=False, position_ids=(mask[1:].cumsum(-1) - 1).clamp_min(0)).indexer_loss
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_lm_loss_never_reaches_indexer_and_indexer_loss_never_reaches_base(mode):
    _, model = dense_and_dsa(topk=4)
    model.train()
    dsa.set_mode(model, mode)
    x = tokens(2, 16)
    out = model(x, labels=x, use_cache=False)
    assert out.indexer_loss is not None and out.indexer_loss.dim() == 0

    out.loss.backward(retain_graph=True)
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None or not p.grad.any(), name
    base_grads = [p.grad for n, p in model.named_parameters() if ".indexer." not in n]
    assert any(g is not None and g.any() for g in base_grads)

    model.zero_grad(set_to_none=True)
    out.indexer_loss.backward()
    for name, p in model.named_parameters():
        if ".indexer." not in name:
            assert p.grad is None or not p.grad.any(), name
    indexer_grads = [p.grad for n, p in model.named_parameters() if ".indexer." in n]
    assert all(g is not None and g.any() for g in indexer_grads)


def test_indexer_loss_only_in_training_and_not_in_dense_mode():
    _, model = dense_and_dsa(topk=4)
    x = tokens(1, 12)
    assert model(x).indexer_loss is None  # eval
    model.train()
    dsa.set_mode(model, "dense")
    assert model(x, labels=x, use_cache=False).indexer_loss is None
    dsa.set_mode(model, "warmup")
    assert model(x, labels=x, use_cache=False).indexer_loss is not None


def test_warmup_mode_attention_is_dense():
    base, model = dense_and_dsa(topk=4)
    x = tokens(2, 20)
    dsa.set_mode(model, "warmup")
    model.train()  # warm-up in training: dense outputs plus the indexer loss
    out = model(x, use_cache=False)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, base(x).logits, atol=1e-5, rtol=0)


def test_kl_is_zero_when_the_indexer_distribution_equals_the_target():
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(2, 5, 7, generator=g) > 0.3
    allowed[..., 0] = True
    target = torch.rand(2, 5, 7, generator=g) * allowed
    target = target / target.sum(-1, keepdim=True)
    scores = target.clamp_min(1e-30).log() + 3.0  # softmax over allowed keys == target
    torch.testing.assert_close(kl_rows(target, masked_log_softmax(scores, allowed)), torch.zeros(2, 5), atol=1e-6, rtol=0)
    other = torch.randn(2, 5, 7, generator=g)
    assert (kl_rows(target, masked_log_softmax(other, allowed)) > 0).all()


def test_attention_target_sums_or_takes_the_max_over_heads_by_hand():
    """Two heads over three keys, the third masked: head 0 softmax (0.8, 0.2), head 1 (0.5, 0.5).
    sum: (1.3, 0.7) / 2; max: (0.8, 0.5) / 1.3; masked keys get 0."""
    logits = torch.tensor([[math.log(0.8), math.log(0.2), 5.0], [0.0, 0.0, 5.0]])[None, :, None]  # B, H, T, R
    allowed = torch.tensor([True, True, False])[None, None]  # B, T, R
    torch.testing.assert_close(dsa.core.attention_target(logits, allowed), torch.tensor([[[0.65, 0.35, 0.0]]]))
    torch.testing.assert_close(dsa.core.attention_target(logits, allowed, "max"), torch.tensor([[[0.8 / 1.3, 0.5 / 1.3, 0.0]]]))


def test_save_and_reload_roundtrip(tmp_path):
    _, model = dense_and_dsa(topk=4)
    dsa.set_mode(model, "dense")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, dsa.Qwen2DSAForCausalLM)
    assert reloaded.config.model_type == "qwen2_dsa"
    assert (reloaded.config.index_n_heads, reloaded.config.index_head_dim, reloaded.config.index_rope_dim) == (2, 16, 8)
    assert reloaded.config.index_topk == 4
    assert all(layer.self_attn.mode == "sparse" for layer in reloaded.model.layers)
    dsa.set_mode(model, "sparse")
    x = tokens(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"index_n_heads": 0}, "index_n_heads"),
        ({"index_head_dim": -1}, "index_head_dim"),
        ({"index_rope_dim": 7}, "index_rope_dim"),
        ({"index_rope_dim": 128, "index_head_dim": 64}, "index_rope_dim"),
        ({"index_topk": 0}, "index_topk"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        dsa.DSAConfig(**kwargs)


def test_bad_model_and_mode_raise_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(TypeError, match="supports Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM, MistralForCausalLM; got GPT2LMHeadModel"):
        dsa.add_indexers(gpt2, dsa.DSAConfig())
    _, model = dense_and_dsa()
    with pytest.raises(ValueError, match="'fast'"):
        dsa.set_mode(model, "fast")
    with pytest.raises(ValueError, match="topk"):
        dsa.set_topk(model, 0)
    with pytest.raises(ValueError, match="'mean'"):
        dsa.set_target_heads(model, "mean")
    with pytest.raises(TypeError, match="add_indexers"):
        dsa.set_mode(gpt2, "sparse")


def test_zero_score_ties_go_to_the_most_recent_keys():
    # one query, 6 allowed keys: two real positives, four exact zeros (every indexer head's ReLU is 0)
    q = torch.tensor([[[[1.0, 0.0]]]])  # B=1, T=1, H_I=1, d_I=2
    k = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-3.0, 0.0], [-1.0, 0.0]]])
    w = torch.ones(1, 1, 1)
    assert select_topk(q, k, w, torch.tensor([5]), None, topk=4)[0].sort(-1).values.tolist() == [[[0, 2, 4, 5]]]


def test_rows_with_fewer_allowed_keys_than_k_never_attend_masked_keys():
    q = torch.randn(1, 3, 1, 4)
    k = torch.randn(1, 3, 4)
    w = torch.ones(1, 3, 1)
    selected, valid = select_topk(q, k, w, torch.arange(3), None, topk=3)
    for t in range(3):
        chosen = {int(i) for i, ok in zip(selected[0, t], valid[0, t]) if ok}
        assert chosen == set(range(t + 1))  # every causal key, and never a future one


def test_bf16_model_dense_mode_is_bitwise_the_stock_model(tmp_path):
    # a cast of the whole DSA model to bf16 would also cast the RoPE inv_freq buffer and shift every angle
    tiny_qwen2(VOCAB, sharpen=4.0).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = dsa.add_indexers(base, dsa.DSAConfig(index_n_heads=2, index_head_dim=16, index_rope_dim=8)).eval()
    dsa.set_mode(model, "dense")
    x = tokens(1, 64)
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)
    ix = model.model.layers[0].self_attn.indexer
    assert ix.wq.weight.dtype == torch.bfloat16 and 0.01 < ix.wq.weight.float().std() < 0.03
    assert torch.equal(ix.k_norm.weight, torch.ones_like(ix.k_norm.weight))


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    def grads(checkpointing: bool):
        _, model = dense_and_dsa(topk=4)
        model.train()
        dsa.set_mode(model, mode)
        if checkpointing:
            model.activation_checkpointing_enable()
        x = tokens(2, 16)
        out = model(x, labels=x, use_cache=False)
        (out.loss + out.indexer_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(".indexer." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_add_indexers_keeps_tied_embeddings_tied():
    _, model = dense_and_dsa()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sparse_mode_builds_no_dense_mask_for_a_padded_batch():
    """Left padding in sparse mode: the layers get no B x 1 x T x S mask (they read the 2D key padding); dense mode
    still gets the stock mask."""
    _, model = dense_and_dsa(topk=4)
    x = tokens(2, 16)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        sparse = model(x, attention_mask=mask).logits
        dsa.set_mode(model, "dense")
        model(x, attention_mask=mask)
    hook.remove()
    assert seen[0] is None and seen[1] is not None and seen[1].shape[-2:] == (16, 16)
    dsa.set_mode(model, "sparse")
    with torch.no_grad():  # and the padded row still gets what it gets alone
        alone = model(x[1:, 5:]).logits
        padded = model(x[1:], attention_mask=mask[1:], position_ids=(mask[1:].cumsum(-1) - 1).clamp_min(0)).logits
    torch.testing.assert_close(padded[0, 5:], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(sparse).all()
