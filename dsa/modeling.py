"""DSA on Qwen2: every attention layer gets a lightning indexer and runs top-k sparse attention.

Modes (`set_mode`), per forward of one attention layer:
  dense   stock Qwen2 attention (the model's attn_implementation); the indexer is not run.
  warmup  stock dense attention; in training, indexer loss against the full causal attention.
  sparse  each query attends only its top-k keys by index score; in training, indexer loss on the
          selected set. The default, and the mode a reloaded checkpoint starts in.

The indexer keys of past tokens live in the transformers cache object (`DynamicIndexedLayer`,
`cache.update_indexer`), beside the main KV cache, which still stores every token.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, apply_rotary_pos_emb, eager_attention_forward
from transformers.utils.deprecation import deprecate_kwarg

from . import attention
from .attention import allowed_keys, query_chunks, select_topk
from .cache import GrowingIndexedLayer
from .config import DSAConfig, Qwen2DSAConfig, dsa_config_from
from .indexer import LightningIndexer
from .losses import query_rows, sparse_kl, warmup_kl, warmup_loss

MODES = ("dense", "warmup", "sparse")


def maybe_checkpoint(fn: Callable, *args):
    """Run fn, recomputing it in backward when autograd is on: a query chunk then keeps only its
    inputs alive, so training memory stays O(L * k) instead of the chunks' O(L * S) intermediates."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Qwen2DSAAttention(Qwen2Attention):
    def __init__(self, config: Qwen2DSAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = LightningIndexer(
            config.hidden_size,
            config.index_n_heads,
            config.index_head_dim,
            config.index_rope_dim,
            config.rope_parameters["rope_theta"],
        )
        self.topk = config.index_topk
        self.mode = "sparse"
        self.indexer_loss: torch.Tensor | None = None  # set by each training forward in warmup/sparse mode

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,  # B, T, hidden (output of input_layernorm)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,  # the stock mask, used by the dense path
        cache=None,
        position_ids: torch.Tensor | None = None,  # B or 1, T
        dsa_key_padding: torch.Tensor | None = None,  # B, S bool, True = real token (None: no padding)
        **kwargs,
    ):
        B, T, _ = hidden_states.shape
        hidden_shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # B, Hq, T, D
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # B, Hkv, T, D
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # B, Hkv, T, D
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        n_past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # B, Hkv, S, D with S = n_past + T
        self.indexer_loss = None

        if self.mode == "dense" or (self.mode == "warmup" and not self.training):
            out = self.dense_attention(q, k, v, attention_mask, **kwargs)
        else:
            if position_ids is None:
                position_ids = torch.arange(n_past, n_past + T, device=q.device)[None]
            q_idx, k_idx, w_idx = self.indexer(hidden_states, position_ids)  # B,T,H_I,d_I  B,T,d_I  B,T,H_I
            if cache is not None:
                k_idx = cache.update_indexer(k_idx, self.layer_idx)  # B, S, d_I
            query_index = torch.arange(n_past, n_past + T, device=q.device)  # cache index of each query
            if self.mode == "warmup":
                out = self.dense_attention(q, k, v, attention_mask, **kwargs)
                self.indexer_loss = self.warmup_loss(q, k, q_idx, k_idx, w_idx, query_index, dsa_key_padding)
            else:
                out = self.sparse_attention(q, k, v, q_idx, k_idx, w_idx, query_index, dsa_key_padding)

        out = out.reshape(B, T, -1).contiguous()  # B, T, Hq * D
        return self.o_proj(out), None

    def dense_attention(self, q, k, v, attention_mask, **kwargs) -> torch.Tensor:
        """The stock Qwen2 attention call (SDPA, eager, flash... per config). Returns B, T, Hq, D."""
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        kwargs.pop("use_cache", None)
        out, _ = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return out

    def sparse_attention(self, q, k, v, q_idx, k_idx, w_idx, query_index, key_padding) -> torch.Tensor:
        """Top-k sparse attention, query chunk by query chunk; in training also the sparse indexer loss.

        With attention.FAST_PATHS (the default) a chunk sees only the keys up to its last query (the later
        ones are never allowed), a chunk whose queries have at most k keys is dense attention (top-k would
        select every allowed key; the indexer loss is then over the whole causal row, which is the selected
        set), and the selected keys are attended by `attention.fast_sparse_attention_for`: masked dense attention
        in a chunk of at most MASKED_DENSE_KEYS * k keys, else `sparse_attention_fast` (or the Triton kernel on a
        GPU at inference). Otherwise: the reference path.
        """
        S, T = k.shape[2], len(query_index)  # query_index = S - T, ..., S - 1
        fast = attention.FAST_PATHS
        if fast:
            k, v = attention.per_head_contiguous(k), attention.per_head_contiguous(v)
        outs, kl_sum, n_rows = [], 0.0, 0
        scratch = attention.Scratch() if fast else None  # the chunks reuse its buffers (index scores, selected keys)
        for rows in query_chunks(T, S):
            n_keys = S - T + rows.stop if fast else S
            k_c, v_c, k_idx_c = k[:, :, :n_keys], v[:, :, :n_keys], k_idx[:, :n_keys]
            padding = None if key_padding is None else key_padding[:, :n_keys]
            q_c, q_idx_c, w_idx_c = q[:, :, rows], q_idx[:, rows], w_idx[:, rows]
            if fast and n_keys <= self.topk:
                allowed = allowed_keys(query_index[rows], padding, n_keys)  # B|1, C, n_keys
                outs.append(maybe_checkpoint(attention.dense_attention, q_c, k_c, v_c, allowed, self.scaling))
                if self.training:
                    kl = maybe_checkpoint(warmup_kl, q_c, k_c, q_idx_c, k_idx_c, w_idx_c, allowed, self.scaling)
            else:
                indices, valid = select_topk(q_idx_c, k_idx_c, w_idx_c, query_index[rows], padding, self.topk, fast, scratch)  # B, C, K
                attend = attention.fast_sparse_attention_for(q_c, n_keys, self.topk, scratch) if fast else attention.sparse_attention
                outs.append(maybe_checkpoint(attend, q_c, k_c, v_c, indices, valid, self.scaling))
                if self.training:
                    kl = maybe_checkpoint(sparse_kl, q_c, k_c, q_idx_c, k_idx_c, w_idx_c, indices, valid, self.scaling)
            if self.training:
                counted = query_rows(query_index[rows], key_padding)
                kl_sum, n_rows = kl_sum + (kl * counted).sum(), n_rows + counted.sum()
        if self.training:
            self.indexer_loss = kl_sum / max(n_rows, 1)
        return torch.cat(outs, dim=1)  # B, T, Hq, D

    def warmup_loss(self, q, k, q_idx, k_idx, w_idx, query_index, key_padding) -> torch.Tensor:
        """The warm-up indexer loss over full causal rows, query chunk by query chunk: the mean over real query
        rows of `warmup_kl`. With attention.FAST_PATHS its gradient is computed in the same pass
        (`losses.WarmupLoss`); the reference leaves it to autograd and recomputes each chunk in backward."""
        if attention.FAST_PATHS:
            return warmup_loss(q, k, q_idx, k_idx, w_idx, query_index, key_padding, self.scaling)
        S = k.shape[2]
        kl_sum, n_rows = 0.0, 0
        for rows in query_chunks(len(query_index), S):
            allowed = allowed_keys(query_index[rows], key_padding, S)
            kl = maybe_checkpoint(warmup_kl, q[:, :, rows], k, q_idx[:, rows], k_idx, w_idx[:, rows], allowed, self.scaling)
            counted = query_rows(query_index[rows], key_padding)
            kl_sum, n_rows = kl_sum + (kl * counted).sum(), n_rows + counted.sum()
        return kl_sum / max(n_rows, 1)


