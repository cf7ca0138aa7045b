"""Every stage in order, each one the project's own script in a subprocess:
dense base -> warmup_train.py (indexers only) -> train.py (sparse) -> dpo_train.py -> compare.py.

    uv run python pipeline.py --preset tiny    # offline, small model built from dsa/samples/, into runs/tiny/
    uv run python pipeline.py                  # Qwen2.5-0.5B + deepctrl-sft-data (+ COIG-P), into runs/

A training stage whose output already holds a final model is skipped (--force reruns it); an unfinished one
continues from its last checkpoint (--resume). compare.py always runs: the final DSA model against the
dense model it started from (the model before DSA), report in <root>/compare/report.md.

With --preset tiny every stage runs on one CPU thread (OMP_NUM_THREADS, unless set): a model this small
gains little from more, and on a CPU shared with other work multi-threaded small ops stall on each other
(measured on a loaded 2-core machine: a tiny sparse training step took 7 s on one thread, 127-213 s on two).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dsa.errors import UsageError
from dsa.presets import TINY_ROOT
from dsa.train_utils import cli

HERE = Path(__file__).resolve().parent
REAL_BASE = "Qwen/Qwen2.5-0.5B"
# compare.py's held-out text on deepctrl-sft-data: conversations after those the training stages read
# (both stages read from the start of the files; 1M conversations is well past the default token budgets)
REAL_HELD_OUT_SKIP = 1_000_000


def stages(preset: str | None, root: Path) -> list[tuple[str, list[str] | None, Path]]:
    """(name, script argv or None for the in-process tiny base, output directory) of every stage."""
    tiny = preset == "tiny"
    flags = ["--preset", "tiny"] if tiny else []
    base = str(root / "base") if tiny else REAL_BASE
    plan = [("base", None, root / "base")] if tiny else []
    plan += [
        ("warmup", ["warmup_train.py", *flags, "--model", base, "--output-dir", str(root / "warmup")], root / "warmup"),
        ("sparse", ["train.py", *flags, "--model", str(root / "warmup"), "--output-dir", str(root / "sparse")], root / "sparse"),
    ]
    if (HERE / "dpo_train.py").is_file():
        plan.append(("dpo", ["dpo_train.py", *flags, "--model", str(root / "sparse"), "--output-dir", str(root / "dpo")], root / "dpo"))
    held_out = [] if tiny else ["--skip-conversations", str(REAL_HELD_OUT_SKIP)]
    final = plan[-1][2]
    compare = ["compare.py", *flags, "--model", str(final), "--baseline", base, "--output-dir", str(root / "compare"), *held_out]
    return plan + [("compare", compare, root / "compare")]


def finished(name: str, output: Path) -> bool:
    """A training stage saves its final model (config.json) only at the very end."""
    return name != "compare" and (output / "config.json").is_file()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["tiny"], help="tiny: offline, small model and bundled data")
    p.add_argument("--root", help=f"output root (default {TINY_ROOT} with --preset tiny, else runs)")
    p.add_argument("--force", action="store_true", help="rerun finished stages (from scratch)")
    args = p.parse_args(argv)
    root = Path(args.root or (TINY_ROOT if args.preset == "tiny" else "runs")).resolve()
    env = dict(os.environ)
    if args.preset == "tiny":
        env.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # the in-process tiny base stage

    times = {}
    for name, script, output in stages(args.preset, root):
        start = time.time()
        if finished(name, output) and not args.force:
            print(f"== {name}: {output} is finished, skipped (--force reruns it)", flush=True)
            continue
        if script is None:  # the tiny dense base model: built and pretrained by the package, cached
            from dsa.tiny import ensure_tiny_base

            print(f"== {name}: tiny dense base model -> {output}", flush=True)
            if args.force and (output / "tiny_preset.json").exists():
                (output / "tiny_preset.json").unlink()
            ensure_tiny_base(root, [] if args.force else ["--resume"])
        else:
            command = [sys.executable, str(HERE / script[0]), *script[1:]]
            command += ["--resume"] if name != "compare" and not args.force else []
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            code = subprocess.run(command, env=env).returncode
            if code != 0:
                raise UsageError(f"stage {name} failed (exit status {code}): {' '.join(command[1:])}")
        times[name] = time.time() - start
        print(f"== {name} done in {times[name]:.0f} s", flush=True)
    print(f"pipeline done in {sum(times.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}); "
          f"report: {root / 'compare' / 'report.md'}")


if __name__ == "__main__":
    cli(main)
