"""Stage 1, dense warm-up (docs/method.md, training): add a lightning indexer to every attention layer of a dense
model (Qwen2, Qwen3, Llama or Mistral; Qwen2.5-0.5B by default), freeze every base parameter, keep dense attention,
and train only the indexers on KL(head-summed attention || softmax(index scores)). Base weights in the output are bit-identical to the input's.

    uv run python warmup_train.py --preset tiny                       # offline: tiny base model, bundled data
    uv run python warmup_train.py --model Qwen/Qwen2.5-0.5B --data deepctrl/deepctrl-sft-data
    uv run python warmup_train.py --model runs/warmup --seq-len 8192 ...  # continue a warm-up (its indexers) at a new length
    accelerate launch --num_processes 8 warmup_train.py ...           # DDP on several GPUs
"""

import torch
from accelerate.utils import set_seed

import dsa
from dsa import tiny
from dsa.core import TARGET_HEADS
from dsa.data import training_windows
from dsa.errors import UsageError
from dsa.sources import resolve_data
from dsa.train_utils import cli, common_parser, load_model, parse_args, run_training

INDEX_SIZES = ("index_n_heads", "index_head_dim", "index_rope_dim")


def warmup_loss(model, batch):
    """The indexer KL (mean over query tokens and layers); logits of the last position only (unused)."""
    out = model(input_ids=batch["input_ids"], indexer_row_weight=batch.get("indexer_weight"), use_cache=False, logits_to_keep=1)
    return out.indexer_loss, {"kl": out.indexer_loss.item()}


def check_indexer_sizes(sizes: dict, topk: int, name: str):
    """A check for load_model, run before any weight loads: a DSA checkpoint's indexers continue, so each size given
    must equal its own (those not given are its own); for a dense model the given sizes must make a valid DSAConfig."""

    def check(config) -> None:
        if isinstance(config, dsa.DSAModelConfig):
            for field, value in sizes.items():
                if value != getattr(config, field):
                    flag = "--" + field.replace("_", "-")
                    raise UsageError(f"{flag} {value} differs from {name}'s {field} = {getattr(config, field)}")
            return
        try:
            dsa.DSAConfig(index_topk=topk, **sizes)
        except ValueError as e:
            raise UsageError(str(e)) from None

    return check


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--index-n-heads", type=int, help="H_I: indexer query heads (default: a warm-up checkpoint's own, else 4)")
    parser.add_argument("--index-head-dim", type=int, help="d_I: indexer head size (default: the checkpoint's, else 64)")
    parser.add_argument("--index-rope-dim", type=int, help="indexer features that get RoPE, even, <= d_I (default: the checkpoint's, else 32)")
    parser.add_argument("--target-heads", choices=TARGET_HEADS, default="sum",
                        help="the indexer target's head aggregation: sum (the paper) or max (dsa/core.py, section 4)")
    args = parse_args(parser, "warmup", argv)
    # the indexer sizes given by flag or preset; the others: a warm-up checkpoint's own, or DSAConfig's defaults
    sizes = {field: getattr(args, field) for field in INDEX_SIZES if getattr(args, field) is not None}
    set_seed(args.seed)
    if args.model is None:  # only --preset tiny leaves it unset
        args.model = str(tiny.ensure_tiny_base())
    paths = resolve_data(args.data)
    model, tokenizer, saved_dtype = load_model(args.model, check=check_indexer_sizes(sizes, args.topk, args.model))
    if isinstance(model.config, dsa.DSAModelConfig):  # a warm-up checkpoint: continue training its indexers
        dsa.set_topk(model, args.topk)
    else:
        try:
            model = dsa.add_indexers(model, dsa.DSAConfig(index_topk=args.topk, **sizes))  # copies the base weights: the dense model is dropped
        except (TypeError, ValueError) as e:  # not a supported family, or sliding-window layers
            raise UsageError(f"{args.model}: {e}") from None
    model.requires_grad_(False)
    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    for p in indexer:
        p.requires_grad_(True)
    dsa.set_mode(model, "warmup")
    dsa.set_target_heads(model, args.target_heads)

    windows = training_windows(paths, tokenizer, args.seq_len, args.retrieval_share, args.retrieval_pairs, args.seed,
                               args.retrieval_weight)
    loader = torch.utils.data.DataLoader(windows, batch_size=args.batch_size)
    groups = [{"params": indexer, "lr": args.lr, "name": "indexer"}]
    return run_training(args, model, groups, loader, warmup_loss, tokenizer, save_dtype=saved_dtype)


if __name__ == "__main__":
    cli(main)
