"""dsa.data: deepctrl records -> chat messages -> labelled token ids -> packed windows."""

import copy
import itertools
import json
import re

import pytest
import torch

from dsa.data import IGNORE_INDEX, PackedSFT, encode_conversation, parse_line, record_to_messages, training_windows
from dsa.errors import UsageError
from dsa.presets import SAMPLES_DIR
from dsa.sources import resolve_data
from dsa.tiny import build_tokenizer

# A ChatML template with a default system prompt (as Qwen2.5's): system text must stay unlabelled.
SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([SAMPLES_DIR / "sft_sample_en.jsonl", SAMPLES_DIR / "sft_sample_zh.jsonl"], vocab_size=600)


def record(**fields):
    base = {"id": 1, "instruction": "", "input": "What is my name?", "output": "Your name is Bob.", "history": []}
    base.update(fields)
    return base


def test_record_to_messages_orders_history_then_instruction_and_input():
    messages = record_to_messages(record(instruction="Answer briefly.", history=[["Hi, I am Bob.", "Hello Bob!"]]))
    assert messages == [
        {"role": "user", "content": "Hi, I am Bob."},
        {"role": "assistant", "content": "Hello Bob!"},
        {"role": "user", "content": "Answer briefly.\nWhat is my name?"},
        {"role": "assistant", "content": "Your name is Bob."},
    ]
    only_instruction = record_to_messages(record(instruction="Say hi.", input=""))
    assert only_instruction[0] == {"role": "user", "content": "Say hi."}


@pytest.mark.parametrize(
    "line",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"input": "q"}),  # no output
        json.dumps({"output": "a"}),  # no input
        json.dumps(record(output=3)),
        json.dumps(record(instruction=None)),
        json.dumps(record(history="Hi")),
        json.dumps(record(history=[["only the user turn"]])),
        json.dumps(record(history=[["q", 5]])),
        json.dumps(record(output="")),
        json.dumps(record(input="", instruction="")),
    ],
)
def test_malformed_records_are_rejected(line):
    assert parse_line(line) is None


def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = SYSTEM_TEMPLATE
    messages = record_to_messages(record(history=[["My number is 4821.", "Noted: 4821."]]))
    ids, labels = encode_conversation(tokenizer, messages)
    assert len(ids) == len(labels)
    labelled = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert tokenizer.decode(labelled) == "Noted: 4821.<|im_end|>\nYour name is Bob.<|im_end|>\n"
    unlabelled = tokenizer.decode([token for token, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "You are helpful." in unlabelled and "My number is 4821." in unlabelled and "What is my name?" in unlabelled
    assert "Noted" not in unlabelled and "Your name" not in unlabelled
    all_ids, all_labels = encode_conversation(tokenizer, messages, labels="all")
    assert all_ids == ids and all_labels == ids


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_packing_concatenates_conversations_into_full_windows(tokenizer, tmp_path):
    records = [record(input=f"Question number {i}?", output=f"Answer {i}. " * (i % 5 + 1)) for i in range(40)]
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(r, ensure_ascii=False) for r in records])
    stream_ids, stream_labels = [], []
    for r in records:
        ids, labels = encode_conversation(tokenizer, record_to_messages(r))
        stream_ids += ids
        stream_labels += labels
    seq_len = 32
    chunks = [
        (stream_ids[i : i + seq_len], stream_labels[i : i + seq_len])
        for i in range(0, len(stream_ids) - seq_len + 1, seq_len)
    ]
    expected = [chunk for chunk in chunks if any(label != IGNORE_INDEX for label in chunk[1])]
    assert len(expected) > 10
    windows = iter(PackedSFT([path], tokenizer, seq_len))
    for ids, labels in expected:
        window = next(windows)
        assert window["input_ids"].shape == window["labels"].shape == (seq_len,)
        assert window["input_ids"].tolist() == ids
        assert window["labels"].tolist() == labels


def test_stream_is_deterministic_and_repeats_over_epochs(tokenizer, tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(record(input=f"q{i}", output=f"a{i}")) for i in range(5)])
    first = [w["input_ids"].tolist() for _, w in zip(range(30), PackedSFT([path], tokenizer, 16))]
    second = [w["input_ids"].tolist() for _, w in zip(range(30), PackedSFT([path], tokenizer, 16))]
    assert first == second
    n_tokens = sum(len(encode_conversation(tokenizer, parse_line(json.dumps(record(input=f"q{i}", output=f"a{i}"))))[0])
                   for i in range(5))
    assert 30 * 16 > 2 * n_tokens  # the 30 windows span more than two passes over the file


def test_malformed_lines_are_skipped_and_counted_once(tokenizer, tmp_path):
    good = [json.dumps(record(input=f"q{i}", output=f"a{i}")) for i in range(4)]
    bad = ["{oops", json.dumps({"input": "no output"}), json.dumps(record(history=[["x"]]))]
    path = write_lines(tmp_path / "mixed.jsonl", [good[0], bad[0], good[1], bad[1], "", good[2], bad[2], good[3]])
    dataset = PackedSFT([path], tokenizer, 8)
    windows = [w for _, w in zip(range(40), dataset)]  # several passes over the file
    assert len(windows) == 40
    assert dataset.skipped == 3


def test_windows_without_assistant_tokens_are_dropped(tokenizer, tmp_path):
    long_question = record(input="word " * 200, output="ok")
    path = write_lines(tmp_path / "long.jsonl", [json.dumps(long_question)])
    for _, window in zip(range(5), PackedSFT([path], tokenizer, 16)):
        assert (window["labels"] != IGNORE_INDEX).any()


