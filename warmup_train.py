"""Stage 1, dense warm-up (docs/method.md, training): add a lightning indexer to every attention layer of a dense
Qwen2 model, freeze every base parameter, keep dense attention, and train only the indexers on
KL(head-summed attention || softmax(index scores)). Base weights in the output are bit-identical to the input's.

    uv run python warmup_train.py --preset tiny                       # offline: tiny base model, bundled data
    uv run python warmup_train.py --model Qwen/Qwen2.5-0.5B --data deepctrl/deepctrl-sft-data
    accelerate launch --num_processes 8 warmup_train.py ...           # DDP on several GPUs
"""

import torch
from accelerate.utils import set_seed

import dsa
from dsa import tiny
from dsa.data import PackedSFT
from dsa.errors import UsageError
from dsa.sources import resolve_data
from dsa.train_utils import cli, common_parser, load_model, parse_args, run_training


def warmup_loss(model, batch):
    """The indexer KL (mean over query tokens and layers); logits of the last position only (unused)."""
    out = model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
    return out.indexer_loss, {"kl": out.indexer_loss.item()}


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--index-n-heads", type=int, help="H_I: indexer query heads")
    parser.add_argument("--index-head-dim", type=int, help="d_I: indexer head size")
    parser.add_argument("--index-rope-dim", type=int, help="indexer features that get RoPE (even, <= d_I)")
    args = parse_args(parser, "warmup", argv)
    try:
        dsa_config = dsa.DSAConfig(args.index_n_heads, args.index_head_dim, args.index_rope_dim, args.topk)
    except ValueError as e:
        raise UsageError(str(e)) from None
    set_seed(args.seed)
    if args.model is None:  # only --preset tiny leaves it unset
        args.model = str(tiny.ensure_tiny_base())
    paths = resolve_data(args.data)
    dense, tokenizer, saved_dtype = load_model(args.model)

    try:
        model = dsa.add_indexers(dense, dsa_config)
    except TypeError as e:  # not a dense Qwen2 checkpoint
        raise UsageError(f"{args.model}: {e}") from None
    del dense  # add_indexers copied its weights: do not hold a second copy of the base model while training
    model.requires_grad_(False)
    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    for p in indexer:
        p.requires_grad_(True)
    dsa.set_mode(model, "warmup")

    loader = torch.utils.data.DataLoader(PackedSFT(paths, tokenizer, args.seq_len), batch_size=args.batch_size)
    groups = [{"params": indexer, "lr": args.lr, "name": "indexer"}]
    return run_training(args, model, groups, loader, warmup_loss, tokenizer, save_dtype=saved_dtype)


if __name__ == "__main__":
    cli(main)
