// archlab's attention of a decoding step's queries over a KV cache (archlab/kernels/__init__.py describes it): the
// queries of the last N positions p - N + 1 .. p (N = 1 for a one-token step, k + 1 for a speculative verify pass),
// query i (position p_i = p - N + 1 + i) reading the keys r..p_i (causal):
//   out[b, a, i] = sum_{j in r..p_i} e_j v[b, g, j] / sum_{j in r..p_i} e_j,   e_j = exp(s_j - max_j s_j),
//   s_j = scale * q[b, a, i] . k[b, g, j],   g = a / (A / G),   p = positions[0]
// q [B, A, N, D], k [B, G, L, D], v [B, G, L, Dv] float32, D and Dv multiples of 16, each with its last dimension
// contiguous (any other strides: a KV cache's view of its storage is read in place). Only the keys r..p_i are read:
// cached_attention (a static cache, or a dynamic one with p = L - 1) reads r = 0 (the positions after p are not
// written yet); cached_attention_padded (a left-padded batch) r = starts[b] for row b (the positions before it are
// padding). Each query is computed by the same operations whatever N and the other queries are: a position's result
// is the same to the bit in a one-token step and in an N-token pass. On AVX-512 the query heads that share a key/value
// head (grouped-query attention) are computed together at each position, each key and value vector loaded once for
// all of them (attend512_q), each query's operations unchanged.
// The dot products use the 16-lane scheme of f32_rows.cpp (two chains of 16-lane blocks, folded 8 + 8, 4 + 4,
// 2 + 2, 1 + 1; on AVX-512 16 keys' folds at once, lanes.h's dots16x16); exp is lanes.h's (Cephes' expf, the same
// operations in either width), 16 keys at a time; the sum of the weights in 16 lanes, key j in lane (j - r) % 16,
// folded the same way; the weighted sum of the values adds e_j v_j lane by lane in key order. The AVX2 variant carries each 16 lanes as two 8-lane halves: both variants give the same
// result to the bit, and a row's result depends only on its own query, keys and values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "lanes.h"

namespace {

using archlab_lanes::dot256;
using archlab_lanes::dot512;
using archlab_lanes::dots16x16;
using archlab_lanes::kLanes;

// s[j] = scale * q . k[j * ks] for j in r..p: 16 keys at a time (dots16x16), the rest one by one; the same values
template <class T>
ARCHLAB_AVX512 void scores512(float* s, const T* q, const T* k, int64_t ks, int64_t r, int64_t p, int64_t D,
                              float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t j = r;
  for (; j + kLanes <= p + 1; j += kLanes)
    _mm512_storeu_ps(s + j, _mm512_mul_ps(vscale, dots16x16(q, k + j * ks, ks, D)));
  for (; j <= p; ++j) s[j] = scale * dot512(q, k + j * ks, D);
}

template <class T>
ARCHLAB_AVX2 void scores256(float* s, const T* q, const T* k, int64_t ks, int64_t r, int64_t p, int64_t D,
                            float scale) {
  for (int64_t j = r; j <= p; ++j) s[j] = scale * dot256(q, k + j * ks, D);
}

// the largest of x[0..n) (exact in any order)
float largest(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[0..n) <- e_j = exp(x_j - m), m their largest; returns sum_j e_j. 16 keys at a time, key j in lane j % 16 (the last
// block padded with -inf, whose weights are 0), the lanes' sums folded as lanes.h folds: either width the same bits.
ARCHLAB_AVX512 float weights512(float* x, int64_t n) {
  const __m512 m = _mm512_set1_ps(largest(x, n));
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m512 e = archlab_lanes::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), m));
    _mm512_storeu_ps(x + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    float tail[kLanes];
    std::fill(tail, tail + kLanes, -std::numeric_limits<float>::infinity());
    std::copy(x + j, x + n, tail);
    const __m512 e = archlab_lanes::exp16(_mm512_sub_ps(_mm512_loadu_ps(tail), m));
    _mm512_storeu_ps(tail, e);
    std::copy(tail, tail + (n - j), x + j);
    sum = _mm512_add_ps(sum, e);
  }
  return archlab_lanes::fold16(sum);
}

