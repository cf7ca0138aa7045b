"""DSA hyper-parameters and the Hugging Face config type that carries them.

`DSAConfig` is what a user passes to `dsa.add_indexers`; `Qwen2DSAConfig` is a `Qwen2Config` with the
same four `index_*` fields, saved in config.json under `model_type = "qwen2_dsa"` so that
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds the DSA model after `import dsa`.
"""

from dataclasses import asdict, dataclass

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config


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


@strict
class Qwen2DSAConfig(Qwen2Config):
    """A Qwen2 config plus the DSA fields (see `DSAConfig`)."""

    model_type = "qwen2_dsa"

    index_n_heads: int = 4
    index_head_dim: int = 64
    index_rope_dim: int = 32
    index_topk: int = 512

    def __post_init__(self, **kwargs):
        validate_dsa_fields(self.index_n_heads, self.index_head_dim, self.index_rope_dim, self.index_topk)
        super().__post_init__(**kwargs)

    @property
    def dsa(self) -> DSAConfig:
        return DSAConfig(self.index_n_heads, self.index_head_dim, self.index_rope_dim, self.index_topk)


def dsa_config_from(qwen2_config: Qwen2Config, dsa_config: DSAConfig) -> Qwen2DSAConfig:
    """The Qwen2DSAConfig of a dense Qwen2 config plus DSA sizes."""
    fields = qwen2_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    fields.update(asdict(dsa_config))
    config = Qwen2DSAConfig(**fields)
    config._attn_implementation = qwen2_config._attn_implementation
    return config
