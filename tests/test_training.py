"""The training stages on the tiny preset (shrunk: 128-token windows, k = 16, a few steps)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa
import train
import warmup_train
from dsa.presets import TINY_DATA
from dsa.tiny import ensure_tiny_base
from dsa.train_utils import cli
from cli_errors import one_line_error

REPO = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--seq-len", "128", "--batch-size", "2", "--topk", "16", "--save-every", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return ensure_tiny_base(tmp_path_factory.mktemp("tiny"), ["--max-steps", "30", "--seq-len", "128"])


@pytest.fixture(scope="module")
def warmed(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("warmup")
    warmup_train.main(TINY + ["--model", str(base), "--output-dir", str(out), "--max-steps", "30"])
    return out


@pytest.fixture(scope="module")
def sparse_run(warmed, tmp_path_factory):
    """Six uninterrupted sparse-stage steps, checkpoint every 3 (the reference of the resume test)."""
    out = tmp_path_factory.mktemp("sparse")
    train.main(sparse_flags(warmed) + ["--output-dir", str(out)])
    return out


def sparse_flags(warmed: Path) -> list[str]:
    return TINY + ["--model", str(warmed), "--max-steps", "6", "--save-every", "3"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_tiny_base_is_cached_and_speaks_chatml(base):
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_base(base.parent) == base
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and tokenizer.eos_token == "<|im_end|>"
    assert type(AutoModelForCausalLM.from_pretrained(base)).__name__ == "Qwen2ForCausalLM"


def test_warmup_changes_only_indexer_weights(base, warmed):
    before, after = weights(base), weights(warmed)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    set_seed(0)  # the warm-up's seed: rebuilds its initial indexers
    initial = dsa.add_indexers(AutoModelForCausalLM.from_pretrained(base), dsa.DSAConfig(2, 32, 16, 16)).state_dict()
    indexer = [name for name in after if ".indexer." in name]
    assert len(indexer) == 4 * 5  # 4 layers x (wq, wk, k_norm weight and bias, weights_proj)
    extra = set(after) - set(before) - set(indexer)
    assert extra <= {"lm_head.weight"}  # a tied head may be written out too: then it must equal the embedding
    for name in extra:
        assert torch.equal(after[name], before["model.embed_tokens.weight"])
    for name in indexer:
        if name.endswith(("wq.weight", "wk.weight", "weights_proj.weight")):
            assert not torch.equal(after[name], initial[name]), name


def test_warmup_kl_falls(warmed):
    rows = metrics(warmed)
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert {"loss", "kl", "lr", "tokens_per_s"} <= set(rows[0])
    first = sum(row["kl"] for row in rows[:5]) / 5
    last = sum(row["kl"] for row in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_warmup_with_the_max_head_target(base, warmed, tmp_path):
    """--target-heads max: the same indexers and first batch as the default run, another target (another first KL);
    the flag is recorded and only indexer weights change."""
    warmup_train.main(TINY + ["--model", str(base), "--output-dir", str(tmp_path), "--max-steps", "2", "--target-heads", "max"])
    first = metrics(tmp_path)[0]["kl"]
    assert abs(first - metrics(warmed)[0]["kl"]) > 1e-4 * first
    assert json.loads((tmp_path / "args.json").read_text())["target_heads"] == "max"
    for name, tensor in weights(base).items():
        assert torch.equal(weights(tmp_path)[name], tensor), name


def test_warmup_continues_from_a_warmup_checkpoint_with_retrieval_windows(warmed, tmp_path):
    """A DSA checkpoint as --model: its indexers train on (here, longer) windows, half of them synthetic retrieval
    windows; the base stays bit-identical and the new k is recorded."""
    warmup_train.main(TINY + ["--model", str(warmed), "--output-dir", str(tmp_path), "--max-steps", "3", "--seq-len", "256",
                              "--topk", "32", "--retrieval-share", "0.5", "--retrieval-pairs", "2"])
    before, after = weights(warmed), weights(tmp_path)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != (".indexer." in name), name
    assert json.loads((tmp_path / "config.json").read_text())["index_topk"] == 32


def test_a_continued_warmup_keeps_its_checkpoints_indexer_sizes(base, tmp_path):
    """A warm-up checkpoint with non-default indexer sizes continues without repeating the size flags (no preset:
    the stage defaults do not override the checkpoint's sizes); only its indexers train."""
    first, second = tmp_path / "first", tmp_path / "second"
    warmup_train.main(TINY + ["--model", str(base), "--output-dir", str(first), "--max-steps", "2",
                              "--index-n-heads", "3", "--index-head-dim", "16", "--index-rope-dim", "8"])
    warmup_train.main(["--model", str(first), "--data", TINY_DATA, "--output-dir", str(second), "--max-steps", "2",
                       "--seq-len", "128", "--batch-size", "2", "--grad-accum", "1", "--topk", "16", "--save-every", "0"])
    config = json.loads((second / "config.json").read_text())
    assert (config["index_n_heads"], config["index_head_dim"], config["index_rope_dim"]) == (3, 16, 8)
    before, after = weights(first), weights(second)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != (".indexer." in name), name


@pytest.mark.parametrize("script", [warmup_train, train])
def test_retrieval_weight_changes_the_indexer_loss_of_the_same_windows(script, warmed, tmp_path):
    """--retrieval-weight 20: the same windows (all synthetic here), the questions' rows weigh 20x in the indexer KL,
    so the first step's KL differs from the unweighted run's while its LM loss (sparse stage) does not."""
    flags = TINY + ["--model", str(warmed), "--max-steps", "1", "--seq-len", "256", "--retrieval-share", "1", "--retrieval-pairs", "2"]
    script.main(flags + ["--output-dir", str(tmp_path / "plain")])
    script.main(flags + ["--output-dir", str(tmp_path / "weighted"), "--retrieval-weight", "20"])
    plain, weighted = metrics(tmp_path / "plain")[0], metrics(tmp_path / "weighted")[0]
    assert abs(weighted["kl"] - plain["kl"]) > 1e-3 * plain["kl"]
    if script is train:
        assert weighted["lm_loss"] == plain["lm_loss"]
    assert json.loads((tmp_path / "weighted" / "args.json").read_text())["retrieval_weight"] == 20


def test_dense_control_trains_the_base_with_stock_attention_and_leaves_the_indexers(warmed, sparse_run, tmp_path):
    """--attention dense: the same stage and batches with the stock attention; the indexers neither run (kl 0) nor
    change, every base weight trains, and the first LM loss (same weights, same batch) is the dense model's, not
    the sparse run's."""
    train.main(TINY + ["--model", str(warmed), "--output-dir", str(tmp_path), "--max-steps", "2", "--attention", "dense"])
    before, after = weights(warmed), weights(tmp_path)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) == (".indexer." in name), name
    rows, sparse_rows = metrics(tmp_path), metrics(sparse_run)
    assert [row["kl"] for row in rows] == [0.0, 0.0]
    assert abs(rows[0]["lm_loss"] - sparse_rows[0]["lm_loss"]) > 1e-4
    assert json.loads((tmp_path / "args.json").read_text())["attention"] == "dense"