ARCHLAB_AVX2 float weights256(float* x, int64_t n) {
  const __m256 m = _mm256_set1_ps(largest(x, n));
  __m256 lo = _mm256_setzero_ps(), hi = lo;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m256 e_lo = archlab_lanes::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
    const __m256 e_hi = archlab_lanes::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), m));
    _mm256_storeu_ps(x + j, e_lo);
    _mm256_storeu_ps(x + j + 8, e_hi);
    lo = _mm256_add_ps(lo, e_lo);
    hi = _mm256_add_ps(hi, e_hi);
  }
  if (j < n) {
    float tail[kLanes];
    std::fill(tail, tail + kLanes, -std::numeric_limits<float>::infinity());
    std::copy(x + j, x + n, tail);
    const __m256 e_lo = archlab_lanes::exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), m));
    const __m256 e_hi = archlab_lanes::exp8(_mm256_sub_ps(_mm256_loadu_ps(tail + 8), m));
    _mm256_storeu_ps(tail, e_lo);
    _mm256_storeu_ps(tail + 8, e_hi);
    std::copy(tail, tail + (n - j), x + j);
    lo = _mm256_add_ps(lo, e_lo);
    hi = _mm256_add_ps(hi, e_hi);
  }
  return archlab_lanes::fold16(lo, hi);
}

// o[t][0..Dv) = sum_{j in r..p} e[t][j] v[j * vs + 0..Dv) for Q queries over one value head, lane by lane in key
// order (o = fma(e_j, v_j, o) from 0): the same operations in either width. 64 lanes at a time held in registers
// across the keys (4 chains, not one through memory), each value vector loaded once for the Q queries.
template <int Q, int NV, class T>
ARCHLAB_AVX512 void weighted512(float* const* o, const float* const* e, const T* v, int64_t vs, int64_t r,
                                int64_t p) {
  __m512 acc[Q][NV];
  for (int t = 0; t < Q; ++t)
    for (int i = 0; i < NV; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t j = r; j <= p; ++j) {
    const T* vj = v + j * vs;
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = archlab_lanes::load16(vj + i * kLanes);
    for (int t = 0; t < Q; ++t) {
      const __m512 w = _mm512_set1_ps(e[t][j]);
      for (int i = 0; i < NV; ++i) acc[t][i] = _mm512_fmadd_ps(w, vv[i], acc[t][i]);
    }
  }
  for (int t = 0; t < Q; ++t)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o[t] + i * kLanes, acc[t][i]);
}

// weighted512 over all Dv lanes: 64 at a time, then the 1-3 blocks of 16 left
template <int Q, class T>
ARCHLAB_AVX512 void weighted512_all(float* const* o, const float* const* e, const T* v, int64_t vs, int64_t r,
                                    int64_t p, int64_t Dv) {
  for (int64_t c = 0; c < Dv; c += 4 * kLanes) {
    const int64_t blocks = std::min<int64_t>(4, (Dv - c) / kLanes);
    float* oc[Q];
    for (int t = 0; t < Q; ++t) oc[t] = o[t] + c;
    const T* vc = v + c;
    if (blocks == 4) weighted512<Q, 4>(oc, e, vc, vs, r, p);
    else if (blocks == 3) weighted512<Q, 3>(oc, e, vc, vs, r, p);
    else if (blocks == 2) weighted512<Q, 2>(oc, e, vc, vs, r, p);
    else weighted512<Q, 1>(oc, e, vc, vs, r, p);
  }
}

template <int NV, class T>
ARCHLAB_AVX2 void weighted256(float* o, const float* e, const T* v, int64_t vs, int64_t r, int64_t p) {
  __m256 acc[2 * NV];
  for (int i = 0; i < 2 * NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = r; j <= p; ++j) {
    const __m256 s = _mm256_set1_ps(e[j]);
    const T* vj = v + j * vs;
    for (int i = 0; i < 2 * NV; ++i) acc[i] = _mm256_fmadd_ps(s, archlab_lanes::load8(vj + i * 8), acc[i]);
  }
  for (int i = 0; i < 2 * NV; ++i) _mm256_storeu_ps(o + i * 8, acc[i]);
}

