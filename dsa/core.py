"""DeepSeek Sparse Attention for one attention layer, in plain PyTorch: the reference implementation.

Read top to bottom: the lightning indexer (`LightningIndexer`, `index_scores`), the top-k selection
(`select_topk`; `oracle_topk` for evaluation), the sparse attention (`sparse_attention`), the indexer's
training signal (`attention_target`, `warmup_kl`, `sparse_kl`), and the layer's flow over query chunks
(`dsa_attention`, `warmup_indexer_loss`).
docs/method.md states the method; this module imports nothing from transformers (the Qwen2 integration is
dsa/modeling.py). Faster implementations of the same contracts are backends (dsa/backends.py), each tested
equal to the `Backend` defined here.

Notation: B batch, Hq query heads, Hkv key/value heads (G = Hq / Hkv query heads per KV head), D head dim,
T queries in this call, S keys (cached + new), H_I indexer heads of size d_I, K = min(k, S) selected keys.
Indexer tensors carry the suffix _I (q_I, k_I, w_I); `query_pos` is the cache position of each query
(S - T, ..., S - 1); `selected` holds the positions of the keys each query attends.
A query at cache position i may attend key s iff s <= i and key s is not padding: the key is "allowed".
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 20  # queries per chunk: at most this many (query x key) pairs, so no T x S x heads tensor
NEG = torch.finfo(torch.float32).min  # a finite "minus infinity": the softmax of a fully masked row stays finite

# ---------------------------------------------------------------------------------------------------------------
# 1. The lightning indexer
#
#     I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s])
#     q_I[t, j] = RoPE(wq(x_t))_j                  H_I heads of size d_I
#     k_I[s]    = RoPE(k_norm(wk(x_s)))            one key of size d_I, shared by all indexer heads
#     w[t, j]   = weights_proj(x_t)_j * H_I^-1/2 * d_I^-1/2              (fp32)
#
# x is the attention block's input, detached: the indexer learns only from its own loss.
# ---------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x (rotate-half layout); the rest pass through."""
    rope_dim = cos.shape[-1]
    x_rope, x_pass = x[..., :rope_dim], x[..., rope_dim:]
    return torch.cat((x_rope * cos + rotate_half(x_rope) * sin, x_pass), dim=-1)


class LightningIndexer(nn.Module):
    """The indexer of one layer. inv_freq: the rope_dim / 2 RoPE frequencies of the indexer's own rope width
    (from the model's rope parameters, see modeling.indexer_rope), rope_scale: the factor on cos and sin
    (1 but for YaRN-type scalings)."""

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, rope_dim: int, inv_freq: Sequence[float], rope_scale: float = 1.0):
        super().__init__()
        if len(inv_freq) != rope_dim // 2:
            raise ValueError(f"inv_freq has {len(inv_freq)} frequencies, a rope_dim of {rope_dim} needs {rope_dim // 2}")
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.wq = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)  # kept in fp32 (modeling.py)
        self.weight_scale = n_heads**-0.5 * head_dim**-0.5
        # Plain floats, not a buffer: nothing to restore on load, and a cast of the model to bf16 cannot round them.
        self.inv_freq, self.rope_scale = tuple(float(f) for f in inv_freq), float(rope_scale)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # the frequencies as a tensor, per device

    def _apply(self, fn, recurse=True):
        """Module casts and moves (model.to(torch.bfloat16), .half(), .cuda(), ...) move weights_proj but keep it in
        fp32, as the reference keeps the indexer weights w."""
        fp32 = self.weights_proj.weight.data
        super()._apply(fn, recurse)
        moved = self.weights_proj.weight
        if fp32.dtype == torch.float32 and moved.dtype != torch.float32:
            moved.data = fp32.to(moved.device)
        return self

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: B|1, L, rope_dim (rotate-half layout: the rope_dim / 2 angles twice)."""
        device = position_ids.device
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = torch.tensor(self.inv_freq, dtype=torch.float32).to(device)
        freqs = position_ids[..., None].float() * self._inv_freq_on[device]  # B|1, L, rope_dim / 2
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos.to(dtype), sin.to(dtype)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """x: B, L, hidden; position_ids: B|1, L  ->  q_I: B, L, H_I, d_I; k_I: B, L, d_I; w_I: B, L, H_I (fp32,
        scale folded in, also under autocast)."""
        B, L, _ = x.shape
        x = x.detach()
        q_I = self.wq(x).view(B, L, self.n_heads, self.head_dim)
        k_I = self.k_norm(self.wk(x))
        with torch.autocast(x.device.type, enabled=False):
            w_I = F.linear(x.float(), self.weights_proj.weight.float()) * self.weight_scale
        if self.rope_dim:
            cos, sin = self.rope(position_ids, q_I.dtype)
            q_I = apply_partial_rope(q_I, cos[:, :, None, :], sin[:, :, None, :])
            k_I = apply_partial_rope(k_I, cos, sin)
        return q_I, k_I, w_I


def index_scores(q_I: torch.Tensor, k_I: torch.Tensor, w_I: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = sum_j w_I[b, t, j] * relu(q_I[b, t, j] . k_I[b, s]).

    q_I: B, T, H_I, d_I; k_I: B, S, d_I; w_I: B, T, H_I  ->  B, T, S, fp32 (the weighted head sum runs in fp32,
    also under autocast). Memory: one B x T x H_I x S tensor; callers pass query chunks.
    """
    with torch.autocast(q_I.device.type, enabled=False):
        logits = torch.einsum("bthd,bsd->bths", q_I, k_I.to(q_I.dtype))  # B, T, H_I, S
        return torch.einsum("bths,bth->bts", F.relu(logits).float(), w_I.float())


