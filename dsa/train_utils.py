"""The one training loop of every stage (tiny base model, dense warm-up, sparse training, DPO), its
command-line flags, and model loading.

    args = parse_args(common_parser("..."), "warmup", argv)      # flags > preset > stage defaults
    model, tokenizer, dtype = load_model(args.model)
    run_training(args, model, [{"params": ..., "lr": ...}], dataloader, loss_fn, tokenizer, save_dtype=dtype)

`loss_fn(model, batch) -> (loss, {name: float})` is the only stage-specific part. The loop:
accelerate (one process, or `accelerate launch` for DDP; bf16 autocast on CUDA, fp32 on CPU unless --bf16), AdamW over
the parameter groups (each may carry its own "lr" and a "name"), linear warm-up over
`--lr-warmup` steps (default 5% of --max-steps) then cosine decay to 0, no weight decay, gradient norm
clipped to 1 (`accelerator.clip_grad_norm_`), `--grad-accum` micro-batches per optimizer step. Model, optimizer and
data loader are prepared in one `accelerator.prepare` call, which FSDP2 needs (it swaps the optimizer's parameters for
the sharded ones); `accelerate launch --config_file configs/<ddp|fsdp2|zero2|zero3>.yaml` picks the parallelism.

Output directory:
  metrics.jsonl      one JSON object per optimizer step: step, loss, the loss_fn metrics, lr (first group;
                     lr_<name> for the other named groups), tokens_per_s (all processes)
  checkpoints/step-N accelerate state (model, optimizer, RNG, scheduler) + progress.json (step, data
                     position) + config.json and tokenizer files, written to checkpoints/tmp-step-N and then
                     renamed: a checkpoint directory is complete or absent. It loads as a model too
                     (`AutoModelForCausalLM.from_pretrained(".../step-N")`, weights in the training dtype), so
                     compare.py can measure a run part-way. The latest --keep-checkpoints are kept (0: all).
  args.json, config.json, model.safetensors, tokenizer files: the final model (save_pretrained).
  runs/<name>/       TensorBoard event files with --report-to tensorboard (`tensorboard --logdir <output-dir>/runs`;
                     <name> is the output directory's name, also the wandb project with --report-to wandb): the
                     same per-step values as metrics.jsonl (every key but "step", at that step), and the flags as
                     hyperparameters. A resumed run hides the earlier run's events after its checkpoint (purge_step).
`--resume` loads the latest checkpoint and skips the micro-batches already consumed, so a run killed after
a checkpoint and restarted with the same flags plus --resume ends with the same weights as a run that
was never interrupted.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from .errors import UsageError
from .presets import PRESETS, stage_values
from .sources import resolve_model

TRACKERS = ("tensorboard", "wandb")  # --report-to: accelerate trackers written beside metrics.jsonl
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


# ----------------------------------------------------------------------------- command line


def common_parser(description: str) -> argparse.ArgumentParser:
    """The flags every training script shares. Defaults are None here: `parse_args` fills them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="local directory, or a ModelScope / hub id downloaded with modelscope")
    p.add_argument("--data", help="JSONL file(s), comma-separated, or a ModelScope dataset id")
    p.add_argument("--output-dir", help="final model, metrics.jsonl and checkpoints/ go here")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--seq-len", type=int, help="tokens per packed training window")
    p.add_argument("--retrieval-share", type=float, default=0.0,
                   help="share of windows replaced by synthetic key-value retrieval windows (dsa/data.py), 0..1")
    p.add_argument("--retrieval-pairs", type=int, default=4, help="key-value needles per synthetic retrieval window")
    p.add_argument("--retrieval-weight", type=float, default=1.0,
                   help="weight (>= 1) of the retrieval windows' question and answer rows in the indexer loss mean")
    p.add_argument("--batch-size", type=int, help="windows per micro-batch and process")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--lr-warmup", type=int, help="learning-rate warm-up steps (default 5%% of --max-steps)")
    p.add_argument("--topk", type=int, help="k: keys attended per query by sparse attention")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="how many of the latest checkpoints to keep (0: all)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--preset", choices=sorted(PRESETS), help="tiny: small offline model and bundled data")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations in backward")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (faster where the CPU has bf16 units)")
    p.add_argument("--report-to", default="none",
                   help="also log the metrics to tensorboard (<output-dir>/runs), wandb, or none; comma-separated")
    return p


