"""`--preset tiny`: a small Qwen2 model and its tokenizer, built offline from the bundled samples (dsa/samples/).

    path = ensure_tiny_base()          # runs/tiny/base, built once (a few minutes on 2 CPU cores), then reused

Tokenizer: byte-level BPE (the `tokenizers` library) trained on the bundled conversations, with Qwen2's
pre-tokenizer (digits split one by one), the Qwen special tokens <|endoftext|> (padding), <|im_start|>,
<|im_end|> (end of turn, eos), and a ChatML chat template (no default system prompt).
Model: Qwen2ForCausalLM, 4 layers, hidden 128, 4 query heads and 2 KV heads of dim 32 (GQA, as in
Qwen2.5), tied embeddings; pretrained as a dense LM on every token of the bundled corpus, whose
conversations state facts early and ask for them later, so the model learns long-range retrieval.
"""

import json
from pathlib import Path

import torch
from accelerate import PartialState
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .data import PackedSFT, parse_line
from .presets import TINY_ROOT
from .train_utils import common_parser, parse_args, run_training

DONE = "tiny_preset.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TINY_MODEL = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def build_tokenizer(paths: list[Path], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the message texts (and role names) of the JSONL files."""

    def texts():
        yield from ("system", "user", "assistant")
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    for message in parse_line(line) or []:
                        yield message["content"]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_model(tokenizer) -> Qwen2ForCausalLM:
    """A randomly initialised small Qwen2 model sized to the tokenizer."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_MODEL,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def lm_loss(model, batch):
    """Plain language modelling: mean cross-entropy of the next token."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    return out.loss, {}


def ensure_tiny_base(root: Path | str = TINY_ROOT, argv: list[str] = ()) -> Path:
    """root/base: the tiny dense base model and tokenizer; built and pretrained unless already there.

    argv: extra training flags (e.g. ["--max-steps", "5"] in tests) on top of the tiny preset's "base" stage.
    """
    out = Path(root) / "base"
    if (out / DONE).is_file():
        return out
    args = parse_args(common_parser("tiny base"), "base", ["--preset", "tiny", "--output-dir", str(out), *argv])
    torch.manual_seed(args.seed)
    paths = [Path(p) for p in args.data.split(",")]
    tokenizer = build_tokenizer(paths)
    model = tiny_model(tokenizer)
    loader = torch.utils.data.DataLoader(PackedSFT(paths, tokenizer, args.seq_len, labels="all"), args.batch_size)
    run_training(args, model, [{"params": list(model.parameters())}], loader, lm_loss, tokenizer)
    if PartialState().is_main_process:  # written last: marks a complete build
        (out / DONE).write_text(json.dumps({"model": TINY_MODEL, "vocab_size": len(tokenizer)}) + "\n")
    return out