def selected_index_scores(q_I, k_I, w_I, selected: torch.Tensor) -> torch.Tensor:
    """`index_scores` at each query's selected keys only: selected B, T, K  ->  B, T, K (fp32)."""
    batch = torch.arange(k_I.shape[0], device=k_I.device)[:, None, None]
    return gathered_index_scores(q_I, k_I[batch, selected], w_I)


def gathered_index_scores(q_I, k_sel: torch.Tensor, w_I) -> torch.Tensor:
    """`index_scores` of each query at its own keys: k_sel B, T, K, d_I  ->  B, T, K (fp32)."""
    with torch.autocast(q_I.device.type, enabled=False):
        logits = torch.einsum("bthd,btkd->bthk", q_I, k_sel.to(q_I.dtype))  # B, T, H_I, K
        return torch.einsum("bthk,bth->btk", F.relu(logits).float(), w_I.float())


# ---------------------------------------------------------------------------------------------------------------
# 2. Top-k selection: for each query, the k allowed keys with the highest index score (all of them when fewer
#    than k exist), one set shared by every attention head.
# ---------------------------------------------------------------------------------------------------------------


def allowed_keys(query_pos: torch.Tensor, key_padding: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """allowed[b, t, s] = (s <= query_pos[t]) and key s is a real token.

    query_pos: T; key_padding: B, S bool (True = real) or None  ->  B|1, T, S bool.
    """
    keys = torch.arange(n_keys, device=query_pos.device)
    allowed = (keys[None, :] <= query_pos[:, None])[None]  # 1, T, S
    return allowed if key_padding is None else allowed & key_padding[:, None, :n_keys]


def recency_nudge(n_keys: int, device) -> torch.Tensor:
    """1e-30 * (s + 1) for key s = 0 .. n_keys - 1 (fp32): what `break_zero_ties` adds."""
    return torch.arange(1, n_keys + 1, device=device, dtype=torch.float32) * 1e-30


def break_zero_ties(scores: torch.Tensor) -> torch.Tensor:
    """I'[t, s] = I[t, s] + 1e-30 * (s + 1): exact-zero scores ordered by recency. scores: ..., S (fp32).

    ReLU makes I[t, s] exactly 0 whenever every indexer head sees q . k <= 0, so keys can tie at the k-th place
    and torch.topk would pick among them arbitrarily (differently in a full forward and a cached decode). The
    nudge makes those zeros tiny positives growing with s (the most recent tied keys win) and leaves every score
    of magnitude >= 1e-16 unchanged in fp32 (it is below half an ulp of it, for up to 10^6 keys).
    """
    return scores + recency_nudge(scores.shape[-1], scores.device)


def valid_slots(selected: torch.Tensor, query_pos: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """valid[b, t, j]: whether the j-th selected key of query t is allowed. A row with fewer than K allowed keys
    still gets K positions from top-k; the others must never be attended. selected: B, T, K -> B, T, K bool."""
    valid = selected <= query_pos[:, None]
    if key_padding is not None:
        valid = valid & key_padding.gather(1, selected.flatten(1)).view_as(selected)
    return valid


@torch.no_grad()
def select_topk(q_I, k_I, w_I, query_pos: torch.Tensor, key_padding: torch.Tensor | None, topk: int):
    """The top-k allowed keys of each query by index score (exact-zero ties to the most recent keys).

    q_I: B, T, H_I, d_I; k_I: B, S, d_I; w_I: B, T, H_I; query_pos: T; key_padding: B, S bool or None
    ->  selected: B, T, K (long), valid: B, T, K (bool, see `valid_slots`).
    """
    S = k_I.shape[1]
    scores = break_zero_ties(index_scores(q_I, k_I, w_I))  # B, T, S
    scores = scores.masked_fill(~allowed_keys(query_pos, key_padding, S), float("-inf"))
    selected = scores.topk(min(topk, S), dim=-1, sorted=False).indices  # B, T, K
    return selected, valid_slots(selected, query_pos, key_padding)


SELECTIONS = ("indexer", "oracle")  # what ranks the keys: the indexer (DSA), or the true attention (evaluation only)


@torch.no_grad()
def oracle_topk(q, k, query_pos: torch.Tensor, key_padding: torch.Tensor | None, topk: int, scaling: float):
    """The top-k allowed keys of each query by the true attention instead of the index score: by p[t, s], the
    head-summed dense attention of section 4 (`dense_target`, the warm-up's target). No indexer can select keys
    carrying more of p (the upper bound on recall), so a model run with this selection separates what k costs at
    the target the indexer learns from what the indexer misses of it. It is not the perplexity-optimal set (one
    set serves every head; summing weighs heads alike), so a trained indexer can lose less perplexity than it.
    For evaluation: it computes the dense attention it replaces.

    q: B, Hq, T, D; k: B, Hkv, S, D; query_pos, key_padding as `select_topk`  ->  selected, valid: B, T, K.
    """
    S = k.shape[2]
    allowed = allowed_keys(query_pos, key_padding, S)  # B|1, T, S
    p = dense_target(q, k, allowed, scaling).masked_fill(~allowed, float("-inf"))  # B, T, S
    selected = p.topk(min(topk, S), dim=-1, sorted=False).indices  # B, T, K
    return selected, valid_slots(selected, query_pos, key_padding)


# ---------------------------------------------------------------------------------------------------------------
# 3. Sparse attention: each query head's softmax over the query's selected keys. The selected keys of a KV head
#    serve its G query heads (query head h belongs to KV head h // G, transformers' repeat_kv convention).
# ---------------------------------------------------------------------------------------------------------------


def gather_keys(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """x: B, Hkv, S, D; selected: B, T, K  ->  B, Hkv, T, K, D."""
    B, Hkv = x.shape[:2]
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    head = torch.arange(Hkv, device=x.device)[None, :, None, None]
    return x[batch, head, selected[:, None]]


def grouped_logits(q: torch.Tensor, k_sel: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: B, Hq, T, D; k_sel: B, Hkv, T, K, D  ->  logits B, Hkv, T, G, K (one batched matmul per KV head)."""
    B, Hq, T, D = q.shape
    Hkv = k_sel.shape[1]
    q = q.view(B, Hkv, Hq // Hkv, T, D).transpose(2, 3)  # B, Hkv, T, G, D
    return torch.matmul(q, k_sel.transpose(-1, -2)) * scaling


def sparse_attention(q, k, v, selected, valid, scaling: float) -> torch.Tensor:
    """out[b, t, h] = sum_j softmax_j(q[b, h, t] . k[b, h // G, selected[b, t, j]] * scaling) v[b, h // G, selected[b, t, j]]
    over the valid slots j (a query with no valid slot outputs zeros).

    q: B, Hq, T, D; k, v: B, Hkv, S, D; selected, valid: B, T, K  ->  B, T, Hq, D (transformers' layout).
    """
    B, Hq, T, D = q.shape
    k_sel, v_sel = gather_keys(k, selected), gather_keys(v, selected)  # B, Hkv, T, K, D
    logits = grouped_logits(q, k_sel, scaling)  # B, Hkv, T, G, K
    mask = valid[:, None, :, None, :]
    probs = (F.softmax(logits.float().masked_fill(~mask, NEG), dim=-1) * mask).to(v.dtype)
    out = torch.matmul(probs, v_sel)  # B, Hkv, T, G, D
    return out.permute(0, 2, 1, 3, 4).reshape(B, T, Hq, D)


# ---------------------------------------------------------------------------------------------------------------
# 4. The indexer's training signal, per query row t over a key set R_t (every allowed key in the warm-up, the
#    selected set in the sparse stage), from detached main q/k in fp32:
#
#     p[t, s] = sum_h softmax_{s in R_t}(q_h[t] . k_h[s] * scaling)  /  (its sum over s)
#     KL_t    = sum_{s in R_t} p[t, s] * (log p[t, s] - log softmax_{s in R_t}(I[t, s]))
#
#    Keys outside R_t contribute exactly 0; the loss is the mean of KL_t over the real query rows, weighted:
#
#     loss    = sum_t c_t KL_t / sum_t c_t,   c_t = [t is a real token] * row_weight[t]   (row_weight 1: the paper)
#
#    A row weight above 1 (beyond the paper, a training variant) makes chosen rows count more, e.g. the questions
#    of the synthetic retrieval windows (dsa/data.py), a few dozen rows among thousands.
#    `heads` = "sum" is the paper's target above. "max" (beyond the paper, a training variant) replaces the sum over
#    heads by the max over heads before normalising: a key that one head attends strongly (a retrieval head) keeps
#    its weight instead of being diluted by the heads that look elsewhere.
# ---------------------------------------------------------------------------------------------------------------


TARGET_HEADS = ("sum", "max")  # how the target combines the attention heads: the paper's sum, or the max


def attention_target(logits: torch.Tensor, allowed: torch.Tensor, heads: str = "sum") -> torch.Tensor:
    """logits: B, H, T, R; allowed: B|1, T, R  ->  p: B, T, R (fp32), rows summing to 1 (0 if empty).
    heads: "sum" or "max" of the per-head softmaxes over the heads, then normalised (see the section's comment)."""
    mask = allowed[:, None]
    per_head = F.softmax(logits.float().masked_fill(~mask, NEG), dim=-1) * mask  # B, H, T, R
    p = per_head.sum(dim=1) if heads == "sum" else per_head.amax(dim=1)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def masked_log_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log softmax(scores) over the allowed entries of each row (fp32), 0 at the others."""
    return F.log_softmax(scores.float().masked_fill(~allowed, NEG), dim=-1).masked_fill(~allowed, 0.0)


def kl_rows(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(target || q) per row, from log q = `masked_log_softmax` (xlogy: 0 log 0 = 0). B, T, R -> B, T."""
    return (torch.xlogy(target, target) - target * log_q).sum(dim=-1)


@torch.no_grad()
def dense_target(q, k, allowed, scaling: float, heads: str = "sum") -> torch.Tensor:
    """The warm-up target over every allowed key. q: B, Hq, T, D; k: B, Hkv, S, D; allowed: B|1, T, S -> B, T, S."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    q32 = q.float().view(B, Hkv, Hq // Hkv, T, D)
    logits = torch.matmul(q32, k.float()[:, :, None].transpose(-1, -2)) * scaling  # B, Hkv, G, T, S
    return attention_target(logits.reshape(B, Hq, T, -1), allowed, heads)


def warmup_kl(q, k, q_I, k_I, w_I, allowed, scaling: float, heads: str = "sum") -> torch.Tensor:
    """KL per query row with the target over every allowed key (dense warm-up): B, T."""
    return kl_rows(dense_target(q, k, allowed, scaling, heads), masked_log_softmax(index_scores(q_I, k_I, w_I), allowed))


def sparse_kl(q, k, q_I, k_I, w_I, selected, valid, scaling: float, heads: str = "sum") -> torch.Tensor:
    """KL per query row with the target over the selected keys (the sparse attention itself): B, T."""
    with torch.no_grad():
        B, Hq, T, _ = q.shape
        logits = grouped_logits(q.float(), gather_keys(k.float(), selected), scaling)  # B, Hkv, T, G, K
        target = attention_target(logits.permute(0, 1, 3, 2, 4).reshape(B, Hq, T, -1), valid, heads)
    return kl_rows(target, masked_log_softmax(selected_index_scores(q_I, k_I, w_I, selected), valid))


def query_rows(query_pos: torch.Tensor, key_padding: torch.Tensor | None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight c_t of each query row in the loss mean: 1 for a real token, 0 for padding, times row_weight[t]
    when given (B, T: one per query row; a sequence's weights sum to >= 1 over its real rows, so that the mean's
    denominator clamp at 1 touches only an all-padding input). B|1, T float32."""
    real = torch.ones(1, len(query_pos), device=query_pos.device) if key_padding is None else key_padding[:, query_pos].float()
    return real if row_weight is None else real * row_weight.float()


# ---------------------------------------------------------------------------------------------------------------
# 5. One layer, query chunk by query chunk
# ---------------------------------------------------------------------------------------------------------------


def query_chunks(n_queries: int, n_keys: int, chunk_elements: int = CHUNK_ELEMENTS):
    """Slices over the queries, each of at most max(1, chunk_elements // n_keys) queries."""
    size = max(1, chunk_elements // max(n_keys, 1))
    for start in range(0, n_queries, size):
        yield slice(start, min(start + size, n_queries))


def maybe_checkpoint(fn: Callable, *args):
    """fn(*args), recomputed in backward when autograd is on: a chunk keeps only its inputs alive, so training
    memory stays O(L * k) instead of the chunks' O(L * S) intermediates."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Backend:
    """How the steps of `dsa_attention` are computed. This class is the reference: every step as written above.
    Faster backends (dsa/backends.py) subclass it with the same contracts and are tested equal to it.

    dense_shortcut: a chunk whose queries have at most k allowed keys each runs `dense` (top-k would select
    every allowed key, so the sparse attention is dense attention over the allowed keys).
    """

    name = "reference"
    trains = True  # its forward is differentiable (some kernels run only with autograd off and defer to PyTorch then)
    dense_shortcut = False

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS):
        self.chunk_elements = chunk_elements

    def workspace(self):
        """Per-call state that the chunks of one `dsa_attention` call share (reused buffers); None here."""
        return None

    def select(self, q_I, k_I, w_I, query_pos, key_padding, topk: int, work):
        return select_topk(q_I, k_I, w_I, query_pos, key_padding, topk)

    def attend(self, q, k, v, selected, valid, scaling: float, work) -> torch.Tensor:
        return sparse_attention(q, k, v, selected, valid, scaling)

    def attend_trainable(self, q, k, v, selected, valid, scaling: float, work) -> torch.Tensor:
        """`attend` with autograd on, keeping O(L * k) per layer for backward: here the chunk is recomputed in
        backward (`maybe_checkpoint`)."""
        return maybe_checkpoint(self.attend, q, k, v, selected, valid, scaling, work)

    def sparse_kl(self, q, k, q_I, k_I, w_I, selected, valid, scaling: float, heads: str = "sum") -> torch.Tensor:
        """`sparse_kl` of a chunk (B, T), recomputed in backward (`maybe_checkpoint`)."""
        return maybe_checkpoint(sparse_kl, q, k, q_I, k_I, w_I, selected, valid, scaling, heads)

    def dense(self, q, k, v, allowed, scaling: float) -> torch.Tensor:
        raise NotImplementedError("the reference backend has no dense shortcut")

    def warmup_loss(self, q, k, q_I, k_I, w_I, query_pos, key_padding, scaling: float, heads: str = "sum",
                    row_weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return warmup_indexer_loss(q, k, q_I, k_I, w_I, query_pos, key_padding, scaling, self.chunk_elements, heads, row_weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


REFERENCE = Backend()


def dsa_attention(
    q, k, v, q_I, k_I, w_I, query_pos, key_padding, topk: int, scaling: float, training: bool, backend: Backend = REFERENCE,
    selection: str = "indexer", heads: str = "sum", row_weight: torch.Tensor | None = None,
):
    """Top-k sparse attention of one layer and, in training, the sparse-stage indexer loss.

    q: B, Hq, T, D; k, v: B, Hkv, S, D (cache and new tokens); q_I: B, T, H_I, d_I; k_I: B, S, d_I; w_I: B, T, H_I;
    query_pos: T (S - T, ..., S - 1); key_padding: B, S bool (True = real token) or None.
    Returns out: B, T, Hq, D and the mean over real query rows of `sparse_kl` (None unless training), each row
    weighted by row_weight (B, T; None: 1).
    A chunk sees only the keys up to its last query: the later ones are never allowed. selection "oracle" ranks
    the keys by the true attention (`oracle_topk`) instead of the indexer's scores. heads: the target's head
    aggregation (`attention_target`).
    """
    S, T = k.shape[2], len(query_pos)
    work = backend.workspace()
    outs, kl_sum, n_rows = [], 0.0, 0
    for rows in query_chunks(T, S, backend.chunk_elements):
        n_keys = S - T + rows.stop
        k_c, v_c, k_I_c = k[:, :, :n_keys], v[:, :, :n_keys], k_I[:, :n_keys]
        padding = None if key_padding is None else key_padding[:, :n_keys]
        q_c, q_I_c, w_I_c, pos = q[:, :, rows], q_I[:, rows], w_I[:, rows], query_pos[rows]
        if backend.dense_shortcut and n_keys <= topk:
            allowed = allowed_keys(pos, padding, n_keys)  # B|1, C, n_keys
            outs.append(maybe_checkpoint(backend.dense, q_c, k_c, v_c, allowed, scaling))
            if training:
                kl = maybe_checkpoint(warmup_kl, q_c.detach(), k_c.detach(), q_I_c, k_I_c, w_I_c, allowed, scaling, heads)
        else:
            if selection == "oracle":
                selected, valid = oracle_topk(q_c, k_c, pos, padding, topk, scaling)  # B, C, K
            else:
                selected, valid = backend.select(q_I_c, k_I_c, w_I_c, pos, padding, topk, work)  # B, C, K
            attend = backend.attend_trainable if torch.is_grad_enabled() else backend.attend
            outs.append(attend(q_c, k_c, v_c, selected, valid, scaling, work))
            if training:
                kl = backend.sparse_kl(q_c.detach(), k_c.detach(), q_I_c, k_I_c, w_I_c, selected, valid, scaling, heads)
        if training:
            counted = query_rows(pos, key_padding, None if row_weight is None else row_weight[:, rows])  # B|1, C
            kl_sum, n_rows = kl_sum + (kl * counted).sum(), n_rows + counted.sum()
    loss = kl_sum / n_rows.clamp_min(1) if training else None  # n_rows is a tensor: no host sync
    return torch.cat(outs, dim=1), loss


def warmup_indexer_loss(q, k, q_I, k_I, w_I, query_pos, key_padding, scaling: float, chunk_elements: int = CHUNK_ELEMENTS,
                        heads: str = "sum", row_weight: torch.Tensor | None = None):  # fmt: skip
    """The dense warm-up's indexer loss of one layer: the mean over real query rows of `warmup_kl` (every allowed
    key), each row weighted by row_weight (B, T; None: 1). Shapes as `dsa_attention`; returns a scalar. The
    attention output itself is the stock dense one."""
    S = k.shape[2]
    kl_sum, n_rows = 0.0, 0
    for rows in query_chunks(len(query_pos), S, chunk_elements):
        allowed = allowed_keys(query_pos[rows], key_padding, S)
        kl = maybe_checkpoint(warmup_kl, q[:, :, rows].detach(), k.detach(), q_I[:, rows], k_I, w_I[:, rows], allowed, scaling, heads)
        counted = query_rows(query_pos[rows], key_padding, None if row_weight is None else row_weight[:, rows])
        kl_sum, n_rows = kl_sum + (kl * counted).sum(), n_rows + counted.sum()
    return kl_sum / n_rows.clamp_min(1)
