"""DeepSeek Sparse Attention (lightning indexer + top-k sparse attention) for Qwen2, Qwen3, Llama and Mistral models
in transformers.

    model = dsa.add_indexers(AutoModelForCausalLM.from_pretrained(...), dsa.DSAConfig(index_topk=512))
    dsa.set_mode(model, "warmup" | "sparse" | "dense")
    dsa.set_backend(model, "auto" | "reference" | "torch" | "cpu" | "triton")   # dsa.available_backends()
    dsa.set_selection(model, "indexer" | "oracle")   # oracle: top-k of the true attention (evaluation only)
    dsa.set_target_heads(model, "sum" | "max")   # the indexer target's head aggregation in training
    out = model(input_ids, labels=labels)   # out.loss (LM), out.indexer_loss (KL, training mode)

dsa/core.py is the method in plain PyTorch. Importing dsa registers the "qwen2_dsa", "qwen3_dsa", "llama_dsa" and
"mistral_dsa" config types, so AutoModelForCausalLM reloads saved DSA models. Every DSA model is a `dsa.DSAModel`, its
config a `dsa.DSAModelConfig`.
"""

from .backends import available_backends
from .config import DSAConfig, DSAModelConfig, LlamaDSAConfig, MistralDSAConfig, Qwen2DSAConfig, Qwen3DSAConfig
from .modeling import (
    FAMILIES,
    MODES,
    DSAAttention,
    DSACausalLMOutput,
    DSAModel,
    LlamaDSAForCausalLM,
    MistralDSAForCausalLM,
    Qwen2DSAAttention,
    Qwen2DSAForCausalLM,
    Qwen3DSAForCausalLM,
    add_indexers,
    set_backend,
    set_mode,
    set_selection,
    set_target_heads,
    set_topk,
)

__all__ = [
    "DSAConfig",
    "DSAModelConfig",
    "DSAModel",
    "DSAAttention",
    "DSACausalLMOutput",
    "FAMILIES",
    "MODES",
    "Qwen2DSAConfig",
    "Qwen2DSAForCausalLM",
    "Qwen2DSAAttention",
    "Qwen3DSAConfig",
    "Qwen3DSAForCausalLM",
    "LlamaDSAConfig",
    "LlamaDSAForCausalLM",
    "MistralDSAConfig",
    "MistralDSAForCausalLM",
    "add_indexers",
    "available_backends",
    "set_backend",
    "set_mode",
    "set_selection",
    "set_target_heads",
    "set_topk",
]
