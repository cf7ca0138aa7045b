/* DSA's kernels on CPU (fp32, AVX2 + FMA): the top-k selection's indexer scores and top-k, and the forward of
dsa.core.sparse_attention.

Indexer scores (index_scores_cpu). For batch row b, query t at cache index i = first + t and key s:
    scores[b, t, s] = sum_j w[b, t, j] * relu(q[b, t, j] . k[b, s]) + 1e-30 * (s + 1)    if s <= i
                    = -inf                                                               otherwise
(dsa.core.index_scores, with core.break_zero_ties's nudge and the causal mask.) For a block of
QUERY_BLOCK queries, KEYS key rows at a time are transposed into a panel (a register holds 8 keys' feature d),
and register tiles of ROWS (query, head) rows x KEYS keys accumulate their dot products over d with one
broadcast of q per row and d; ReLU, the head weight and the sum over heads are applied to the tile in
registers. Panels after a query's last allowed key are not computed for it. A single query (a decode step)
takes 8 keys at a time without a panel, summing each head's 8 dot products with one `hadd` tree.

Top-k (topk_cpu): see the comment above topk_row.

Sparse attention (sparse_attention_cpu). For batch row b, query t and KV head h, with idx = indices[b, t] (K selected keys) and the G query heads
h*G + g of KV head h:
    logits[g, j] = scaling * q[b, h*G + g, t] . k[b, h, idx[j]]
    p[g, :]      = softmax over the valid j of logits[g, :]        (no valid j: the output is 0)
    out[b, t, h*G + g] = sum_j p[g, j] * v[b, h, idx[j]]
The selected key and value rows are read by index straight from k and v (nothing of size K x D is written);
each one is loaded once for all G query heads. One task per (b, t, h), split over torch's threads.
*/
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// [sum(a[0]), ..., sum(a[7])]
inline __m256 sums_of_8(const __m256 *a) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

struct Rows {  // the rows of one batch row and KV head of k or v: row s starts at data + s * stride
    const float *data;
    int64_t stride;
    const float *operator[](int64_t s) const { return data + s * stride; }
};

// Ask for the n floats at x to be brought into L1 (one prefetch per 64-byte line), ahead of their use: the
// hardware prefetchers do not foresee rows read by index, nor keep a decode step's stream of keys ahead enough.
inline void prefetch(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char *>(x + i), _MM_HINT_T0);
}

constexpr int64_t AHEAD = 16;  // sparse attention: key rows prefetched this many keys before their use

// One query t of one KV head: q: G x D (scaled, contiguous); idx, valid: K; out: G x D; p: G x K (work).
// next_k, next_idx: the key rows of the next task, whose first AHEAD rows are prefetched during the softmax.
template <int D>
void attend(const float *q, Rows k, Rows v, const int64_t *idx, const uint8_t *valid, int64_t K, int64_t G, float *out, float *p,
            Rows next_k, const int64_t *next_idx) {
    constexpr int C = D / 8;  // 8-float registers per row
    // logits, 8 keys at a time: each key row is read from memory once and serves the G heads from cache
    int64_t j = 0;
    for (; j + 8 <= K; j += 8) {
        const float *rows[8];
        for (int i = 0; i < 8; i++) rows[i] = k[idx[j + i]];
        for (int64_t i = j + AHEAD; i < std::min(j + AHEAD + 8, K); i++) prefetch(k[idx[i]], D);
        for (int64_t g = 0; g < G; g++) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int c = 0; c < C; c++) {
                __m256 qc = _mm256_loadu_ps(q + g * D + 8 * c);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(rows[i] + 8 * c), acc[i]);
            }
            _mm256_storeu_ps(p + g * K + j, sums_of_8(acc));
        }
    }
    for (; j < K; j++) {  // the last K % 8 keys
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int d = 0; d < D; d++) s += q[g * D + d] * k[idx[j]][d];
            p[g * K + j] = s;
        }
    }
    if (next_idx)
        for (int64_t i = 0; i < std::min(AHEAD, K); i++) prefetch(next_k[next_idx[i]], D);
    int64_t n_valid = 0;
    for (j = 0; j < K; j++) n_valid += valid[j];
    for (int64_t g = 0; g < G; g++) {
        float *pg = p + g * K, *o = out + g * D;
        if (n_valid == 0) {
            for (int d = 0; d < D; d++) o[d] = 0.f;
            continue;
        }
        // softmax over the valid keys; exp of logit - max clamped to [-87, 0] (finite: the valid ones are <= 0,
        // and exp(-87) is below fp32's resolution of a sum >= 1), then 0 for the invalid ones
        float m = std::numeric_limits<float>::lowest();
        for (j = 0; j < K; j++) m = std::max(m, valid[j] ? pg[j] : std::numeric_limits<float>::lowest());
        float z = 0.f;
        for (j = 0; j < K; j++) {
            float e = std::exp(std::clamp(pg[j] - m, -87.f, 0.f)) * (valid[j] ? 1.f : 0.f);
            pg[j] = e;
            z += e;
        }
        // out[g] = sum_j p[g, j] v[idx[j]] / z, the value rows read from cache after the first head
        __m256 acc[C];
        for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
        for (j = 0; j < K; j++) {
            __m256 pj = _mm256_broadcast_ss(pg + j);
            const float *row = v[idx[j]];
            for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 8 * c), acc[c]);
        }
        __m256 inv_z = _mm256_set1_ps(1.f / z);
        for (int c = 0; c < C; c++) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], inv_z));
    }
}

