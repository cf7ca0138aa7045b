"""lm-evaluation-harness through compare.py (--lm-eval) and `python -m dsa.lm_eval`, on a tiny random DSA
checkpoint (the `checkpoint` fixture of conftest.py). RULER's niah_single_1 makes its own data, so it runs
offline; niah_single_2 needs an essay download and must fail with one line while the other task still runs."""

import json
import os
import subprocess
import sys

import pytest
import requests

import compare
import dsa
import dsa.lm_eval as dsa_lm_eval
from dsa.presets import SAMPLES_DIR
from dsa.stats import mean_interval, paired_accuracy_difference, wilson_interval

HELD_OUT = str(SAMPLES_DIR / "sft_heldout.jsonl")
LENGTH = 512  # the shortest RULER length with room for niah's prompt, one needle and 128 answer tokens


def layer_setup(model) -> tuple:
    """(mode, k, selection) shared by every DSA layer of model."""
    (setup,) = {(layer.self_attn.mode, layer.self_attn.topk, layer.self_attn.selection) for layer in model.model.layers}
    return setup


def test_compare_scores_every_side_on_the_same_samples(checkpoint, tmp_path, monkeypatch, capsys):
    seen = []  # (task, dsa setup of the model) at every lm-eval run
    run = dsa_lm_eval.LmEvalSuite._run

    def recording_run(self, model, name, task, length):
        seen.append((name, layer_setup(model)))
        return run(self, model, name, task, length)

    monkeypatch.setattr(dsa_lm_eval.LmEvalSuite, "_run", recording_run)
    monkeypatch.setattr(dsa_lm_eval, "hub_unreachable", lambda: True)  # no download, with or without network
    out = tmp_path / "lm"
    tasks = "niah_single_2,niah_single_1"  # the first needs a download, the second runs offline
    argv = ["--model", str(checkpoint), "--data", HELD_OUT, "--lengths", "64", "--topk", "16", "--only", "lm-eval"]
    compare.main([*argv, "--lm-eval", tasks, "--lm-eval-lengths", str(LENGTH), "--lm-eval-limit", "2", "--lm-eval-max-gen-toks", "8", "--output-dir", str(out)])

    # every side ran on its own setup: dense, DSA (indexer) at k = 16, the oracle at k = 16
    assert seen == [
        ("niah_single_1", ("dense", 16, "indexer")),
        ("niah_single_1", ("sparse", 16, "indexer")),
        ("niah_single_1", ("sparse", 16, "oracle")),
    ]
    err = capsys.readouterr().err
    failure = [line for line in err.splitlines() if "niah_single_2" in line and "skipped" in line]
    assert len(failure) == 1 and "could not fetch" in failure[0] and "paul_graham_essays" in failure[0], err
    assert "Traceback" not in err

    lm = json.loads((out / "results.json").read_text())["lm_eval"]
    assert lm["tasks"] == ["niah_single_2", "niah_single_1"] and lm["lengths"] == [LENGTH] and lm["limit"] == 2
    assert set(lm["scores"]) == {"niah_single_1"} and set(lm["failed"]) == {"niah_single_2"}
    scores, samples = lm["scores"]["niah_single_1"], lm["per_sample"]["niah_single_1"]
    sides = [("dense", scores["dense"], samples["dense"])] + [(g, scores[g]["16"], samples[g]["16"]) for g in ("dsa", "oracle")]
    for _, (figure,), (per_sample,) in sides:
        assert len(per_sample) == 2 and all(x in (0.0, 1.0) for x in per_sample)
        assert figure == wilson_interval(int(sum(per_sample)), 2)  # 0/1 scores: Wilson
    for group in ("dsa", "oracle"):  # paired on the samples: Newcombe's interval for 0/1 scores
        sparse, dense = [int(x) for x in samples[group]["16"][0]], [int(x) for x in samples["dense"][0]]
        assert lm["vs_dense"]["niah_single_1"][group]["16"] == [paired_accuracy_difference(sparse, dense)]

    report = (out / "report.md").read_text()
    assert "## 4. Standard benchmarks (lm-evaluation-harness)" in report and "![lm-eval scores](lm_eval.png)" in report
    assert f"| niah_single_1, L={LENGTH} |" in report and f"| niah_single_1 vs dense, L={LENGTH} (paired) |" in report
    assert "- niah_single_2: not run, needs a download" in report
    assert (out / "lm_eval.png").stat().st_size > 0


