"""DSA in transformers' decoders: every attention layer gets a lightning indexer and runs dsa.core's sparse attention.

Families (`FAMILIES`): Qwen2 (Qwen2 / Qwen2.5, the main model), Qwen3 (q/k RMSNorm per head), Llama (Llama 2/3.x,
SmolLM; any static rope type, llama3 scaling included) and Mistral, all with the Llama attention layout: q/k/v/o
projections, GQA, rotate-half RoPE. Each family gets a DSA config type (dsa/config.py), an attention class
(`DSAAttention` + the family's attention: its projections and norms) and a causal-LM class (`DSAModel` + the family's
ForCausalLM: the indexer cache and the padding mask). Sliding-window layers are refused: the selection covers the
whole causal prefix. Nothing outside this module and dsa/config.py knows the family.

The attention layer projects q/k/v, applies RoPE, updates the cache and hands the rest to dsa.core. Modes
(`set_mode`), per forward of one layer:
  dense   the family's stock attention (the model's attn_implementation); the indexer is not run.
  warmup  stock dense attention; in training, the indexer loss against the full causal attention.
  sparse  each query attends only its top-k keys by index score; in training, the indexer loss on the selected
          set. The default, and the mode a reloaded checkpoint starts in.
The backend (`set_backend`, dsa/backends.py) decides how the selection and the sparse attention are computed.
The indexer keys of past tokens live in the cache object (`DynamicIndexedLayer`, `cache.update_indexer`), beside
the main KV cache, which still stores every token.
"""

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, eager_attention_forward
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.utils.deprecation import deprecate_kwarg

from . import backends
from .cache import GrowingIndexedLayer
from .config import DSAConfig, DSAModelConfig, LlamaDSAConfig, MistralDSAConfig, Qwen2DSAConfig, Qwen3DSAConfig, dsa_config_from
from .core import SELECTIONS, TARGET_HEADS, Backend, LightningIndexer, dsa_attention

MODES = ("dense", "warmup", "sparse")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static frequencies; "dynamic" and "longrope" depend on the length


class RopeAtWidth:
    """What transformers' RoPE initialisers read from a config, for a head of `width` features: the indexer's RoPE
    follows the model's rope parameters at the indexer's own rope width."""

    def __init__(self, config, width: int):
        self.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 1.0}
        self.head_dim, self.hidden_size, self.num_attention_heads = width, config.hidden_size, config.num_attention_heads
        self.max_position_embeddings = config.max_position_embeddings

    def standardize_rope_params(self) -> None:
        pass


def indexer_rope(config, rope_dim: int) -> tuple[list[float], float]:
    """(inv_freq, scale) of the indexer's RoPE: the model's rope type and parameters at width rope_dim. A rope type
    whose frequencies change with the sequence length is refused with a ValueError naming it."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"the DSA indexer supports rope_type {list(ROPE_TYPES)}; this model has {rope_type!r}")
    if not rope_dim:
        return [], 1.0
    with torch.device("cpu"):  # also when the model is being built on the meta device
        if rope_type == "default":
            dims = torch.arange(0, rope_dim, 2, dtype=torch.float32)
            return (1.0 / (params["rope_theta"] ** (dims / rope_dim))).tolist(), 1.0
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](RopeAtWidth(config, rope_dim), "cpu")
    return inv_freq.float().tolist(), float(scale)


def sliding_window(attention: torch.nn.Module, config) -> int | None:
    """The layer's sliding window (Qwen2/Qwen3 set it per layer type, Mistral reads its config; Llama has none)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(config, "sliding_window", None)