template <int D>
void attend_all(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &indices,
                const at::Tensor &valid, at::Tensor &out) {
    // q: B, Hkv, T, G, D; k, v: B, Hkv, S, D (rows of D contiguous floats); indices, valid: B, T, K; out: B, T, Hkv, G, D
    const int64_t B = q.size(0), Hkv = q.size(1), T = q.size(2), G = q.size(3), S = k.size(2), K = indices.size(2);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const int64_t *ip = indices.data_ptr<int64_t>();
    const uint8_t *mp = reinterpret_cast<const uint8_t *>(valid.data_ptr<bool>());  // 0 / 1 bytes, vectorizable
    float *op = out.data_ptr<float>();
    at::parallel_for(0, B * T * Hkv, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> p(G * K);
        // task n: batch row b, query t, KV head h (n = (b * T + t) * Hkv + h); its key rows
        auto keys_of = [&](int64_t n) { return Rows{kp + n / (T * Hkv) * k.stride(0) + n % Hkv * k.stride(1), k.stride(2)}; };
        for (int64_t n = begin; n < end; n++) {
            const int64_t b = n / (T * Hkv), t = n / Hkv % T, h = n % Hkv;
            const int64_t *idx = ip + n / Hkv * K;  // the selection of query (b, t)
            for (int64_t j = 0; j < K; j++) TORCH_CHECK(idx[j] >= 0 && idx[j] < S, "sparse attention: key index ", idx[j], " is not in [0, ", S, ")");
            Rows v_rows{vp + b * v.stride(0) + h * v.stride(1), v.stride(2)};
            const bool last = n + 1 == end;  // (a prefetch never faults: the next task's indices are checked in its turn)
            attend<D>(qp + ((b * Hkv + h) * T + t) * G * D, keys_of(n), v_rows, idx, mp + n / Hkv * K, K, G, op + n * G * D, p.data(),
                      last ? Rows{nullptr, 0} : keys_of(n + 1), last ? nullptr : ip + (n + 1) / Hkv * K);
        }
    });
}

constexpr int64_t QUERY_BLOCK = 32;  // queries that share each panel of keys in index_scores_cpu
constexpr int KEYS = 24;             // keys per panel
constexpr int ROWS = 4;              // (query, head) rows per register tile: ROWS x KEYS accumulators

