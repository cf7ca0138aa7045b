"""Small random Qwen2 and DSA models for the tests, built in memory (no weights on disk).

Random initialisation gives nearly uniform attention and nearly tied index scores, which hide bugs in the
indexer targets and in the selection: `sharpen` multiplies the main q/k projections (peaked attention),
`spread` the indexer projections (distinct index scores).
"""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import dsa

TINY_DSA = dict(index_n_heads=2, index_head_dim=16, index_rope_dim=8)


def tiny_qwen2(
    vocab_size: int = 128,
    hidden_size: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    seed: int = 0,
    sharpen: float = 1.0,
    attn_implementation: str = "sdpa",
) -> Qwen2ForCausalLM:
    """A Qwen2 model with GQA (heads query heads on kv_heads KV heads), tied embeddings, eval mode."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def tiny_dsa(base: Qwen2ForCausalLM, topk: int, seed: int = 1, spread: float = 1.0, spread_weights: float = 1.0):
    """dsa.add_indexers(base) with a 2 x 16 indexer (RoPE on 8 features); wq, wk scaled by `spread` and
    weights_proj by `spread_weights`. Eval mode (as base)."""
    torch.manual_seed(seed)
    model = dsa.add_indexers(base, dsa.DSAConfig(**TINY_DSA, index_topk=topk))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.indexer.wq.weight.mul_(spread)
            layer.self_attn.indexer.wk.weight.mul_(spread)
            layer.self_attn.indexer.weights_proj.weight.mul_(spread_weights)
    return model


def gqa_dsa(topk: int, vocab_size: int = 96) -> dsa.Qwen2DSAForCausalLM:
    """A 2-layer DSA model with GQA (6 query heads on 2 KV heads), peaked attention and spread index scores."""
    return tiny_dsa(tiny_qwen2(vocab_size, hidden_size=48, heads=6, sharpen=4.0), topk, spread=4.0)


def random_selection(B=2, Hq=6, Hkv=2, T=7, S=20, K=5, D=8, seed=0):
    """q, k, v (with grad) and a causal top-K selection with padding: batch row 1 has only 3 real keys, at the end,
    so its queries have fewer than K valid keys, or none. Returns q, k, v, allowed, selected, valid."""
    from dsa.core import allowed_keys, select_topk

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_() for H, L in ((Hq, T), (Hkv, S), (Hkv, S)))
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, : S - 3] = False
    query_pos = torch.arange(S - T, S)
    scores = torch.randn(B, T, S, generator=g)
    q_I, k_I, w_I = scores[:, :, None, :], torch.eye(S)[None].expand(B, S, S), torch.ones(B, T, 1)  # index score of key s = scores[..., s]
    selected, valid = select_topk(q_I, k_I, w_I, query_pos, padding, K)
    return q, k, v, allowed_keys(query_pos, padding, S), selected, valid
