"""deepctrl-sft-data (or any JSONL of its schema) as a stream of packed, labelled training windows.

Record -> chat messages (one JSON object per line; schema in docs/method.md, data formats):
    for [user, assistant] in history:  user, assistant
    then  user = instruction + "\\n" + input  (either part may be empty),  assistant = output
A line is malformed, skipped and counted, when it is not JSON, not an object, or when `input`/`output` are
missing or not strings, `instruction` is not a string, `history` is not a list of [str, str] pairs, or the
last user turn or the output is empty.

Labels: the conversation is rendered with `tokenizer.apply_chat_template`; a token is labelled (its own id)
when it lies in the text that an assistant turn adds after its generation prompt (the reply and its
end-of-turn marker, e.g. "reply<|im_end|>\\n" in ChatML), and -100 elsewhere (system, user, role headers).
With labels="all" (plain language modelling, used for the tiny base model) every token is labelled.

Packing: tokenized conversations are concatenated into one stream, in file order, and cut into windows
of exactly `seq_len` tokens; a conversation that does not fit continues in the next window. Attention
flows across the conversations packed in one window, as in standard packed pre-training (no document
mask: the DSA attention takes a 2D key-padding mask only); each window is one causal sequence with
positions 0..seq_len-1. Windows without any labelled token are dropped (their LM loss is undefined).
Several files are read round-robin, one line from each in turn. The stream starts over when every
file is exhausted (epochs), so it never ends; the order is fixed, hence deterministic, and resuming
skips a number of windows (`accelerate.skip_first_batches`).

Synthetic retrieval windows (`RetrievalMix`, training flag --retrieval-share): packed conversations teach the
indexer recency and attention sinks, rarely a lookup far back. A share of the windows is replaced by a
key-value retrieval window built from the window itself (the project's own format, not a benchmark's):

    <haystack ...> The access code of {key_1} is {value_1}. <haystack ...> The access code of {key_2} is ...
    <haystack ...> What is the access code of {key_j}? The access code of {key_j} is {value_j}. (every key, shuffled)

keys are random pseudo-words, values random 6-digit numbers, the needles at random places in the window's
own tokens (cut to make room), the questions at the end; labels: the haystack's own, -100 on the needles
and questions, the answer values labelled. Every window of the mix also carries `indexer_weight` (one per row,
the weight of that query row in the indexer loss, dsa/core.py section 4): the rows of the questions and answers
weigh `question_weight` (flag --retrieval-weight) times the other rows, scaled so that every window's weights sum
to its length (plain windows: all 1). Every window then adds the same total weight to the loss's denominator, so
the objective does not depend on how windows are split into micro-batches and processes. Which windows
are synthetic, and their keys, values and places come from a generator seeded by (seed, window index): the stream stays deterministic and resumable.
"""

import json
import random
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from .errors import UsageError

IGNORE_INDEX = -100


def record_to_messages(record) -> list[dict] | None:
    """A deepctrl record as chat messages [{"role", "content"}], or None if it is malformed."""
    if not isinstance(record, dict):
        return None
    instruction, text, output = record.get("instruction", ""), record.get("input"), record.get("output")
    history = record.get("history") or []
    if not all(isinstance(x, str) for x in (instruction, text, output)) or not isinstance(history, list):
        return None
    messages = []
    for pair in history:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            return None
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = "\n".join(part for part in (instruction, text) if part)
    if not user or not output:
        return None
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def parse_line(line: str) -> list[dict] | None:
    try:
        return record_to_messages(json.loads(line))
    except json.JSONDecodeError:
        return None


def encode_conversation(tokenizer, messages: list[dict], labels: str = "assistant") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (see the module docstring)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if labels == "all":
        return ids, list(ids)
    spans = []  # character spans of the assistant replies in `text`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        spans.append((len(prompt), len(upto)))
    token_labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, enc["offset_mapping"])
    ]
    return ids, token_labels


