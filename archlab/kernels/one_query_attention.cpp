// archlab's attention of one query row per head over a static KV cache (archlab/kernels/__init__.py describes it):
//   out[b, a] = sum_{j <= p} e_j v[b, g, j] / sum_{j <= p} e_j,   e_j = exp(s_j - max_j s_j),
//   s_j = scale * q[b, a] . k[b, g, j],   g = a / (A / G),   p = positions[0]
// q [B, A, 1, D], k [B, G, L, D], v [B, G, L, Dv] float32, D and Dv multiples of 16. Only the keys 0..p are read
// (the static cache's mask: the positions after p are not written yet). The dot products use the 16-lane scheme of
// f32_rows.cpp (two chains of 16-lane blocks, folded 8 + 8, 4 + 4, 2 + 2, 1 + 1); exp, the max and the sum are
// scalar, in key order; the weighted sum of the values adds e_j v_j lane by lane in key order. The AVX2 variant
// carries each 16 lanes as two 8-lane halves: both variants give the same result to the bit.
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

using archlab_lanes::fold16;
using archlab_lanes::kLanes;

ARCHLAB_AVX512 float dot512(const float* a, const float* b, int64_t D) {
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kLanes <= D; i += 2 * kLanes) {
    c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
    c1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + kLanes), _mm512_loadu_ps(b + i + kLanes), c1);
  }
  if (i < D) c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
  return fold16(_mm512_add_ps(c0, c1));
}

ARCHLAB_AVX2 float dot256(const float* a, const float* b, int64_t D) {
  __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  int64_t i = 0;
  for (; i + 2 * kLanes <= D; i += 2 * kLanes) {
    lo0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), lo0);
    hi0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), hi0);
    lo1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), lo1);
    hi1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), hi1);
  }
  if (i < D) {
    lo0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), lo0);
    hi0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), hi0);
  }
  return fold16(_mm256_add_ps(lo0, lo1), _mm256_add_ps(hi0, hi1));
}

// acc[0..Dv) += e * v[0..Dv), lane by lane (the same operation in either width)
ARCHLAB_AVX512 void axpy512(float* acc, float e, const float* v, int64_t Dv) {
  const __m512 s = _mm512_set1_ps(e);
  for (int64_t i = 0; i < Dv; i += kLanes)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(s, _mm512_loadu_ps(v + i), _mm512_loadu_ps(acc + i)));
}

ARCHLAB_AVX2 void axpy256(float* acc, float e, const float* v, int64_t Dv) {
  const __m256 s = _mm256_set1_ps(e);
  for (int64_t i = 0; i < Dv; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(s, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
}

at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& positions, double scale, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q [B, A, 1, D], k, v [B, G, L, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k, v must be float32");
  const int64_t B = q.size(0), A = q.size(1), D = q.size(3), G = k.size(1), L = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == G && v.size(2) == L && k.size(3) == D,
              "k and v must be [B, G, L, D] and [B, G, L, Dv] with q's B and D");
  TORCH_CHECK(G > 0 && A % G == 0 && D % kLanes == 0 && Dv % kLanes == 0 && D > 0 && Dv > 0,
              "A must be a multiple of G, D and Dv multiples of 16");
  TORCH_CHECK(positions.numel() >= 1 && positions.scalar_type() == at::kLong, "positions must be int64 [1]");
  TORCH_CHECK(isa == 512 || isa == 256, "isa must be 512 or 256");
  TORCH_CHECK(positions.device().is_cpu(), "positions must be on the CPU");
  const int64_t p = *positions.contiguous().data_ptr<int64_t>();
  TORCH_CHECK(p >= 0 && p < L, "position ", p, " is outside the cache's ", L, " positions");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty({B, A, 1, Dv}, q.options());
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = p + 1, per_group = A / G;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * A, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(n);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t b = h / A, g = (h % A) / per_group;
      const float* qh = qp + h * D;
      const float* kh = kp + (b * G + g) * L * D;
      const float* vh = vp + (b * G + g) * L * Dv;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        s[j] = fscale * (isa == 512 ? dot512(qh, kh + j * D, D) : dot256(qh, kh + j * D, D));
        m = std::max(m, s[j]);
      }
      float* o = op + h * Dv;
      std::fill(o, o + Dv, 0.f);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float e = std::exp(s[j] - m);
        sum += e;
        if (isa == 512)
          axpy512(o, e, vh + j * Dv, Dv);
        else
          axpy256(o, e, vh + j * Dv, Dv);
      }
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < Dv; ++i) o[i] *= inv;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor positions, float scale, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) { m.impl("one_query_attention", one_query_attention); }