inline float minus_infinity() {  // built from its bits: -ffast-math assumes no infinities in arithmetic
    const uint32_t bits = 0xff800000u;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

// [1e-30 * (s0 + 1), ..., 1e-30 * (s0 + 8)]: the nudges of keys s0 .. s0 + 7, float(s + 1) * 1e-30f as recency_nudge
inline __m256 nudges_of_8(int64_t s0) {
    return _mm256_mul_ps(_mm256_add_ps(_mm256_set1_ps(float(s0)), _mm256_setr_ps(1, 2, 3, 4, 5, 6, 7, 8)), _mm256_set1_ps(1e-30f));
}

// r[i][j] -> r[j][i] for an 8 x 8 block of floats
inline void transpose_8x8(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}

// panel[d * KEYS + i] = k[s0 + i][d]: KEYS key rows, transposed so that a register holds 8 keys' feature d
template <int D>
void pack_panel(Rows k, int64_t s0, float *panel) {
    for (int i0 = 0; i0 < KEYS; i0 += 8)
        for (int d0 = 0; d0 < D; d0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(k[s0 + i0 + i] + d0);
            transpose_8x8(r);
            for (int d = 0; d < 8; d++) _mm256_storeu_ps(panel + (d0 + d) * KEYS + i0, r[d]);
        }
}

// For NR rows (query t, indexer head j) of q: out[t, s0 : s0 + KEYS] += w[t, j] * relu(q[t, j] . k[s]), the dot
// products of all NR rows and KEYS keys accumulated in registers (no horizontal sums).
template <int D, int NR>
void rows_times_panel(const float *q, const float *w, const float *panel, int64_t H, int64_t row0, float *out, int64_t S) {
    constexpr int V = KEYS / 8;  // registers per panel row
    const __m256 zero = _mm256_setzero_ps();
    __m256 acc[NR][V];
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < V; v++) acc[r][v] = zero;
    for (int d = 0; d < D; d++) {
        __m256 p[V];
        for (int v = 0; v < V; v++) p[v] = _mm256_loadu_ps(panel + d * KEYS + 8 * v);
        for (int r = 0; r < NR; r++) {
            const __m256 qd = _mm256_broadcast_ss(q + (row0 + r) * D + d);
            for (int v = 0; v < V; v++) acc[r][v] = _mm256_fmadd_ps(qd, p[v], acc[r][v]);
        }
    }
    for (int r = 0; r < NR; r++) {
        const int64_t row = row0 + r, t = row / H;
        const __m256 wr = _mm256_set1_ps(w[row]);
        float *o = out + t * S;
        for (int v = 0; v < V; v++) _mm256_storeu_ps(o + 8 * v, _mm256_fmadd_ps(wr, _mm256_max_ps(acc[r][v], zero), _mm256_loadu_ps(o + 8 * v)));
    }
}

constexpr int64_t ONE_QUERY_AHEAD = 32;  // one-query scores: key rows prefetched this many keys before their use

// One query's scores over keys s0, s0 + 8, ... < end (groups of 8): q: H x D, out: its row. A decode step: each
// key row is read from memory once, for all heads; the 8 dot products of a head are summed by one hadd tree.
// The rows ONE_QUERY_AHEAD keys on are prefetched.
template <int D>
void score_one_query(const float *q, const float *w, Rows k, int64_t H, int64_t end, float *out) {
    constexpr int C = D / 8;
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t s0 = 0; s0 + 8 <= end; s0 += 8) {
        const float *rows[8];
        for (int i = 0; i < 8; i++) rows[i] = k[s0 + i];
        if (s0 + ONE_QUERY_AHEAD + 8 <= end) prefetch(k[s0 + ONE_QUERY_AHEAD], 8 * k.stride);  // 8 rows (and any gaps)
        __m256 score = nudges_of_8(s0);
        for (int64_t j = 0; j < H; j++) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = zero;
            for (int c = 0; c < C; c++) {
                const __m256 qc = _mm256_loadu_ps(q + j * D + 8 * c);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(rows[i] + 8 * c), acc[i]);
            }
            score = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_max_ps(sums_of_8(acc), zero), score);
        }
        _mm256_storeu_ps(out + s0, score);
    }
}

