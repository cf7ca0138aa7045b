"""DPO on COIG-P preference pairs, for a dense model or a DSA model (trained in sparse mode).

    uv run python dpo_train.py --model runs/sparse                       # COIG-P (m-a-p/COIG-P on the hub)
    uv run python dpo_train.py --model runs/sparse --data pairs.parquet  # a local copy (.jsonl / .parquet / dir)
    uv run python dpo_train.py --preset tiny                             # offline: tiny model, bundled pairs
    accelerate launch dpo_train.py --model runs/sparse                   # several GPUs (DDP)

The policy is --model; the reference is a frozen copy loaded separately from --ref-model (default: the same
checkpoint). Data format, truncation, the loss and why the DSA indexer keeps learning by default
(--freeze-indexer to freeze it): dsa/dpo.py. Training loop, checkpoints and metrics.jsonl:
dsa/train_utils.py.
"""

from functools import partial

import torch

import dsa
from dsa.dpo import DPOLoss, PreferencePairs, collate
from dsa.errors import UsageError
from dsa.sources import resolve_preference_data
from dsa.tiny import ensure_tiny_base
from dsa.train_utils import cli, common_parser, load_model, make_accelerator, parse_args, run_training


def parse(argv: list[str] | None = None):
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--ref-model", help="the frozen reference model (default: --model)")
    p.add_argument("--beta", type=float, help="DPO temperature beta (default 0.1)")
    p.add_argument("--max-length", type=int, help="tokens per sequence, prompt + reply (longer pairs are truncated)")
    p.add_argument("--indexer-lr", type=float, help="learning rate of the DSA indexers")
    p.add_argument("--freeze-indexer", action="store_true", help="DSA models: keep the indexers fixed")
    args = parse_args(p, "dpo", argv)
    if args.seq_len is not None:
        raise UsageError("dpo_train.py does not pack sequences: use --max-length instead of --seq-len")
    if args.retrieval_share != 0 or args.retrieval_weight != 1:
        raise UsageError("dpo_train.py trains on preference pairs: --retrieval-share and --retrieval-weight are warm-up "
                         "and sparse-stage flags")
    if args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")
    if not args.beta > 0:
        raise UsageError(f"--beta must be > 0, got {args.beta}")
    return args


def param_groups(model: torch.nn.Module, args) -> list[dict]:
    """Dense: one group. DSA: the base model at --lr, the indexers at --indexer-lr (or frozen)."""
    indexer = [p for name, p in model.named_parameters() if ".indexer." in name]
    base = [p for name, p in model.named_parameters() if ".indexer." not in name]
    if args.freeze_indexer:
        for p in indexer:
            p.requires_grad_(False)
    groups = [{"params": base, "lr": args.lr, "name": "base"}]
    if indexer and not args.freeze_indexer:
        groups.append({"params": indexer, "lr": args.indexer_lr, "name": "indexer"})
    return groups


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.model is None:  # --preset tiny on its own: the tiny dense base model
        args.model = str(ensure_tiny_base())
    resolve_preference_data(args.data)  # before loading two models: a bad source or an unreachable dataset fails now
    torch.manual_seed(args.seed)
    model, tokenizer, save_dtype = load_model(args.model)
    ref_model, _, _ = load_model(args.ref_model or args.model)
    is_dsa = isinstance(model, dsa.DSAModel)
    if isinstance(ref_model, dsa.DSAModel) != is_dsa:
        raise UsageError(f"--ref-model {args.ref_model} and --model {args.model} must both be DSA or both dense")
    for m in (model, ref_model) if is_dsa else ():
        dsa.set_mode(m, "sparse")
        if args.topk is not None:
            dsa.set_topk(m, args.topk)

    accelerator = make_accelerator(args)
    ref_model.to(accelerator.device)
    pairs = PreferencePairs(args.data, tokenizer, args.max_length, seed=args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(pairs, batch_size=args.batch_size, collate_fn=partial(collate, pad_token_id=pad_id))
    loss_fn = DPOLoss(ref_model, args.beta, train_indexer=is_dsa and not args.freeze_indexer, autocast=accelerator.autocast)
    run_training(args, model, param_groups(model, args), loader, loss_fn, tokenizer, accelerator, save_dtype)
    accelerator.print(f"{pairs.truncated} pairs truncated to --max-length {args.max_length}")


if __name__ == "__main__":
    cli(main)