class PackedSFT(IterableDataset):
    """Endless stream of {"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]} windows.

    `skipped` is the number of distinct malformed lines met so far (each counted once over the epochs).
    """

    def __init__(self, paths: list[Path], tokenizer, seq_len: int, labels: str = "assistant"):
        if labels not in ("assistant", "all"):
            raise ValueError(f"labels must be 'assistant' or 'all', got {labels!r}")
        self.paths, self.tokenizer, self.seq_len, self.labels = list(paths), tokenizer, seq_len, labels
        self.malformed: set[tuple[int, int]] = set()  # (file index, line number)

    @property
    def skipped(self) -> int:
        return len(self.malformed)

    def conversations(self) -> Iterator[list[dict]]:
        """Valid conversations of one pass over the files, interleaved line by line."""
        files = [open(path, encoding="utf-8") for path in self.paths]
        try:
            for line_no, lines in enumerate(zip_longest(*files)):
                for file_index, line in enumerate(lines):
                    if line is None or not line.strip():
                        continue
                    messages = parse_line(line)
                    if messages is None:
                        self.malformed.add((file_index, line_no))
                        continue
                    yield messages
        finally:
            for f in files:
                f.close()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ids, labels = [], []
        while True:
            found = False
            for messages in self.conversations():
                found = True
                conv_ids, conv_labels = encode_conversation(self.tokenizer, messages, self.labels)
                ids += conv_ids
                labels += conv_labels
                while len(ids) >= self.seq_len:
                    window_ids, window_labels = ids[: self.seq_len], labels[: self.seq_len]
                    ids, labels = ids[self.seq_len :], labels[self.seq_len :]
                    if any(label != IGNORE_INDEX for label in window_labels):
                        yield {"input_ids": torch.tensor(window_ids), "labels": torch.tensor(window_labels)}
            if not found:
                raise UsageError(f"no valid conversation in {', '.join(map(str, self.paths))}")


NEEDLE = " The access code of {key} is {value}. "
QUESTION = " What is the access code of {key}? The access code of {key} is"
ANSWER = " {value}."
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


class RetrievalMix(IterableDataset):
    """The windows of `windows` (a PackedSFT), each replaced with probability `share` by a synthetic retrieval
    window of the same length with `pairs` key-value needles, its question and answer rows weighted
    `question_weight` in the indexer loss (module docstring)."""

    def __init__(self, windows: PackedSFT, share: float, pairs: int = 4, seed: int = 0, question_weight: float = 1.0):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the retrieval share must be in [0, 1], got {share}")
        if pairs < 1:
            raise ValueError(f"the number of retrieval pairs must be >= 1, got {pairs}")
        if question_weight < 1:
            raise ValueError(f"the question rows' weight must be >= 1, got {question_weight}")
        self.windows, self.share, self.pairs, self.seed, self.question_weight = windows, share, pairs, seed, question_weight

    @property
    def skipped(self) -> int:
        return self.windows.skipped

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index, window in enumerate(self.windows):
            rng = random.Random(f"{self.seed}:{index}")
            if rng.random() < self.share:
                window = self.retrieval_window(window["input_ids"].tolist(), window["labels"].tolist(), rng)
            else:
                window = window | {"indexer_weight": torch.ones(len(window["input_ids"]))}
            yield window

    def retrieval_window(self, ids: list[int], labels: list[int], rng: random.Random) -> dict[str, torch.Tensor]:
        encode = lambda text: self.windows.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        keys = rng.sample(sorted({"".join(rng.choices(SYLLABLES, k=3)) for _ in range(4 * self.pairs)}), self.pairs)
        values = [rng.randrange(100_000, 1_000_000) for _ in keys]
        needles = [encode(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
        tail_ids, tail_labels = [], []
        for j in rng.sample(range(self.pairs), self.pairs):
            question, answer = encode(QUESTION.format(key=keys[j])), encode(ANSWER.format(value=values[j]))
            tail_ids += question + answer
            tail_labels += [IGNORE_INDEX] * len(question) + answer
        room = len(ids) - len(tail_ids) - sum(map(len, needles))
        if room < self.pairs:
            raise UsageError(f"--seq-len {len(ids)} is too short for {self.pairs} retrieval pairs")
        cuts = sorted(rng.sample(range(room), self.pairs))  # needle j goes before haystack token cuts[j]
        out_ids, out_labels, start = [], [], 0
        for cut, needle in zip(cuts, needles):
            out_ids += ids[start:cut] + needle
            out_labels += labels[start:cut] + [IGNORE_INDEX] * len(needle)
            start = cut
        out_ids += ids[start:room] + tail_ids
        out_labels += labels[start:room] + tail_labels
        weight = torch.ones(len(out_ids))
        weight[len(out_ids) - len(tail_ids):] = self.question_weight
        weight *= len(out_ids) / weight.sum()
        return {"input_ids": torch.tensor(out_ids), "labels": torch.tensor(out_labels), "indexer_weight": weight}


def training_windows(paths: list[Path], tokenizer, seq_len: int, retrieval_share: float = 0.0, retrieval_pairs: int = 4,
                     seed: int = 0, retrieval_weight: float = 1.0) -> IterableDataset:  # fmt: skip
    """The training stream of the warm-up and sparse stages: PackedSFT windows, with a share of synthetic retrieval
    windows when retrieval_share > 0."""
    windows = PackedSFT(paths, tokenizer, seq_len)
    if retrieval_share == 0:
        return windows
    return RetrievalMix(windows, retrieval_share, retrieval_pairs, seed, retrieval_weight)
