"""The Triton sparse-attention kernel (GPU inference path) equals the reference, run on CPU by Triton's
interpreter, at toy sizes and at Qwen2.5-0.5B's (head_dim 64, 7 query heads per KV head, k = 512), in fp32 and bf16.
TRITON_INTERPRET=1 must be set before triton is first imported, so the comparison runs in a fresh process (this file
run as a script).

bf16: Triton's interpreter keeps bf16 tensors as their uint16 bit patterns and its tl.dot multiplies those patterns
(triton-lang/triton#11584; bf16 is unsupported in the interpreter). `interpret_bf16_dots` converts bf16 dot operands
to fp32 first, which is what a GPU's bf16 dot computes (exact products, fp32 sums); every other bf16 operation of the
kernel is a load, a store or a cast, which the interpreter converts correctly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="torch builds without triton have no GPU kernel to test")

# (T, S, K, Hq, Hkv, D): toy sizes (K = 130: three blocks of 64 keys), then the real head sizes with S just above k
CASES = [(7, 20, 5, 6, 2, 16), (1, 300, 130, 6, 2, 16), (12, 12, 4, 6, 2, 16), (3, 600, 512, 14, 2, 64)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: against the fp32 reference of the same bf16 inputs


def interpret_bf16_dots() -> None:
    """Make the interpreter's tl.dot convert bf16 operands to fp32 (see the module docstring)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        a, b = (interpreter.TensorHandle(interpreter._convert_float(x.data, x.dtype, tl.float32, None).view(np.float32), tl.float32)
                if x.dtype == tl.bfloat16 else x for x in (a, b))  # fmt: skip
        return original(self, a, b, d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot


def compare() -> None:
    from dsa.core import sparse_attention
    from dsa.kernels.triton_attention import sparse_attention_triton
    from tiny_models import random_selection

    interpret_bf16_dots()
    for dtype in (torch.float32, torch.bfloat16):
        for T, S, K, Hq, Hkv, D in CASES:
            q, k, v, _, selected, valid = random_selection(T=T, S=S, K=K, Hq=Hq, Hkv=Hkv, D=D)
            q, k, v = (x.detach().to(dtype) for x in (q, k, v))
            assert not valid.all()  # invalid slots (batch row 1 has 3 real keys); the toy sizes: queries without any
            with torch.no_grad():
                ref = sparse_attention(q.float(), k.float(), v.float(), selected, valid, D**-0.5)
                out = sparse_attention_triton(q, k, v, selected, valid, D**-0.5)
            assert out.dtype == dtype and out.shape == ref.shape
            torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
            print(f"{str(dtype):14} T={T} S={S} K={K} Hq={Hq} Hkv={Hkv} D={D}: max diff {(out.float() - ref).abs().max():.2e}")
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
    assert done.stdout.count("max diff") == 2 * len(CASES)
    assert "torch.bfloat16 T=3 S=600 K=512 Hq=14 Hkv=2 D=64" in done.stdout


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    compare()
