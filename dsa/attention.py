"""Top-k selection and sparse attention, in query chunks (never a tensor of H * L * L).

Notation: B batch, Hq query heads, Hkv key/value heads (G = Hq / Hkv query heads per KV head),
T queries in this call, S keys (cached + new), K = min(topk, S) selected keys per query, D head dim.
A query at cache index i may attend key s iff s <= i and key s is not padding ("allowed").

Two implementations of the same attention: the plain reference (`sparse_attention`: one advanced-indexing
gather of the selected keys and values, then batched matmuls) and the fast paths the model uses by default
(`FAST_PATHS`): `sparse_attention_fast` (index_select + embedding_bag, no gathered values; at inference the
C++ kernel of cpu_attention.py on CPU, the Triton kernel of triton_attention.py on a GPU),
`masked_dense_attention` (SDPA under a mask of the selected keys, for chunks with few keys) and
`dense_attention` (SDPA, for queries whose every allowed key is selected). The selection likewise: the
reference scores every key with `index_scores` and takes `topk_plain` (torch.topk); the fast path scores with
`selection_scores_fast` (`index_scores_fast` and `mask_disallowed_`) and selects with `topk_fast`
(`topk_by_blocks`: the same keys through a top-k of group maxima first); on CPU both are the C++ kernels of
cpu_attention.py. Tests hold them equal.
"""

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from . import cpu_attention
from .indexer import index_scores

# Queries per chunk are chosen so that (queries x keys) stays under this many elements.
CHUNK_ELEMENTS = 1 << 20
# On CPU the fast path's indexer logits are computed in key tiles of at most this many (query x head x key)
# elements (on a GPU in one tile per chunk: its L2 holds a chunk's logits, and each tile costs kernel launches).
TILE_ELEMENTS = 1 << 19
# The model runs the fast paths below; False runs the reference path everywhere (tests compare the two).
FAST_PATHS = True
CPU_KERNEL = True  # fast path on CPU at inference: the C++ sparse attention (cpu_attention.py) where it builds
CPU_SELECTION = True  # fast path on CPU: the selection's indexer scores and top-k by the C++ kernels (cpu_attention.py)
FAST_BLOCK = 32  # queries per block in sparse_attention_fast
MASKED_DENSE_KEYS = 5  # fast path: a chunk with at most this many times k keys runs `masked_dense_attention`
TOPK_BLOCK = None  # keys per group in topk_by_blocks; None: by row length (`topk_group_size`)
NEG = torch.finfo(torch.float32).min  # a finite "minus infinity" for masked logits


