"""Standard benchmarks through lm-evaluation-harness (lm-eval), on DSA models.

Two ways in:

- In process, on a model object already loaded (compare.py --lm-eval): `LmEvalSuite(tasks, lengths, tokenizer,
  limit).evaluate(model)` runs every task at every length on the model as it is set up (dsa.set_mode / set_topk /
  set_selection are the caller's, e.g. dsa.evaluation.Variant.activate()), through lm-eval's HFLM wrapper, and
  returns per task and length the per-sample scores and their figure (dsa.stats).
- The lm-eval command line with `dsa` imported first (`python -m dsa.lm_eval ARGS`), so that DSA checkpoints
  load, plus the model type "hf-dsa": HFLM with the model arguments dsa_mode (dense / sparse / warmup),
  dsa_topk and dsa_selection (indexer / oracle) applied after loading:

      python -m dsa.lm_eval run --model hf-dsa --model_args pretrained=CKPT,dsa_mode=sparse,dsa_topk=128 \\
          --tasks niah_single_1 --metadata '{"max_seq_lengths": [4096]}' --limit 20 --batch_size 1

How the in-process runs are done:

- One lm-eval evaluation per (task, length): RULER concatenates the samples of every length in
  `max_seq_lengths`, so `limit` would otherwise take the first length only. RULER's generator gets the length
  through the task metadata `max_seq_lengths` = [L] and sizes its prompts with the model's own tokenizer
  (saved to a temporary directory: RULER loads a tokenizer by path). The tasks are loaded once per length,
  with Python's and numpy's RNG seeded first, and the same samples serve every model evaluated.
- HFLM gets max_length = L + PROMPT_SLACK: RULER's length L counts the prompt without its answer prefix ("The
  special magic number for ... is") plus the 128 generated tokens, so at max_length = L lm-eval would cut the
  start of some prompts. batch size 1 (no padding), greedy decoding (the tasks' do_sample=false; the model's
  own generation config is replaced for the run by a plain one, so no repetition penalty or sampling defaults
  apply).
- A score per sample: RULER's string-match score at L (the fraction of the reference answers found in the
  output), for another task its first metric. The figure of a (task, length) is stats.wilson_interval when
  every sample scores 0 or 1 with a single reference (niah_single_*, niah_multikey_*), else stats.mean_interval
  (t interval) of the per-sample scores (ruler_vt, ruler_cwe, niah_multivalue: fractional recall).
- A task that cannot be loaded (it needs a download and there is no network: the essay haystacks of
  niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery; the QA sets ruler_qa_squad/hotpot;
  LongBench; or a length too short for its prompt) is one line on stderr naming the task and what it could
  not fetch, is recorded in `failed`, and the other tasks go on. When the Hugging Face Hub's host does not
  resolve, the task data loads in Hub offline mode, so such a task fails at once rather than after a minute
  of retries (set HF_HUB_OFFLINE=1 to force it).
- lm-eval's own logging, progress bars and warnings are silenced while it runs.
"""

import contextlib
import copy
import io
import logging
import os
import random
import socket
import sys
import tempfile
import urllib.error
from urllib.parse import urlparse

import numpy as np
import transformers
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from transformers import GenerationConfig

from .modeling import DSAModel, set_mode, set_selection, set_topk
from .stats import mean_interval, wilson_interval

PROMPT_SLACK = 256  # tokens of context allowed beyond the task length L (RULER's answer prefix is not in L)
SEED = 0

# ---------------------------------------------------------------------------------------------------
# Failures to fetch task data
# ---------------------------------------------------------------------------------------------------


def network_errors() -> tuple[type, ...]:
    """Exception types that mean a download failed (no network, host unknown, Hub offline mode)."""
    types = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
    with contextlib.suppress(ImportError):
        import requests

        types.append(requests.exceptions.RequestException)
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        types += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    return tuple(types)


def exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def failure_message(exc: BaseException) -> str:
    """One line saying why a task could not be loaded: what it could not fetch (the URL, or the Hub's message
    naming the dataset) for a download failure, else the exception."""
    download = next((e for e in exception_chain(exc) if isinstance(e, network_errors())), None)
    if download is None:
        return f"could not be loaded: {type(exc).__name__}: {first_line(exc)}"
    url = getattr(getattr(download, "request", None), "url", None)
    if url:
        return f"needs a download and could not fetch {url} ({type(download).__name__})"
    return f"needs a download and could not fetch it: {first_line(download)}"


def hub_unreachable() -> bool:
    """Whether the Hugging Face Hub's host (HF_ENDPOINT) does not resolve: then there is no network to wait for."""
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        socket.getaddrinfo(host, 443)
        return False
    except OSError:
        return True