class DSAAttention:
    """The DSA attention of one layer, mixed into a family's attention class (which brings q/k/v/o_proj, the optional
    q_norm / k_norm, head_dim and scaling): `class Qwen2DSAAttention(DSAAttention, Qwen2Attention)`."""

    def __init__(self, config: DSAModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        window = sliding_window(self, config)
        if window is not None:
            raise ValueError(f"layer {layer_idx} of this {type(config).__name__} uses sliding-window attention (window {window}); "
                             "DSA here selects from the whole causal prefix: load the model with sliding_window=None "
                             "(use_sliding_window=False for Qwen) to use it")  # fmt: skip
        inv_freq, rope_scale = indexer_rope(config, config.index_rope_dim)
        self.indexer = LightningIndexer(config.hidden_size, config.index_n_heads, config.index_head_dim, config.index_rope_dim, inv_freq, rope_scale)
        self.topk = config.index_topk
        self.mode = "sparse"
        self.backend: str | Backend = "auto"  # a name of dsa.backends or a Backend; see set_backend
        self.selection = "indexer"  # or "oracle" (evaluation only); see set_selection
        self.target_heads = "sum"  # the indexer target's head aggregation in training; see set_target_heads
        self.indexer_loss: torch.Tensor | None = None  # set by each training forward in warmup / sparse mode

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,  # B, T, hidden (output of input_layernorm)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,  # the stock mask, used by dense attention
        cache=None,
        position_ids: torch.Tensor | None = None,  # B|1, T
        dsa_key_padding: torch.Tensor | None = None,  # B, S bool, True = real token (None: no padding)
        dsa_row_weight: torch.Tensor | None = None,  # B, T: weight of each query row in the indexer loss (None: 1)
        **kwargs,
    ):
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        n_past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # B, Hkv, S, D with S = n_past + T
        self.indexer_loss = None

        if self.mode == "dense" or (self.mode == "warmup" and not self.training):
            out = self.stock_attention(q, k, v, attention_mask, **kwargs)
        else:
            if position_ids is None:
                position_ids = torch.arange(n_past, n_past + T, device=q.device)[None]
            q_I, k_I, w_I = self.indexer(hidden_states, position_ids)  # B, T, H_I, d_I; B, T, d_I; B, T, H_I
            if cache is not None:
                k_I = cache.update_indexer(k_I, self.layer_idx)  # B, S, d_I
            query_pos = torch.arange(n_past, n_past + T, device=q.device)  # cache position of each query
            backend = backends.resolve(self.backend, q.device)
            if self.mode == "warmup":
                out = self.stock_attention(q, k, v, attention_mask, **kwargs)
                self.indexer_loss = backend.warmup_loss(q, k, q_I, k_I, w_I, query_pos, dsa_key_padding, self.scaling,
                                                        self.target_heads, dsa_row_weight)
            else:
                out, self.indexer_loss = dsa_attention(
                    q, k, v, q_I, k_I, w_I, query_pos, dsa_key_padding, self.topk, self.scaling, self.training, backend, self.selection,
                    self.target_heads, dsa_row_weight,
                )
        return self.o_proj(out.reshape(B, T, -1).contiguous()), None

    def project(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The family's q, k, v of B, T, hidden: q B, Hq, T, D and k B, Hkv, T, D after the per-head norms (Qwen3's
        q_norm / k_norm, where the family has them) and RoPE; v B, Hkv, T, D."""
        B, T, _ = hidden_states.shape
        hidden_shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        return q, k, v

    def stock_attention(self, q, k, v, attention_mask, **kwargs) -> torch.Tensor:
        """The family's stock attention call (SDPA, eager, flash... per config). Returns B, T, Hq, D."""
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        kwargs.pop("use_cache", None)
        dropout = self.attention_dropout if self.training else 0.0
        out, _ = attention_interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        return out


@dataclass
class DSACausalLMOutput(CausalLMOutputWithPast):
    """`loss`: language-modelling loss only. `indexer_loss`: mean over layers of the indexer KL (a scalar whenever
    the mode is warmup / sparse and the model is in training mode, else None)."""

    indexer_loss: torch.FloatTensor | None = None


