"""DeepSeek Sparse Attention (lightning indexer + top-k sparse attention) for Qwen2 models in transformers.

    model = dsa.add_indexers(AutoModelForCausalLM.from_pretrained(...), dsa.DSAConfig(index_topk=512))
    dsa.set_mode(model, "warmup" | "sparse" | "dense")
    dsa.set_backend(model, "auto" | "reference" | "torch" | "cpu" | "triton")   # dsa.available_backends()
    dsa.set_selection(model, "indexer" | "oracle")   # oracle: top-k of the true attention (evaluation only)
    dsa.set_target_heads(model, "sum" | "max")   # the indexer target's head aggregation in training
    out = model(input_ids, labels=labels)   # out.loss (LM), out.indexer_loss (KL, training mode)

dsa/core.py is the method in plain PyTorch. Importing dsa registers the "qwen2_dsa" config type, so
AutoModelForCausalLM reloads saved DSA models.
"""

from .backends import available_backends
from .config import DSAConfig, Qwen2DSAConfig
from .modeling import MODES, DSACausalLMOutput, Qwen2DSAAttention, Qwen2DSAForCausalLM, add_indexers, set_backend, set_mode, set_selection, set_target_heads, set_topk

__all__ = [
    "DSAConfig",
    "Qwen2DSAConfig",
    "Qwen2DSAForCausalLM",
    "Qwen2DSAAttention",
    "DSACausalLMOutput",
    "MODES",
    "add_indexers",
    "available_backends",
    "set_backend",
    "set_mode",
    "set_selection",
    "set_target_heads",
    "set_topk",
]