def test_sample_scores_pick_the_interval_by_the_kind_of_score():
    def sample(score, outputs, flt="none"):
        return {"doc": {"outputs": outputs}, "filter": flt, "metrics": ["4096"], "4096": score}

    binary = [sample(1.0, ["7"]), sample(0.0, ["3"]), sample(1.0, ["5"]), sample(1.0, ["5"], flt="other")]
    scores, is_binary = dsa_lm_eval.sample_scores(binary, 4096)
    assert scores == [1.0, 0.0, 1.0] and is_binary  # the second filter's repeat of the documents is left out
    assert dsa_lm_eval.score_figure(scores, is_binary) == wilson_interval(2, 3)

    fractional = [sample(0.5, ["1", "2"]), sample(1.0, ["1", "2"]), sample(0.0, ["4", "8"])]  # e.g. ruler_vt recall
    scores, is_binary = dsa_lm_eval.sample_scores(fractional, 4096)
    assert not is_binary and dsa_lm_eval.score_figure(scores, is_binary) == mean_interval([0.5, 1.0, 0.0])
    other = [{"doc": {}, "filter": "none", "metrics": ["acc"], "acc": 1.0}]  # a non-RULER task: its first metric
    assert dsa_lm_eval.sample_scores(other, 4096) == ([1.0], True)


def test_failure_message_names_what_could_not_be_fetched():
    error = requests.exceptions.ConnectionError("Max retries exceeded", request=requests.Request("GET", "https://example.org/essays.json"))
    try:
        try:
            raise error
        except requests.exceptions.ConnectionError as e:
            raise RuntimeError("task setup failed") from e
    except RuntimeError as wrapped:
        message = dsa_lm_eval.failure_message(wrapped)
    assert message == "needs a download and could not fetch https://example.org/essays.json (ConnectionError)"
    assert dsa_lm_eval.failure_message(ValueError("bad length\nmore")) == "could not be loaded: ValueError: bad length"


def test_bad_task_names_are_one_line_errors(checkpoint, capsys):
    for tasks, named in (("niah_nope", "'niah_nope' is not an lm-eval task"), ("ruler", "'ruler' is a group")):
        with pytest.raises(SystemExit) as exit_info:
            compare.cli(lambda: compare.main(["--model", str(checkpoint), "--data", HELD_OUT, "--only", "lm-eval", "--lm-eval", tasks]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err


def test_hf_dsa_model_sets_mode_k_and_selection(checkpoint):
    lm = dsa_lm_eval.DSAHFLM(pretrained=str(checkpoint), dsa_mode="sparse", dsa_topk=8, dsa_selection="oracle", batch_size=1, device="cpu")
    assert isinstance(lm.model, dsa.Qwen2DSAForCausalLM)
    assert layer_setup(lm.model) == ("sparse", 8, "oracle")
    with pytest.raises(ValueError, match="'sideways'"):
        dsa_lm_eval.DSAHFLM(pretrained=str(checkpoint), dsa_selection="sideways", batch_size=1, device="cpu")


def test_command_line_runs_lm_eval_with_dsa(checkpoint, tmp_path):
    """`python -m dsa.lm_eval` is lm-eval's command line with the hf-dsa model type registered."""
    out = tmp_path / "cli"
    model_args = f"pretrained={checkpoint},dsa_mode=sparse,dsa_topk=16"
    metadata = json.dumps({"max_seq_lengths": [LENGTH]})  # RULER takes its tokenizer from model_args' pretrained
    command = [sys.executable, "-m", "dsa.lm_eval", "run", "--model", "hf-dsa", "--model_args", model_args, "--tasks", "niah_single_1",
               "--metadata", metadata, "--limit", "1", "--batch_size", "1", "--device", "cpu", "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "niah_single_1" in result.stdout and "hf-dsa" in result.stdout
    saved = list(out.rglob("results_*.json"))
    assert len(saved) == 1 and "niah_single_1" in json.loads(saved[0].read_text())["results"]
