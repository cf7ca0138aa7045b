"""Stage 2, sparse training (docs/method.md, training): load a warm-up checkpoint, switch to top-k sparse attention,
and train the base model on the language-modelling loss and the indexers on the sparse indexer loss
(KL over each query's selected keys), each with its own learning rate. The indexer input is detached in the
model: the LM loss never reaches the indexers, the indexer loss never reaches the base model.

    uv run python train.py --preset tiny
    uv run python train.py --model runs/warmup --data deepctrl/deepctrl-sft-data --topk 512
    accelerate launch --num_processes 8 train.py ...
"""

import torch
from accelerate.utils import set_seed

import dsa
from dsa.data import PackedSFT
from dsa.sources import resolve_data
from dsa.train_utils import cli, common_parser, load_model, parse_args, run_training


def sparse_loss(model, batch):
    """LM loss (assistant tokens) + indexer KL; the two reach disjoint parameters."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    return out.loss + out.indexer_loss, {"lm_loss": out.loss.item(), "kl": out.indexer_loss.item()}


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--indexer-lr", type=float, help="learning rate of the indexers")
    args = parse_args(parser, "sparse", argv)
    set_seed(args.seed)
    paths = resolve_data(args.data)
    model, tokenizer, saved_dtype = load_model(args.model, require=dsa.Qwen2DSAConfig, hint=": run warmup_train.py first")
    dsa.set_mode(model, "sparse")
    if args.topk is not None:  # default: the checkpoint's index_topk
        dsa.set_topk(model, args.topk)

    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    base = [p for name, p in model.named_parameters() if ".indexer." not in name]
    groups = [
        {"params": base, "lr": args.lr, "name": "base"},
        {"params": indexer, "lr": args.indexer_lr, "name": "indexer"},
    ]
    loader = torch.utils.data.DataLoader(PackedSFT(paths, tokenizer, args.seq_len), batch_size=args.batch_size)
    return run_training(args, model, groups, loader, sparse_loss, tokenizer, save_dtype=saved_dtype)


if __name__ == "__main__":
    cli(main)
