"""Dense vs DSA, side by side: perplexity, indexer recall, passkey, lm-eval benchmarks (RULER), generations,
speed and memory.

    uv run python compare.py --preset tiny                                    # runs/tiny/compare
    uv run python compare.py --model runs/sparse --lengths 1024,2048,4096 --topk 64,128,256,512
    uv run python compare.py --preset tiny --only perplexity,recall           # only these sections
    uv run python compare.py --model runs/sparse --only lm-eval --lm-eval niah_single_1,niah_multikey_2 \
        --lm-eval-lengths 4096,8192 --lm-eval-limit 20                      # RULER through lm-evaluation-harness

Writes report.md (summary table first, plots embedded), results.json (docs/results_schema.md) and PNG
plots to --output-dir. The dense side is --baseline, or by default the DSA checkpoint itself in dense mode.
Every quality figure carries a 95% interval (dsa/stats.py).
"""

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa
from dsa.errors import UsageError
from dsa.evaluation import SECTIONS, CompareSettings, Variant, compare, device_description, held_out_data, progress_total, tokens_needed
from dsa.presets import PRESETS, STAGE_DEFAULTS, stage_values
from dsa.report import write_report
from dsa.sources import resolve_data, resolve_model
from dsa.train_utils import cli


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return values


def section_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    return names