def test_sparse_stage_trains_base_and_indexers(warmed, sparse_run):
    before, after = weights(warmed), weights(sparse_run)
    assert any(".indexer." in name for name in after) and set(after) <= set(before)
    unchanged = [name for name in after if torch.equal(before[name], after[name])]
    assert unchanged == []
    rows = metrics(sparse_run)
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert {"lm_loss", "kl", "lr", "lr_indexer"} <= set(rows[-1])
    assert rows[-1]["lr_indexer"] > rows[-1]["lr"] > 0
    config = json.loads((sparse_run / "config.json").read_text())
    assert config["model_type"] == "qwen2_dsa" and config["index_topk"] == 16


KILL_AT_FIFTH_STEP = """
import os, signal, sys
import train
calls, original = 0, train.sparse_loss
def loss_then_kill(model, batch):
    global calls
    calls += 1
    if calls == 5:  # step 4 is done and logged, the checkpoint is from step 3
        os.kill(os.getpid(), signal.SIGKILL)
    return original(model, batch)
train.sparse_loss = loss_then_kill
train.main(sys.argv[1:])
"""


def test_killed_run_resumes_to_the_same_weights(warmed, sparse_run, tmp_path):
    flags = sparse_flags(warmed) + ["--output-dir", str(tmp_path)]
    same_threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as the in-process reference run
    killed = subprocess.run([sys.executable, "-c", KILL_AT_FIFTH_STEP, *flags], cwd=REPO, capture_output=True, text=True,
                            env=same_threads)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-3"]
    assert not (tmp_path / "model.safetensors").exists()
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3, 4]

    train.main(flags + ["--resume"])
    reference, resumed = weights(sparse_run), weights(tmp_path)
    assert set(resumed) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    assert [row["loss"] for row in metrics(tmp_path)] == [row["loss"] for row in metrics(sparse_run)]


