"""compare.py end to end on a tiny random DSA checkpoint: report.md, results.json and plots; bad input."""

import json
import re

import pytest

import compare
from dsa.presets import SAMPLES_DIR

HELD_OUT = str(SAMPLES_DIR / "sft_heldout.jsonl")


FLAGS = [
    "--data", HELD_OUT,
    "--lengths", "32,64",
    "--topk", "16,64",
    "--ppl-windows", "2",
    "--passkey-lengths", "96",
    "--passkey-depths", "0,1",
    "--passkey-trials", "1",
    "--generations", "1",
    "--max-new-tokens", "4",
    "--speed-lengths", "64",
    "--speed-decode-tokens", "2",
]  # fmt: skip


def is_figure(fig, n: int) -> bool:
    """A dsa.stats figure of n values with an interval around its mean."""
    return set(fig) == {"mean", "ci_low", "ci_high", "n"} and fig["n"] == n and fig["ci_low"] <= fig["mean"] <= fig["ci_high"]


def test_report_end_to_end(checkpoint, tmp_path):
    from dsa.report import fmt_change

    out = tmp_path / "compare"
    compare.main(["--model", str(checkpoint), "--output-dir", str(out), *FLAGS])
    r = json.loads((out / "results.json").read_text())

    assert r["meta"]["headline_topk"] == 16 and r["meta"]["device"].startswith("CPU")
    ppl = r["perplexity"]
    assert ppl["lengths"] == [32, 64] and set(ppl["dsa"]) == set(ppl["dsa_vs_dense"]) == {"16", "64"}
    assert ppl["windows"] == [2, 2]
    figures = ppl["dense"] + ppl["dsa"]["16"] + ppl["dsa"]["64"]
    assert all(is_figure(f, n=2) for f in figures)
    assert all(1 < f["mean"] < 2 * r["meta"]["vocab_size"] for f in figures)
    assert all(is_figure(f, n=2) for f in ppl["dsa_vs_dense"]["16"] + ppl["dsa_vs_dense"]["64"])
    # the figures are those of the per-window perplexities: geometric mean, paired relative difference
    for i in range(2):
        dense, sparse = ppl["per_window"]["dense"][i], ppl["per_window"]["dsa"]["16"][i]
        assert ppl["dense"][i]["mean"] == pytest.approx((dense[0] * dense[1]) ** 0.5)
        change = (sparse[0] / dense[0] + sparse[1] / dense[1]) / 2 - 1
        assert ppl["dsa_vs_dense"]["16"][i]["mean"] == pytest.approx(change)
    # k >= L: DSA is dense attention; k < L: it is not
    assert [f["mean"] for f in ppl["dsa"]["64"]] == pytest.approx([f["mean"] for f in ppl["dense"]], rel=1e-5)
    assert all(abs(f["mean"]) < 1e-5 for f in ppl["dsa_vs_dense"]["64"])
    assert ppl["dsa"]["16"][0]["mean"] != pytest.approx(ppl["dense"][0]["mean"], rel=1e-4)
    # the oracle selection: dense at k >= L, its own figures and paired differences at k < L
    assert set(ppl["oracle"]) == set(ppl["oracle_vs_dense"]) == {"16", "64"}
    assert [f["mean"] for f in ppl["oracle"]["64"]] == pytest.approx([f["mean"] for f in ppl["dense"]], rel=1e-5)
    assert ppl["oracle"]["16"][0]["mean"] not in (pytest.approx(ppl["dsa"]["16"][0]["mean"], rel=1e-6), pytest.approx(ppl["dense"][0]["mean"], rel=1e-6))
    assert all(is_figure(f, n=2) for f in ppl["oracle_vs_dense"]["16"])
    dec = r["decode_perplexity"]
    assert dec["topk"] == 16 and dec["length"] == 32 and dec["rel_diff"] < 1e-4

    rec = r["recall"]
    n_layers = r["meta"]["n_layers"]
    assert rec["length"] == 64 and rec["per_layer"]["64"]["indexer"] == [None] * n_layers
    assert rec["mean"]["64"]["indexer"] is None  # k >= L: no recall to measure
    m = rec["mean"]["16"]
    assert all(is_figure(m[method], n=n_layers) for method in ("indexer", "oracle", "last_k", "random"))
    m = {method: fig["mean"] for method, fig in m.items()}
    assert 0 < m["random"] <= m["oracle"] <= 1 and m["indexer"] <= m["oracle"] + 1e-6 and m["last_k"] <= m["oracle"] + 1e-6
    assert len(rec["per_layer"]["16"]["indexer"]) == n_layers

    pk = r["passkey"]
    assert [len(row) for row in pk["dense"]] == [2] and set(pk["dsa"]) == {"16", "64"}
    cells = [cell for grid in [pk["dense"], *pk["dsa"].values()] for row in grid for cell in row]
    assert all(is_figure(cell, n=1) and 0 <= cell["ci_low"] and cell["ci_high"] <= 1 for cell in cells)  # Wilson, one trial
    assert is_figure(pk["all_cells"]["dense"], n=2) and set(pk["all_cells"]["dsa"]) == {"16", "64"}
    assert set(pk["oracle"]) == set(pk["all_cells"]["oracle"]) == {"16", "64"}
    gen = r["generations"]["samples"]
    assert len(gen) == 2 and all({"reference", "dense", "dsa", "messages"} <= set(s) for s in gen)
    assert re.search(r"[\u4e00-\u9fff]", gen[0]["messages"][-1]["content"])  # one Chinese, one English prompt
    sp = r["speed"]
    assert sp["lengths"] == [64] and sp["prefill_s"]["dense"][0] > 0 and sp["decode_ms_per_token"]["dsa"]["16"][0] > 0
    assert "oracle" not in sp["prefill_s"]  # speed: dense and DSA only
    assert r["settings"]["sections"] == ["perplexity", "recall", "passkey", "generations", "speed"]

    report = (out / "report.md").read_text()
    assert report.index("## Summary") < report.index("## 1. Perplexity")
    assert "DSA k=16" in report and "oracle k=16" in report and r["meta"]["device"] in report and "skipped" not in report
    change = ppl["dsa_vs_dense"]["16"][-1]
    assert fmt_change(change).removesuffix("*") in report
    assert "the 95% interval of the difference excludes 0" in report
    dense_fails_all = pk["all_cells"]["dense"]["mean"] == 0
    assert ("The dense model fails every trial" in report) == dense_fails_all  # the grids are flagged as meaningless
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 4 and all((out / name).stat().st_size > 1000 for name in images)


