"""dsa.sources: --model / --data arguments -> local paths as they are, missing or malformed ones as one-line
UsageErrors naming them, ids downloaded (modelscope and the hub replaced here: no network)."""

import json

import pytest

from dsa.errors import UsageError
from dsa.sources import DEEPCTRL_FILES, resolve_data, resolve_model, resolve_preference_data
from dsa.train_utils import cli


@pytest.fixture
def modelscope_calls(monkeypatch, tmp_path):
    """modelscope's two download functions replaced: each call is recorded as (function, id, allow_file_pattern)
    and returns tmp_path/snapshot, which holds a config.json, every deepctrl file, x.jsonl and pairs.jsonl."""
    import modelscope

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", *DEEPCTRL_FILES, "x.jsonl", "pairs.jsonl"):
        (snapshot / name).write_text("{}\n")
    calls = []

    def fake(function):
        def download(repo_id, allow_file_pattern=None):
            calls.append((function, repo_id, allow_file_pattern))
            return str(snapshot)

        return download

    monkeypatch.setattr(modelscope, "snapshot_download", fake("snapshot_download"))
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", fake("dataset_snapshot_download"))
    return calls


@pytest.fixture
def modelscope_unreachable(monkeypatch):
    """modelscope's two download functions replaced by ones that fail as they do offline."""
    import modelscope

    def unreachable(repo_id, **kwargs):
        raise ConnectionError(f"cannot reach modelscope.cn for {repo_id}")

    monkeypatch.setattr(modelscope, "snapshot_download", unreachable)
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", unreachable)


def test_local_paths_are_used_as_they_are(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    a.write_text("{}\n")
    b.write_bytes(b"")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_data(f"{a}, {a}") == [a, a]
    assert resolve_preference_data(str(a)) == [a]
    assert resolve_preference_data(str(tmp_path)) == [a, b]  # a directory: its .jsonl / .parquet files, sorted


def test_missing_local_paths_name_the_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in (str(tmp_path / "nope"), "./nope", "~/no-such-dir-here", "runs/typo", "org/weights.safetensors"):
        with pytest.raises(UsageError) as error:
            resolve_model(name)
        assert str(error.value) == f"model not found: {name} (not a directory)"
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(UsageError, match="model not found: file.txt"):  # a file is not a checkpoint
        resolve_model("file.txt")
    for spec, named in (("missing.jsonl", "missing.jsonl"), ("runs/typo", "runs/typo"), ("runs", "runs")):
        with pytest.raises(UsageError) as error:
            resolve_data(spec)
        assert str(error.value) == f"data file not found: {named}"
    with pytest.raises(UsageError, match="data file not found: nope.parquet"):
        resolve_preference_data("nope.parquet")
    with pytest.raises(UsageError, match="data file not found or not .jsonl / .parquet: file.txt"):
        resolve_preference_data("file.txt")
    with pytest.raises(UsageError, match="no .jsonl or .parquet file in runs"):
        resolve_preference_data("runs")


def test_malformed_ids_name_the_argument(modelscope_calls):
    for name in ("no slash", "a/b/c", "owner/", ""):
        with pytest.raises(UsageError) as error:
            resolve_model(name)
        assert str(error.value) == f"model not found: {name!r} (neither a local directory nor a ModelScope id owner/name)"
    with pytest.raises(UsageError, match=r"data file not found: 'a/b/c' \(neither a local file"):
        resolve_data("a/b/c")
    with pytest.raises(UsageError, match="data not found: modelscope:bad id"):
        resolve_preference_data("modelscope:bad id")
    with pytest.raises(UsageError, match="not .jsonl / .parquet: a/b/c"):
        resolve_preference_data("a/b/c")
    assert modelscope_calls == []  # nothing malformed reaches modelscope


def test_ids_are_downloaded_with_modelscope(modelscope_calls, tmp_path):
    snapshot = tmp_path / "snapshot"
    assert resolve_model("Qwen/Qwen2.5-0.5B") == snapshot
    assert resolve_data("deepctrl/deepctrl-sft-data") == sorted(snapshot / f for f in DEEPCTRL_FILES)
    assert resolve_data("owner/name") == sorted(snapshot.glob("*.jsonl"))
    assert resolve_data("owner/name:x.jsonl") == [snapshot / "x.jsonl"]
    assert resolve_preference_data("modelscope:owner/pairs") == sorted(snapshot.glob("*.jsonl"))
    assert modelscope_calls == [
        ("snapshot_download", "Qwen/Qwen2.5-0.5B", None),
        ("dataset_snapshot_download", "deepctrl/deepctrl-sft-data", list(DEEPCTRL_FILES)),
        ("dataset_snapshot_download", "owner/name", ["*.jsonl"]),
        ("dataset_snapshot_download", "owner/name", ["x.jsonl"]),
        ("dataset_snapshot_download", "owner/pairs", ["*.parquet", "*.jsonl"]),
    ]
    with pytest.raises(UsageError, match="dataset 'owner/name' has no file matching other.jsonl"):
        resolve_data("owner/name:other.jsonl")


def test_download_failure_is_one_line_naming_the_id(modelscope_unreachable, capsys):
    cases = (
        (resolve_model, "no-such-org/no-such-model", "cannot download model 'no-such-org/no-such-model'", "--model PATH"),
        (resolve_data, "no-such-org/sft", "cannot download dataset 'no-such-org/sft'", "--data PATH"),
        (resolve_preference_data, "modelscope:no-such-org/pairs", "cannot download dataset 'no-such-org/pairs'", "--data PATH"),
    )
    for resolve, argument, start, hint in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli(lambda: resolve(argument))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: {start} from ModelScope (ConnectionError); ")
        assert hint in err and "--preset tiny" in err


def test_hub_dataset_rows_and_failure(monkeypatch):
    import datasets

    rows = [{"n": i} for i in range(3)]
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id, split, streaming: iter(rows))
    assert list(resolve_preference_data("m-a-p/COIG-P")) == rows  # the first row, read to check, is kept

    def unreachable(dataset_id, split, streaming):
        raise ConnectionError("cannot reach huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UsageError) as error:
        resolve_preference_data("m-a-p/COIG-P")
    message = str(error.value)
    assert message.startswith("data 'm-a-p/COIG-P' is not a local file and cannot be read from the Hugging Face hub")
    assert "(ConnectionError)" in message and "--preset tiny" in message and "\n" not in message


def test_dpo_reads_rows_through_sources(tmp_path):
    from dsa.dpo import read_rows

    (tmp_path / "b.jsonl").write_text(json.dumps({"n": 2}) + "\n\nnot json\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"n": 1}) + "\n")
    assert list(read_rows(str(tmp_path))) == [{"n": 1}, {"n": 2}, None]
