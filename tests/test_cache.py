"""The decode cache: `GrowingIndexedLayer` (appends in place) against transformers' `DynamicIndexedLayer` (torch.cat)."""

import torch
from transformers.cache_utils import DynamicIndexedLayer

import dsa.cache
from dsa.cache import GrowingIndexedLayer


def layer_pair():
    return GrowingIndexedLayer(), DynamicIndexedLayer()


def feed(layers, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    k, v, ki = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g), torch.randn(2, t, 5, generator=g)
    return [(layer.update(k, v), layer.update_indexer(ki)) for layer in layers]


def assert_same(growing, stock):
    (k1, v1), i1 = growing
    (k2, v2), i2 = stock
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(i1, i2)


def test_growing_cache_layer_equals_dynamic_indexed_layer(monkeypatch):
    monkeypatch.setattr(dsa.cache, "MIN_CAPACITY", 8)
    growing, stock = layer_pair()
    for step, t in enumerate([5, 1, 1, 3, 1, 7, 1]):
        assert_same(*feed((growing, stock), t, step))
    assert growing.get_seq_length() == stock.get_seq_length() == 19
    for layer in (growing, stock):
        layer.crop(-4)
        layer.reorder_cache(torch.tensor([1, 0]))
    assert_same(*feed((growing, stock), 2, 10))
    for layer in (growing, stock):
        layer.reset()
    assert_same(*feed((growing, stock), 3, 11))
    assert growing.get_seq_length() == 3


def test_growing_cache_appends_in_place_and_grows_geometrically(monkeypatch):
    monkeypatch.setattr(dsa.cache, "MIN_CAPACITY", 8)
    layer = GrowingIndexedLayer()
    feed([layer], 40, 0)
    storage = layer.storage["keys"]
    assert storage.shape[-2] == int(dsa.cache.GROWTH * 40)
    for step in range(storage.shape[-2] - 40):  # appends while there is room: no new storage, no copy
        feed([layer], 1, step + 1)
        assert layer.storage["keys"] is storage and layer.keys.data_ptr() == storage.data_ptr()
    feed([layer], 1, 99)
    assert layer.storage["keys"] is not storage and layer.storage["keys"].shape[-2] == int(dsa.cache.GROWTH * 51)