class RecordingBar:
    """Stands in for tqdm: records the total, the units done and the descriptions set."""

    def __init__(self, total, desc, **kwargs):
        self.total, self.done, self.descriptions = total, 0, [desc]
        RecordingBar.last = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, n=1):
        self.done += n

    def set_description(self, desc, refresh=True):
        self.descriptions.append(desc)

    def set_postfix_str(self, text, refresh=True):
        pass


def test_only_and_skip_run_just_the_sections_asked(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "only"
    monkeypatch.setattr(compare, "tqdm", RecordingBar)
    compare.main(["--model", str(checkpoint), "--output-dir", str(out), *FLAGS, "--only", "perplexity,passkey"])
    bar = RecordingBar.last  # one bar over the sections asked for, each named while it runs
    sides = 1 + 2 + 2  # dense, DSA at k = 16, 64, the oracle at k = 16, 64
    assert bar.done == bar.total == (sides * 2 * 2 + 2) + sides * 1 * 2 * 1  # perplexity (+ decode path) + passkey
    assert bar.descriptions == ["perplexity", "perplexity", "passkey"]
    r = json.loads((out / "results.json").read_text())
    assert {"perplexity", "decode_perplexity", "passkey"} <= set(r)
    assert not {"recall", "generations", "speed"} & set(r)
    assert r["settings"]["sections"] == ["perplexity", "passkey"]
    report = (out / "report.md").read_text()
    assert "Sections skipped in this run (--only / --skip): recall, generations, speed." in report
    assert "## 1. Perplexity" in report and "## 2. Indexer recall" not in report and "## 6. Speed" not in report
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)) == ["passkey.png", "perplexity.png"]

    no_decode = tmp_path / "no_decode"  # --decode-length 0: the perplexity section without the decode-path check
    compare.main(["--model", str(checkpoint), "--output-dir", str(no_decode), *FLAGS, "--only", "perplexity",
                  "--decode-length", "0", "--no-oracle"])
    bar = RecordingBar.last
    assert bar.done == bar.total == 3 * 2 * 2
    r = json.loads((no_decode / "results.json").read_text())
    assert "perplexity" in r and "decode_perplexity" not in r

    assert compare.parse_args(["--skip", "speed,generations"]).sections == ["perplexity", "recall", "passkey"]
    assert compare.parse_args(["--only", "speed,recall"]).sections == ["recall", "speed"]
    assert compare.parse_args([]).sections == ["perplexity", "recall", "passkey", "generations", "speed"]


