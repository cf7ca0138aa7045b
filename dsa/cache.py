"""The decode cache of DSA models: transformers' DynamicIndexedLayer with appends in O(new tokens).

`DynamicIndexedLayer` grows its keys, values and indexer keys by `torch.cat`, which copies the whole cache
at every decoded token: at 64K context that copy costs more than the sparse attention itself. Here each
tensor lives in storage with spare room at the end; an append writes the new tokens in place, and the
storage grows by GROWTH (a copy every few thousand tokens at long context, amortized O(1) per token).
`keys`, `values` (B, Hkv, n, D) and `indexer_keys` (B, n, d_I) stay prefix views of the storage, so
every other method of the parent (crop, reorder, batch repeat/select, reset) keeps working unchanged:
when one of them replaces a tensor by a fresh one, the next append copies it into new storage.
"""

import torch
from transformers.cache_utils import DynamicIndexedLayer

GROWTH = 1.25  # new capacity = GROWTH * needed length (at least MIN_CAPACITY)
MIN_CAPACITY = 256


def append(storage: torch.Tensor | None, current: torch.Tensor, new: torch.Tensor, dim: int):
    """Write `new` after `current` along `dim`; returns (storage, the prefix view holding both).

    `current` is a prefix view of `storage`, or any other tensor (then it is copied into fresh storage).
    """
    n = current.shape[dim] if current.dim() == new.dim() else 0  # an uninitialized layer holds tensor([])
    needed = n + new.shape[dim]
    if storage is None or current._base is not storage or storage.shape[dim] < needed:
        shape = list(new.shape)
        shape[dim] = max(MIN_CAPACITY, int(GROWTH * needed))
        fresh = new.new_empty(shape)
        if n:
            fresh.narrow(dim, 0, n).copy_(current)
        storage = fresh
    storage.narrow(dim, n, new.shape[dim]).copy_(new)
    return storage, storage.narrow(dim, 0, needed)


class GrowingIndexedLayer(DynamicIndexedLayer):
    """A DynamicIndexedLayer (same tensors, same API) whose appends do not copy the cache."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.storage: dict[str, torch.Tensor | None] = {"keys": None, "values": None, "indexer_keys": None}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.storage["keys"], self.keys = append(self.storage["keys"], self.keys, key_states, dim=-2)
        self.storage["values"], self.values = append(self.storage["values"], self.values, value_states, dim=-2)
        return self.keys, self.values

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        if not self.is_indexer_initialized:
            self.lazy_initialization_indexer(indexer_key_states)
        storage, self.indexer_keys = append(self.storage["indexer_keys"], self.indexer_keys, indexer_key_states, dim=1)
        self.storage["indexer_keys"] = storage
        return self.indexer_keys

    def reset(self) -> None:
        super().reset()
        self.storage = dict.fromkeys(self.storage)
