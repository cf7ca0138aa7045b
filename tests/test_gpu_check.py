"""bench/gpu_check.py --device cpu --quick: the GPU check's code paths at tiny shapes on CPU, so the command a GPU user
runs cannot rot. Its report's structure, that every check passed, that ratios come from the medians; a broken backend
makes the exit status 1; bad input is one line. No timing thresholds."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsa
from bench import gpu_check, train_step
from dsa.backends import TorchBackend

REPO = Path(__file__).resolve().parents[1]
KINDS = ["dense_ft", "warmup", "sparse", "distill"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The whole quick run, as a user runs it (a subprocess): its exit status, JSON and markdown."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    return done, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_quick_run_passes_and_reports_every_section(quick):
    done, report, md = quick
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["passed"] is True and report["failures"] == [], report["failures"]
    assert report["quick"] is True and report["device_type"] == "cpu" and report["device"].startswith("CPU ")
    assert report["sections"] == list(gpu_check.SECTIONS)
    for key in ("command", "versions", "backends", "commit", "started", "plan"):
        assert key in report, key
    for section in gpu_check.SECTIONS:
        assert report[section]["seconds"] > 0, section
    assert md == gpu_check.markdown(report) and md in done.stdout  # the table printed is the table written
    assert "**PASSED**" in md and "| configs/ddp.yaml | 2 |" in md


def test_quick_run_checks_every_backend_in_both_dtypes(quick):
    _, report, md = quick
    correctness = report["correctness"]
    rows = correctness["checks"]
    assert correctness["passed"] and all(r["passed"] for r in rows)
    checked = {r["backend"] for r in rows}
    names = [n for n in dsa.available_backends() if n not in ("auto", "reference")]
    assert checked == {"reference", *names}
    assert {s["backend"] for s in correctness["skipped"]} == {"cpu", "torch", "triton"} - set(names)  # each named, with its reason
    assert all(s["status"].startswith("skipped: ") for s in correctness["skipped"])
    for name in names:
        fp32 = {r["check"] for r in rows if r["backend"] == name and r["dtype"] == "fp32"}
        bf16 = {r["check"] for r in rows if r["backend"] == name and r["dtype"] == "bf16"}
        assert fp32 == {"forward", "train", "warmup", "decode"} and bf16 == {"forward", "train", "warmup", "decode", "finite"}, name
    for r in rows:
        assert r["tolerance"] == {"fp32": 1e-4, "bf16": 5e-2}[r["dtype"]] or r["check"] in ("sensitivity", "finite")
    sensitivity = next(r for r in rows if r["check"] == "sensitivity")
    assert sensitivity["error"] > sensitivity["tolerance"] == 10 * 1e-4  # the sharpened model tells sparse from dense
    assert "| torch | bf16 | train |" in md


def test_quick_training_ratios_come_from_the_medians(quick):
    _, report, _ = quick
    results = report["training"]["results"]
    assert [(r["length"], r["kind"]) for r in results] == [(length, kind) for length in (64, 128) for kind in KINDS]
    for r in results:
        assert r["status"] == "ok" and r["topk"] == r["length"] // 8 and len(r["times_s"]) == 1
        assert r["median_s"] == statistics.median(r["times_s"])
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["median_s"])
        dense = next(d for d in results if d["length"] == r["length"] and d["kind"] == "dense_ft")
        assert r["tokens_per_s_ratio"] == pytest.approx(r["tokens_per_s"] / dense["tokens_per_s"])
        assert r["peak_memory_mib"] > 0
        assert r["peak_memory_ratio"] == pytest.approx(r["peak_memory_mib"] / dense["peak_memory_mib"])


def test_quick_inference_ratios_come_from_the_medians(quick):
    _, report, _ = quick
    inference = report["inference"]
    assert inference["dtype"] == "float32" and inference["flash_attention_2"] == "needs a CUDA device"
    results = inference["results"]
    expected = [(kind, length, variant) for kind in ("prefill", "decode") for length in (64, 128) for variant in ("stock_sdpa", "dsa")]
    assert [(r["kind"], r["length"], r["variant"]) for r in results] == expected
    for r in results:
        assert r["status"] == "ok" and r["median_s"] == statistics.median(r["times_s"])
        assert len(r["times_s"]) == (2 if r["kind"] == "prefill" else 4)
        if r["variant"] == "dsa":
            stock = next(s for s in results if (s["kind"], s["length"], s["variant"]) == (r["kind"], r["length"], "stock_sdpa"))
            assert r["ratio_to_stock_sdpa"] == pytest.approx(r["median_s"] / stock["median_s"])
            assert r["topk"] == r["length"] // 8


def test_quick_launch_runs_ddp_and_names_what_it_skips(quick):
    _, report, _ = quick
    launches = {r["config"]: r for r in report["launch"]["results"]}
    assert set(launches) == {f"configs/{name}.yaml" for name in ("ddp", "fsdp2", "zero2", "zero3")}
    ddp = launches["configs/ddp.yaml"]
    assert ddp["status"] == "ok" and ddp["processes"] == 2 and ddp["reloads"] and ddp["checkpoint"], ddp
    assert ddp["command"].startswith("accelerate launch --config_file ")
    assert launches["configs/fsdp2.yaml"]["status"] == "skipped: accelerate runs FSDP on accelerators only"
    for name in ("zero2", "zero3"):
        assert launches[f"configs/{name}.yaml"]["status"].startswith("skipped: ")
        assert "deepspeed" in launches[f"configs/{name}.yaml"]["status"].lower()


class DropsTheLastKey(TorchBackend):
    """A plausible bug: the last selected key of every query is never attended."""

    name = "drops_last_key"

    def attend(self, q, k, v, selected, valid, scaling, work):
        return super().attend(q, k, v, selected, valid & (torch.arange(valid.shape[-1]) < valid.shape[-1] - 1), scaling, work)


class Raises(TorchBackend):
    name = "raises"

    def attend(self, q, k, v, selected, valid, scaling, work):
        raise RuntimeError("kernel failed to launch")


def test_a_broken_backend_fails_the_check(tmp_path, capsys):
    status = gpu_check.main(["--device", "cpu", "--quick", "--sections", "correctness", "--out", str(tmp_path)],
                            extra_backends={"drops_last_key": DropsTheLastKey(), "raises": Raises()})  # fmt: skip
    assert status == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False and set(report) >= {"correctness"} and "training" not in report
    rows = report["correctness"]["checks"]
    broken = [r for r in rows if r["backend"] == "drops_last_key"]
    assert any(r["check"] == "forward" and r["dtype"] == "fp32" and not r["passed"] for r in broken)
    assert [r["check"] for r in rows if r["backend"] == "raises" and not r["passed"]][0] == "error"
    assert any("kernel failed to launch" in r["worst"] for r in rows if r["backend"] == "raises")
    assert all(r["passed"] for r in rows if r["backend"] not in ("drops_last_key", "raises"))
    assert all("drops_last_key" in f or "raises" in f for f in report["failures"])
    assert "**FAILED**" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--model", "/no/such/checkpoint"], "--model /no/such/checkpoint: not a checkpoint directory (no config.json)"),
    (["--lengths", "4096,lots"], "--lengths: comma-separated integers expected, got '4096,lots'"),
    (["--sections", "correctness,speed"], "--sections: unknown section(s) ['speed']"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
])  # fmt: skip
def test_bad_input_is_one_line(flags, message, tmp_path, capsys):
    try:
        status = gpu_check.main(["--out", str(tmp_path / "out"), "--quick", *flags])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: no CUDA device is visible to torch"


def test_commit_is_none_without_git_or_repository(monkeypatch, tmp_path):
    """A copied tree (no .git) or a machine without git still runs the check: the report's commit is None."""
    found = train_step.commit()  # the tests run in a clone
    assert found is not None and len(found) >= 4 and set(found) <= set("0123456789abcdef"), found
    monkeypatch.setattr(train_step, "__file__", str(tmp_path / "train_step.py"))  # no repository here
    assert train_step.commit() is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable either
    assert train_step.commit() is None
