"""--report-to: TensorBoard scalars equal metrics.jsonl step by step, also across a resume; bad names are one line."""

import json
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import warmup_train
from dsa.presets import SAMPLES_DIR
from dsa.tiny import build_tokenizer, tiny_model
from cli_errors import one_line_error

TINY = ["--preset", "tiny", "--seq-len", "128", "--batch-size", "2", "--topk", "16", "--save-every", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random (untrained) tiny dense base model: the warm-up's input."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = build_tokenizer([SAMPLES_DIR / "sft_heldout.jsonl"], vocab_size=400)
    torch.manual_seed(0)
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def metrics(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({row["step"] for row in rows}) == len(rows), "a step is logged twice"
    return {row["step"]: row for row in rows}


def scalars(out) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard events under out/runs/<output dir name> (duplicates would fail)."""
    events = EventAccumulator(str(out / "runs" / out.name))
    events.Reload()
    found = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        found[tag] = {p.step: p.value for p in points}
        assert len(found[tag]) == len(points), f"{tag}: a step is logged twice"
    return found


def assert_same(out, steps: list[int]) -> None:
    rows, logged = metrics(out), scalars(out)
    assert sorted(rows) == steps
    for name in ("loss", "kl", "lr", "tokens_per_s"):
        assert sorted(logged[name]) == steps, name
        for step in steps:
            assert logged[name][step] == pytest.approx(rows[step][name], rel=1e-6, abs=1e-12), (name, step)
    assert "step" not in logged


def test_tensorboard_scalars_equal_metrics_jsonl(base, tmp_path):
    out = tmp_path / "warmup"
    warmup_train.main(TINY + ["--model", str(base), "--output-dir", str(out), "--max-steps", "4", "--report-to", "tensorboard"])
    assert_same(out, [1, 2, 3, 4])


def test_resumed_run_logs_each_step_once(base, tmp_path):
    """A run that logged step 3 after its step-2 checkpoint, resumed to step 5: metrics.jsonl and TensorBoard hold
    steps 1..5 once each, steps 3..5 from the resumed run."""
    out = tmp_path / "warmup"
    flags = TINY + ["--model", str(base), "--output-dir", str(out), "--save-every", "2", "--report-to", "tensorboard"]
    warmup_train.main(flags + ["--max-steps", "3"])
    first = metrics(out)
    warmup_train.main(flags + ["--max-steps", "5", "--resume"])
    assert_same(out, [1, 2, 3, 4, 5])
    assert [metrics(out)[step]["loss"] for step in (1, 2)] == [first[step]["loss"] for step in (1, 2)]


def test_bad_report_to_gives_one_line_errors(tmp_path, capsys, monkeypatch):
    out = TINY + ["--output-dir", str(tmp_path / "out")]
    err = one_line_error(warmup_train.main, out + ["--report-to", "tensorboard,mlflow"], capsys)
    assert "--report-to: unknown tracker 'mlflow'; choose from tensorboard, wandb, none" in err
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, installed or not
    assert "--report-to wandb: wandb is not installed" in one_line_error(warmup_train.main, out + ["--report-to", "wandb"], capsys)
    assert not (tmp_path / "out").exists()
