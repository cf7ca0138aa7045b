"""Default flag values of every stage (training and compare), and the `--preset tiny` values that replace them.

Precedence: a flag given on the command line > the preset's value > the stage default. `model` is left
out where the script decides it (warm-up and DPO: the tiny base model under --preset tiny), and so are the
warm-up's indexer sizes (a continued warm-up keeps its checkpoint's; a new one gets DSAConfig's defaults).

The tiny preset (offline, 2 CPU cores): a 4-layer Qwen2 model built by `dsa.tiny`, the conversations
bundled with the package (SAMPLES_DIR, dsa/samples/), windows of 512 tokens and k = 64 = L/8 (docs/method.md:
sequences must be longer than k for sparse attention to differ from dense).

compare's sample sizes: 8 perplexity windows per length and 10 passkey trials per (length, depth) cell by
default, so that the 95% intervals (dsa/stats.py) are informative; the tiny preset keeps 4 and 1, a fast run
whose intervals are wide.
"""

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"  # package data: installed with dsa
TINY_DATA = ",".join(str(SAMPLES_DIR / f"sft_sample_{language}.jsonl") for language in ("en", "zh"))
TINY_ROOT = Path("runs/tiny")

COMMON = dict(data="deepctrl/deepctrl-sft-data", seq_len=4096, batch_size=1, grad_accum=16, seed=0, save_every=100)

STAGE_DEFAULTS = {
    "warmup": dict(COMMON, model="Qwen/Qwen2.5-0.5B", output_dir="runs/warmup", max_steps=500, lr=1e-3, topk=512),
    "sparse": dict(COMMON, model="runs/warmup", output_dir="runs/sparse", max_steps=1000, lr=1e-5, indexer_lr=1e-3,
                   topk=None, loss="lm", lm_weight=1.0, distill_weight=1.0, distill_temperature=1.0, train_params="all",
                   lora_rank=16, lora_alpha=32),
    "dpo": dict(COMMON, data="m-a-p/COIG-P", model="runs/sparse", output_dir="runs/dpo", max_steps=1000, lr=5e-7,
                indexer_lr=1e-4, beta=0.1, max_length=2048, seq_len=None, batch_size=2, topk=None),
    "compare": dict(model="runs/sparse", data="deepctrl/deepctrl-sft-data", output_dir="runs/compare",
                    lengths="1024,2048,4096", topk="64,128,256,512", passkey_depths="0,0.25,0.5,0.75,1",
                    ppl_windows=8, passkey_trials=10),
}

TINY_COMMON = dict(data=TINY_DATA, seq_len=512, batch_size=4, grad_accum=1, seed=0, save_every=50)

PRESETS = {
    "tiny": {
        "base": dict(TINY_COMMON, output_dir=str(TINY_ROOT / "base"), max_steps=200, batch_size=4, lr=3e-3),
        "warmup": dict(TINY_COMMON, model=None, output_dir=str(TINY_ROOT / "warmup"), max_steps=60, lr=3e-3, topk=64,
                       index_n_heads=2, index_head_dim=32, index_rope_dim=16),
        "sparse": dict(TINY_COMMON, model=str(TINY_ROOT / "warmup"), output_dir=str(TINY_ROOT / "sparse"),
                       max_steps=60, lr=1e-4, indexer_lr=1e-3, topk=64),
        "dpo": dict(TINY_COMMON, model=None, data=str(SAMPLES_DIR / "coig_p_sample.jsonl"), output_dir=str(TINY_ROOT / "dpo"),
                    max_steps=30, lr=1e-4, indexer_lr=1e-3, max_length=256, seq_len=None, batch_size=8, save_every=10),
        "compare": dict(model=str(TINY_ROOT / "sparse"), data=str(SAMPLES_DIR / "sft_heldout.jsonl"),
                        output_dir=str(TINY_ROOT / "compare"), lengths="256,512,1024", topk="16,32,64,128",
                        passkey_depths="0,0.5,1", ppl_windows=4, passkey_trials=1),
    },
}


def stage_values(stage: str, preset: str | None) -> dict:
    """The default value of every flag of `stage` ("base", "warmup", "sparse", "dpo", "compare"), with the
    preset's values on top (preset None: the defaults alone)."""
    values = dict(STAGE_DEFAULTS.get(stage, {}))
    if preset is not None:
        values.update(PRESETS[preset][stage])
    return values
