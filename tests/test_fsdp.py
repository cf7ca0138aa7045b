"""FSDP2 (configs/fsdp2.yaml): a DSA model wrapped the way accelerate wraps it trains with the same gradients as
unwrapped, in the warm-up (base frozen, only the indexer loss) and in the sparse stage (LM + indexer loss).

The indexer loss reaches each indexer's weights beside its decoder layer's output, so a layer-level FSDP unit never
gathers them for that backward ("data is not allocated yet", seen on a GPU); DSAModel names LightningIndexer in
_no_split_modules, which accelerate's transformer-based wrapping turns into a unit per indexer. Runs on CPU: one
process, gloo, FSDP2's fully_shard with accelerate's own wrap policy."""

import copy

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.other import get_module_children_bottom_up
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM

import dsa


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("fsdp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_dsa_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=256)  # fmt: skip
    return dsa.add_indexers(Qwen2ForCausalLM(config), dsa.DSAConfig(index_n_heads=2, index_head_dim=16, index_rope_dim=8, index_topk=8))


def shard_like_accelerate(model: torch.nn.Module) -> torch.nn.Module:
    """What accelerate's fsdp2_prepare_model does for TRANSFORMER_BASED_WRAP with no class list (configs/fsdp2.yaml):
    fully_shard each module its policy picks (from the model's _no_split_modules), bottom up, then the root."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    for module in get_module_children_bottom_up(model)[:-1]:
        if policy(module):
            fully_shard(module)
    return fully_shard(model)


def gradients(model, mode: str) -> dict[str, torch.Tensor]:
    dsa.set_mode(model, mode)
    if mode == "warmup":  # warmup_train.py: only the indexers train
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." in name)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids if mode == "sparse" else None, use_cache=False)
    (out.indexer_loss if mode == "warmup" else out.loss + out.indexer_loss).backward()
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip


def test_the_indexer_is_an_fsdp_unit_of_its_own(process_group):
    model = tiny_dsa_model()
    assert {"Qwen2DecoderLayer", "LightningIndexer"} <= set(model._no_split_modules)
    shard_like_accelerate(model)
    units = [name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP")]
    assert "model.layers.0.self_attn.indexer" in units and "model.layers.0" in units


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_fsdp2_gradients_equal_the_unwrapped_model(process_group, mode):
    plain = tiny_dsa_model()
    wrapped = shard_like_accelerate(copy.deepcopy(plain))
    expected, found = gradients(plain, mode), gradients(wrapped, mode)
    assert found.keys() == expected.keys() and len(found) > 0
    if mode == "warmup":
        assert all(".indexer." in name for name in found)
    for name, grad in expected.items():
        torch.testing.assert_close(found[name], grad, rtol=1e-5, atol=1e-7, msg=name)
