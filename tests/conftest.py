"""Fixtures shared by the tests: torch's thread count restored after each test, and a tiny DSA checkpoint."""

import pytest
import torch

import dsa
from dsa.presets import SAMPLES_DIR
from dsa.tiny import build_tokenizer, tiny_model


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Some tests call a script's main() in-process, which sets torch's thread count; the thread count changes the
    order of float reductions, so a later test comparing a subprocess with an in-process run would differ in the last bits."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A random tiny DSA model (k = 16) and its tokenizer, saved like a training output."""
    path = tmp_path_factory.mktemp("dsa_checkpoint")
    tokenizer = build_tokenizer([SAMPLES_DIR / "sft_heldout.jsonl"], vocab_size=400)
    torch.manual_seed(0)
    base = tiny_model(tokenizer)
    model = dsa.add_indexers(base, dsa.DSAConfig(index_n_heads=2, index_head_dim=16, index_rope_dim=8, index_topk=16))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
