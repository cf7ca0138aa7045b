"""bench/train_step.py at small shapes on the tiny model: the JSON's structure and its ratios (no timing thresholds)."""

import json
import statistics

import pytest

from bench import train_step


def test_train_step_bench_writes_every_kind_with_timings_and_ratios(tmp_path):
    out = tmp_path / "train_step.json"
    flags = ["--out", str(out), "--lengths", "48,64", "--repeats", "3", "--warmup-runs", "1", "--topk", "8", "--layers", "2"]
    report = train_step.main(flags)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for key in ("command", "device", "threads", "bf16", "backend", "model", "parameters", "shapes", "repeats", "warmup_runs",
                "torch", "commit", "started", "peak_rss_mib"):  # fmt: skip
        assert key in report, key
    assert report["device"].startswith(("CPU ", "NVIDIA", "AMD")) and report["repeats"] == 3 and report["shapes"]["layers"] == 2
    kinds = [kind.name for kind in train_step.STEP_KINDS]
    assert kinds[0] == "dense_ft" and {"warmup", "sparse", "distill"} <= set(kinds)
    results = report["results"]
    assert [(r["length"], r["kind"]) for r in results] == [(length, kind) for length in (48, 64) for kind in kinds]
    for r in results:
        assert r["topk"] == 8 and len(r["times_s"]) == len(r["cpu_s"]) == 3 and min(r["times_s"]) > 0
        assert r["median_s"] == statistics.median(r["times_s"])
        assert r["iqr_s"][0] <= r["median_s"] <= r["iqr_s"][1]
        dense = next(d for d in results if d["length"] == r["length"] and d["kind"] == "dense_ft")
        assert r["ratio_to_dense_ft"] == pytest.approx(r["median_s"] / dense["median_s"])
    assert [r["ratio_to_dense_ft"] for r in results if r["kind"] == "dense_ft"] == [1.0, 1.0]


def test_train_step_bench_rejects_unknown_kinds(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--out", str(tmp_path / "x.json"), "--kinds", "dense_ft,nope"])
    assert "unknown kind(s) ['nope']" in capsys.readouterr().err


def test_count_ops_counts_every_kind_and_the_gpu_sizes_dispatch_fewer(tmp_path):
    """--count-ops: operators per step and kind in the JSON; with the GPU work sizes (--work-sizes cuda) the sparse
    and warm-up steps dispatch a fraction of the CPU sizes' operators (2K tokens, k = 256: the CPU sizes split a
    layer into several chunks and training blocks, the GPU sizes into one)."""
    counts = {}
    for sizes in ("cpu", "cuda"):
        out = tmp_path / f"{sizes}.json"
        report = train_step.main(["--out", str(out), "--lengths", "2048", "--topk", "256", "--layers", "1", "--count-ops",
                                  "--warmup-runs", "0", "--backend", "torch", "--work-sizes", sizes, "--kinds", "dense_ft,warmup,sparse"])  # fmt: skip
        assert json.loads(out.read_text()) == json.loads(json.dumps(report)) and report["work_sizes"] == sizes
        counts[sizes] = {r["kind"]: r["operators"] for r in report["results"]}
        assert set(counts[sizes]) == {"dense_ft", "warmup", "sparse"} and min(counts[sizes].values()) > 0
    assert counts["cuda"]["dense_ft"] == counts["cpu"]["dense_ft"]  # no DSA layer in a dense step
    assert counts["cuda"]["sparse"] * 3 < counts["cpu"]["sparse"], counts
    assert counts["cuda"]["warmup"] < counts["cpu"]["warmup"], counts


def test_work_sizes_need_a_named_backend(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--out", str(tmp_path / "x.json"), "--work-sizes", "cuda"])
    assert "--work-sizes needs a named --backend" in capsys.readouterr().err
