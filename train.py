"""Stage 2, sparse training (docs/method.md, training): load a warm-up checkpoint, switch to top-k sparse attention,
and train the base model on the language-modelling loss and the indexers on the sparse indexer loss
(KL over each query's selected keys), each with its own learning rate. The indexer input is detached in the
model: the LM loss never reaches the indexers, the indexer loss never reaches the base model.

    uv run python train.py --preset tiny
    uv run python train.py --model runs/warmup --data deepctrl/deepctrl-sft-data --topk 512
    uv run python train.py --model runs/warmup --loss lm+distill --lm-weight 1 --distill-weight 0.5 --distill-temperature 2
    uv run python train.py --model runs/warmup --train-params lora --lora-rank 16 --lora-alpha 32 --lr 1e-4
    accelerate launch --num_processes 8 train.py ...

Options (docs/method.md, "Sparse-stage options"); the indexers always train in full on their own KL:
  --loss lm            (default, the paper) the LM loss on the assistant tokens
  --loss distill       self-distillation: T^2 * KL(teacher || student) over the next-token distribution at every
                       position (dsa/distill.py), teacher = the --model checkpoint frozen in dense mode; the LM loss
                       is logged, not trained on
  --loss lm+distill    --lm-weight * LM loss + --distill-weight * the distillation KL (weights default 1)
  --distill-temperature T   softmax temperature of the distillation KL (default 1)
  --train-params all        (default, the paper) every base weight
  --train-params attention  only the base's attention projections q/k/v/o (weights and biases)
  --train-params lora       LoRA adapters (peft) of rank --lora-rank, scale --lora-alpha / rank, on every linear
                       layer of the blocks (q/k/v/o, gate/up/down; not the embeddings and lm_head), at --lr; merged
                       into the weights at the end, so the output is a plain DSA checkpoint (the checkpoints/ of
                       the run hold the adapters unmerged: they resume the run, but do not load as a model)
  --attention dense     the control: the same stage with the stock dense attention (DSA mode dense; the indexers
                       neither run nor train, kl is 0): the dense fine-tune of the same data and budget, the baseline
                       of an --loss lm recipe (an LM loss also adapts the model to the data, which dense gets too)
metrics.jsonl: loss, lm_loss, kl (indexer), and distill_kl with --loss distill | lm+distill.
"""

from functools import partial

import torch
from accelerate.utils import extract_model_from_parallel, set_seed

import dsa
from dsa.core import TARGET_HEADS
from dsa.data import training_windows
from dsa.distill import distill_losses
from dsa.errors import UsageError
from dsa.sources import resolve_data
from dsa.train_utils import cli, common_parser, load_model, make_accelerator, parse_args, run_training

LOSSES = ("lm", "distill", "lm+distill")
ATTENTIONS = ("sparse", "dense")  # --attention: the sparse stage, or its dense control
TRAIN_PARAMS = ("all", "attention", "lora")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # --train-params attention
LORA_TARGETS = ATTENTION + ("gate_proj", "up_proj", "down_proj")  # --train-params lora: every linear layer of a block


def indexer_kl(out) -> torch.Tensor:
    """The indexer KL of a forward; 0 with --attention dense (the stock attention: no indexer runs)."""
    return out.indexer_loss if out.indexer_loss is not None else out.logits.new_zeros((), dtype=torch.float32)


def sparse_loss(model, batch):
    """--loss lm: LM loss (assistant tokens) + indexer KL; the two reach disjoint parameters."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], indexer_row_weight=batch.get("indexer_weight"), use_cache=False)
    kl = indexer_kl(out)
    return out.loss + kl, {"lm_loss": out.loss.item(), "kl": kl.item()}


def distill_loss(model, batch, teacher, args, autocast):
    """--loss distill: distill_kl + indexer KL; --loss lm+distill: lm_weight * lm_loss + distill_weight * distill_kl
    + indexer KL. distill_kl and lm_loss (dsa/distill.py) come from the final hidden states of the teacher (dense,
    no grad) and of the student, in one chunked pass; both models run under the run's autocast."""
    ids = batch["input_ids"]
    with autocast():
        with torch.no_grad():  # hidden_states[-1]: after the final norm (the lm_head's input); logits: last position only
            teacher_hidden = teacher(input_ids=ids, use_cache=False, output_hidden_states=True,
                                     logits_to_keep=1).hidden_states[-1]
        out = model(input_ids=ids, indexer_row_weight=batch.get("indexer_weight"), use_cache=False, output_hidden_states=True,
                    logits_to_keep=1)
        head = extract_model_from_parallel(model).lm_head.weight
        kl, lm = distill_losses(out.hidden_states[-1], head, teacher_hidden, teacher.lm_head.weight, batch["labels"],
                                args.distill_temperature)
    indexer = indexer_kl(out)
    if args.loss == "distill":
        loss = kl + indexer
    else:
        loss = args.lm_weight * lm + args.distill_weight * kl + indexer
    return loss, {"lm_loss": lm.item(), "distill_kl": kl.item(), "kl": indexer.item()}


