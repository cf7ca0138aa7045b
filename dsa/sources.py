"""What a --model or --data argument names, for every script: a local path, or an id to download.

    resolve_model("runs/sparse")                  # a local checkpoint directory, as it is
    resolve_model("Qwen/Qwen2.5-0.5B")            # a ModelScope model id: downloaded into modelscope's cache
    resolve_data("a.jsonl,b.jsonl")               # SFT conversations: local JSONL files, as they are
    resolve_data("deepctrl/deepctrl-sft-data")    # a ModelScope dataset id: its JSONL files, downloaded
    resolve_preference_data("pairs.parquet")      # DPO pairs: a file, a directory, modelscope:<id>, a hub id

Local or id. An argument is local when it names an existing file or directory, or when it is written like a
path: it starts with ".", "/" or "~", its first component is an existing directory (runs/typo), or it ends
in a file suffix (FILE_SUFFIXES). A local argument is used as it is; one that does not exist (or is not
of the kind the caller needs) is a UsageError naming it. Any other argument must be an id "owner/name"
(ID), else a UsageError naming it.

Downloads (modelscope, or `datasets` for Hugging Face hub ids) go to those libraries' caches. A failure
(offline, unknown id) is one UsageError line naming the id and what to pass instead: a local path, or
--preset tiny; the libraries' own retry warnings are silenced.
"""

import logging
import re
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from .errors import UsageError

ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name, as ModelScope and the Hugging Face hub spell ids
DATASET_ITEM = re.compile(r"^(?P<id>[\w.-]+/[\w.-]+)(:(?P<file>[\w./-]+))?$")  # owner/name or owner/name:file
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".safetensors", ".bin")
DEEPCTRL_ID = "deepctrl/deepctrl-sft-data"
DEEPCTRL_FILES = ("sft_data_zh.jsonl", "sft_data_en.jsonl")
PREFERENCE_SUFFIXES = (".jsonl", ".parquet")

MODEL_HINT = "pass a local checkpoint with --model PATH, or use --preset tiny"
DATA_HINT = "pass a local JSONL file with --data PATH, or use --preset tiny"
PREFERENCE_HINT = "pass a local .jsonl/.parquet with --data PATH, or use --preset tiny"


def looks_local(arg: str) -> bool:
    """True when `arg` names an existing path or is written like one (rules: module docstring)."""
    if not arg:
        return False
    path = Path(arg).expanduser()
    return (
        arg.startswith((".", "/", "~"))
        or path.exists()
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
        or path.suffix in FILE_SUFFIXES
    )


def resolve_model(name: str) -> Path:
    """The checkpoint directory a --model argument names: a local directory as it is, or a ModelScope
    model id (owner/name, e.g. Qwen/Qwen2.5-0.5B) downloaded with modelscope.snapshot_download.
    UsageError: "model not found: NAME (not a directory)" for a local-looking NAME that is no directory,
    "model not found: 'NAME' (neither ...)" for a malformed id, "cannot download model ..." for a failed download."""
    path = Path(name).expanduser()
    if name and path.is_dir():
        return path
    if looks_local(name):
        raise UsageError(f"model not found: {name} (not a directory)")
    if not ID.match(name):
        raise UsageError(f"model not found: {name!r} (neither a local directory nor a ModelScope id owner/name)")
    return modelscope_download("model", name, MODEL_HINT)


def resolve_data(spec: str) -> list[Path]:
    """The JSONL files of SFT conversations a --data argument names, in order. `spec` is comma-separated;
    each item is a local file (as it is) or a ModelScope dataset id downloaded with
    modelscope.dataset_snapshot_download: "deepctrl/deepctrl-sft-data" (its DEEPCTRL_FILES), another
    "owner/name" (all its top-level *.jsonl, sorted), or "owner/name:file.jsonl" (that one file).
    UsageError "data file not found: ITEM ..." naming the first item that is none of these."""
    paths = []
    for item in (part.strip() for part in spec.split(",")):
        path = Path(item).expanduser()
        match = DATASET_ITEM.match(item)
        if path.is_file():
            paths.append(path)
        elif looks_local(match["id"] if match else item):
            raise UsageError(f"data file not found: {item}")
        elif match is None:
            raise UsageError(
                f"data file not found: {item!r} (neither a local file nor a ModelScope dataset id owner/name)"
            )
        else:
            paths += dataset_jsonl_files(match["id"], match["file"])
    return paths


