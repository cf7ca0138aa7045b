"""The sparse stage's options (train.py --loss, --train-params): the distillation loss of dsa/distill.py against
a hand computation and an unchunked reference, a frozen teacher, the loss weights, exact resume, which weights
train, and the one-line errors. The tiny preset, shrunk: 128-token windows, k = 16, a few steps."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dsa
import train
import warmup_train
from dsa.distill import distill_losses
from dsa.tiny import ensure_tiny_base
from cli_errors import one_line_error

TINY = ["--preset", "tiny", "--seq-len", "128", "--batch-size", "2", "--topk", "16", "--save-every", "0"]
LORA = ["--train-params", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """The warm-up checkpoint of tests/test_training.py (with fewer steps, some indexers get no gradient)."""
    base = ensure_tiny_base(tmp_path_factory.mktemp("tiny"), ["--max-steps", "30", "--seq-len", "128"])
    out = tmp_path_factory.mktemp("warmup")
    warmup_train.main(TINY + ["--model", str(base), "--output-dir", str(out), "--max-steps", "30"])
    return out


def sparse_flags(warmed: Path, out: Path, *extra: str) -> list[str]:
    return TINY + ["--model", str(warmed), "--output-dir", str(out), "--max-steps", "4", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def changed(before: dict, after: dict) -> set[str]:
    assert set(after) == set(before)
    return {name for name in before if not torch.equal(before[name], after[name])}


# ----------------------------------------------------------------------------- the loss (dsa/distill.py)


def test_distill_loss_by_hand():
    """2 positions, vocabulary 3, T = 2: hidden states are the logits (lm_head = identity)."""
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [0.5, 0.5, -2.0]]
    T = 2.0

    def softmax(row):
        e = [math.exp(x / T) for x in row]
        return [x / sum(e) for x in e]

    kl = sum(
        sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(softmax(ti), softmax(si))) for si, ti in zip(s, t)
    )
    expected_kl = T**2 * kl / 2  # mean over the 2 positions
    expected_lm = -(s[0][2] - math.log(sum(math.exp(x) for x in s[0])))  # position 0 predicts labels[1] = 2 at T = 1

    eye = torch.eye(3)
    distill_kl, lm_loss = distill_losses(torch.tensor([s]), eye, torch.tensor([t]), eye, torch.tensor([[-100, 2]]), T)
    assert distill_kl.item() == pytest.approx(expected_kl, rel=1e-6)
    assert lm_loss.item() == pytest.approx(expected_lm, rel=1e-6)


def test_teacher_equal_to_student_gives_zero():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    kl, _ = distill_losses(hidden, head, hidden.detach().clone(), head.detach().clone(), labels, temperature=1.5, chunk_size=3)
    kl.backward()
    assert kl.item() == 0.0
    for grad in (hidden.grad, head.grad):  # q - p * sum(p): 0 up to the rounding of sum(p) = 1
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 14, 100])  # B * L = 14 positions: 4 and 5 do not divide it
def test_chunked_equals_unchunked(chunk_size):
    torch.manual_seed(0)
    B, L, D, V, T = 2, 7, 8, 11, 2.0
    hidden, head = torch.randn(B, L, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(B, L, D), torch.randn(V, D)
    labels = torch.randint(0, V, (B, L))
    labels[0, :3] = -100

    logits = hidden @ head.T  # the reference: every logit at once
    log_q, log_p = F.log_softmax(logits / T, -1), F.log_softmax(teacher_hidden @ teacher_head.T / T, -1)
    kl = T**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    (kl + lm).backward()
    expected = kl, lm, hidden.grad.clone(), head.grad.clone()
    hidden.grad, head.grad = None, None

    kl, lm = distill_losses(hidden, head, teacher_hidden, teacher_head, labels, T, chunk_size=chunk_size)
    (kl + lm).backward()
    for got, want in zip((kl, lm, hidden.grad, head.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backward_keeps_only_hidden_states():
    """Memory: what autograd saves outside the checkpointed chunks is hidden states and weights, no logits."""
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 7, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    saved = []

    def keep_shape(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep_shape, lambda tensor: tensor):
        teacher_hidden, teacher_head, labels = torch.randn(2, 7, 8), torch.randn(50, 8), torch.randint(0, 50, (2, 7))
        kl, lm = distill_losses(hidden, head, teacher_hidden, teacher_head, labels, chunk_size=4)
    assert saved and all(shape[-1:] != (50,) for shape in saved), saved  # nothing of vocabulary width
    (kl + lm).backward()
    assert hidden.grad is not None and head.grad is not None


def test_lm_loss_is_the_models_own(warmed):
    model = AutoModelForCausalLM.from_pretrained(warmed).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    labels = ids.clone()
    labels[:, :10] = -100
    out = model(input_ids=ids, labels=labels, use_cache=False, output_hidden_states=True)
    hidden, head = out.hidden_states[-1], model.lm_head.weight
    _, lm = distill_losses(hidden, head, hidden.detach(), head.detach(), labels, chunk_size=16)
    torch.testing.assert_close(lm, out.loss)


# ----------------------------------------------------------------------------- training with the teacher


def test_teacher_is_frozen(warmed, tmp_path, monkeypatch):
    loaded = {}

    def keep_teacher(name):
        teacher = load_teacher(name)
        loaded.update(teacher=teacher, at_load={k: v.clone() for k, v in teacher.state_dict().items()})
        return teacher

    load_teacher = train.load_teacher
    monkeypatch.setattr(train, "load_teacher", keep_teacher)
    student = train.main(sparse_flags(warmed, tmp_path, "--loss", "distill", "--max-steps", "3"))
    teacher, at_load = loaded["teacher"], loaded["at_load"]
    assert not teacher.training and {layer.self_attn.mode for layer in teacher.model.layers} == {"dense"}
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, at_load[name]), name
    assert changed(at_load, student.state_dict())  # the student did learn
    rows = metrics(tmp_path)
    assert {"loss", "lm_loss", "distill_kl", "kl"} <= set(rows[0])
    for row in rows:  # --loss distill: the LM loss is logged, not trained on
        assert row["loss"] == pytest.approx(row["distill_kl"] + row["kl"], rel=1e-6)


def test_lm_plus_distill_weights(warmed, tmp_path):
    train.main(sparse_flags(warmed, tmp_path, "--loss", "lm+distill", "--lm-weight", "0.7", "--distill-weight", "0.2",
                            "--distill-temperature", "2", "--max-steps", "2"))
    for row in metrics(tmp_path):
        assert row["distill_kl"] > 0
        assert row["loss"] == pytest.approx(0.7 * row["lm_loss"] + 0.2 * row["distill_kl"] + row["kl"], rel=1e-6)


# ----------------------------------------------------------------------------- exact resume


def uninterrupted(warmed: Path, out: Path, *recipe: str) -> tuple[list[str], Path]:
    """(flags, output of an uninterrupted 4-step run with a checkpoint every 2 steps)."""
    flags = ["--save-every", "2", *recipe]
    train.main(sparse_flags(warmed, out, *flags))
    return flags, out


@pytest.fixture(scope="module")
def distill_run(warmed, tmp_path_factory):
    return uninterrupted(warmed, tmp_path_factory.mktemp("distill"), "--loss", "distill")


@pytest.fixture(scope="module")
def lora_run(warmed, tmp_path_factory):
    return uninterrupted(warmed, tmp_path_factory.mktemp("lora"), *LORA)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("recipe", ["distill_run", "lora_run"])
def test_stopped_run_resumes_to_the_same_weights(warmed, recipe, request, tmp_path, monkeypatch):
    flags, reference = request.getfixturevalue(recipe)
    calls = 0

    def stop_at_fourth(original):
        def loss_fn(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 4:  # step 3 is done and logged, the checkpoint is from step 2
                raise Interrupted
            return original(*args, **kwargs)

        return loss_fn

    monkeypatch.setattr(train, "sparse_loss", stop_at_fourth(train.sparse_loss))
    monkeypatch.setattr(train, "distill_loss", stop_at_fourth(train.distill_loss))
    with pytest.raises(Interrupted):
        train.main(sparse_flags(warmed, tmp_path, *flags))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3]

    monkeypatch.undo()
    train.main(sparse_flags(warmed, tmp_path, *flags, "--resume"))
    assert changed(weights(reference), weights(tmp_path)) == set()
    assert [row["loss"] for row in metrics(tmp_path)] == [row["loss"] for row in metrics(reference)]


@pytest.mark.parametrize("recipe", ["distill_run", "lora_run"])
def test_gradient_checkpointing_reaches_the_same_weights(warmed, recipe, request, tmp_path):
    """--gradient-checkpointing recomputes activations in the backward; the run (LoRA through peft included) must end
    where the run without it ends."""
    flags, reference = request.getfixturevalue(recipe)
    train.main(sparse_flags(warmed, tmp_path, *flags, "--gradient-checkpointing"))
    expected, got = weights(reference), weights(tmp_path)
    assert got.keys() == expected.keys() and changed(weights(warmed), got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- which weights train


def test_attention_trains_only_attention_and_indexers(warmed, tmp_path):
    train.main(sparse_flags(warmed, tmp_path, "--train-params", "attention", "--max-steps", "2"))
    before = weights(warmed)
    attention = {name for name in before if ".indexer." in name or name.split(".")[-2] in train.ATTENTION}
    assert any(".q_proj.bias" in name for name in attention)
    assert changed(before, weights(tmp_path)) == attention


def test_lora_output_is_a_plain_checkpoint(warmed, lora_run):
    out = lora_run[1]
    before, after = weights(warmed), weights(out)
    targets = {name for name in before if ".indexer." not in name and name.split(".")[-2] in train.LORA_TARGETS
               and name.endswith(".weight")}
    assert changed(before, after) - {name for name in before if ".indexer." in name} == targets  # not the biases
    assert {name for name in before if ".indexer." in name} <= changed(before, after)
    assert not (out / "adapter_config.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is dsa.Qwen2DSAForCausalLM and model.model.layers[0].self_attn.mode == "sparse"
    for name, tensor in model.state_dict().items():
        if name in after:
            assert torch.equal(tensor, after[name]), name
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    assert torch.isfinite(model(input_ids=ids).logits).all()


# ----------------------------------------------------------------------------- bad flags


def test_bad_flags_give_one_line_errors(tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    assert "--lm-weight must be >= 0, got -1.0" in one_line_error(train.main, out + ["--lm-weight", "-1"], capsys)
    assert "--distill-weight must be >= 0, got -0.5" in one_line_error(train.main, out + ["--distill-weight", "-0.5"], capsys)
    assert "--distill-temperature must be > 0, got 0.0" in one_line_error(train.main, out + ["--distill-temperature", "0"], capsys)
    assert "--lora-rank must be >= 1, got 0" in one_line_error(train.main, out + ["--lora-rank", "0"], capsys)
    assert "--lora-alpha must be >= 1, got -2" in one_line_error(train.main, out + ["--lora-alpha", "-2"], capsys)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert "--train-params lora needs peft" in one_line_error(train.main, out + ["--train-params", "lora"], capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        train.main(out + ["--loss", "kl"])
    assert exit_info.value.code == 2 and "invalid choice: 'kl'" in capsys.readouterr().err
