"""DPO (dsa/dpo.py): the loss and log-probs against independent computations, reply-only labels,
truncation, malformed rows, the frozen reference, and learning on the bundled COIG-P-format samples."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import dsa
from dsa.errors import UsageError
from dsa.presets import SAMPLES_DIR
from dsa.dpo import IGNORE, DPOLoss, PreferencePairs, collate, dpo_loss, parse_row, read_rows, sequence_logps, tokenize_pair
from tiny_models import tiny_dsa, tiny_qwen2

SAMPLES = SAMPLES_DIR / "coig_p_sample.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level tokenizer over the bundled samples' characters, with a ChatML template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(SAMPLES.read_text(encoding="utf-8")) | set("abcdefghijklmnopqrstuvwxyz0123456789 \n"))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=specials[:3],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def sample_pairs(tokenizer, n: int | None, max_length: int = 256) -> list[dict]:
    rows = [parse_row(row) for row in read_rows(str(SAMPLES))]
    return [tokenize_pair(tokenizer, *row, max_length) for row in rows[:n]]


# ---------------------------------------------------------------------------------------------------
# The loss and the log-probs
# ---------------------------------------------------------------------------------------------------


def test_dpo_loss_matches_hand_computation():
    pc, pr = [-3.0, -10.0, -4.5], [-5.0, -9.0, -4.0]
    rc, rr = [-4.0, -9.5, -4.5], [-4.0, -9.5, -6.0]
    beta = 0.5
    margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(3)]  # 1.5, -0.75, -1.25
    expected = sum(math.log(1 + math.exp(-m)) for m in margins) / 3
    t = lambda xs: torch.tensor(xs, requires_grad=True)  # noqa: E731
    loss, metrics = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["reward_accuracy"] == pytest.approx(1 / 3)
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 3)
    assert metrics["chosen_reward"] == pytest.approx(beta * sum(pc[i] - rc[i] for i in range(3)) / 3)
    assert metrics["rejected_reward"] == pytest.approx(beta * sum(pr[i] - rr[i] for i in range(3)) / 3)


def test_dpo_loss_gradient_never_reaches_reference():
    ref_c, ref_r = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    pol_c, pol_r = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, 0.1)
    loss.backward()
    assert ref_c.grad is None and ref_r.grad is None
    # d/d pi_c of -log sigmoid(beta * m) at m = 0: -beta / 2
    assert pol_c.grad.item() == pytest.approx(-0.05) and pol_r.grad.item() == pytest.approx(0.05)


def test_sequence_logps_sums_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, IGNORE], [IGNORE, 6, 0, 2, 5]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 5):
            if labels[b, t] != IGNORE:
                total += torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
        expected.append(total)
    assert torch.allclose(sequence_logps(logits, labels), torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "dsa"])
def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tokenizer, kind):
    model = tiny_qwen2(len(tokenizer)) if kind == "dense" else tiny_dsa(tiny_qwen2(len(tokenizer)), topk=4)
    batch = collate(sample_pairs(tokenizer, 4), tokenizer.pad_token_id)
    loss, metrics = DPOLoss(copy.deepcopy(model), beta=0.1, train_indexer=False)(model.train(), batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-6)
    if kind == "dsa":  # sequences are longer than k: sparse attention is on, and its indexer loss is logged
        assert batch["chosen_attention_mask"].sum(-1).min() > 4 and metrics["indexer_kl"] > 0


# ---------------------------------------------------------------------------------------------------
# Data: labels, truncation, malformed rows, sources
# ---------------------------------------------------------------------------------------------------


def test_labels_only_on_reply_tokens(tokenizer):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "why?"}]
    pair = tokenize_pair(tokenizer, messages, "because.", "no", max_length=512)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for name, reply in (("chosen", "because."), ("rejected", "no")):
        ids, labels = pair[f"{name}_input_ids"], pair[f"{name}_labels"]
        assert len(ids) == len(labels)
        assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(ids[:n_prompt]) == prompt
        assert tokenizer.decode(ids[n_prompt:]) == reply + "<|im_end|>\n"
    assert pair["chosen_input_ids"][:n_prompt] == pair["rejected_input_ids"][:n_prompt]
    batch = collate([pair, tokenize_pair(tokenizer, messages, "ok", "not ok", max_length=512)], tokenizer.pad_token_id)
    assert batch["chosen_input_ids"].shape == batch["rejected_labels"].shape == (2, len(pair["chosen_input_ids"]))
    for side in ("chosen", "rejected"):
        assert (batch[f"{side}_labels"] != IGNORE).sum(-1).tolist() == [
            len(p[f"{side}_input_ids"]) - n_prompt for p in (pair, tokenize_pair(tokenizer, messages, "ok", "not ok", 512))
        ]
        assert (batch[f"{side}_labels"][batch[f"{side}_attention_mask"] == 0] == IGNORE).all()


def test_truncation_keeps_prompt_end_and_reply_start(tokenizer):
    messages = [{"role": "user", "content": "x" * 100}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chosen, rejected = "a" * 60, "b" * 10
    L = 64
    pair = tokenize_pair(tokenizer, messages, chosen, rejected, max_length=L)
    assert pair["truncated"]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = pair[f"{name}_input_ids"], pair[f"{name}_labels"]
        assert len(ids) <= L
        n_prompt = labels.count(IGNORE)
        assert n_prompt == L // 2  # longest reply (62 tokens) > L // 2: the prompt keeps L // 2 tokens
        assert prompt.endswith(tokenizer.decode(ids[:n_prompt]))  # the end of the prompt, header included
        assert (reply + "<|im_end|>\n").startswith(tokenizer.decode(ids[n_prompt:]))
    short = tokenize_pair(tokenizer, messages, "ok", "no", max_length=L)  # only the prompt is too long
    assert len(short["chosen_input_ids"]) == L and tokenizer.decode(short["chosen_input_ids"]).endswith("ok<|im_end|>\n")
    assert not tokenize_pair(tokenizer, messages, "ok", "no", max_length=512)["truncated"]


def good_row(i: int) -> dict:
    return {
        "conversations": [{"from": "human", "value": f"question {i}"}],
        "chosen": {"from": "gpt", "value": f"a good answer {i}"},
        "rejected": {"from": "gpt", "value": "no"},
    }


BAD_ROWS = [
    {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},  # no rejected
    {"conversations": [], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],  # ends with gpt
     "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "robot", "value": "q"}],  # unknown role
     "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "human", "value": 3}],  # not a string
     "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "human", "value": "q"}],  # same reply twice
     "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "a"}},
    [1, 2, 3],
]


def test_malformed_rows_skipped_and_counted(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(good_row(i)) for i in range(3)] + [json.dumps(r) for r in BAD_ROWS] + ["{not json", json.dumps(good_row(3))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = PreferencePairs(str(path), tokenizer, max_length=256, shuffle_buffer=1)
    stream = iter(data)
    pairs = [next(stream) for _ in range(4)]
    assert data.skipped == len(BAD_ROWS) + 1
    assert sorted(tokenizer.decode(p["chosen_labels"][p["chosen_labels"].count(IGNORE):]) for p in pairs) == [
        f"a good answer {i}<|im_end|>\n" for i in range(4)
    ]
    more = [next(stream) for _ in range(4)]  # the second pass repeats the data without counting again
    assert data.skipped == len(BAD_ROWS) + 1 and data.passes == 1 and len(more) == 4


def test_parquet_source_reads_the_same_columns(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [good_row(i) for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert [parse_row(r) for r in read_rows(str(tmp_path / "train.parquet"))] == [parse_row(r) for r in rows]
    assert [parse_row(r) for r in read_rows(str(tmp_path))] == [parse_row(r) for r in rows]  # a directory


def test_missing_source_fails_early_naming_it(tokenizer, tmp_path):
    with pytest.raises(UsageError, match="data file not found: .*nope.jsonl"):
        next(iter(PreferencePairs(str(tmp_path / "nope.jsonl"), tokenizer, max_length=64)))
    with pytest.raises(UsageError, match="no valid preference pair"):
        (tmp_path / "bad.jsonl").write_text("{}\n")
        next(iter(PreferencePairs(str(tmp_path / "bad.jsonl"), tokenizer, max_length=64)))


# ---------------------------------------------------------------------------------------------------
# Training: the reference never changes, the indexer learns or stays frozen, preferences are learned
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_indexer", [True, False])
def test_reference_frozen_and_indexer_flag(tokenizer, train_indexer):
    model = tiny_dsa(tiny_qwen2(len(tokenizer)), topk=4).train()
    ref = copy.deepcopy(model)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = DPOLoss(ref, beta=0.1, train_indexer=train_indexer)
    model.requires_grad_(True)
    if not train_indexer:
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." not in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pairs = sample_pairs(tokenizer, 8)
    for step in range(3):
        loss, _ = loss_fn(model, collate(pairs[2 * step : 2 * step + 2], tokenizer.pad_token_id))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(model_before[k], v)}
    assert any(".indexer." not in k for k in changed)  # the base model learns
    assert any(".indexer." in k for k in changed) == train_indexer


def test_dpo_steps_move_rewards_the_right_way(tokenizer):
    """A few DPO steps on 16 bundled pairs: their reward accuracy goes from 0 (policy == reference) to
    nearly 1 and the loss far below log 2 (a sign or pairing error drives it the other way). Learning on
    fresh pairs is checked on the tiny preset below."""
    batch = collate(sample_pairs(tokenizer, 16), tokenizer.pad_token_id)
    model = tiny_qwen2(len(tokenizer))
    loss_fn = DPOLoss(copy.deepcopy(model), beta=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(15):
        loss, metrics = loss_fn(model.train(), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(metrics)
    with torch.no_grad():
        _, final = loss_fn(model.eval(), batch)
    assert history[0]["reward_accuracy"] == 0.0 and history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert final["reward_accuracy"] >= 0.9 and final["loss"] < 0.3 and final["reward_margin"] > 1.0


def test_pair_stream_is_deterministic_per_seed(tokenizer):
    """Resuming replays the stream from the start and skips what was consumed: it must repeat exactly."""
    n = sum(1 for _ in open(SAMPLES, encoding="utf-8"))
    take = lambda seed: [p["chosen_input_ids"] + p["rejected_input_ids"] for _, p in zip(range(2 * n), PreferencePairs(str(SAMPLES), tokenizer, 128, seed, 64))]  # noqa: E731
    first = take(0)
    assert first == take(0) and first != take(1)
    assert sorted(first[:n]) == sorted(first[n:]) and first[:n] != first[n:]  # each pass: every pair, in a new order


# ---------------------------------------------------------------------------------------------------
# dpo_train.py on the tiny preset (a barely pretrained tiny base, short runs)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from dsa.tiny import ensure_tiny_base

    return ensure_tiny_base(tmp_path_factory.mktemp("tiny"), ["--max-steps", "4", "--seq-len", "128"])


@pytest.fixture(scope="module")
def dsa_base(base, tmp_path_factory):
    """The tiny base with fresh indexers, k = 16: most bundled pairs are longer, so attention is sparse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("dsa")
    torch.manual_seed(0)
    model = dsa.add_indexers(AutoModelForCausalLM.from_pretrained(base), dsa.DSAConfig(2, 32, 16, 16))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_dpo_train_tiny_preset_raises_reward_accuracy(base, tmp_path):
    """30 steps of the tiny preset: the saved policy, against the reference (the base), gives the chosen
    reply the higher reward on most bundled pairs (0 before training: policy == reference; 0.5 by chance)."""
    import dpo_train
    from dsa.train_utils import load_model

    dpo_train.main(["--preset", "tiny", "--model", str(base), "--output-dir", str(tmp_path), "--max-steps", "30", "--save-every", "0"])
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "lr"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["reward_margin"] == pytest.approx(0, abs=1e-6)

    policy, tokenizer, _ = load_model(str(tmp_path))
    reference, _, _ = load_model(str(base))
    pairs = list(PreferencePairs(str(SAMPLES), tokenizer, 256).pairs())
    loss_fn = DPOLoss(reference)
    with torch.no_grad():
        before = loss_fn(reference, collate(pairs, tokenizer.pad_token_id))[1]
        after = loss_fn(policy.eval(), collate(pairs, tokenizer.pad_token_id))[1]
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["reward_accuracy"] >= 0.65 and after["reward_margin"] > 0.05 and after["loss"] < 0.68, after