def query_chunks(n_queries: int, n_keys: int):
    """Slices over the queries, each with at most max(1, CHUNK_ELEMENTS // n_keys) of them."""
    size = max(1, CHUNK_ELEMENTS // max(n_keys, 1))
    for start in range(0, n_queries, size):
        yield slice(start, min(start + size, n_queries))


def allowed_keys(query_index: torch.Tensor, key_padding: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """allowed[b, t, s] = (s <= query_index[t]) and key s is a real token.

    query_index: T (cache index of each query); key_padding: B, S bool (True = real) or None.
    Returns B (or 1), T, S bool.
    """
    keys = torch.arange(n_keys, device=query_index.device)
    allowed = (keys[None, :] <= query_index[:, None])[None]  # 1, T, S
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, :]
    return allowed


class Scratch:
    """Buffers that the query chunks of one call reuse (fast path). Each chunk's index logits and scores would
    otherwise be fresh tensors of several MB, and on CPU the page faults of touching new memory cost ~20% of
    the selection. A buffer grows (to twice the size asked) when a chunk needs more."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A tensor of `shape` (contents undefined) in buffer `name`."""
        n = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != torch.device(device):
            buffer = self.buffers[name] = torch.empty(2 * n, dtype=dtype, device=device)
        return buffer[:n].view(shape)


def recency_nudge(n_keys: int, device) -> torch.Tensor:
    """1e-30 * (s + 1) for key s = 0 .. n_keys - 1: added to the index scores to order exact-zero ties."""
    return torch.arange(1, n_keys + 1, device=device, dtype=torch.float32) * 1e-30


def break_zero_ties(scores: torch.Tensor) -> torch.Tensor:
    """I'[t, s] = I[t, s] + 1e-30 * (s + 1): exact-zero index scores ordered by recency.

    ReLU makes I[t, s] exactly 0 whenever every indexer head sees q . k <= 0, so many keys can tie at the
    k-th place, and torch.topk would pick among them arbitrarily (differently for a full forward and a
    cached decode). The nudge turns zeros into tiny positives that grow with the key index (below any real
    positive score: the most recent tied keys win) and leaves every score of magnitude >= 1e-16 unchanged
    in fp32 (it is below half an ulp of it, for up to 10^6 keys). scores: ..., S (fp32).
    """
    return scores + recency_nudge(scores.shape[-1], scores.device)


@torch.no_grad()
def select_topk(q_idx, k_idx, w_idx, query_index: torch.Tensor, key_padding, topk: int, fast: bool = False, scratch=None):
    """The top-k keys of each query by index score, among its allowed keys (`allowed_keys`).

    q_idx: B, T, H_I, d_I; k_idx: B, S, d_I; w_idx: B, T, H_I; query_index: T (the cache index of each
    query, consecutive); key_padding: B, S bool (True = real token) or None.
    Exact-zero ties go to the most recent keys (`break_zero_ties`). fast: scores by `selection_scores_fast`
    (the last query must be key S - 1, as in a cached decode or a chunk cut at its last query), selection by
    `topk_fast`; scratch: a `Scratch` for the scores.
    Returns indices B, T, K (long) and valid B, T, K (bool). A selected slot is valid only if its key is
    allowed: when a row has fewer than K allowed keys, topk also returns masked positions, and those
    must never be attended.
    """
    S = k_idx.shape[1]
    if fast:
        scores = selection_scores_fast(q_idx, k_idx, w_idx, query_index, key_padding, scratch)  # B, T, S
    else:
        scores = break_zero_ties(index_scores(q_idx, k_idx, w_idx))  # B, T, S
        scores = scores.masked_fill_(~allowed_keys(query_index, key_padding, S), float("-inf"))
    k = min(topk, S)
    indices = (topk_fast if fast else topk_plain)(scores, k)  # B, T, K
    valid = indices <= query_index[:, None]  # B, T, K: causal
    if key_padding is not None:
        valid = valid & key_padding.gather(1, indices.flatten(1)).view_as(indices)
    return indices, valid


def selection_scores_fast(q_idx, k_idx, w_idx, query_index: torch.Tensor, key_padding, scratch=None) -> torch.Tensor:
    """The fast path's scores for the selection: break_zero_ties(index_scores(...)), -inf where a key is not
    allowed, for consecutive queries whose last one is key S - 1. On CPU the C++ kernel
    (`cpu_attention.index_scores_cpu`, with CPU_SELECTION) where it supports q_idx and k_idx, in one pass; else
    `index_scores_fast`, the nudge and `mask_disallowed_`. scratch: a `Scratch` for the scores."""
    if CPU_SELECTION and cpu_attention.supports(q_idx) and k_idx.dtype == torch.float32:
        B, T = q_idx.shape[:2]
        out = (scratch or Scratch()).tensor("index_scores", (B, T, k_idx.shape[1]), torch.float32, q_idx.device)
        scores = cpu_attention.index_scores_cpu(q_idx, k_idx, w_idx.float(), int(query_index[0]), out)
        return scores if key_padding is None else scores.masked_fill_(~key_padding[:, None, :], float("-inf"))
    scores = index_scores_fast(q_idx, k_idx, w_idx, scratch).add_(recency_nudge(k_idx.shape[1], k_idx.device))
    return mask_disallowed_(scores, query_index, key_padding)


def mask_disallowed_(scores: torch.Tensor, query_index: torch.Tensor, key_padding) -> torch.Tensor:
    """scores.masked_fill_(~allowed_keys(query_index, key_padding, S), -inf) for queries whose last one is
    key S - 1: then every key before the first query is allowed to all of them (causally), and only the
    last T columns need the causal comparison. scores: B, T, S."""
    T, S = scores.shape[-2:]
    tail = min(T, S)
    keys = torch.arange(S - tail, S, device=scores.device)
    scores[..., S - tail :].masked_fill_(keys[None, :] > query_index[:, None], float("-inf"))  # B, T, tail
    if key_padding is not None:
        scores.masked_fill_(~key_padding[:, None, :], float("-inf"))
    return scores


def topk_plain(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1, sorted=False).indices


def topk_fast(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The fast path's top-k (the same set of values as `topk_plain`): on CPU the C++ radix selection
    (`cpu_attention.topk_cpu`, with CPU_SELECTION) where the kernels build, else `topk_by_blocks`."""
    if CPU_SELECTION and cpu_attention.available_for(scores):
        return cpu_attention.topk_cpu(scores, k)
    return topk_by_blocks(scores, k)


def topk_group_size(n_keys: int, k: int) -> int:
    """Keys per group for `topk_by_blocks` (0: plain top-k), as measured on the CPU of docs/performance.md
    (k = 512, 32-128 rows): torch.topk of the whole row is fastest below 12k keys, groups of 4 below 48k,
    groups of 8 above (a 32K-key row: 222 us plain, 102 us in groups of 4, 89 us in groups of 8)."""
    if TOPK_BLOCK:
        return TOPK_BLOCK
    return 0 if n_keys < 12 * k else 4 if n_keys < 48 * k else 8


def topk_by_blocks(scores: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """`topk_plain` (the same set of values) with fewer elements through torch.topk, for long rows.

    Split a row's first n * block entries into n groups of `block` (group j: entries j, j + n, j + 2n, ...;
    strided, so that the group maxima are an elementwise max of `block` contiguous slices) and keep the rest
    as a tail. The k largest entries of a row all lie in the k groups with the largest maxima, or in the
    tail: an entry of any other group is exceeded by the maximum of each of those k groups. So: group maxima
    (one pass), top-k of the n maxima, then top-k of the k * block (+ tail) candidates, instead of top-k of
    all S entries. block: default `topk_group_size`; rows with fewer than 2 * k groups go to `topk_plain`.
    Equal values may be picked at other positions than `topk_plain` picks them.
    """
    *lead, S = scores.shape
    block = block or topk_group_size(S, k)
    if not block or S // block < 2 * k:
        return topk_plain(scores, k)
    n = S // block
    maxima = scores[..., : n * block].unflatten(-1, (block, n)).amax(dim=-2)  # ..., n
    top_groups = maxima.topk(k, dim=-1, sorted=False).indices  # ..., k
    members = torch.arange(block, device=scores.device) * n
    candidates = (top_groups[..., None] + members).flatten(-2)  # ..., k * block
    if S > n * block:
        tail = torch.arange(n * block, S, device=scores.device).expand(*lead, -1)
        candidates = torch.cat([candidates, tail], dim=-1)
    picked = scores.gather(-1, candidates).topk(k, dim=-1, sorted=False).indices
    return candidates.gather(-1, picked)


def index_scores_fast(q_idx, k_idx, w_idx, scratch: Scratch | None = None) -> torch.Tensor:
    """`index_scores` without autograd, in tiles of keys: for each tile, one matmul for all indexer heads
    (B x T*H_I x tile logits; on CPU at most TILE_ELEMENTS per batch row, on a GPU one tile), ReLU in place,
    then the weighted sum over heads as a batched matmul (w[t] (1 x H_I) @ relu(logits[t]) (H_I x tile)) into
    that tile's columns of the B x T x S scores. A tile's logits are summed while they are still in cache,
    instead of a B*T*H_I*S tensor written once and read twice (one 32K-token attention-only layer on the AMD
    EPYC of docs/performance.md: 9-12% less time, `bench/ab_constant.py --name TILE_ELEMENTS`).
    A single query (decoding) multiplies the other way round, k_idx @ q^T, which streams the S x d_I indexer
    keys once, in order (the cost of a decode step). With a `Scratch`, logits and scores are written into its
    buffers (the scores stay valid until the next call with the same scratch). Under autocast the logits keep
    the inputs' dtype and the scores are fp32, as without it."""
    B, T, H, d = q_idx.shape
    S = k_idx.shape[1]
    dtype = torch.promote_types(q_idx.dtype, k_idx.dtype)
    q_idx, k_idx, w_idx = q_idx.to(dtype), k_idx.to(dtype), w_idx.float()
    with torch.autocast(q_idx.device.type, enabled=False):  # the head sum stays fp32 under autocast
        if T == 1:
            logits = torch.matmul(k_idx, q_idx.view(B, H, d).transpose(1, 2)).relu_()  # B, S, H
            return torch.matmul(logits.float(), w_idx.reshape(B, H, 1)).view(B, 1, -1)
        scratch = scratch or Scratch()
        scores = scratch.tensor("index_scores", (B * T, S), torch.float32, q_idx.device)
        q_rows, w_rows = q_idx.reshape(B, T * H, d), w_idx.reshape(B * T, 1, H)
        tile = max(1, TILE_ELEMENTS // (T * H)) if q_idx.device.type == "cpu" else S
        for start in range(0, S, tile):
            keys = slice(start, min(start + tile, S))
            n = keys.stop - start
            logits = scratch.tensor("index_logits", (B, T * H, n), dtype, q_idx.device)
            torch.matmul(q_rows, k_idx[:, keys].transpose(1, 2), out=logits).relu_()  # B, T * H, n
            torch.bmm(w_rows, logits.view(B * T, H, n).float(), out=scores[:, keys].unsqueeze(1))  # B * T, 1, n
        return scores.view(B, T, S)


def gather_keys(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: B, Hkv, S, D; indices: B, T, K  ->  B, Hkv, T, K, D (one gather per KV head)."""
    B, Hkv = x.shape[:2]
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    head = torch.arange(Hkv, device=x.device)[None, :, None, None]
    return x[batch, head, indices[:, None]]


def grouped_logits(q: torch.Tensor, k_sel: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: B, Hq, T, D; k_sel: B, Hkv, T, K, D  ->  logits B, Hkv, T, G, K.

    Each KV head's gathered keys serve its G query heads in one batched matmul.
    Query head h belongs to KV head h // G (the repeat_kv convention of transformers).
    """
    B, Hq, T, D = q.shape
    Hkv = k_sel.shape[1]
    q = q.view(B, Hkv, Hq // Hkv, T, D).transpose(2, 3)  # B, Hkv, T, G, D
    return torch.matmul(q, k_sel.transpose(-1, -2)) * scaling  # B, Hkv, T, G, K


def sparse_attention(q, k, v, indices, valid, scaling: float) -> torch.Tensor:
    """softmax over the selected keys of each query, shared by all heads.

    q: B, Hq, T, D; k, v: B, Hkv, S, D; indices, valid: B, T, K  ->  B, T, Hq, D
    (the layout transformers' attention functions return). A query with no valid key outputs zeros.
    """
    B, Hq, T, D = q.shape
    k_sel, v_sel = gather_keys(k, indices), gather_keys(v, indices)  # B, Hkv, T, K, D
    logits = grouped_logits(q, k_sel, scaling)  # B, Hkv, T, G, K
    mask = valid[:, None, :, None, :]
    logits = logits.float().masked_fill(~mask, NEG)
    probs = (F.softmax(logits, dim=-1) * mask).to(v.dtype)
    out = torch.matmul(probs, v_sel)  # B, Hkv, T, G, D
    return out.permute(0, 2, 1, 3, 4).reshape(B, T, Hq, D)


def per_head_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x: B, H, S, D with every x[b, h] a contiguous S x D block (copied only if it is not already: cache
    tensors and their prefix views are; the freshly projected keys of a forward without cache are not)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def sparse_attention_fast(q, k, v, indices, valid, scaling: float, scratch: Scratch | None = None) -> torch.Tensor:
    """`sparse_attention` (same contract and result) without gathering the values, or the keys of all heads at once.

    Per batch row, KV head and block of FAST_BLOCK queries: the selected keys by index_select (a row copy,
    several times faster than advanced indexing on CPU), the G query heads' logits by one batched matmul, and
    the output sum_j probs[j] * v[indices[j]] by embedding_bag(mode="sum", per_sample_weights=probs), which
    reads the selected value rows without materializing them. k and v need contiguous heads
    (`per_head_contiguous`). scratch: with autograd off, the blocks' selected keys (FAST_BLOCK * K * D, 4 MB
    at k = 512, D = 64) go into one of its buffers instead of a fresh tensor per block, whose page faults on
    CPU cost up to a third of the attention.
    """
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], indices.shape[-1]
    G = Hq // Hkv
    out = q.new_empty(B, T, Hkv, G, D)
    q = (q * scaling).view(B, Hkv, G, T, D).transpose(2, 3)  # B, Hkv, T, G, D
    # On CPU, no mask work when every slot is valid (long prefills); on a GPU that check would be a sync.
    masked = q.is_cuda or not bool(valid.all())
    reuse = scratch is not None and not torch.is_grad_enabled()  # autograd would keep k_sel for backward
    for b in range(B):
        for start in range(0, T, FAST_BLOCK):
            rows = slice(start, min(start + FAST_BLOCK, T))
            idx, mask = indices[b, rows], valid[b, rows, None, :]  # C, K and C, 1, K
            C = idx.shape[0]
            bags = idx[:, None, :].expand(C, G, K).reshape(C * G, K)  # each query's keys, once per query head
            buffer = {"out": scratch.tensor("selected_keys", (C * K, D), k.dtype, k.device)} if reuse else {}
            for h in range(Hkv):
                k_sel = torch.index_select(k[b, h], 0, idx.reshape(-1), **buffer).view(C, K, D)
                logits = torch.matmul(q[b, h, rows], k_sel.transpose(1, 2)).float()  # C, G, K
                probs = F.softmax(logits.masked_fill_(~mask, NEG) if masked else logits, dim=-1)
                probs = (probs * mask if masked else probs).to(v.dtype)  # a query with no valid key: zeros
                o = F.embedding_bag(bags, v[b, h], mode="sum", per_sample_weights=probs.reshape(C * G, K))
                out[b, rows, h] = o.view(C, G, D)
    return out.view(B, T, Hq, D)


def masked_dense_attention(q, k, v, indices, valid, scaling: float) -> torch.Tensor:
    """`sparse_attention` (same contract and result) as dense attention (SDPA) under a mask of the selected keys.

    Per query it costs all S keys instead of k gathered ones, but at dense-kernel speed: on the 2-core CPU of
    docs/performance.md it is 3x cheaper than `sparse_attention_fast` at S = 2k, 2x at S = 4k, and breaks even
    near S = 5.5k (k = 512, Qwen2.5-0.5B heads); hence MASKED_DENSE_KEYS. Memory: one B x T x S bool mask.
    """
    B, T, _ = indices.shape
    selected = torch.zeros(B, T, k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, indices, valid)
    return dense_attention(q, k, v, selected, scaling)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fast_sparse_attention_for(q: torch.Tensor, n_keys: int, topk: int, scratch: Scratch | None = None):
    """The sparse attention the fast path uses for queries q over n_keys keys: `masked_dense_attention` when
    n_keys <= MASKED_DENSE_KEYS * topk; else at inference (autograd off) the Triton kernel on a GPU
    (dsa/triton_attention.py, if triton is installed and head_dim is a power of two >= 16) or the C++ kernel on
    CPU (dsa/cpu_attention.py, with CPU_KERNEL, where `cpu_attention.supports` q); else `sparse_attention_fast`
    (with `scratch` for its buffer). All have the contract of `sparse_attention`."""
    D = q.shape[-1]
    if n_keys <= MASKED_DENSE_KEYS * topk:
        return masked_dense_attention
    if q.is_cuda and not torch.is_grad_enabled() and triton_available() and D >= 16 and D & (D - 1) == 0:
        from .triton_attention import sparse_attention_triton

        return sparse_attention_triton
    if CPU_KERNEL and cpu_attention.supports(q):
        return cpu_attention.sparse_attention_cpu
    return functools.partial(sparse_attention_fast, scratch=scratch)


def dense_attention(q, k, v, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax over every allowed key (SDPA): `sparse_attention` when each query selects all its allowed keys.

    q: B, Hq, T, D; k, v: B, Hkv, S, D; allowed: B or 1, T, S  ->  B, T, Hq, D. A query with no allowed key
    outputs zeros (it attends every key, finite, and is then zeroed: no NaN in forward or backward).
    """
    has_key = allowed.any(dim=-1, keepdim=True)  # B, T, 1
    mask = (allowed | ~has_key)[:, None]  # B, 1, T, S
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)  # B, Hq, T, D
    return (out * has_key[:, None]).transpose(1, 2)