// Queries t0 .. t0 + n_q - 1 of one batch row: q: T x H x D and w: T x H (contiguous), k: S key rows,
// out: T x S (row t at out + t * S), panel: KEYS x D floats of work space. Query t may see keys 0 .. first + t.
// Keys in panels of KEYS (a single query: groups of 8, `score_one_query`), then the last keys one by one,
// then -inf after each query's last key (which also overwrites what a panel computed past it).
template <int D>
void score_block(const float *q, const float *w, Rows k, int64_t H, int64_t S, int64_t first, int64_t t0, int64_t n_q, float *out, float *panel) {
    const int64_t block_last = std::min(S - 1, first + t0 + n_q - 1);  // the last key any query of the block sees
    const int64_t step = n_q == 1 ? 8 : KEYS, end = std::min(S, block_last + 1) / step * step;  // keys [0, end) in groups
    if (n_q == 1) {
        score_one_query<D>(q + t0 * H * D, w + t0 * H, k, H, end, out + t0 * S);
    } else {
        for (int64_t s0 = 0; s0 < end; s0 += KEYS) {
            pack_panel<D>(k, s0, panel);
            const int64_t t_start = std::max(t0, s0 - first);  // the queries that see key s0
            for (int64_t t = t_start; t < t0 + n_q; t++)  // start from the nudge 1e-30 * (s + 1), as recency_nudge
                for (int i = 0; i < KEYS; i += 8)
                    _mm256_storeu_ps(out + t * S + s0 + i, nudges_of_8(s0 + i));
            int64_t row = t_start * H;
            for (; row + ROWS <= (t0 + n_q) * H; row += ROWS) rows_times_panel<D, ROWS>(q, w, panel, H, row, out + s0, S);
            for (; row < (t0 + n_q) * H; row++) rows_times_panel<D, 1>(q, w, panel, H, row, out + s0, S);
        }
    }
    const float neg_inf = minus_infinity();
    for (int64_t t = t0; t < t0 + n_q; t++) {
        const int64_t last = std::min(S - 1, first + t);
        for (int64_t s = end; s <= last; s++) {  // keys after the groups
            float score = 0.f;
            for (int64_t j = 0; j < H; j++) {
                float dot = 0.f;
                for (int d = 0; d < D; d++) dot += q[(t * H + j) * D + d] * k[s][d];
                score += w[t * H + j] * std::max(dot, 0.f);
            }
            out[t * S + s] = score + float(s + 1) * 1e-30f;
        }
        std::fill(out + t * S + last + 1, out + (t + 1) * S, neg_inf);
    }
}

template <int D>
void score_all(const at::Tensor &q, const at::Tensor &k, const at::Tensor &w, int64_t first, at::Tensor &out) {
    // q: B, T, H, D and w: B, T, H (contiguous); k: B, S, D (rows contiguous); out: B, T, S (contiguous)
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), S = k.size(1);
    const int64_t n_blocks = (T + QUERY_BLOCK - 1) / QUERY_BLOCK;
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *wp = w.data_ptr<float>();
    float *op = out.data_ptr<float>();
    at::parallel_for(0, B * n_blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> panel(KEYS * D);
        for (int64_t n = begin; n < end; n++) {
            const int64_t b = n / n_blocks, t0 = n % n_blocks * QUERY_BLOCK;
            Rows k_rows{kp + b * k.stride(0), k.stride(1)};
            score_block<D>(qp + b * T * H * D, wp + b * T * H, k_rows, H, S, first, t0, std::min(QUERY_BLOCK, T - t0), op + b * T * S, panel.data());
        }
    });
}

// Top-k (topk_cpu): the K largest entries of each row by radix selection on the floats' bits, mapped to
// unsigned integers in the same order (sign flipped for positives, all bits for negatives). Level 1 counts
// the top 11 bits of every entry; the bin holding the K-th largest follows from the counts; one vectorized pass
// takes the entries of higher bins (compared as floats against the bin's edges) and keeps those of that bin as
// candidates. Levels 2 (the next 11 bits) and 3 (the last 10) repeat this on the candidates. Entries equal to
// the K-th largest are taken in index order. No comparison sort (torch.topk sorts partially).