def load_teacher(name: str) -> torch.nn.Module:
    """The teacher of --loss distill: the --model checkpoint in dense mode, eval mode, every weight frozen."""
    teacher = load_model(name)[0]
    dsa.set_mode(teacher, "dense")
    return teacher.eval().requires_grad_(False)


def add_lora(model: torch.nn.Module, args):
    """LoRA adapters (peft) on LORA_TARGETS, in place in `model`. Returns the PeftModel whose merge_and_unload()
    folds them into the weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def base_trains(name: str, train_params: str) -> bool:
    """Whether base parameter `name` trains under --train-params."""
    if train_params == "attention":
        return name.split(".")[-2] in ATTENTION  # model.layers.N.self_attn.q_proj.weight
    if train_params == "lora":
        return ".lora_" in name  # ...q_proj.lora_A.default.weight
    return True


def param_groups(model: torch.nn.Module, args) -> list[dict]:
    """The base parameters that train (--train-params) at --lr, the indexers at --indexer-lr (frozen with
    --attention dense: they do not run, and a parameter without a gradient breaks DDP); every other parameter
    frozen."""
    base, indexer = [], []
    for name, p in model.named_parameters():
        if ".indexer." in name:
            group = indexer if args.attention == "sparse" else None
        else:
            group = base if base_trains(name, args.train_params) else None
        p.requires_grad_(group is not None)
        if group is not None:
            group.append(p)
    return [{"params": base, "lr": args.lr, "name": "base"}, {"params": indexer, "lr": args.indexer_lr, "name": "indexer"}]


def check_options(args) -> None:
    """A UsageError for an impossible value of the sparse-stage options."""
    for name in ("lm_weight", "distill_weight"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.distill_temperature > 0:
        raise UsageError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    for name in ("lora_rank", "lora_alpha"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.attention == "dense" and args.loss == "distill":
        raise UsageError("--attention dense --loss distill trains nothing: the dense student starts equal to its teacher")
    if args.train_params == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("--train-params lora needs peft, which cannot be imported (pip install peft)") from None


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--indexer-lr", type=float, help="learning rate of the indexers")
    parser.add_argument("--loss", choices=LOSSES, help="what the base model learns: lm (the paper), distill, lm+distill")
    parser.add_argument("--lm-weight", type=float, help="weight of the LM loss in lm+distill")
    parser.add_argument("--distill-weight", type=float, help="weight of the distillation KL in lm+distill")
    parser.add_argument("--distill-temperature", type=float, help="softmax temperature T of the distillation KL (x T^2)")
    parser.add_argument("--train-params", choices=TRAIN_PARAMS, help="which base weights train: all (the paper), attention, lora")
    parser.add_argument("--lora-rank", type=int, help="rank r of the LoRA adapters")
    parser.add_argument("--lora-alpha", type=int, help="LoRA scale alpha: the update is (alpha / r) B A")
    parser.add_argument("--target-heads", choices=TARGET_HEADS, default="sum",
                        help="the indexer target's head aggregation: sum (the paper) or max (dsa/core.py, section 4)")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sparse",
                        help="sparse (the stage) or dense (its control: the same training with the stock attention)")
    args = parse_args(parser, "sparse", argv)
    check_options(args)
    set_seed(args.seed)
    paths = resolve_data(args.data)
    model, tokenizer, saved_dtype = load_model(args.model, require=dsa.DSAModelConfig, hint=": run warmup_train.py first")
    dsa.set_mode(model, args.attention)
    dsa.set_target_heads(model, args.target_heads)
    if args.topk is not None:  # default: the checkpoint's index_topk
        dsa.set_topk(model, args.topk)
    accelerator = make_accelerator(args)

    loss_fn = sparse_loss
    if args.loss != "lm":
        teacher = load_teacher(args.model).to(accelerator.device)
        loss_fn = partial(distill_loss, teacher=teacher, args=args, autocast=accelerator.autocast)
    lora = add_lora(model, args) if args.train_params == "lora" else None
    groups = param_groups(model, args)
    windows = training_windows(paths, tokenizer, args.seq_len, args.retrieval_share, args.retrieval_pairs, args.seed,
                               args.retrieval_weight)
    loader = torch.utils.data.DataLoader(windows, batch_size=args.batch_size)
    model = run_training(args, model, groups, loader, loss_fn, tokenizer, accelerator,
                         save_dtype=saved_dtype if lora is None else None)
    if lora is not None:  # replace the saved model (adapters unmerged, training dtype) by the merged plain checkpoint
        model = lora.merge_and_unload().to(saved_dtype)
        if accelerator.is_main_process:
            model.save_pretrained(args.output_dir)
        accelerator.wait_for_everyone()
    return model


if __name__ == "__main__":
    cli(main)
