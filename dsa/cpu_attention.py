"""C++ kernels for CPUs with AVX2: the top-k selection (indexer scores, top-k) and `sparse_attention` at inference.

The source is csrc/cpu_kernels.cpp; torch.utils.cpp_extension compiles it on first use (about a
minute, once per machine and checkout: the build is cached under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR).
`index_scores_cpu` computes the lightning indexer's scores of a query chunk with the recency nudge and the
causal mask in one pass: the logits of all indexer heads, their ReLU and weighted sum stay in registers
(the PyTorch path writes the logits of every head and reads them back), and keys past a query's last allowed
key are skipped. `topk_cpu` selects each row's k largest scores by a radix selection on their bits (two
passes over a row) instead of torch.topk. The selection runs without autograd, so these serve training too.
`sparse_attention_cpu`, per query and KV head, reads the K selected key rows by index, computes the G query heads' logits with
each row loaded once, takes the softmax over the valid slots and sums the selected value rows, without
writing anything of size K x D. On a 32K-token prefill it is ~0.4-0.5x the time of `sparse_attention_fast`
per block of queries (docs/performance.md). Where it cannot run (no AVX2, another dtype or head_dim, no
compiler) `supports` and `available_for` are False and the PyTorch paths in attention.py serve; they stay the
reference.
"""

import functools
import hashlib
import logging
import warnings
from pathlib import Path

import torch

HEAD_DIMS = (8, 16, 32, 64, 128)  # the head_dims the kernel is instantiated for
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"


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
        return build(SOURCE, f"dsa_cpu_kernels_{checkout}")
    except RuntimeError as error:  # no compiler, no ninja, a failed build: the PyTorch path serves
        warnings.warn(f"the CPU kernels (dsa/csrc) are not available ({error}); using the PyTorch path")
        return None
    finally:
        cpp_extension_log.setLevel(level)


def build(source: Path, name: str):
    """Compile `source` (a version of csrc/cpu_kernels.cpp) as the extension module `name`, or load its cached
    build; where it cannot, raises a RuntimeError whose message is one line: the last line of the failure's.
    `kernel()` builds the package's file; bench/cpu_kernels.py --against another."""
    try:
        from torch.utils.cpp_extension import load

        return load(name=name, sources=[str(source)], extra_cflags=["-O3", "-mavx2", "-mfma", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else type(error).__name__) from error


def available_for(x: torch.Tensor) -> bool:
    """Whether the kernels can take x: fp32 on CPU, autograd off, and the extension builds here (the first call
    may compile it)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and kernel() is not None


def supports(q: torch.Tensor) -> bool:
    """Whether the kernels can take queries q (B, Hq, T, D for `sparse_attention_cpu`, B, T, H_I, d_I for
    `index_scores_cpu`): `available_for(q)` and a head_dim of HEAD_DIMS."""
    return q.shape[-1] in HEAD_DIMS and available_for(q)


def index_scores_cpu(q_idx, k_idx, w_idx, first_query: int, out: torch.Tensor) -> torch.Tensor:
    """scores[b, t, s] = index_scores(q_idx, k_idx, w_idx)[b, t, s] + 1e-30 * (s + 1) (attention.recency_nudge)
    for s <= first_query + t, else -inf: the indexer scores of queries at cache indices first_query,
    first_query + 1, ..., nudged and causally masked, written into `out`.
    q_idx: B, T, H_I, d_I; k_idx: B, S, d_I (rows contiguous); w_idx: B, T, H_I; out: B, T, S (contiguous), all
    fp32. Needs `supports(q_idx)`."""
    return kernel().index_scores_cpu(q_idx, k_idx, w_idx, first_query, out)


def topk_cpu(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k largest entries of each row of scores (B, T, S, fp32, no NaN): B, T, k (int64),
    in no particular order; the same set of values as torch.topk (among equal values, the lowest positions).
    Needs `available_for(scores)`."""
    return kernel().topk_cpu(scores, k)


def sparse_attention_cpu(q, k, v, indices, valid, scaling: float) -> torch.Tensor:
    """Same contract as attention.sparse_attention: q: B, Hq, T, D; k, v: B, Hkv, S, D (rows contiguous);
    indices, valid: B, T, K  ->  B, T, Hq, D. Needs `supports(q)`."""
    return kernel().sparse_attention_cpu(q, k, v, indices, valid, scaling)
