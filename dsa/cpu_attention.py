"""`sparse_attention` as a C++ kernel for CPUs with AVX2, at inference (forward only, no autograd).

The source is csrc/sparse_attention_cpu.cpp; torch.utils.cpp_extension compiles it on first use (about a
minute, once per machine and checkout: the build is cached under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR).
Per query and KV head it reads the K selected key rows by index, computes the G query heads' logits with
each row loaded once, takes the softmax over the valid slots and sums the selected value rows, without
writing anything of size K x D. On a 32K-token prefill it is ~0.4-0.5x the time of `sparse_attention_fast`
per block of queries (docs/performance.md). Where it cannot run (no AVX2, another dtype or head_dim, no
compiler) `supports` is False and the PyTorch paths in attention.py serve; they stay the reference.
"""

import functools
import hashlib
import logging
import warnings
from pathlib import Path

import torch

HEAD_DIMS = (8, 16, 32, 64, 128)  # the head_dims the kernel is instantiated for
SOURCE = Path(__file__).parent / "csrc" / "sparse_attention_cpu.cpp"


@functools.cache
def kernel():
    """The compiled extension module, or None (with one warning saying why) where it cannot be built."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    checkout = hashlib.sha1(str(SOURCE).encode()).hexdigest()[:8]  # one build per checkout: its path is in the build file
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)  # its import warns that there is no CUDA runtime, as on any CPU machine
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"dsa_sparse_attention_cpu_{checkout}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch path serves
        reason = str(error).strip().splitlines()
        warnings.warn(f"the CPU sparse-attention kernel is not available ({reason[-1] if reason else type(error).__name__}); using the PyTorch path")
        return None
    finally:
        cpp_extension_log.setLevel(level)


def supports(q: torch.Tensor) -> bool:
    """Whether `sparse_attention_cpu` can attend queries q (B, Hq, T, D): fp32 on CPU, autograd off, a head_dim
    of HEAD_DIMS, and the kernel builds here (the first call may compile it)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and not torch.is_grad_enabled()
        and q.shape[-1] in HEAD_DIMS
        and kernel() is not None
    )


def sparse_attention_cpu(q, k, v, indices, valid, scaling: float) -> torch.Tensor:
    """Same contract as attention.sparse_attention: q: B, Hq, T, D; k, v: B, Hkv, S, D (rows contiguous);
    indices, valid: B, T, K  ->  B, T, Hq, D. Needs `supports(q)`."""
    return kernel().sparse_attention_cpu(q, k, v, indices, valid, scaling)
