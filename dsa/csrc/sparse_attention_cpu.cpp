/* Top-k sparse attention on CPU (fp32, AVX2 + FMA): the forward of dsa.attention.sparse_attention.

For batch row b, query t and KV head h, with idx = indices[b, t] (K selected keys) and the G query heads
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

// One query t of one KV head: q: G x D (scaled, contiguous); idx, valid: K; out: G x D; p: G x K (work).
template <int D>
void attend(const float *q, Rows k, Rows v, const int64_t *idx, const uint8_t *valid, int64_t K, int64_t G, float *out, float *p) {
    constexpr int C = D / 8;  // 8-float registers per row
    // logits, 8 keys at a time: each key row is read from memory once and serves the G heads from cache
    int64_t j = 0;
    for (; j + 8 <= K; j += 8) {
        const float *rows[8];
        for (int i = 0; i < 8; i++) rows[i] = k[idx[j + i]];
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
        for (int64_t n = begin; n < end; n++) {
            const int64_t b = n / (T * Hkv), t = n / Hkv % T, h = n % Hkv;
            const int64_t *idx = ip + (b * T + t) * K;
            for (int64_t j = 0; j < K; j++) TORCH_CHECK(idx[j] >= 0 && idx[j] < S, "sparse attention: key index ", idx[j], " is not in [0, ", S, ")");
            Rows k_rows{kp + b * k.stride(0) + h * k.stride(1), k.stride(2)};
            Rows v_rows{vp + b * v.stride(0) + h * v.stride(1), v.stride(2)};
            attend<D>(qp + ((b * Hkv + h) * T + t) * G * D, k_rows, v_rows, idx, mp + (b * T + t) * K, K, G, op + n * G * D, p.data());
        }
    });
}

}  // namespace

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
    m.def("sparse_attention_cpu", &sparse_attention_cpu, "Top-k sparse attention (forward), fp32, AVX2");
}