def dsa_cache(config) -> DynamicCache:
    """A DynamicCache whose layers also keep the indexer keys (appending in place: `cache.GrowingIndexedLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingIndexedLayer() for _ in range(config.num_hidden_layers)]
    return cache


class DSAModel:
    """A DSA causal LM, mixed into a family's ForCausalLM: `class Qwen2DSAForCausalLM(DSAModel, Qwen2ForCausalLM)`
    with `attention_class` the family's DSA attention. Every layer's self_attn is a DSA attention; forward takes
    the padding mask to the DSA layers and returns the indexer loss (`indexer_row_weight`, B x T: the weight of each
    query row in it, core section 4); generate() gets the indexer cache."""

    attention_class: type
    _keep_in_fp32_modules_strict = ["weights_proj"]  # the indexer weights w are fp32, also in a bf16 checkpoint

    def __init__(self, config: DSAModelConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = self.attention_class(config, i)
        # FSDP (accelerate's transformer-based wrapping) makes one unit of each class named here. The indexer loss
        # reaches the indexer's weights beside its layer's output, never through it, so the layer's unit would not
        # gather them for that backward (in the warm-up nothing else flows back): each indexer is a unit of its own.
        self._no_split_modules = {*(self._no_split_modules or ()), LightningIndexer.__name__}
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, indexer_row_weight=None,
                **kwargs) -> DSACausalLMOutput:  # fmt: skip
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = dsa_cache(self.config)
        key_padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"DSA models take a 2D attention_mask (batch, keys); got shape {tuple(attention_mask.shape)}")
            if not attention_mask.bool().all():
                key_padding = attention_mask.bool()
        if all(layer.self_attn.mode == "sparse" for layer in self.model.layers):
            attention_mask = None  # sparse layers read key_padding; no B x 1 x T x S mask is built for them
        kwargs["return_dict"] = True
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache, dsa_key_padding=key_padding,
            dsa_row_weight=indexer_row_weight, **kwargs
        )
        losses = [layer.self_attn.indexer_loss for layer in self.model.layers if layer.self_attn.indexer_loss is not None]
        return DSACausalLMOutput(**out, indexer_loss=torch.stack(losses).mean() if losses else None)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a plain DynamicCache from the config; give it indexer layers instead."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = dsa_cache(self.config)


# --------------------------------------------------------------------------------------------------------------
# The families: the family's attention and causal LM with DSA mixed in, and their registration for the Auto classes
# --------------------------------------------------------------------------------------------------------------


class Qwen2DSAAttention(DSAAttention, Qwen2Attention):
    pass


class Qwen3DSAAttention(DSAAttention, Qwen3Attention):
    pass


class LlamaDSAAttention(DSAAttention, LlamaAttention):
    pass


class MistralDSAAttention(DSAAttention, MistralAttention):
    pass


class Qwen2DSAForCausalLM(DSAModel, Qwen2ForCausalLM):
    config_class, attention_class = Qwen2DSAConfig, Qwen2DSAAttention


class Qwen3DSAForCausalLM(DSAModel, Qwen3ForCausalLM):
    config_class, attention_class = Qwen3DSAConfig, Qwen3DSAAttention


class LlamaDSAForCausalLM(DSAModel, LlamaForCausalLM):
    config_class, attention_class = LlamaDSAConfig, LlamaDSAAttention


class MistralDSAForCausalLM(DSAModel, MistralForCausalLM):
    config_class, attention_class = MistralDSAConfig, MistralDSAAttention


FAMILIES = {  # a dense ForCausalLM class -> its DSA class
    Qwen2ForCausalLM: Qwen2DSAForCausalLM,
    Qwen3ForCausalLM: Qwen3DSAForCausalLM,
    LlamaForCausalLM: LlamaDSAForCausalLM,
    MistralForCausalLM: MistralDSAForCausalLM,
}
for dsa_class in FAMILIES.values():
    AutoConfig.register(dsa_class.config_class.model_type, dsa_class.config_class)
    AutoModelForCausalLM.register(dsa_class.config_class, dsa_class)


def add_indexers(model: torch.nn.Module, dsa_config: DSAConfig) -> DSAModel:
    """A DSA model built from a dense model of a supported family (`FAMILIES`): the same base weights (copied
    unchanged), a fresh lightning indexer in every layer's `self_attn.indexer` (weights_proj in fp32 whatever the
    model's dtype), mode "sparse", backend "auto". Another model class: a TypeError naming it and the supported ones;
    a sliding-window layer: a ValueError."""
    dsa_class = FAMILIES.get(type(model))
    if dsa_class is None:
        supported = ", ".join(cls.__name__ for cls in FAMILIES)
        raise TypeError(f"add_indexers supports {supported}; got {type(model).__name__}")
    if not isinstance(dsa_config, DSAConfig):
        raise TypeError(f"dsa_config must be a dsa.DSAConfig, got {type(dsa_config).__name__}")
    param = next(model.parameters())
    with no_init_weights():  # the base weights are copied below: skip their random init
        config = dsa_config_from(model.config, dsa_class.config_class, dsa_config)
        dsa_model = dsa_class._from_config(config, dtype=param.dtype)
    dsa_model.to(param.device)
    missing, unexpected = dsa_model.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".indexer." not in name for name in missing):
        raise RuntimeError(f"weights did not map onto the DSA model: missing {missing}, unexpected {unexpected}")
    dsa_model.tie_weights()  # the load above copied lm_head into its own tensor: tie it back (tied configs)
    for layer in dsa_model.model.layers:
        indexer = layer.self_attn.indexer
        indexer.weights_proj.float()
        indexer.apply(dsa_model._init_weights)  # normal(0, initializer_range); LayerNorm 1, 0
    dsa_model.generation_config = model.generation_config
    dsa_model.train(model.training)
    return dsa_model


def dsa_attention_layers(model: torch.nn.Module) -> list[DSAAttention]:
    layers = [m for m in model.modules() if isinstance(m, DSAAttention)]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no DSA attention layers: build it with dsa.add_indexers")
    return layers


def set_mode(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Switch every DSA attention layer to "dense", "warmup" or "sparse"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for layer in dsa_attention_layers(model):
        layer.mode = mode
    return model


def set_topk(model: torch.nn.Module, topk: int) -> torch.nn.Module:
    """Change k for every layer (and in the config, so it is saved)."""
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    for layer in dsa_attention_layers(model):
        layer.topk = topk
    if isinstance(getattr(model, "config", None), DSAModelConfig):
        model.config.index_topk = topk
    return model


def set_backend(model: torch.nn.Module, backend: str | Backend) -> torch.nn.Module:
    """Compute every DSA layer of this model with `backend`: a name of `dsa.available_backends()` or a Backend
    instance. An unknown or unavailable name raises a ValueError listing the choices."""
    backend = backends.check_backend(backend)
    for layer in dsa_attention_layers(model):
        layer.backend = backend
    return model


def set_selection(model: torch.nn.Module, selection: str) -> torch.nn.Module:
    """How sparse mode ranks the keys in every DSA layer: "indexer" (DSA, the default) or "oracle": the top-k of
    the true head-summed dense attention (dsa.core.oracle_topk), evaluation only. The oracle set holds the most
    head-summed attention mass any k keys can (an upper bound on recall), which is the indexer's training target;
    it is not the set that loses the least perplexity, so a trained indexer can beat it there."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    for layer in dsa_attention_layers(model):
        layer.selection = selection
    return model


def set_target_heads(model: torch.nn.Module, heads: str) -> torch.nn.Module:
    """How the indexer's training target combines the attention heads in every DSA layer: "sum" (the paper) or
    "max" (dsa.core.attention_target). Training only: inference and the saved weights do not depend on it."""
    if heads not in TARGET_HEADS:
        raise ValueError(f"target heads must be one of {TARGET_HEADS}, got {heads!r}")
    for layer in dsa_attention_layers(model):
        layer.target_heads = heads
    return model