template <class T>
void weighted(float* o, const float* e, const T* v, int64_t vs, int64_t r, int64_t p, int64_t Dv, int64_t isa) {
  if (isa == 512) return weighted512_all<1>(&o, &e, v, vs, r, p, Dv);
  for (int64_t c = 0; c < Dv; c += 4 * kLanes) {  // 64 lanes (4 blocks of 16), then the 1-3 blocks left
    const int64_t blocks = std::min<int64_t>(4, (Dv - c) / kLanes);
    float* oc = o + c;
    const T* vc = v + c;
    if (blocks == 4) weighted256<4>(oc, e, vc, vs, r, p);
    else if (blocks == 3) weighted256<3>(oc, e, vc, vs, r, p);
    else if (blocks == 2) weighted256<2>(oc, e, vc, vs, r, p);
    else weighted256<1>(oc, e, vc, vs, r, p);
  }
}

// Q queries that read one key/value head over one key range (the A / G query heads of a group at one position: a
// one-token step's, or a verify pass's at each position), AVX-512, D = 16 DB (DB <= 4): each key vector and value
// vector loaded once for the Q queries, the queries held in registers. Each query's operations are those above:
// dot_lanes512's two chains, folds16x16 over 16 keys (fold16 for the keys past the last block), weights512,
// weighted512's multiply-adds in key order; so each result is the one-query path's, to the bit. Measured on the AMD
// EPYC (AVX-512) kind, 30 layers of SmolLM2's shapes: a 10-row step 1.30x, a 9-token verify pass 1.38x, one token
// 1.20x (docs/speed.md, 2026-12-05).

// the lanes of q[t] . k_j before the fold, t < Q (the queries in registers qv): chain 0 (even blocks) + chain 1 (odd
// blocks), as dot_lanes512
template <int Q, int DB, class T>
ARCHLAB_AVX512 inline void key_lanes(const __m512 (&qv)[Q][DB], const T* kj, __m512* out) {
  __m512 c0[Q], c1[Q];
  for (int t = 0; t < Q; ++t) c0[t] = c1[t] = _mm512_setzero_ps();
  for (int d = 0; d + 1 < DB; d += 2) {
    const __m512 k0 = archlab_lanes::load16(kj + d * kLanes), k1 = archlab_lanes::load16(kj + (d + 1) * kLanes);
    for (int t = 0; t < Q; ++t) {
      c0[t] = _mm512_fmadd_ps(qv[t][d], k0, c0[t]);
      c1[t] = _mm512_fmadd_ps(qv[t][d + 1], k1, c1[t]);
    }
  }
  if (DB % 2) {
    const __m512 k0 = archlab_lanes::load16(kj + (DB - 1) * kLanes);
    for (int t = 0; t < Q; ++t) c0[t] = _mm512_fmadd_ps(qv[t][DB - 1], k0, c0[t]);
  }
  for (int t = 0; t < Q; ++t) out[t] = _mm512_add_ps(c0[t], c1[t]);
}

template <int Q, int DB, class T>
ARCHLAB_AVX512 void scores512_q(float* const* s, const T* const* q, const T* k, int64_t ks, int64_t r,
                                int64_t p, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 qv[Q][DB];
  for (int t = 0; t < Q; ++t)
    for (int d = 0; d < DB; ++d) qv[t][d] = archlab_lanes::load16(q[t] + d * kLanes);
  __m512 sums[Q][kLanes];
  int64_t j = r;
  for (; j + kLanes <= p + 1; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      __m512 out[Q];
      key_lanes<Q, DB, T>(qv, k + (j + u) * ks, out);
      for (int t = 0; t < Q; ++t) sums[t][u] = out[t];
    }
    for (int t = 0; t < Q; ++t) _mm512_storeu_ps(s[t] + j, _mm512_mul_ps(vscale, archlab_lanes::folds16x16(sums[t])));
  }
  for (; j <= p; ++j) {
    __m512 out[Q];
    key_lanes<Q, DB, T>(qv, k + j * ks, out);
    for (int t = 0; t < Q; ++t) s[t][j] = scale * archlab_lanes::fold16(out[t]);
  }
}