def test_failed_checkpoint_write_is_one_line_and_resumes(warmed, sparse_run, tmp_path, capsys, monkeypatch):
    """A full disk at the step-6 checkpoint: one line naming it and the step-3 checkpoint, no half-written step-6
    taken for complete; after --resume the run ends where the uninterrupted one does."""
    flags = sparse_flags(warmed) + ["--output-dir", str(tmp_path)]
    save_state = Accelerator.save_state

    def disk_full_at_step_6(self, output_dir=None, **kwargs):
        if output_dir.endswith("tmp-step-6"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            raise OSError(28, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_at_step_6)
    with pytest.raises(SystemExit) as exit_info:
        cli(lambda: train.main(flags))
    stderr = capsys.readouterr().err  # the progress bar, then the error line
    err = stderr.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "Traceback" not in stderr and err.startswith("error: cannot write ")
    assert "tmp-step-6: [Errno 28] No space left on device" in err and err.endswith("step-3 (--resume continues from it)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "tmp-step-6"]
    assert not (tmp_path / "model.safetensors").exists()

    monkeypatch.undo()
    train.main(flags + ["--resume"])
    reference, resumed = weights(sparse_run), weights(tmp_path)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_kept_checkpoints_load_as_models(warmed, tmp_path):
    """--keep-checkpoints 0 keeps every checkpoint, each loadable by the Auto classes; the last equals the final model."""
    flags = sparse_flags(warmed) + ["--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "0"]
    train.main(flags + ["--output-dir", str(tmp_path)])
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step-2", "step-4"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    last = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-4")
    assert type(last).__name__ == "Qwen2DSAForCausalLM"
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, final[name]), name
    middle = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-2").state_dict()
    assert any(not torch.equal(middle[name], final[name]) for name in final)
    assert AutoTokenizer.from_pretrained(tmp_path / "checkpoints" / "step-2").eos_token == "<|im_end|>"


RANK_WEIGHTS = """
import sys
import torch
from accelerate import PartialState
import train
model = train.main(sys.argv[2:])
state = PartialState()
assert state.num_processes == 2, state
torch.save(model.state_dict(), f"{sys.argv[1]}/rank{state.process_index}.pt")
"""


def test_two_cpu_processes_end_with_equal_weights(warmed, tmp_path):
    """DDP over gloo with 2 CPU ranks. `accelerate launch --cpu` always starts one process (accelerate 1.x:
    multi-CPU needs mpirun), so the ranks are started by torchrun, the launcher `accelerate launch --multi_gpu`
    uses, with ACCELERATE_USE_CPU=1 (what --cpu sets)."""
    script = tmp_path / "rank_weights.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + RANK_WEIGHTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(port)]
    flags = TINY + ["--model", str(warmed), "--output-dir", str(tmp_path / "out"), "--max-steps", "2"]
    done = subprocess.run([*launch, str(script), str(tmp_path), *flags], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    start, saved = weights(warmed), weights(tmp_path / "out")
    assert set(rank0) == set(rank1)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    for name, tensor in saved.items():
        assert torch.equal(tensor, rank0[name]), name
    assert any(not torch.equal(start[name], saved[name]) for name in saved)
    rows = metrics(tmp_path / "out")
    assert [row["step"] for row in rows] == [1, 2]


def test_bad_input_gives_one_line_errors(base, warmed, tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    assert "missing.jsonl" in one_line_error(warmup_train.main, TINY + out + ["--model", str(base), "--data", "missing.jsonl"], capsys)
    assert "--topk must be >= 1, got 0" in one_line_error(warmup_train.main, out + ["--topk", "0"], capsys)
    assert "--topk must be >= 1, got -3" in one_line_error(train.main, out + ["--topk", "-3"], capsys)
    assert "--keep-checkpoints must be >= 0, got -1" in one_line_error(train.main, out + ["--keep-checkpoints", "-1"], capsys)
    assert "--retrieval-share must be in [0, 1], got 2.0" in one_line_error(warmup_train.main, out + ["--retrieval-share", "2"], capsys)
    err = one_line_error(train.main, out + ["--attention", "dense", "--loss", "distill"], capsys)
    assert "--attention dense --loss distill trains nothing" in err
    assert "--retrieval-weight must be finite and >= 1, got 0.5" in one_line_error(train.main, out + ["--retrieval-weight", "0.5"], capsys)
    assert "--retrieval-weight must be finite and >= 1, got inf" in one_line_error(train.main, out + ["--retrieval-weight", "inf"], capsys)
    err = one_line_error(warmup_train.main, out + ["--retrieval-weight", "20"], capsys)
    assert "--retrieval-weight 20.0" in err and "needs --retrieval-share > 0" in err
    err = one_line_error(warmup_train.main, TINY + out + ["--model", str(warmed), "--index-n-heads", "3"], capsys)
    assert "--index-n-heads 3 differs from" in err and "index_n_heads = 2" in err
    err = one_line_error(warmup_train.main, TINY + out + ["--model", str(base), "--index-head-dim", "8"], capsys)
    assert "index_rope_dim=16 must be <= index_head_dim=8" in err
    err = one_line_error(train.main, TINY + out + ["--model", str(base)], capsys)
    assert "'qwen2' checkpoint, not '<family>_dsa': run warmup_train.py first" in err
    monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
    err = one_line_error(warmup_train.main, TINY + out + ["--model", "no-such-org/no-such-model"], capsys)
    assert "no-such-org/no-such-model" in err and "--model PATH" in err and "--preset tiny" in err


def test_script_exits_without_traceback_on_missing_model(tmp_path):
    missing = tmp_path / "no_model_here"
    done = subprocess.run([sys.executable, "warmup_train.py", "--preset", "tiny", "--model", str(missing)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: model not found: {missing} (not a directory)"]
