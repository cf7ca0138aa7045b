"""DSA backends, chosen by name per model (as transformers chooses attention implementations):

    dsa.available_backends()            # what runs on this machine, e.g. ['auto', 'reference', 'torch', 'cpu']
    dsa.set_backend(model, "reference")  # every DSA layer of this model instance

| name        | selection and sparse attention                                         | runs where                  |
|-------------|------------------------------------------------------------------------|-----------------------------|
| `reference` | dsa.core as written: the formulas, literally                           | everywhere                  |
| `torch`     | the PyTorch paths of kernels/torch_paths.py                            | everywhere                  |
| `cpu`       | `torch`, with the C++ kernels of kernels/cpu_attention.py for the      | x86 CPUs with AVX2 and a    |
|             | selection and, with autograd off, the sparse attention (fp32)          | C++ compiler                |
| `triton`    | `torch`, with the Triton kernel of kernels/triton_attention.py for the | CUDA devices with triton    |
|             | sparse attention with autograd off                                     |                             |
| `auto`      | the default: `cpu` on a CPU where it builds, `triton` on a CUDA device | everywhere                  |
|             | where triton is installed, else `torch`; decided per forward's device  |                             |

Every backend trains (a kernel that has no backward defers to the PyTorch paths while autograd is on), and
tests hold each equal to `reference`. A `Backend` instance (e.g. `TorchBackend(chunk_elements=...)`) may be
passed instead of a name.
"""

import functools
import importlib.util
import warnings

import torch

from .core import CHUNK_ELEMENTS, Backend, valid_slots
from .kernels import cpu_attention
from .kernels.torch_paths import (
    Scratch,
    SparseAttention,
    SparseKL,
    WarmupLoss,
    dense_attention,
    masked_dense_attention,
    selection_scores,
    sparse_attention_blocks,
    topk_by_blocks,
)

TILE_ELEMENTS = 1 << 19  # CPU: index logits in key tiles of at most this many (query x head x key) elements
QUERY_BLOCK = 32  # queries per block in sparse_attention_blocks
MASKED_DENSE_KEYS = 5  # a chunk with at most this many times K keys takes masked_dense_attention
TRAIN_BLOCK_ELEMENTS = 1 << 20  # training: gathered (query x key x feature) numbers per block of SparseAttention / SparseKL
# The sizes above fit a CPU's caches. A GPU runs the same arithmetic in fewer, larger blocks: each block costs a
# handful of kernel launches, and at the CPU sizes launches dominate a GPU's training step (docs/performance.md#gpu).
# Bounds at the GPU sizes: a chunk's index logits (2^24 query-key pairs x 4 heads, fp32) 256 MiB; a training
# block's gathered keys or values (2^26 numbers, fp32) 256 MiB.
DEVICE_SIZES = {"cuda": {"chunk_elements": 1 << 24, "query_block": 1024, "train_block_elements": 1 << 26}}


class TorchBackend(Backend):
    """The PyTorch paths: reused buffers, tiled index scores, top-k by blocks, a dense shortcut, the selected keys
    attended by masked dense attention (few keys) or by `sparse_attention_blocks` (`SparseAttention` in training),
    the sparse-stage KL with its own backward (`SparseKL`), and the fused warm-up loss.
    The constructor's arguments are tuning constants (tests shrink them to reach every path at small sizes)."""

    name = "torch"
    dense_shortcut = True

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS, tile_elements: int = TILE_ELEMENTS, query_block: int = QUERY_BLOCK,
                 masked_dense_keys: int = MASKED_DENSE_KEYS, topk_block: int | None = None,
                 train_block_elements: int = TRAIN_BLOCK_ELEMENTS):  # fmt: skip
        super().__init__(chunk_elements)
        self.tile_elements, self.query_block, self.masked_dense_keys = tile_elements, query_block, masked_dense_keys
        self.topk_block = topk_block  # keys per group in topk_by_blocks; None: by row length
        self.train_block_elements = train_block_elements

    def workspace(self) -> Scratch:
        return Scratch()

    @torch.no_grad()
    def select(self, q_I, k_I, w_I, query_pos, key_padding, topk, work):
        scores = self.scores(q_I, k_I, w_I, query_pos, key_padding, work or Scratch())  # B, T, S
        selected = self.topk(scores, min(topk, k_I.shape[1]))
        return selected, valid_slots(selected, query_pos, key_padding)

    def scores(self, q_I, k_I, w_I, query_pos, key_padding, work: Scratch) -> torch.Tensor:
        return selection_scores(q_I, k_I, w_I, query_pos, key_padding, work, self.tile_elements)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return topk_by_blocks(scores, k, self.topk_block)

    def attend(self, q, k, v, selected, valid, scaling, work):
        if k.shape[2] <= self.masked_dense_keys * selected.shape[-1]:
            return masked_dense_attention(q, k, v, selected, valid, scaling)
        return self.sparse(q, k, v, selected, valid, scaling, work)

    def sparse(self, q, k, v, selected, valid, scaling, work):
        return sparse_attention_blocks(q, k, v, selected, valid, scaling, work, self.query_block)

    def attend_trainable(self, q, k, v, selected, valid, scaling, work):
        if k.shape[2] <= self.masked_dense_keys * selected.shape[-1]:
            return super().attend_trainable(q, k, v, selected, valid, scaling, work)
        return SparseAttention.apply(q, k, v, selected, valid, scaling, self.train_block_elements)

    def sparse_kl(self, q, k, q_I, k_I, w_I, selected, valid, scaling, heads="sum"):
        return SparseKL.apply(q_I, k_I, w_I, q, k, selected, valid, scaling, self.train_block_elements, heads)

    def dense(self, q, k, v, allowed, scaling):
        return dense_attention(q, k, v, allowed, scaling)

    def warmup_loss(self, q, k, q_I, k_I, w_I, query_pos, key_padding, scaling, heads="sum", row_weight=None):
        return WarmupLoss.apply(q_I, k_I, w_I, q.detach(), k.detach(), query_pos, key_padding, scaling, self.chunk_elements, heads,
                                row_weight)