inline uint32_t ordered_bits(float x) {  // a < b  <=>  ordered_bits(a) < ordered_bits(b), for non-NaN floats
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    u = u == 0x80000000u ? 0u : u;  // -0 as +0: equal as floats, so equal here
    return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

inline float lowest_at_or_above(uint32_t key) {  // the lowest float x with ordered_bits(x) >= key, NaNs aside
    key = std::max(key, 0x007FFFFFu);  // the keys below that of -inf are NaNs
    const uint32_t u = key & 0x80000000u ? key ^ 0x80000000u : ~key;
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

struct Level {
    int shift;
    uint32_t bins;
};
constexpr int TOP_SHIFT = 21;          // level 1: the top 11 bits
constexpr uint32_t TOP_BINS = 2048;
constexpr Level LEVELS[2] = {{10, 2048}, {0, 1024}};  // levels 2 and 3, on the candidates

// The bin of the need-th largest of the counted entries, and how many are in higher bins.
inline uint32_t bin_of(const uint32_t *hist, uint32_t bins, int64_t need, int64_t &above) {
    uint32_t bin = bins - 1;
    above = 0;
    while (above + hist[bin] < need) above += hist[bin--];
    return bin;
}

// Row x of n entries -> its K largest positions in out (K < n). cand: n entries, hist: 4 x 2048 of work space.
void topk_row(const float *x, int64_t n, int64_t K, int64_t *out, int32_t *cand, uint32_t *hist) {
    // level 1: four interleaved histograms of the top 11 bits (repeated bins do not wait on each other)
    std::fill(hist, hist + 4 * TOP_BINS, 0u);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int h = 0; h < 4; h++) hist[h * TOP_BINS + (ordered_bits(x[i + h]) >> TOP_SHIFT)]++;
    for (; i < n; i++) hist[ordered_bits(x[i]) >> TOP_SHIFT]++;
    for (uint32_t b = 0; b < TOP_BINS; b++) hist[b] += hist[TOP_BINS + b] + hist[2 * TOP_BINS + b] + hist[3 * TOP_BINS + b];
    int64_t above;
    const uint32_t bin = bin_of(hist, TOP_BINS, K, above);
    // entries >= the next bin's lowest value are taken, entries >= this bin's lowest are candidates
    const bool top_bin = bin == TOP_BINS - 1;
    const __m256 next_low = _mm256_set1_ps(top_bin ? 0.f : lowest_at_or_above((bin + 1) << TOP_SHIFT)), low = _mm256_set1_ps(lowest_at_or_above(bin << TOP_SHIFT));
    int64_t taken = 0, m = 0;
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        int in_bin = _mm256_movemask_ps(_mm256_cmp_ps(v, low, _CMP_GE_OQ));
        if (!in_bin) continue;
        const int higher = top_bin ? 0 : _mm256_movemask_ps(_mm256_cmp_ps(v, next_low, _CMP_GE_OQ));
        in_bin &= ~higher;
        for (int bits = higher; bits; bits &= bits - 1) out[taken++] = i + __builtin_ctz(bits);
        for (int bits = in_bin; bits; bits &= bits - 1) cand[m++] = int32_t(i + __builtin_ctz(bits));
    }
    for (; i < n; i++) {
        const uint32_t b = ordered_bits(x[i]) >> TOP_SHIFT;
        if (b > bin) out[taken++] = i;
        else if (b == bin) cand[m++] = int32_t(i);
    }
    // levels 2 and 3 on the candidates (their higher bits are all equal), compacted in place
    for (const Level &L : LEVELS) {
        if (taken + m == K) break;  // every candidate is needed
        std::fill(hist, hist + L.bins, 0u);
        for (int64_t c = 0; c < m; c++) hist[(ordered_bits(x[cand[c]]) >> L.shift) & (L.bins - 1)]++;
        const uint32_t level_bin = bin_of(hist, L.bins, K - taken, above);
        int64_t kept = 0;
        for (int64_t c = 0; c < m; c++) {
            const int32_t j = cand[c];
            const uint32_t b = (ordered_bits(x[j]) >> L.shift) & (L.bins - 1);
            if (b > level_bin) out[taken++] = j;
            else if (b == level_bin) cand[kept++] = j;
        }
        m = kept;
    }
    for (int64_t c = 0; taken < K; c++) out[taken++] = cand[c];  // all needed, or equal to the K-th largest
}

}  // namespace