@contextlib.contextmanager
def hub_offline(enabled: bool):
    """Hugging Face Hub offline mode (as HF_HUB_OFFLINE=1) for the block, when enabled: a dataset download then
    raises at once instead of retrying for about a minute."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


# ---------------------------------------------------------------------------------------------------
# Quiet, greedy runs
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
    """Silence lm-eval while it runs: its logging, progress bars, prints and warnings (stdout and stderr are
    captured; on an exception the captured text is written to stderr before the exception propagates)."""
    captured = io.StringIO()
    lm_logger = logging.getLogger("lm_eval")
    level, hf_level = lm_logger.level, transformers.logging.get_verbosity()
    lm_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue()[-4000:])
        raise
    finally:
        lm_logger.setLevel(level)
        transformers.logging.set_verbosity(hf_level)


@contextlib.contextmanager
def plain_generation_config(model):
    """The model's generation config replaced, for the block, by one with its special tokens only: greedy
    decoding as the tasks ask (do_sample=false), without a checkpoint's sampling or repetition-penalty defaults."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id, do_sample=False
    )
    try:
        yield
    finally:
        model.generation_config = saved


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------


def sample_scores(samples: list[dict], length: int) -> tuple[list[float], bool]:
    """Per-sample scores of one evaluation (lm-eval's logged samples of one task) and whether they are 0/1
    outcomes. RULER samples carry their score under the length ("1024"); other tasks' under their first metric.
    Samples of a second output filter repeat the documents and are left out."""
    if not samples:
        return [], True
    first_filter = samples[0].get("filter")
    samples = [s for s in samples if s.get("filter") == first_filter]
    metric = str(length) if str(length) in samples[0] else samples[0]["metrics"][0]
    scores = [float(s[metric]) for s in samples]
    references = [s["doc"]["outputs"] for s in samples if isinstance(s.get("doc"), dict) and isinstance(s["doc"].get("outputs"), list)]
    single_reference = all(len(outputs) == 1 for outputs in references)
    binary = single_reference and all(x in (0.0, 1.0) for x in scores)
    return scores, binary


def score_figure(scores: list[float], binary: bool) -> dict | None:
    """The figure of per-sample scores: Wilson interval for 0/1 outcomes, else the t interval of the mean."""
    if not scores:
        return None
    return wilson_interval(int(sum(scores)), len(scores)) if binary else mean_interval(scores)


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------

_INDEX = None  # one TaskManager per process: building its index scans every task YAML (~10 s)


def task_index():
    global _INDEX
    if _INDEX is None:
        from lm_eval.tasks import TaskManager

        with quiet():
            _INDEX = TaskManager()
    return _INDEX


def check_tasks(tasks: list[str]) -> list[str]:
    """The names in tasks that are not single lm-eval tasks (unknown names, groups and tags), with a reason each."""
    from lm_eval.tasks._index import Kind

    index = task_index().task_index
    problems = []
    for name in tasks:
        entry = index.get(name)
        if entry is None:
            problems.append(f"{name!r} is not an lm-eval task (`lm-eval ls tasks` lists them)")
        elif entry.kind not in (Kind.TASK, Kind.PY_TASK):
            problems.append(f"{name!r} is a {entry.kind.name.lower()} of lm-eval tasks: name its tasks one by one")
    return problems