class CpuBackend(TorchBackend):
    """`torch` with the C++ kernels where they take the tensors (fp32 CPU tensors, autograd off, a head_dim they
    are built for): index scores and top-k of the selection, and the sparse attention at inference."""

    name = "cpu"

    def scores(self, q_I, k_I, w_I, query_pos, key_padding, work):
        if torch.promote_types(q_I.dtype, k_I.dtype) == torch.float32:  # the dtype index_scores_tiled computes in
            q_I, k_I = q_I.float(), k_I.float()  # (bf16 q_I under autocast, fp32 k_I from k_norm)
        if not (cpu_attention.takes(q_I, q_I.shape[-1]) and k_I.dtype == torch.float32):
            return super().scores(q_I, k_I, w_I, query_pos, key_padding, work)
        B, T, S = q_I.shape[0], q_I.shape[1], k_I.shape[1]
        out = work.tensor("index_scores", (B, T, S), torch.float32, q_I.device)
        scores = cpu_attention.index_scores_cpu(q_I, k_I, w_I.float(), int(query_pos[0]), out)
        return scores if key_padding is None else scores.masked_fill_(~key_padding[:, None, :], float("-inf"))

    def topk(self, scores, k):
        return cpu_attention.topk_cpu(scores, k) if cpu_attention.takes(scores) else super().topk(scores, k)

    def sparse(self, q, k, v, selected, valid, scaling, work):
        if cpu_attention.takes(q, q.shape[-1]):
            return cpu_attention.sparse_attention_cpu(q, k, v, selected, valid, scaling)
        return super().sparse(q, k, v, selected, valid, scaling, work)


class TritonBackend(TorchBackend):
    """`torch` with the Triton sparse attention for CUDA tensors at inference (head_dim a power of two >= 16)."""

    name = "triton"

    def sparse(self, q, k, v, selected, valid, scaling, work):
        D = q.shape[-1]
        if q.is_cuda and not torch.is_grad_enabled() and D >= 16 and D & (D - 1) == 0:
            from .kernels.triton_attention import sparse_attention_triton

            return sparse_attention_triton(q, k, v, selected, valid, scaling)
        return super().sparse(q, k, v, selected, valid, scaling, work)


BACKENDS: dict[str, type[Backend]] = {"reference": Backend, "torch": TorchBackend, "cpu": CpuBackend, "triton": TritonBackend}


def missing_requirement(name: str) -> str | None:
    """Why backend `name` cannot run on this machine (one line), or None."""
    if name == "cpu":
        return cpu_attention.missing_requirement()
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


def available_backends() -> list[str]:
    """The backend names that run on this machine ("auto" first)."""
    return ["auto", *(name for name in BACKENDS if missing_requirement(name) is None)]


def check_backend(backend: str | Backend) -> str | Backend:
    """`backend` if it can run here; else a ValueError naming it and listing the choices. Choosing "cpu" builds its
    kernels now (one line on stderr when that compiles)."""
    if isinstance(backend, Backend) or backend == "auto":
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown DSA backend {backend!r}; choose one of {available_backends()}")
    reason = missing_requirement(backend)
    if reason is None and backend == "cpu":
        try:
            cpu_attention.kernel()
        except RuntimeError as error:
            reason = str(error)
    if reason is not None:
        raise ValueError(f"DSA backend {backend!r} is not available here ({reason}); choose one of {available_backends()}")
    return backend


@functools.cache
def named_backend(name: str, device_type: str = "cpu") -> Backend:
    """The shared instance of backend `name` for tensors on `device_type` (backends hold no state between calls),
    with that device type's work sizes (DEVICE_SIZES; the reference takes only chunk_elements)."""
    sizes = DEVICE_SIZES.get(device_type, {})
    if BACKENDS[name] is Backend:
        sizes = {key: value for key, value in sizes.items() if key == "chunk_elements"}
    return BACKENDS[name](**sizes)


@functools.cache
def auto_backend(device_type: str) -> Backend:
    """What "auto" runs on a device type: "cpu" on a CPU where its kernels build (else "torch", with one warning
    saying why), "triton" on CUDA where triton is installed, else "torch"."""
    if device_type == "cpu" and cpu_attention.missing_requirement() is None:
        try:
            cpu_attention.kernel()
            return named_backend("cpu", device_type)
        except RuntimeError as error:
            warnings.warn(f"{error}; DSA uses the torch backend", stacklevel=2)
    if device_type == "cuda" and missing_requirement("triton") is None:
        return named_backend("triton", device_type)
    return named_backend("torch", device_type)


def resolve(backend: str | Backend, device: torch.device) -> Backend:
    """The Backend that computes a forward on `device` for a layer set to `backend` (a name or an instance)."""
    if isinstance(backend, Backend):
        return backend
    return auto_backend(device.type) if backend == "auto" else named_backend(backend, device.type)
