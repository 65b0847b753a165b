// The 16-lane float32 sums shared by archlab's kernels (f32_rows.cpp, bf16_rows.cpp, cached_attention.cpp,
// rms_norm.cpp): a sum is carried in 16 lanes and folded 8 + 8, 4 + 4, 2 + 2, 1 + 1. The AVX-512 variants hold the 16
// lanes in one register, the AVX2 variants in two 8-lane halves (lanes 0-7, 8-15); both do the same operations on
// each lane in the same order, so they give the same result to the bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#define ARCHLAB_AVX2 __attribute__((target("avx2,fma")))
#define ARCHLAB_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

namespace archlab_lanes {

constexpr int64_t kLanes = 16;

// 16 (8) floats from float32 or bfloat16 memory: a bfloat16 is a float's upper 16 bits, so it widens exactly
ARCHLAB_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ARCHLAB_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
ARCHLAB_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
ARCHLAB_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 lanes -> one float: 4 + 4, 2 + 2, 1 + 1
ARCHLAB_AVX2 inline float halve8(__m256 v) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

// 16 lanes -> one float: 8 + 8, then halve8
ARCHLAB_AVX512 inline float fold16(__m512 v) {
  return halve8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

// the same 16 lanes held as two halves
ARCHLAB_AVX2 inline float fold16(__m256 lo, __m256 hi) { return halve8(_mm256_add_ps(lo, hi)); }

// 16 sums of 16 lanes -> their 16 folds at once, each folded exactly as fold16 folds it (the same pairs added in the
// same order, the lanes moved between registers instead of extracted one sum at a time): v[i]'s fold is lane
// 4 (i % 4) + i / 4 of the result. 30 shuffles and 15 additions for 16 sums, against 16 x 8 operations. Always
// inlined: gcc called it through the PLT from the product tiles, and inlined, bf16_rows' 10-row products of SmolLM2's
// shapes ran 15-23% faster (2026-12-05, AMD EPYC; docs/speed.md).
ARCHLAB_AVX512 __attribute__((always_inline)) inline __m512 fold16x16(const __m512* v) {
  __m512 u[8], w[4], z[2];
  for (int i = 0; i < 8; ++i)  // 8 + 8: lanes 0-7 v[2i]'s, 8-15 v[2i + 1]'s
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 4 + 4: 128-bit lane q holds v[4i + q]'s four
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // 2 + 2: in 128-bit lane q, w[2i]'s pair of v[..+q], then w[2i + 1]'s
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  // 1 + 1: in 128-bit lane q, the folds of v[q], v[4 + q], v[8 + q], v[12 + q]
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// a . b over D floats (D a multiple of 16; a, b float32 or bfloat16 widened by load16): two chains of 16-lane blocks
// (even blocks, odd blocks), added; dot512 folds that sum, dots16x16 folds 16 of them at once
template <class T>
ARCHLAB_AVX512 inline __m512 dot_lanes512(const T* a, const T* b, int64_t D) {
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kLanes <= D; i += 2 * kLanes) {
    c0 = _mm512_fmadd_ps(load16(a + i), load16(b + i), c0);
    c1 = _mm512_fmadd_ps(load16(a + i + kLanes), load16(b + i + kLanes), c1);
  }
  if (i < D) c0 = _mm512_fmadd_ps(load16(a + i), load16(b + i), c0);
  return _mm512_add_ps(c0, c1);
}

template <class T>
ARCHLAB_AVX512 inline float dot512(const T* a, const T* b, int64_t D) { return fold16(dot_lanes512(a, b, D)); }

// fold16x16's 16 folds in v's order: lane i holds v[i]'s fold (fold16x16 puts it at lane 4 (i % 4) + i / 4)
ARCHLAB_AVX512 __attribute__((always_inline)) inline __m512 folds16x16(const __m512* v) {
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, fold16x16(v));
}

// the 16 dot products a . b[t * bs], t = 0..15, in t's order: each dot512's value, to the bit (folds16x16)
template <class T>
ARCHLAB_AVX512 inline __m512 dots16x16(const T* a, const T* b, int64_t bs, int64_t D) {
  __m512 sums[16];
  for (int t = 0; t < 16; ++t) sums[t] = dot_lanes512(a, b + t * bs, D);
  return folds16x16(sums);
}

template <class T>
ARCHLAB_AVX2 inline float dot256(const T* a, const T* b, int64_t D) {
  __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  int64_t i = 0;
  for (; i + 2 * kLanes <= D; i += 2 * kLanes) {
    lo0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), lo0);
    hi0 = _mm256_fmadd_ps(load8(a + i + 8), load8(b + i + 8), hi0);
    lo1 = _mm256_fmadd_ps(load8(a + i + 16), load8(b + i + 16), lo1);
    hi1 = _mm256_fmadd_ps(load8(a + i + 24), load8(b + i + 24), hi1);
  }
  if (i < D) {
    lo0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), lo0);
    hi0 = _mm256_fmadd_ps(load8(a + i + 8), load8(b + i + 8), hi0);
  }
  return fold16(_mm256_add_ps(lo0, lo1), _mm256_add_ps(hi0, hi1));
}

// exp(x) in each lane, x <= 0 (softmax's shifted scores; NaN stays NaN), in float32 by the same operations in either
// width (Cephes' expf: x = n ln 2 + r, ln 2 in two parts, a degree-5 polynomial in r, times 2^n): within 2 ulp of
// exp; x below -88 (exp < 2^-127) gives 0.
namespace exp_constants {
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kLow = -88.f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace exp_constants

ARCHLAB_AVX512 inline __m512 exp16(__m512 x) {
  using namespace exp_constants;
  x = _mm512_max_ps(_mm512_set1_ps(kLow), x);  // NaN: max(c, NaN) is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kP0);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

ARCHLAB_AVX2 inline __m256 exp8(__m256 x) {
  using namespace exp_constants;
  x = _mm256_max_ps(_mm256_set1_ps(kLow), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kP0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

}  // namespace archlab_lanes