@dataclass
class DSACausalLMOutput(CausalLMOutputWithPast):
    """`loss`: language-modelling loss only. `indexer_loss`: mean over layers of the indexer KL
    (a scalar whenever the mode is warmup/sparse and the model is in training mode, else None)."""

    indexer_loss: torch.FloatTensor | None = None


def dsa_cache(config) -> DynamicCache:
    """A DynamicCache whose layers also keep the indexer keys (DynamicIndexedLayer, appending in place:
    `cache.GrowingIndexedLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingIndexedLayer() for _ in range(config.num_hidden_layers)]
    return cache


class Qwen2DSAForCausalLM(Qwen2ForCausalLM):
    config_class = Qwen2DSAConfig
    config: Qwen2DSAConfig

    def __init__(self, config: Qwen2DSAConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = Qwen2DSAAttention(config, i)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs) -> DSACausalLMOutput:
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
        kwargs["return_dict"] = True
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            dsa_key_padding=key_padding,
            **kwargs,
        )
        losses = [layer.self_attn.indexer_loss for layer in self.model.layers]
        losses = [loss for loss in losses if loss is not None]
        return DSACausalLMOutput(**out, indexer_loss=torch.stack(losses).mean() if losses else None)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a plain DynamicCache from the config; give it indexer layers instead."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = dsa_cache(self.config)


def add_indexers(model: Qwen2ForCausalLM, dsa_config: DSAConfig) -> Qwen2DSAForCausalLM:
    """A DSA model built from a dense Qwen2ForCausalLM: the same base weights (copied unchanged), a fresh
    lightning indexer in every layer's `self_attn.indexer`, mode "sparse"."""
    if type(model) is not Qwen2ForCausalLM:
        raise TypeError(
            f"add_indexers supports Qwen2ForCausalLM (Qwen2 / Qwen2.5 checkpoints); got {type(model).__name__}"
        )
    if not isinstance(dsa_config, DSAConfig):
        raise TypeError(f"dsa_config must be a dsa.DSAConfig, got {type(dsa_config).__name__}")
    param = next(model.parameters())
    with no_init_weights():  # the base weights are copied below: skip their random init
        dsa_model = Qwen2DSAForCausalLM._from_config(dsa_config_from(model.config, dsa_config), dtype=param.dtype)
    dsa_model.to(param.device)
    missing, unexpected = dsa_model.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".indexer." not in name for name in missing):
        raise RuntimeError(f"weights did not map onto the DSA model: missing {missing}, unexpected {unexpected}")
    dsa_model.tie_weights()  # the load above copied lm_head into its own tensor: tie it back (tied configs)
    for layer in dsa_model.model.layers:
        layer.self_attn.indexer.apply(dsa_model._init_weights)  # normal(0, initializer_range); LayerNorm 1, 0
    dsa_model.generation_config = model.generation_config
    dsa_model.train(model.training)
    return dsa_model


def dsa_attention_layers(model: torch.nn.Module) -> list[Qwen2DSAAttention]:
    layers = [m for m in model.modules() if isinstance(m, Qwen2DSAAttention)]
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
    if isinstance(getattr(model, "config", None), Qwen2DSAConfig):
        model.config.index_topk = topk
    return model


AutoConfig.register(Qwen2DSAConfig.model_type, Qwen2DSAConfig)
AutoModelForCausalLM.register(Qwen2DSAConfig, Qwen2DSAForCausalLM)
