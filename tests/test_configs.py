"""The committed accelerate configs (configs/*.yaml) as accelerate itself reads them, and the training loop's gradient
clipping through accelerate. FSDP and DeepSpeed run only on GPUs (bench/gpu_check.py launches them there); here:
each file loads with accelerate's config loader, `accelerate launch`'s own argument processing turns it into the
environment a launched process reads, and the plugins built from that environment have the intended settings.
DDP with 2 CPU processes runs in tests/test_training.py and in bench/gpu_check.py --quick (tests/test_gpu_check.py)."""

import argparse
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from transformers import Qwen2Config, Qwen2ForCausalLM

import dsa
from dsa.train_utils import run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP, "zero2": DistributedType.DEEPSPEED,
            "zero3": DistributedType.DEEPSPEED}  # fmt: skip


def launch_environment(name: str, monkeypatch) -> argparse.Namespace:
    """`accelerate launch --config_file configs/<name>.yaml --num_processes 2 warmup_train.py`, processed as accelerate
    does before starting the processes; their environment variables are set here (monkeypatch)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "2",
                                               "--main_process_port", "0", "warmup_train.py"])  # fmt: skip
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return args


def tiny_dsa_model():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return dsa.add_indexers(Qwen2ForCausalLM(config), dsa.DSAConfig(2, 16, 8, 8))


def test_every_config_loads_with_accelerate():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, kind in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert isinstance(config, ClusterConfig), name
        assert config.distributed_type == kind and config.mixed_precision == "bf16", name
        assert config.num_processes == -1, name  # not fixed by the file: --num_processes is the number of GPUs


def test_launch_without_num_processes_names_the_flag():
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "ddp.yaml"), "warmup_train.py"])
    with pytest.raises(ValueError, match="--num_processes"):
        _validate_launch_command(args)


def test_ddp_config_launches_one_process_per_gpu(monkeypatch):
    args = launch_environment("ddp", monkeypatch)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 2


def test_fsdp2_config_shards_decoder_layers_and_saves_full_state_dicts(monkeypatch):
    args = launch_environment("fsdp2", monkeypatch)
    assert args.use_fsdp
    plugin = FullyShardedDataParallelPlugin()  # from the environment accelerate launch sets
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # save_pretrained gets whole tensors: from_pretrained reloads
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None  # unset: the loaded model's _no_split_modules decide
    model = tiny_dsa_model()
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    # one FSDP unit per decoder layer and one per indexer (tests/test_fsdp.py: why, and that it trains)
    assert wrapped == [name for i in range(2) for name in (f"model.layers.{i}", f"model.layers.{i}.self_attn.indexer")]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_clip_at_1_and_leave_accumulation_to_the_script(stage, monkeypatch):
    """Built without deepspeed installed (accelerate's plugin reads the environment only); running needs deepspeed
    and a GPU (bench/gpu_check.py)."""
    args = launch_environment(f"zero{stage}", monkeypatch)
    assert args.use_deepspeed
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.gradient_clipping == 1.0
    assert plugin.gradient_accumulation_steps == "auto"  # filled from Accelerator(gradient_accumulation_steps=--grad-accum)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_pretrained gets whole weights
        assert plugin.zero3_init_flag is False


def test_training_loop_clips_every_trained_gradient_through_accelerate(tmp_path, monkeypatch):
    """run_training clips with accelerator.clip_grad_norm_ over the prepared model's parameters (the call FSDP's
    sharded clipping needs), once per optimizer step, and the gradients it steps with have norm <= 1."""
    calls = []
    original = Accelerator.clip_grad_norm_

    def total_norm(parameters):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))

    def spy(self, parameters, max_norm, *rest, **kwargs):
        parameters = list(parameters)
        before = total_norm(parameters)
        norm = original(self, parameters, max_norm, *rest, **kwargs)
        calls.append((parameters, sum(p.grad is not None for p in parameters), before, norm, total_norm(parameters)))
        return norm

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    model = tiny_dsa_model()
    dsa.set_mode(model, "sparse")
    base = [p for name, p in model.named_parameters() if ".indexer." not in name and "embed" not in name]
    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    for name, p in model.named_parameters():
        p.requires_grad_("embed" not in name)  # the embedding frozen: no gradient, not clipped
    ids = torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=2)

    def loss_fn(model, batch):
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        return 100 * (out.loss + out.indexer_loss), {}  # scaled: a gradient norm well above 1

    class NoTokenizer:
        def save_pretrained(self, path):
            pass

    args = argparse.Namespace(output_dir=str(tmp_path), grad_accum=2, max_steps=2, lr=1e-3, lr_warmup=0, gradient_checkpointing=False,
                              resume=False, save_every=0, keep_checkpoints=1, report_to="none", bf16=False)  # fmt: skip
    groups = [{"params": base, "lr": 1e-3, "name": "base"}, {"params": indexer, "lr": 1e-3, "name": "indexer"}]
    trained = run_training(args, model, groups, loader, loss_fn, NoTokenizer())
    assert len(calls) == 2  # one per optimizer step (grad_accum 2 micro-batches each)
    for parameters, with_grad, before, norm, after in calls:
        prepared = list(trained.parameters())  # the prepared model's, every one (frozen ones have no gradient)
        assert len(parameters) == len(prepared) and all(p is q for p, q in zip(parameters, prepared))
        assert with_grad == len(base) + len(indexer)
        assert before > 10 and torch.isclose(norm, before)  # the norm over every trained gradient
        assert torch.isclose(after, torch.tensor(1.0), rtol=1e-4)  # clipped to 1