def parse_args(parser: argparse.ArgumentParser, stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; fill those not given from the preset, then from the stage defaults; check values."""
    args = parser.parse_args(argv)
    for name, value in stage_values(stage, args.preset).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.lr_warmup is None:
        args.lr_warmup = math.ceil(0.05 * args.max_steps)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """A UsageError naming the first impossible value."""
    positive = ["max_steps", "seq_len", "batch_size", "grad_accum", "retrieval_pairs"]
    for name in positive + ["topk", "index_n_heads", "index_head_dim"]:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("lr", "indexer_lr"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0.0 <= args.retrieval_share <= 1.0:
        raise UsageError(f"--retrieval-share must be in [0, 1], got {args.retrieval_share}")
    if not (args.retrieval_weight >= 1 and math.isfinite(args.retrieval_weight)):
        raise UsageError(f"--retrieval-weight must be finite and >= 1, got {args.retrieval_weight}")
    if args.retrieval_weight != 1 and args.retrieval_share == 0:
        raise UsageError(f"--retrieval-weight {args.retrieval_weight} weights the retrieval windows' questions: it needs --retrieval-share > 0")
    for name in ("save_every", "lr_warmup", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    report_trackers(getattr(args, "report_to", "none"))


def report_trackers(report_to: str) -> list[str]:
    """The tracker names of --report-to ("none" and repeats dropped), or a UsageError for an unknown name or for
    wandb when it cannot be imported."""
    names = list(dict.fromkeys(name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")))
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}, none")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--report-to wandb: wandb is not installed (pip install wandb)") from None
    return names


def cli(main: Callable[[], object]) -> None:
    """Run a script's main(): a UsageError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- models


def load_model(name: str, require: type | None = None, hint: str = "", check: Callable | None = None,
               ) -> tuple[torch.nn.Module, object, torch.dtype]:
    """(model in fp32 for training, its tokenizer, the dtype the checkpoint was saved in).

    require: a config class the checkpoint must have, else a UsageError ending with `hint`; check(config): raises
    a UsageError on a config the caller cannot use. Both run before the weights are read."""
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
        if require is not None and not isinstance(config, require):
            raise UsageError(f"{name} is a {config.model_type!r} checkpoint, not {require.model_type!r}{hint}")
        if check is not None:
            check(config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    saved_dtype = config.dtype or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    return model, tokenizer, saved_dtype


# ----------------------------------------------------------------------------- training loop


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """bf16 autocast on CUDA (and on CPU with --bf16), fp32 elsewhere; CPU also when ACCELERATE_USE_CPU is set
    (`accelerate launch --cpu`). The scheduler is stepped by hand, once per optimizer step. The --report-to
    trackers log under <output-dir>/runs. (No PartialState() before this: it would fix the distributed state
    before the CPU flag is read.)"""
    on_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return Accelerator(
        mixed_precision="bf16" if on_cuda or getattr(args, "bf16", False) else "no",
        gradient_accumulation_steps=args.grad_accum,
        step_scheduler_with_optimizer=False,
        log_with=report_trackers(getattr(args, "report_to", "none")) or None,
        project_dir=str(Path(args.output_dir) / "runs"),
    )


def batch_tokens(batch: dict) -> int:
    """Tokens in a batch: every tensor whose key ends in "input_ids" (DPO batches have two)."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


def run_training(
    args: argparse.Namespace,
    model: torch.nn.Module,
    param_groups: list[dict],
    train_dataloader: torch.utils.data.DataLoader,
    loss_fn: LossFn,
    tokenizer,
    accelerator: Accelerator | None = None,
    save_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Train for args.max_steps optimizer steps; save the final model (in save_dtype, default its own)
    and tokenizer at args.output_dir. Returns the unwrapped model. See the module docstring."""
    accelerator = accelerator or make_accelerator(args)
    out = Path(args.output_dir)
    checkpoints = out / "checkpoints"
    main = accelerator.is_main_process

    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup, args.max_steps)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    latest = latest_checkpoint(checkpoints) if args.resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        position = json.loads((latest / "progress.json").read_text())
        step = position["step"]
        dataloader = accelerator.skip_first_batches(dataloader, position["batches"])
        accelerator.print(f"resumed from {latest} at step {step}")
    elif args.resume:
        accelerator.print(f"no checkpoint in {checkpoints}: starting from step 0")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if latest is None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
        truncate_metrics(out / "metrics.jsonl", step)
    accelerator.wait_for_everyone()
    hyperparameters = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in vars(args).items()}
    resumed = {"tensorboard": {"purge_step": step + 1}} if latest is not None else {}  # hide the old run's later steps
    accelerator.init_trackers(out.resolve().name, config=hyperparameters, init_kwargs=resumed)

    with tqdm(total=args.max_steps, initial=step, disable=not main, desc=out.name, dynamic_ncols=True) as progress:
        sums, micro, tokens, running, t0 = {}, 0, 0, None, time.perf_counter()
        for batch in dataloader:
            if step >= args.max_steps:
                break
            with accelerator.accumulate(model):
                loss, metrics = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the prepared model's parameters: FSDP clips its sharded ones,
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)  # DeepSpeed by its config (frozen: no grad)
                optimizer.step()
                optimizer.zero_grad()
            for name, value in {"loss": loss.item(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value
            micro, tokens = micro + 1, tokens + batch_tokens(batch)
            if not accelerator.sync_gradients:
                continue

            step += 1
            means = torch.tensor([v / micro for v in sums.values()], device=accelerator.device)
            values = accelerator.reduce(means, "mean")
            row = {"step": step, **dict(zip(sums, values.tolist()))}
            for i, group in enumerate(optimizer.param_groups):  # the learning rates this step used
                row["lr" if i == 0 else f"lr_{group.get('name', i)}"] = group["lr"]
            scheduler.step()
            now = time.perf_counter()
            row["tokens_per_s"] = tokens * accelerator.num_processes / (now - t0)
            sums, micro, tokens, t0 = {}, 0, 0, now
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                running = row["loss"] if running is None else 0.9 * running + 0.1 * row["loss"]
                progress.set_postfix(loss=f"{running:.4f}")
                progress.update(1)
            if args.save_every and step % args.save_every == 0:
                save_checkpoint(accelerator, checkpoints, step, batches=step * args.grad_accum,
                                keep=args.keep_checkpoints, extras=(accelerator.unwrap_model(model).config, tokenizer))
    for tracker in accelerator.trackers:  # not accelerator.end_training(): it would also end the process group,
        tracker.finish()  # which the final save below and a caller's later stages (pipeline, tests) still use

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if save_dtype is not None:
        unwrapped.to(save_dtype)
    state_dict = accelerator.get_state_dict(model)
    with explained_write_errors(out, checkpoints):
        unwrapped.save_pretrained(out, state_dict=state_dict, is_main_process=main, save_function=accelerator.save)
        if main:
            tokenizer.save_pretrained(out)
        skipped = getattr(train_dataloader.dataset, "skipped", None)
        if skipped is not None:
            print(f"skipped {skipped} malformed lines")
    accelerator.wait_for_everyone()
    return unwrapped


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the highest step (tmp-* directories are unfinished writes)."""
    done = [p for p in checkpoints.glob("step-*") if (p / "progress.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


@contextmanager
def explained_write_errors(path: Path, checkpoints: Path):
    """An OSError or SafetensorError (a full disk) while writing `path` becomes a UsageError: one line naming the path,
    the reason and the latest complete checkpoint, which --resume continues from."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        latest = latest_checkpoint(checkpoints)
        raise UsageError(f"cannot write {path}: {str(e).splitlines()[0]}; the latest complete checkpoint is "
                         f"{latest or 'none'} (--resume continues from it)") from None


def save_checkpoint(accelerator: Accelerator, checkpoints: Path, step: int, batches: int, keep: int = 1,
                    extras: tuple = ()) -> None:
    """accelerate state + progress.json (step, micro-batches consumed per process) + each of `extras` (objects
    with save_pretrained: the model config, the tokenizer) into tmp-step-N, renamed to step-N once complete;
    then all but the `keep` latest complete checkpoints are removed (keep 0: none). A failed write (a full disk)
    is a one-line error (explained_write_errors); the complete checkpoints stay."""
    tmp, final = checkpoints / f"tmp-step-{step}", checkpoints / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with explained_write_errors(tmp, checkpoints):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for extra in extras:
                extra.save_pretrained(tmp)
            (tmp / "progress.json").write_text(json.dumps({"step": step, "batches": batches}) + "\n")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= step (a resumed run rewrites the steps after its checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))
