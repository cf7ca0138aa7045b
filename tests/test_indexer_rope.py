"""The indexer's RoPE follows the model's rope parameters at the indexer's own rope width; a rope type whose
frequencies depend on the sequence length is refused with an error naming it."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import dsa
from tiny_models import TINY_DSA

ROPE_DIM = TINY_DSA["index_rope_dim"]


def dsa_model(rope_parameters: dict) -> dsa.Qwen2DSAForCausalLM:
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=rope_parameters)  # fmt: skip
    return dsa.add_indexers(Qwen2ForCausalLM(config), dsa.DSAConfig(**TINY_DSA, index_topk=4))


def indexer(rope_parameters: dict):
    return dsa_model(rope_parameters).model.layers[0].self_attn.indexer


def default_freqs(theta: float) -> list[float]:
    return [theta ** (-i / ROPE_DIM) for i in range(0, ROPE_DIM, 2)]


def test_default_rope_has_the_frequencies_of_its_own_width():
    ix = indexer({"rope_type": "default", "rope_theta": 10000.0})
    assert ix.rope_scale == 1.0
    torch.testing.assert_close(torch.tensor(ix.inv_freq), torch.tensor(default_freqs(10000.0)), atol=0, rtol=1e-6)


def test_linear_scaling_divides_positions_by_the_factor():
    scaled = indexer({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    plain = indexer({"rope_type": "default", "rope_theta": 10000.0})
    cos, sin = scaled.rope(torch.tensor([[0, 4, 40, 400]]), torch.float32)
    cos_ref, sin_ref = plain.rope(torch.tensor([[0, 1, 10, 100]]), torch.float32)
    torch.testing.assert_close(cos, cos_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-5, rtol=0)


def test_llama3_scaling_keeps_high_frequencies_and_divides_low_ones():
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}  # fmt: skip
    freqs, base = indexer(params).inv_freq, default_freqs(500000.0)
    low_wavelen, high_wavelen = 64 / 1.0, 64 / 4.0
    kinds = set()
    for f, f0 in zip(freqs, base):
        wavelen = 2 * math.pi / f0
        if wavelen < high_wavelen:
            kinds.add("kept")
            assert f == pytest.approx(f0, rel=1e-6)
        elif wavelen > low_wavelen:
            kinds.add("divided")
            assert f == pytest.approx(f0 / 8.0, rel=1e-6)
        else:
            kinds.add("between")
            assert f0 / 8.0 < f < f0
    assert {"kept", "divided"} <= kinds


def test_yarn_scales_cos_and_sin():
    ix = indexer({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024})
    assert ix.rope_scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cos, sin = ix.rope(torch.tensor([[3]]), torch.float32)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, ix.rope_scale**2))


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_types_are_refused(rope_type):
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        params |= {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 1024}
    with pytest.raises(ValueError, match=f"'{rope_type}'"):
        dsa_model(params)