// the whole equation for Q queries of one key/value head and range: scores, weights, weighted values, normalised
template <int Q, int DB, class T>
ARCHLAB_AVX512 void attend512_q(float* const* o, float* const* s, const T* const* q, const T* k, int64_t ks,
                                const T* v, int64_t vs, int64_t r, int64_t p, int64_t Dv, float scale) {
  scores512_q<Q, DB, T>(s, q, k, ks, r, p, scale);
  float sum[Q];
  for (int t = 0; t < Q; ++t) sum[t] = weights512(s[t] + r, p - r + 1);
  weighted512_all<Q>(o, s, v, vs, r, p, Dv);
  for (int t = 0; t < Q; ++t) {
    const float inv = 1.f / sum[t];
    for (int64_t c = 0; c < Dv; ++c) o[t][c] *= inv;
  }
}

template <class T>
using GroupFn = void (*)(float* const*, float* const*, const T* const*, const T*, int64_t, const T*, int64_t, int64_t,
                         int64_t, int64_t, float);

template <int Q, class T>
constexpr GroupFn<T> group_fn(int64_t DB) {
  return DB == 1   ? attend512_q<Q, 1, T>
         : DB == 2 ? attend512_q<Q, 2, T>
         : DB == 3 ? attend512_q<Q, 3, T>
                   : attend512_q<Q, 4, T>;
}

constexpr int kMaxShared = 4;  // queries computed together at most (registers: Q x DB for q, 2 Q chains)

// the tensor itself where its last dimension is contiguous (the kernel walks the others by their strides)
at::Tensor rows_in_place(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

void check_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) >= 1, "q [B, A, N, D], k, v [B, G, L, D]");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must be all float32 or all bfloat16");
  const int64_t B = q.size(0), A = q.size(1), D = q.size(3), G = k.size(1), L = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == G && v.size(2) == L && k.size(3) == D,
              "k and v must be [B, G, L, D] and [B, G, L, Dv] with q's B and D");
  TORCH_CHECK(G > 0 && A % G == 0 && D % kLanes == 0 && Dv % kLanes == 0 && D > 0 && Dv > 0,
              "A must be a multiple of G, D and Dv multiples of 16");
  TORCH_CHECK(isa == 512 || isa == 256, "isa must be 512 or 256");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be on the CPU");
}

// the last query's position p = positions[0], checked against the cache's L positions and the N queries before it
int64_t last_position(const at::Tensor& positions, int64_t L, int64_t N) {
  TORCH_CHECK(positions.numel() >= 1 && positions.scalar_type() == at::kLong, "positions must be int64 [1]");
  TORCH_CHECK(positions.device().is_cpu(), "positions must be on the CPU");
  const int64_t p = *positions.contiguous().data_ptr<int64_t>();
  TORCH_CHECK(p >= 0 && p < L, "position ", p, " is outside the cache's ", L, " positions");
  TORCH_CHECK(p >= N - 1, "position ", p, " leaves no key for the first of the ", N, " queries (positions ", p - N + 1,
              "..", p, ")");
  return p;
}