def test_bad_sections_are_one_argparse_error(capsys):
    for argv, named in (
        (["--only", "perplexity,lm-eval"], "--lm-eval TASKS"),  # the section needs its tasks
        (["--skip", "sped"], "'sped'"),
        (["--only", "speed", "--skip", "recall"], "not allowed with argument"),
        (["--skip", "perplexity,recall,passkey,generations,speed"], "leaves no section to run"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            compare.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "error: " in err[-1] and named in err[-1] and not any("Traceback" in line for line in err), err


def test_missing_model_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.cli(lambda: compare.main(["--model", str(tmp_path / "nope"), "--data", HELD_OUT]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


def test_bad_flags_are_one_line_errors(checkpoint, tmp_path, capsys):
    for flags, named in (
        (["--topk", "0,16"], "--topk"),
        (["--decode-length", "-1"], "--decode-length must be >= 0, got -1"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--lengths", "1000000"], "1000000"),  # more tokens than the held-out data has
    ):
        argv = ["--model", str(checkpoint), "--data", HELD_OUT, "--output-dir", str(tmp_path), *flags]
        with pytest.raises(SystemExit) as exit_info:
            compare.cli(lambda: compare.main(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith("error: ") and named in err.splitlines()[-1] and "Traceback" not in err, err


def test_preset_fills_the_flags_not_given():
    tiny = compare.parse_args(["--preset", "tiny"])
    assert (tiny.model, tiny.data, tiny.output_dir) == ("runs/tiny/sparse", HELD_OUT, "runs/tiny/compare")
    assert tiny.lengths == [256, 512, 1024] and tiny.topk == [16, 32, 64, 128] and tiny.passkey_depths == [0, 0.5, 1]
    flagged = compare.parse_args(["--preset", "tiny", "--lengths", "128", "--model", "elsewhere"])
    assert flagged.lengths == [128] and flagged.model == "elsewhere" and flagged.topk == tiny.topk
    default = compare.parse_args([])
    assert (default.model, default.data, default.output_dir) == ("runs/sparse", "deepctrl/deepctrl-sft-data", "runs/compare")
    assert default.lengths == [1024, 2048, 4096] and default.topk == [64, 128, 256, 512]
    assert default.passkey_depths == [0, 0.25, 0.5, 0.75, 1]
    assert (default.ppl_windows, default.passkey_trials) == (8, 10)  # enough for informative intervals
    assert (tiny.ppl_windows, tiny.passkey_trials) == (4, 1)  # the tiny run stays fast
    assert compare.parse_args(["--preset", "tiny", "--ppl-windows", "2"]).ppl_windows == 2


def test_pipeline_chains_each_stage_to_the_previous_output(tmp_path):
    import pipeline

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    for preset, first_model in (("tiny", str(tmp_path / "base")), (None, pipeline.REAL_BASE)):
        plan = pipeline.stages(preset, tmp_path)
        names = [name for name, _, _ in plan]
        assert names == (["base"] if preset else []) + ["warmup", "sparse", "dpo", "compare"]
        trained = [(argv, out) for name, argv, out in plan if name not in ("base", "compare")]
        assert flag(trained[0][0], "--model") == first_model
        for (argv, _), (_, previous) in zip(trained[1:], trained):
            assert flag(argv, "--model") == str(previous)
        assert all(flag(argv, "--output-dir") == str(out) for argv, out in trained)
        compare_argv = plan[-1][1]
        assert compare_argv[0] == "compare.py" and flag(compare_argv, "--model") == str(trained[-1][1])
        assert flag(compare_argv, "--baseline") == first_model  # the model before DSA
        assert ("--preset" in compare_argv) == (preset == "tiny")
        assert ("--skip-conversations" in compare_argv) == (preset is None)  # held-out text past the training data


def test_changes_are_marked_when_their_interval_excludes_zero():
    from dsa.report import fmt_change, fmt_figure

    assert fmt_change({"mean": 0.021, "ci_low": 0.008, "ci_high": 0.034, "n": 8}) == "+2.1% [+0.8, +3.4]*"
    assert fmt_change({"mean": -0.021, "ci_low": -0.034, "ci_high": -0.008, "n": 8}) == "-2.1% [-3.4, -0.8]*"
    assert fmt_change({"mean": 0.021, "ci_low": -0.008, "ci_high": 0.05, "n": 8}) == "+2.1% [-0.8, +5.0]"
    assert fmt_change({"mean": 0.021, "ci_low": None, "ci_high": None, "n": 1}) == "+2.1%"
    assert fmt_change({"mean": -0.0004, "ci_low": -0.006, "ci_high": 0.005, "n": 4}) == "+0.0% [-0.6, +0.5]"
    assert fmt_figure({"mean": 12.34, "ci_low": 11.9, "ci_high": 12.8, "n": 8}) == "12.3 [11.9, 12.8]"
    assert fmt_figure({"mean": 12.34, "ci_low": None, "ci_high": None, "n": 1}) == "12.3"


def test_passkey_caveat_only_when_dense_fails_every_trial():
    from dsa.report import passkey_caveat
    from dsa.stats import wilson_interval

    assert passkey_caveat({"all_cells": {"dense": wilson_interval(0, 4)}})
    assert passkey_caveat({"all_cells": {"dense": wilson_interval(1, 4)}}) == []