def test_no_valid_conversation_is_a_usage_error(tokenizer, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{oops", "[]"])
    with pytest.raises(UsageError, match="no valid conversation"):
        next(iter(PackedSFT([path], tokenizer, 8)))


def test_resolve_data(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", ["{}"])
    b = write_lines(tmp_path / "b.jsonl", ["{}"])
    assert resolve_data(f"{a},{b}") == [a, b]
    with pytest.raises(UsageError, match="missing.jsonl"):
        resolve_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UsageError, match="nothere.jsonl"):
        resolve_data("nothere.jsonl")


def test_files_are_interleaved_line_by_line(tokenizer, tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(record(input=f"a{i}", output="x")) for i in range(3)])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps(record(input="b0", output="y"))])
    order = [m[0]["content"] for m in PackedSFT([a, b], tokenizer, 8).conversations()]
    assert order == ["a0", "b0", "a1", "a2"]


def retrieval_stream(tokenizer, share: float, seq_len: int = 256, pairs: int = 3, weight: float = 1.0):
    paths = resolve_data(f"{SAMPLES_DIR / 'sft_sample_en.jsonl'},{SAMPLES_DIR / 'sft_sample_zh.jsonl'}")
    return training_windows(paths, tokenizer, seq_len, retrieval_share=share, retrieval_pairs=pairs, seed=7,
                            retrieval_weight=weight)


def take(stream, n):
    return [window for _, window in zip(range(n), stream)]


def test_retrieval_windows_hold_every_needle_and_answer_it_at_the_end(tokenizer):
    plain = take(retrieval_stream(tokenizer, 0.0), 6)
    synthetic = take(retrieval_stream(tokenizer, 1.0), 6)
    for haystack, window in zip(plain, synthetic):
        ids, labels = window["input_ids"], window["labels"]
        assert ids.shape == labels.shape == (256,)
        text = tokenizer.decode(ids)
        needles = re.findall(r"(?<!\? )The access code of (\w+) is (\d{6})\. ", text)
        questions = re.findall(r"What is the access code of (\w+)\? The access code of \1 is (\d{6})\.", text)
        assert len(needles) == 3 and len({key for key, _ in needles}) == 3
        assert sorted(questions) == sorted(needles)  # each key asked once, answered with its own value
        assert text.index("What is the access code") > max(text.index(f"code of {key} is") for key, _ in needles)
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])  # a label is its own token
        answers = "".join(f" {value}." for _, value in questions)  # in the order asked
        assert tokenizer.decode(ids[labelled]).endswith(answers)  # the answer values are labelled
        rest = ids.tolist()  # without the needles and the questions: the start of the window's own tokens
        encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        tail = sum(len(encode(f" What is the access code of {k}? The access code of {k} is")) + len(encode(f" {v}."))
                   for k, v in questions)
        rest = rest[:-tail]
        for key, value in needles:
            needle = encode(f" The access code of {key} is {value}. ")
            at = next(i for i in range(len(rest)) if rest[i : i + len(needle)] == needle)
            rest = rest[:at] + rest[at + len(needle) :]
        assert rest == haystack["input_ids"].tolist()[: len(rest)]


def test_retrieval_weight_marks_exactly_the_question_and_answer_rows(tokenizer):
    """--retrieval-weight: a synthetic window's rows from its first question to its end weigh W times its other rows
    in the indexer loss, every window's weights sum to its length; the plain windows of the mix weigh 1 everywhere;
    the tokens are those of weight 1."""
    plain = take(retrieval_stream(tokenizer, 0.5), 12)
    for window, same in zip(take(retrieval_stream(tokenizer, 0.5, weight=20.0), 12), plain):
        assert torch.equal(window["input_ids"], same["input_ids"]) and torch.equal(same["indexer_weight"], torch.ones(256))
        ids, weight = window["input_ids"], window["indexer_weight"]
        text = tokenizer.decode(ids)
        if "What is the access code" not in text:
            assert torch.equal(weight, torch.ones(256))
            continue
        torch.testing.assert_close(weight.sum(), torch.tensor(256.0))
        light, top = weight.min(), weight.max()
        torch.testing.assert_close(top / light, torch.tensor(20.0))
        heavy = int((weight == top).sum())
        assert (weight[: 256 - heavy] == light).all() and heavy > 0
        assert tokenizer.decode(ids[256 - heavy :]).startswith(" What is the access code of")
        assert "What is the access code" not in tokenizer.decode(ids[: 256 - heavy])
    assert any((w["indexer_weight"] > 1).any() for w in take(retrieval_stream(tokenizer, 0.5, weight=20.0), 12))


def test_retrieval_share_is_deterministic_per_window_and_resumes(tokenizer):
    first, second = take(retrieval_stream(tokenizer, 0.5), 20), take(retrieval_stream(tokenizer, 0.5), 20)
    plain = take(retrieval_stream(tokenizer, 0.0), 20)
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    replaced = [not torch.equal(a["input_ids"], p["input_ids"]) for a, p in zip(first, plain)]
    assert 3 <= sum(replaced) <= 17  # about half, decided per window
    resumed = take(itertools.islice(retrieval_stream(tokenizer, 0.5), 8, None), 12)  # what skip_first_batches sees
    for a, b in zip(first[8:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_retrieval_bad_values(tokenizer):
    with pytest.raises(ValueError, match="share must be in \\[0, 1\\], got 1.5"):
        retrieval_stream(tokenizer, 1.5)
    with pytest.raises(ValueError, match="question rows' weight must be >= 1, got 0.5"):
        retrieval_stream(tokenizer, 0.5, weight=0.5)
    with pytest.raises(UsageError, match="--seq-len 32 is too short for 3 retrieval pairs"):
        take(retrieval_stream(tokenizer, 1.0, seq_len=32), 1)
