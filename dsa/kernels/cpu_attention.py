"""C++ kernels for x86 CPUs with AVX2 (the "cpu" backend): the selection's index scores and top-k, and the sparse
attention at inference, fp32. The source is cpu_kernels.cpp beside this file.

torch.utils.cpp_extension compiles it on first use, about a minute, once per machine and source version; the
build is cached under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Compiling prints one line on
stderr saying so and where; `python -m dsa.kernels build` compiles ahead of time. Where the kernels cannot run
(another CPU, no C++ compiler, another dtype or head_dim, autograd on for the attention) the backend uses the
PyTorch paths (torch_paths.py), which stay equal to the reference.
"""

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

HEAD_DIMS = (8, 16, 32, 64, 128)  # the head_dims the kernels are instantiated for
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffast-math", "-fopenmp"]


def missing_requirement() -> str | None:
    """Why the kernels cannot be built on this machine (one line), or None if they can."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (CXX or c++) is not on PATH"
    return None


def extension_name() -> str:
    """One build per version of the source: its content hash is in the name."""
    return "dsa_cpu_kernels_" + hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]


def build_directory() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root)


@functools.cache
def kernel():
    """The compiled extension module. Raises RuntimeError with one line saying why where it cannot be built."""
    reason = missing_requirement()
    if reason:
        raise RuntimeError(f"the CPU kernels cannot be built: {reason}")
    from torch.utils.cpp_extension import load

    name = extension_name()
    cached = list(build_directory().rglob(f"{name}/{name}*.so"))
    if not cached:
        print(f"dsa: compiling the CPU kernels (about a minute, once) into {build_directory()}/.../{name}", file=sys.stderr, flush=True)
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its import warns that there is no CUDA runtime, as on any CPU machine
    try:
        return load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise RuntimeError(f"the CPU kernels failed to build: {lines[-1] if lines else type(error).__name__}") from error
    finally:
        quiet.setLevel(level)


def takes(x: torch.Tensor, head_dim: int | None = None) -> bool:
    """Whether the kernels take x: fp32 on CPU, autograd off, and (if given) a head_dim of HEAD_DIMS. Does not
    build anything: the backend builds the kernels when it is chosen."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and (head_dim is None or head_dim in HEAD_DIMS)


def index_scores_cpu(q_I, k_I, w_I, first_query: int, out: torch.Tensor) -> torch.Tensor:
    """scores[b, t, s] = core.index_scores(q_I, k_I, w_I)[b, t, s] + 1e-30 * (s + 1) (core.recency_nudge) for
    s <= first_query + t, else -inf: the scores of queries at cache positions first_query, first_query + 1, ...,
    nudged and causally masked, written into `out`. q_I: B, T, H_I, d_I; k_I: B, S, d_I (rows contiguous);
    w_I: B, T, H_I; out: B, T, S (contiguous); all fp32."""
    return kernel().index_scores_cpu(q_I, k_I, w_I, first_query, out)


def topk_cpu(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k largest entries of each row of scores (B, T, S, fp32, no NaN): B, T, k (int64), in
    no particular order; the same set of values as torch.topk (among equal values, the lowest positions)."""
    return kernel().topk_cpu(scores, k)


def sparse_attention_cpu(q, k, v, selected, valid, scaling: float) -> torch.Tensor:
    """core.sparse_attention (same contract): q: B, Hq, T, D; k, v: B, Hkv, S, D (rows contiguous); selected,
    valid: B, T, K  ->  B, T, Hq, D. Forward only."""
    return kernel().sparse_attention_cpu(q, k, v, selected, valid, scaling)