def dataset_jsonl_files(dataset_id: str, file: str | None) -> list[Path]:
    """The downloaded JSONL files of a ModelScope dataset (which files: `resolve_data`), sorted by path."""
    patterns = [file] if file else list(DEEPCTRL_FILES) if dataset_id == DEEPCTRL_ID else ["*.jsonl"]
    root = modelscope_download("dataset", dataset_id, DATA_HINT, allow_file_pattern=patterns)
    paths = sorted(p for pattern in patterns for p in root.glob(pattern))
    if not paths:
        raise UsageError(f"dataset {dataset_id!r} has no file matching {', '.join(patterns)}")
    return paths


def resolve_preference_data(source: str) -> list[Path] | Iterator[dict]:
    """What a DPO --data argument names: the local files to read, or the rows of a hub dataset.

    source: a local .jsonl / .parquet file -> [it]; a local directory -> its .jsonl / .parquet files (all
    depths, sorted); "modelscope:<owner/name>" -> the same for the dataset downloaded with
    modelscope.dataset_snapshot_download (only its .jsonl / .parquet files); a Hugging Face hub dataset
    id "owner/name" (e.g. m-a-p/COIG-P) -> an iterator over its rows, one pass over the "train" split
    streamed with `datasets` (opened and its first row read here, so an unreachable dataset fails now).
    UsageError naming `source` when it is none of these, or a download fails."""
    if source.startswith("modelscope:"):
        dataset_id = source.removeprefix("modelscope:")
        if not ID.match(dataset_id):
            raise UsageError(f"data not found: {source} (not a ModelScope dataset id owner/name after 'modelscope:')")
        root = modelscope_download("dataset", dataset_id, PREFERENCE_HINT, allow_file_pattern=["*.parquet", "*.jsonl"])
        return preference_files(root, source)
    path = Path(source).expanduser()
    if path.is_dir():
        return preference_files(path, source)
    if path.suffix in PREFERENCE_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"data file not found: {source}")
        return [path]
    if looks_local(source) or not ID.match(source):
        raise UsageError(f"data file not found or not .jsonl / .parquet: {source}")
    return hub_rows(source)


def preference_files(root: Path, source: str) -> list[Path]:
    """The .jsonl / .parquet files under `root`, sorted; a UsageError naming `source` when there are none."""
    files = sorted(f for f in root.rglob("*") if f.suffix in PREFERENCE_SUFFIXES and f.is_file())
    if not files:
        raise UsageError(f"no .jsonl or .parquet file in {source}")
    return files


def modelscope_download(kind: str, repo_id: str, hint: str, allow_file_pattern: list[str] | None = None) -> Path:
    """The local snapshot directory of a ModelScope repository: modelscope.snapshot_download (kind "model")
    or modelscope.dataset_snapshot_download (kind "dataset"), only the files matching allow_file_pattern
    when given. A failure is a UsageError: "cannot download KIND 'ID' from ModelScope (ERROR TYPE); HINT"."""
    import modelscope

    download = {"model": modelscope.snapshot_download, "dataset": modelscope.dataset_snapshot_download}[kind]
    logging.getLogger("modelscope_hub").setLevel(logging.ERROR)  # retries are reported in the error below
    try:
        return Path(download(repo_id, allow_file_pattern=allow_file_pattern))
    except Exception as e:  # offline, unknown id
        raise UsageError(f"cannot download {kind} {repo_id!r} from ModelScope ({type(e).__name__}); {hint}") from None


def hub_rows(dataset_id: str) -> Iterator[dict]:
    """The rows of the "train" split of a Hugging Face hub dataset, streamed with `datasets` (one pass).
    The stream is opened and its first row read before returning; a failure is a UsageError naming the id."""
    import datasets

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # retries are reported in the error below
    try:
        rows = iter(datasets.load_dataset(dataset_id, split="train", streaming=True))
        first = next(rows)
    except Exception as e:  # offline, unknown id, no train split
        raise UsageError(
            f"data {dataset_id!r} is not a local file and cannot be read from the Hugging Face hub "
            f"({type(e).__name__}); {PREFERENCE_HINT}"
        ) from None
    return chain([first], rows)