def task_manager(metadata: dict):
    """A TaskManager passing `metadata` to the tasks it loads, sharing the index of task_index()."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    index = task_index()
    if not hasattr(index, "_factory"):  # another lm-eval layout: build a manager of its own
        with quiet():
            return TaskManager(metadata=metadata)
    manager = copy.copy(index)
    manager.metadata = metadata
    manager._factory = TaskFactory(meta=metadata)
    return manager


def is_ruler(name: str) -> bool:
    entry = task_index().task_index.get(name)
    return entry is not None and entry.yaml_path is not None and "ruler" in entry.yaml_path.parts


class LmEvalSuite:
    """lm-eval tasks at context lengths, evaluated on one model after another (the sides of a comparison).

    tasks: lm-eval task names; lengths: context lengths in tokens (RULER's max_seq_lengths, one at a time);
    tokenizer: the models' tokenizer (saved to a temporary directory for RULER's data generator); limit: samples
    per (task, length), the first `limit` of the task's documents; max_gen_toks: a cap on the tokens generated
    per sample (None: the task's own, 128 for RULER; a RULER answer needs far fewer, so a CPU run may lower it);
    log: prints the one line of a failed task.
    `failed` maps a task that could not be loaded to its message (the first failure; later lengths are skipped
    after a download failure).
    """

    def __init__(self, tasks: list[str], lengths: list[int], tokenizer, limit: int, max_gen_toks: int | None = None, seed: int = SEED, log=None):
        self.tasks, self.lengths, self.tokenizer, self.limit, self.seed = list(tasks), list(lengths), tokenizer, limit, seed
        self.max_gen_toks = max_gen_toks
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.failed: dict[str, str] = {}
        self._loaded: dict[tuple[str, int], object] = {}  # (task, length) -> Task, or None when it failed
        self._gave_up: set[str] = set()  # tasks that failed to download: not tried again
        self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="dsa-lm-eval-tokenizer-")
        tokenizer.save_pretrained(self._tokenizer_dir.name)
        self._offline = None

    def units(self) -> int:
        """lm-eval evaluations per model: one per (task, length)."""
        return len(self.tasks) * len(self.lengths)

    def task(self, name: str, length: int):
        """The Task `name` with its documents at `length` (loaded once), or None when it cannot be loaded."""
        key = (name, length)
        if key in self._loaded:
            return self._loaded[key]
        if name in self._gave_up:
            self._loaded[key] = None
            return None
        if self._offline is None:
            self._offline = hub_unreachable()
        metadata = {"tokenizer": self._tokenizer_dir.name, "max_seq_lengths": [length]}
        try:
            with quiet(), hub_offline(self._offline):
                if is_ruler(name):
                    import lm_eval.tasks.ruler.prepare_niah  # noqa: F401  (imported quietly: it prints about nltk's punkt_tab)
                random.seed(self.seed)
                np.random.seed(self.seed)
                task = task_manager(metadata).load([name])["tasks"][name]
        except Exception as e:  # noqa: BLE001 - one task failing must not stop the others
            message = failure_message(e)
            if "needs a download" in message:
                self._gave_up.add(name)
            else:
                message += f" (at length {length})"
            if name not in self.failed:
                self.failed[name] = message
                self.log(f"lm-eval: task {name} skipped: {message}")
            task = None
        self._loaded[key] = task
        return task

    def evaluate(self, model, step=None) -> dict[str, list[dict | None]]:
        """Every task at every length on `model` as it is set up (mode, k, selection: the caller's).

        Returns {task: [result or None per length]}, None where the task could not be loaded, else
        {"figure": score_figure(...), "scores": [one per sample, in document order]}: the same documents for
        every model, so two models' scores pair up sample by sample. step(label): called after each (task,
        length), or None."""
        results = {}
        for name in self.tasks:
            per_length = []
            for length in self.lengths:
                task = self.task(name, length)
                per_length.append(None if task is None else self._run(model, name, task, length))
                if step is not None:
                    step(f"{name} L={length}")
            results[name] = per_length
        return results

    def _run(self, model, name: str, task, length: int) -> dict:
        import lm_eval

        gen_kwargs = {"max_gen_toks": self.max_gen_toks} if self.max_gen_toks else None
        with quiet(), plain_generation_config(model):
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=1, max_length=length + PROMPT_SLACK, backend="causal")
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=task_manager({}),
                limit=self.limit,
                gen_kwargs=gen_kwargs,
                log_samples=True,
                bootstrap_iters=0,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        scores, binary = sample_scores(out["samples"][name], length)
        return {"figure": score_figure(scores, binary), "scores": scores}

    def close(self):
        self._tokenizer_dir.cleanup()


# ---------------------------------------------------------------------------------------------------
# The lm-eval command line with dsa: `python -m dsa.lm_eval run --model hf-dsa --model_args ...`
# ---------------------------------------------------------------------------------------------------


class DSAHFLM(HFLM):
    """lm-eval's "hf" model (HFLM) on a DSA checkpoint, set up by three more model arguments:
    dsa_mode (dense, sparse or warmup; default: as saved, sparse), dsa_topk (k; default: the checkpoint's) and
    dsa_selection (indexer or oracle; default indexer). Registered as "hf-dsa"."""

    def __init__(self, pretrained, dsa_mode: str | None = None, dsa_topk: int | None = None, dsa_selection: str | None = None, **kwargs):
        kwargs.setdefault("backend", "causal")  # the <family>_dsa types are not in transformers' causal-LM name mapping
        super().__init__(pretrained=pretrained, **kwargs)
        model = self.model
        if not isinstance(model, DSAModel):
            if dsa_mode not in (None, "dense") or dsa_topk is not None or dsa_selection is not None:
                raise ValueError(f"{pretrained} is not a DSA checkpoint ({type(model).__name__}): dsa_mode=dense at most")
            return
        if dsa_mode is not None:
            set_mode(model, dsa_mode)
        if dsa_topk is not None:
            set_topk(model, int(dsa_topk))
        if dsa_selection is not None:
            set_selection(model, dsa_selection)


# A placeholder resolved on use: `python -m dsa.lm_eval` runs this file as __main__ and again as dsa.lm_eval.
model_registry.register("hf-dsa", target="dsa.lm_eval:DSAHFLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`lm-eval run ...`, `lm-eval ls tasks`, ...) with dsa imported, so DSA checkpoints
    load with --model hf (as saved) or --model hf-dsa (with dsa_mode / dsa_topk / dsa_selection)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_evaluate()


if __name__ == "__main__":
    from dsa.lm_eval import main as _main  # the module proper (this file runs as __main__)

    _main()