def name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare a DSA checkpoint with its dense baseline.")
    p.add_argument("--model", help=f"DSA checkpoint: directory or ModelScope id (default {STAGE_DEFAULTS['compare']['model']})")
    p.add_argument("--baseline", help="dense model to compare with (default: --model in dense mode)")
    p.add_argument("--data", help="held-out conversations: JSONL file(s) of the deepctrl schema or a dataset id")
    p.add_argument("--skip-conversations", type=int, default=0, help="skip the first N conversations of --data (those seen in training)")
    p.add_argument("--output-dir")
    p.add_argument("--lengths", help="context lengths, comma-separated")
    p.add_argument("--topk", help="k values to sweep, comma-separated")
    p.add_argument("--ppl-windows", type=int, help=f"held-out windows per length for perplexity (default {STAGE_DEFAULTS['compare']['ppl_windows']})")
    p.add_argument("--recall-windows", type=int, default=1, help="windows of the largest length for indexer recall")
    p.add_argument("--passkey-trials", type=int, help=f"trials per (length, depth) cell (default {STAGE_DEFAULTS['compare']['passkey_trials']})")
    p.add_argument("--passkey-depths", help="needle depths in [0, 1], comma-separated")
    p.add_argument("--passkey-lengths", type=int_list, help="default: --lengths")
    p.add_argument("--generations", type=int, default=2, help="generation prompts per language (Chinese, English)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--lm-eval", type=name_list, default=[], help="lm-eval tasks for every side, comma-separated: niah_single_1,...")
    p.add_argument("--lm-eval-lengths", type=int_list, help="context lengths of the lm-eval tasks (RULER's max_seq_lengths; default: --lengths)")
    p.add_argument("--lm-eval-limit", type=int, default=20, help="samples per lm-eval task and length")
    p.add_argument("--lm-eval-max-gen-toks", type=int, help="cap on tokens generated per lm-eval sample (default: the task's own)")
    p.add_argument("--speed-lengths", type=int_list, help="default: --lengths")
    p.add_argument("--speed-repeats", type=int, default=1, help="timed runs per length, after one warm-up")
    p.add_argument("--decode-length", type=int, help="tokens of the decode-path perplexity check (token by token through the cache; default: the smallest length; 0: skip it)")
    p.add_argument("--speed-decode-tokens", type=int, default=8, help="decode steps timed per run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--oracle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure perplexity, passkey and lm-eval with the oracle selection (the top-k of the true head-summed attention: the indexer's training target)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="tiny: the pipeline's tiny model and bundled held-out data")
    sections = p.add_mutually_exclusive_group()
    sections.add_argument("--only", type=section_list, help=f"run only these sections, comma-separated: {', '.join(SECTIONS)}")
    sections.add_argument("--skip", type=section_list, help="run every section but these, comma-separated")
    args = p.parse_args(argv)
    args.sections = [name for name in SECTIONS if (name in args.only if args.only else name not in (args.skip or []))]
    if not args.lm_eval:
        if args.only and "lm-eval" in args.only:
            p.error("--only lm-eval needs --lm-eval TASKS")
        args.sections = [name for name in args.sections if name != "lm-eval"]
    if not args.sections:
        p.error(f"--skip {','.join(args.skip)} leaves no section to run")
    for name, value in stage_values("compare", args.preset).items():  # flag > preset > default (dsa/presets.py)
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, parse in (("lengths", int_list), ("topk", int_list), ("passkey_depths", float_list)):
        try:
            setattr(args, name, parse(getattr(args, name)))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--{name.replace('_', '-')}: {e}") from None
    for name in ("ppl_windows", "recall_windows", "passkey_trials", "max_new_tokens", "speed_repeats", "speed_decode_tokens", "lm_eval_limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.decode_length is not None and args.decode_length < 0:
        raise UsageError(f"--decode-length must be >= 0, got {args.decode_length}")
    if args.generations < 0 or args.skip_conversations < 0:
        raise UsageError("--generations and --skip-conversations must be >= 0")
    if args.lm_eval_max_gen_toks is not None and args.lm_eval_max_gen_toks < 1:
        raise UsageError(f"--lm-eval-max-gen-toks must be >= 1, got {args.lm_eval_max_gen_toks}")
    return args


def load(name: str, device: torch.device, dtype: torch.dtype):
    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    return model, path


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"unknown --device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    if "lm-eval" in args.sections:
        from dsa.lm_eval import check_tasks

        problems = check_tasks(args.lm_eval)
        if problems:
            raise UsageError(f"--lm-eval: {problems[0]}")
    data = resolve_data(args.data)
    model, model_path = load(args.model, device, dtype)
    if not isinstance(model, dsa.DSAModel):
        raise UsageError(f"--model {args.model} is not a DSA checkpoint ({type(model).__name__}); make one with warmup_train.py")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.baseline:
        baseline, _ = load(args.baseline, device, dtype)
        if baseline.config.vocab_size != model.config.vocab_size:
            raise UsageError(f"--baseline {args.baseline} has another vocabulary ({baseline.config.vocab_size} vs {model.config.vocab_size})")
        is_dsa = isinstance(baseline, dsa.DSAModel)
        dense = Variant("dense", baseline, "dense" if is_dsa else None)
        baseline_text = f"`{args.baseline}`" + (" in dense mode" if is_dsa else " (stock attention)")
    else:
        dense = Variant("dense", model, "dense")
        baseline_text = "the same checkpoint in dense mode (stock attention, indexers unused)"

    topks = sorted(set(args.topk))
    settings = CompareSettings(
        lengths=sorted(set(args.lengths)),
        topks=topks,
        headline_topk=model.config.index_topk if model.config.index_topk in topks else topks[0],
        ppl_windows=args.ppl_windows,
        recall_windows=args.recall_windows,
        passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths,
        passkey_trials=args.passkey_trials,
        max_new_tokens=args.max_new_tokens,
        speed_lengths=args.speed_lengths,
        speed_repeats=args.speed_repeats,
        speed_decode_tokens=args.speed_decode_tokens,
        decode_length=args.decode_length,
        lm_eval_tasks=args.lm_eval,
        lm_eval_lengths=args.lm_eval_lengths,
        lm_eval_limit=args.lm_eval_limit,
        lm_eval_max_gen_toks=args.lm_eval_max_gen_toks,
        seed=args.seed,
        oracle=args.oracle,
        sections=args.sections,
    )
    needed, longest = tokens_needed(settings)
    n_prompts = args.generations if "generations" in settings.sections else 0
    tokens, prompts, skipped = held_out_data(data, tokenizer, needed, n_prompts, args.skip_conversations)
    if skipped:
        print(f"skipped {skipped} malformed lines", file=sys.stderr)
    if len(tokens) < longest:
        raise UsageError(f"--data {args.data} has {len(tokens)} tokens, fewer than the largest length {longest}")

    dsa_config = vars(model.config.dsa)  # before the sweep changes index_topk
    with tqdm(total=progress_total(settings, len(prompts)), desc=settings.sections[0], dynamic_ncols=True) as bar:
        results = compare(dense, model, tokenizer, tokens, prompts, settings, bar)
    results = {
        "meta": {
            "model": str(args.model),
            "baseline": baseline_text,
            "data": args.data + (f" (after the first {args.skip_conversations} conversations)" if args.skip_conversations else ""),
            "device": device_description(device),
            "dtype": str(dtype).removeprefix("torch."),
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_layers": model.config.num_hidden_layers,
            "vocab_size": model.config.vocab_size,
            "dsa_config": dsa_config,
            "headline_topk": settings.headline_topk,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": time.time() - start,
            "command": shlex.join(["python", "compare.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        **results,
    }
    report = write_report(results, args.output_dir)
    print(f"wrote {report}")


if __name__ == "__main__":
    cli(main)