// the equation above for every (b, a, i), over the keys starts[b]..p_i (0..p_i where starts is null); q, k, v of
// element type T (float32, or bfloat16 widened as it is read), the result float32
template <class T>
at::Tensor attend_as(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* starts, int64_t p,
                     double scale, int64_t isa) {
  const int64_t B = q.size(0), A = q.size(1), N = q.size(2), D = q.size(3), G = k.size(1), Dv = v.size(3);
  at::Tensor out = at::empty({B, A, N, Dv}, q.options().dtype(at::kFloat));
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  float* op = out.data_ptr<float>();
  const int64_t per_group = A / G;
  const float fscale = static_cast<float>(scale);
  if (isa == 512 && per_group > 1 && D <= 4 * kLanes) {
    // units (b, g, i, c): the queries c kMaxShared .. of group g at position i, computed together (attend512_q)
    const int64_t chunks = (per_group + kMaxShared - 1) / kMaxShared;
    at::parallel_for(0, B * G * N * chunks, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> scratch(kMaxShared * (p + 1));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c = u % chunks, i = (u / chunks) % N, g = (u / (chunks * N)) % G, b = u / (chunks * N * G);
        const int64_t a0 = g * per_group + c * kMaxShared;
        const int64_t n_q = std::min<int64_t>(kMaxShared, (g + 1) * per_group - a0);
        const int64_t r = starts == nullptr ? 0 : starts[b], last = p - (N - 1) + i;
        const T* qs[kMaxShared];
        float* os[kMaxShared];
        float* ss[kMaxShared];
        for (int64_t t = 0; t < n_q; ++t) {
          qs[t] = qp + b * qs0 + (a0 + t) * qs1 + i * qs2;
          os[t] = op + ((b * A + a0 + t) * N + i) * Dv;
          ss[t] = scratch.data() + t * (p + 1);
        }
        const T* kh = kp + b * ks0 + g * ks1;
        const T* vh = vp + b * vs0 + g * vs1;
        const int64_t DB = D / kLanes;
        const GroupFn<T> fn = n_q == 4   ? group_fn<4, T>(DB)
                              : n_q == 3 ? group_fn<3, T>(DB)
                              : n_q == 2 ? group_fn<2, T>(DB)
                                         : group_fn<1, T>(DB);
        fn(os, ss, qs, kh, ks2, vh, vs2, r, last, Dv, fscale);
      }
    });
    return out;
  }
  at::parallel_for(0, B * A * N, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(p + 1);
    for (int64_t h = h0; h < h1; ++h) {  // h = (b A + a) N + i: out's row
      const int64_t i = h % N, a = (h / N) % A, b = h / (N * A), g = a / per_group;
      const int64_t r = starts == nullptr ? 0 : starts[b], last = p - (N - 1) + i;
      const T* qh = qp + b * qs0 + a * qs1 + i * qs2;
      const T* kh = kp + b * ks0 + g * ks1;
      const T* vh = vp + b * vs0 + g * vs1;
      float sum;  // the scores s_j become the weights e_j
      if (isa == 512) {
        scores512(s.data(), qh, kh, ks2, r, last, D, fscale);
        sum = weights512(s.data() + r, last - r + 1);
      } else {
        scores256(s.data(), qh, kh, ks2, r, last, D, fscale);
        sum = weights256(s.data() + r, last - r + 1);
      }
      float* o = op + h * Dv;
      weighted(o, s.data(), vh, vs2, r, last, Dv, isa);
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < Dv; ++c) o[c] *= inv;
    }
  });
  return out;
}

// attend_as for q's element type, the result in it (bfloat16: the float32 result rounded once)
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const int64_t* starts,
                  int64_t p, double scale, int64_t isa) {
  const at::Tensor q = rows_in_place(q_in), k = rows_in_place(k_in), v = rows_in_place(v_in);
  if (q.scalar_type() == at::kFloat) return attend_as<float>(q, k, v, starts, p, scale, isa);
  return attend_as<c10::BFloat16>(q, k, v, starts, p, scale, isa).to(at::kBFloat16);
}

// a static cache (or a dynamic one, p = L - 1): every row reads the keys 0..p_i
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& positions, double scale, int64_t isa) {
  check_tensors(q, k, v, isa);
  return attend(q, k, v, nullptr, last_position(positions, k.size(2), q.size(2)), scale, isa);
}

// a left-padded batch: row b reads the keys starts[b]..p_i
at::Tensor cached_attention_padded(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& starts, const at::Tensor& positions, double scale, int64_t isa) {
  check_tensors(q, k, v, isa);
  const int64_t N = q.size(2), p = last_position(positions, k.size(2), N), B = q.size(0);
  TORCH_CHECK(starts.dim() == 1 && starts.numel() == B && starts.scalar_type() == at::kLong && starts.device().is_cpu(),
              "starts must be int64 [B] on the CPU, one start per row");
  const at::Tensor sc = starts.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sp[b] >= 0 && sp[b] <= p - N + 1, "starts[", b, "] = ", sp[b], " is outside 0..", p - N + 1,
                " (the first query's position)");
  return attend(q, k, v, sp, p, scale, isa);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("cached_attention(Tensor q, Tensor k, Tensor v, Tensor positions, float scale, int isa) -> Tensor");
  m.def(
      "cached_attention_padded(Tensor q, Tensor k, Tensor v, Tensor starts, Tensor positions, float scale, "
      "int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) {
  m.impl("cached_attention", cached_attention);
  m.impl("cached_attention_padded", cached_attention_padded);
}