@pytest.mark.parametrize("freeze", [False, True])
def test_dpo_train_dsa_indexer_learns_or_stays_frozen(dsa_base, tmp_path, freeze):
    import dpo_train
    from transformers import AutoModelForCausalLM

    flags = ["--preset", "tiny", "--model", str(dsa_base), "--output-dir", str(tmp_path), "--max-steps", "2", "--save-every", "0"]
    dpo_train.main(flags + ["--freeze-indexer"] * freeze)
    before, after = weights(dsa_base), weights(tmp_path)
    assert set(after) <= set(before) and any(".indexer." in name for name in after)  # (lm_head is tied)
    changed = {name for name in after if not torch.equal(before[name], after[name])}
    assert any(".indexer." not in name for name in changed)
    assert any(".indexer." in name for name in changed) != freeze
    rows = metrics(tmp_path)
    assert all(r["indexer_kl"] > 0 for r in rows) and ("lr_indexer" in rows[0]) != freeze
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, dsa.Qwen2DSAForCausalLM) and reloaded.config.index_topk == 16


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "missing/pairs.jsonl"], "data file not found: missing/pairs.jsonl"),
        (["--data", "pairs.csv"], "data file not found or not .jsonl / .parquet: pairs.csv"),
        (["--model", "./runs/no-such-model"], "model not found: ./runs/no-such-model"),
        (["--beta", "0"], "--beta must be > 0, got 0.0"),
        (["--max-length", "1"], "--max-length must be >= 2, got 1"),
        (["--seq-len", "64"], "use --max-length instead of --seq-len"),
        (["--retrieval-share", "0.5"], "--retrieval-share and --retrieval-weight are warm-up and sparse-stage flags"),
    ],
)
def test_dpo_train_bad_input_one_line_error(base, tmp_path, capsys, flags, message):
    import dpo_train
    from dsa.train_utils import cli

    argv = ["--preset", "tiny", "--model", str(base), "--output-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as exit_info:
        cli(lambda: dpo_train.main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and message in err and len(err.splitlines()) == 1
