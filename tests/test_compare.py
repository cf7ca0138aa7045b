"""compare.py end to end on a tiny random DSA checkpoint: report.md, results.json and plots; bad input."""

import json
import re

import pytest
import torch

import compare
import dsa
from dsa.presets import SAMPLES_DIR
from dsa.tiny import build_tokenizer, tiny_model

HELD_OUT = str(SAMPLES_DIR / "sft_heldout.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny DSA model (k = 16) and its tokenizer, saved like a training output."""
    path = tmp_path_factory.mktemp("dsa_checkpoint")
    tokenizer = build_tokenizer([SAMPLES_DIR / "sft_heldout.jsonl"], vocab_size=400)
    torch.manual_seed(0)
    base = tiny_model(tokenizer)
    model = dsa.add_indexers(base, dsa.DSAConfig(index_n_heads=2, index_head_dim=16, index_rope_dim=8, index_topk=16))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


def test_report_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "compare"
    compare.main(["--model", str(checkpoint), "--output-dir", str(out), *FLAGS])
    r = json.loads((out / "results.json").read_text())

    assert r["meta"]["headline_topk"] == 16 and r["meta"]["device"].startswith("CPU")
    ppl = r["perplexity"]
    assert ppl["lengths"] == [32, 64] and set(ppl["dsa"]) == {"16", "64"}
    assert all(1 < v < 2 * r["meta"]["vocab_size"] for v in ppl["dense"] + ppl["dsa"]["16"])
    # k >= L: DSA is dense attention; k < L: it is not
    assert ppl["dsa"]["64"] == pytest.approx(ppl["dense"], rel=1e-5)
    assert ppl["dsa"]["16"][0] != pytest.approx(ppl["dense"][0], rel=1e-4)
    dec = r["decode_perplexity"]
    assert dec["topk"] == 16 and dec["length"] == 32 and dec["rel_diff"] < 1e-4

    rec = r["recall"]
    assert rec["length"] == 64 and rec["per_layer"]["64"]["indexer"] == [None] * r["meta"]["n_layers"]
    m = rec["mean"]["16"]
    assert 0 < m["random"] <= m["oracle"] <= 1 and m["indexer"] <= m["oracle"] + 1e-6 and m["last_k"] <= m["oracle"] + 1e-6
    assert len(rec["per_layer"]["16"]["indexer"]) == r["meta"]["n_layers"]

    pk = r["passkey"]
    assert [len(row) for row in pk["dense"]] == [2] and set(pk["dsa"]) == {"16", "64"}
    assert all(0 <= a <= 1 for grid in [pk["dense"], *pk["dsa"].values()] for row in grid for a in row)
    gen = r["generations"]["samples"]
    assert len(gen) == 2 and all({"reference", "dense", "dsa", "messages"} <= set(s) for s in gen)
    assert re.search(r"[\u4e00-\u9fff]", gen[0]["messages"][-1]["content"])  # one Chinese, one English prompt
    sp = r["speed"]
    assert sp["lengths"] == [64] and sp["prefill_s"]["dense"][0] > 0 and sp["decode_ms_per_token"]["dsa"]["16"][0] > 0

    report = (out / "report.md").read_text()
    assert report.index("## Summary") < report.index("## 1. Perplexity")
    assert "DSA k=16" in report and r["meta"]["device"] in report
    dense_fails_all = all(a == 0 for row in pk["dense"] for a in row)
    assert ("The dense model fails every trial" in report) == dense_fails_all  # the grids are flagged as meaningless
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 4 and all((out / name).stat().st_size > 1000 for name in images)


def test_missing_model_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.cli(lambda: compare.main(["--model", str(tmp_path / "nope"), "--data", HELD_OUT]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


def test_bad_flags_are_one_line_errors(checkpoint, tmp_path, capsys):
    for flags, named in (
        (["--topk", "0,16"], "--topk"),
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


def test_passkey_caveat_only_when_dense_fails_every_trial():
    from dsa.report import passkey_caveat

    assert passkey_caveat({"dense": [[0.0, 0.0], [0.0, 0.0]]})
    assert passkey_caveat({"dense": [[0.0, 0.0], [0.0, 1.0]]}) == []