// q: B, T, H, D; k: B, S, D (rows contiguous); w: B, T, H; out: B, T, S (contiguous); fp32, D in {8, 16, 32, 64, 128}.
// Query t sits at cache index first + t. Returns out, filled as the header says.
at::Tensor index_scores_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &w, int64_t first, at::Tensor out) {
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = k.size(1);
    for (const at::Tensor *x : std::initializer_list<const at::Tensor *>{&q, &k, &w, &out})
        TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat, "index_scores_cpu: needs fp32 CPU tensors");
    TORCH_CHECK(k.size(0) == B && k.size(2) == D && w.size(0) == B && w.size(1) == T && w.size(2) == H, "index_scores_cpu: shapes of q ", q.sizes(), ", k ", k.sizes(), ", w ", w.sizes(), " do not match");
    TORCH_CHECK(k.stride(2) == 1, "index_scores_cpu: indexer key rows must be contiguous");
    TORCH_CHECK(out.is_contiguous() && out.size(0) == B && out.size(1) == T && out.size(2) == S, "index_scores_cpu: out must be a contiguous ", B, " x ", T, " x ", S, " tensor");
    at::Tensor qc = q.contiguous(), wc = w.contiguous();
    switch (D) {
        case 8: score_all<8>(qc, k, wc, first, out); break;
        case 16: score_all<16>(qc, k, wc, first, out); break;
        case 32: score_all<32>(qc, k, wc, first, out); break;
        case 64: score_all<64>(qc, k, wc, first, out); break;
        case 128: score_all<128>(qc, k, wc, first, out); break;
        default: TORCH_CHECK(false, "index_scores_cpu: indexer head_dim ", D, " is not one of 8, 16, 32, 64, 128");
    }
    return out;
}

// scores: B, T, S (fp32, no NaN) -> the positions of the K largest entries of each row, B, T, K (int64, in no order).
at::Tensor topk_cpu(const at::Tensor &scores, int64_t K) {
    TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 3, "topk_cpu: needs a 3-d fp32 CPU tensor");
    const int64_t B = scores.size(0), T = scores.size(1), S = scores.size(2);
    TORCH_CHECK(K >= 1 && K <= S, "topk_cpu: k = ", K, " is not in [1, ", S, "]");
    at::Tensor x = scores.contiguous(), out = at::empty({B, T, K}, scores.options().dtype(at::kLong));
    if (K == S) return out.copy_(at::arange(S, out.options()).expand({B, T, S}));
    const float *xp = x.data_ptr<float>();
    int64_t *op = out.data_ptr<int64_t>();
    at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint32_t> hist(4 * TOP_BINS);
        std::vector<int32_t> cand(S);
        for (int64_t r = begin; r < end; r++) topk_row(xp + r * S, S, K, op + r * K, cand.data(), hist.data());
    });
    return out;
}

// q: B, Hq, T, D; k, v: B, Hkv, S, D; indices (int64), valid (bool): B, T, K  ->  B, T, Hq, D. fp32, D in {8, 16, 32, 64, 128}.
at::Tensor sparse_attention_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &indices,
                                const at::Tensor &valid, double scaling) {
    const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
    for (const at::Tensor *x : {&q, &k, &v})
        TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat, "sparse_attention_cpu: needs fp32 CPU tensors");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "sparse_attention_cpu: key and value rows must be contiguous");
    TORCH_CHECK(Hq % Hkv == 0, "sparse_attention_cpu: ", Hq, " query heads are not a multiple of ", Hkv, " KV heads");
    const int64_t G = Hq / Hkv;
    at::Tensor qs = (q * scaling).view({B, Hkv, G, T, D}).transpose(2, 3).contiguous();  // B, Hkv, T, G, D
    at::Tensor out = at::empty({B, T, Hkv, G, D}, q.options());
    at::Tensor idx = indices.to(at::kLong).contiguous(), mask = valid.to(at::kBool).contiguous();
    switch (D) {
        case 8: attend_all<8>(qs, k, v, idx, mask, out); break;
        case 16: attend_all<16>(qs, k, v, idx, mask, out); break;
        case 32: attend_all<32>(qs, k, v, idx, mask, out); break;
        case 64: attend_all<64>(qs, k, v, idx, mask, out); break;
        case 128: attend_all<128>(qs, k, v, idx, mask, out); break;
        default: TORCH_CHECK(false, "sparse_attention_cpu: head_dim ", D, " is not one of 8, 16, 32, 64, 128");
    }
    return out.view({B, T, Hq, D});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("index_scores_cpu", &index_scores_cpu, "Lightning-indexer scores with the recency nudge and the causal mask, fp32, AVX2");
    m.def("topk_cpu", &topk_cpu, "Positions of the k largest entries of each row (radix selection), fp32");
    m.def("sparse_attention_cpu", &sparse_attention_cpu, "Top-k sparse attention (forward), fp32, AVX2");
}
