"""DSA hyper-parameters and the Hugging Face config types that carry them.

`DSAConfig` is what a user passes to `dsa.add_indexers`. For each supported family there is a config type: the
family's config with the same four `index_*` fields (`Qwen2DSAConfig` = `Qwen2Config` + the fields, ...), saved in
config.json under `model_type = "<family>_dsa"` ("qwen2_dsa", "qwen3_dsa", "llama_dsa", "mistral_dsa") so that
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds the DSA model after `import dsa`. Every one of them is a
`DSAModelConfig`.
"""

from dataclasses import asdict, dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config, Qwen3Config


@dataclass
class DSAConfig:
    """Lightning-indexer sizes and the top-k budget.

    index_n_heads  H_I: indexer query heads (DeepSeek-V3.2: 64; proportional for Qwen2.5-0.5B: 4).
    index_head_dim d_I: size of each indexer query head and of the single shared indexer key.
    index_rope_dim features of q and k (the first ones) that get rotate-half RoPE; even, <= d_I.
    index_topk     k: keys attended per query token (all causal keys when fewer than k exist).
    """

    index_n_heads: int = 4
    index_head_dim: int = 64
    index_rope_dim: int = 32
    index_topk: int = 512

    def __post_init__(self):
        validate_dsa_fields(self.index_n_heads, self.index_head_dim, self.index_rope_dim, self.index_topk)


def validate_dsa_fields(index_n_heads, index_head_dim, index_rope_dim, index_topk) -> None:
    """Raise a ValueError naming the first impossible field."""
    for name, value in (("index_n_heads", index_n_heads), ("index_head_dim", index_head_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(index_rope_dim, int) or index_rope_dim < 0 or index_rope_dim % 2:
        raise ValueError(f"index_rope_dim must be a non-negative even integer, got {index_rope_dim!r}")
    if index_rope_dim > index_head_dim:
        raise ValueError(f"index_rope_dim={index_rope_dim} must be <= index_head_dim={index_head_dim}")
    if not isinstance(index_topk, int) or index_topk < 1:
        raise ValueError(f"index_topk must be an integer >= 1, got {index_topk!r}")


class DSAModelConfig:
    """What every <family>DSAConfig adds to its family's config: the check of the DSA fields and `dsa`."""

    model_type = "<family>_dsa"  # what the concrete types set (also what an error message names)

    def __post_init__(self, **kwargs):
        validate_dsa_fields(self.index_n_heads, self.index_head_dim, self.index_rope_dim, self.index_topk)
        super().__post_init__(**kwargs)

    @property
    def dsa(self) -> DSAConfig:
        return DSAConfig(self.index_n_heads, self.index_head_dim, self.index_rope_dim, self.index_topk)


def dsa_config_type(family: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """The DSA config type of a family: `family` plus the four DSA fields, model_type "<family's>_dsa"."""

    class Config(DSAModelConfig, family):
        model_type = f"{family.model_type}_dsa"

        index_n_heads: int = 4
        index_head_dim: int = 64
        index_rope_dim: int = 32
        index_topk: int = 512

    Config.__name__ = Config.__qualname__ = family.__name__.replace("Config", "DSAConfig")
    Config.__doc__ = f"A {family.__name__} plus the DSA fields (see `DSAConfig`)."
    return strict(Config)


Qwen2DSAConfig = dsa_config_type(Qwen2Config)
Qwen3DSAConfig = dsa_config_type(Qwen3Config)
LlamaDSAConfig = dsa_config_type(LlamaConfig)
MistralDSAConfig = dsa_config_type(MistralConfig)


def dsa_config_from(config: PreTrainedConfig, config_type: type[PreTrainedConfig], dsa_config: DSAConfig) -> PreTrainedConfig:
    """The DSA config (of type `config_type`) of a dense model's config plus DSA sizes."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    fields.update(asdict(dsa_config))
    dsa_model_config = config_type(**fields)
    dsa_model_config._attn_implementation = config._attn_implementation
    return dsa_model_config
