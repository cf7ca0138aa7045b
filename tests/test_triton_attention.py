"""The Triton sparse-attention kernel (GPU inference path) equals the reference, run on CPU by Triton's
interpreter. TRITON_INTERPRET=1 must be set before triton is first imported, so the comparison runs in a
fresh process (this file run as a script)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="torch builds without triton have no GPU kernel to test")


def compare() -> None:
    from dsa.core import sparse_attention
    from dsa.kernels.triton_attention import sparse_attention_triton
    from tiny_models import random_selection

    for T, S, K in [(7, 20, 5), (1, 300, 130), (12, 12, 4)]:  # K = 130: three blocks of 64 keys
        q, k, v, _, selected, valid = random_selection(T=T, S=S, K=K, D=16)
        assert not valid.all()  # invalid slots, and queries without any key
        with torch.no_grad():
            ref = sparse_attention(q, k, v, selected, valid, 0.3)
            out = sparse_attention_triton(q, k, v, selected, valid, 0.3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        print(f"T={T} S={S} K={K}: max diff {(out - ref).abs().max():.2e}")
    q, k, v, _, selected, valid = random_selection(D=8)
    try:
        sparse_attention_triton(q, k, v, selected, valid, 0.3)
        raise AssertionError("head_dim 8 was accepted")
    except ValueError as e:
        assert "head_dim" in str(e)


def test_triton_kernel_equals_reference_in_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("max diff") == 3


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    compare()
