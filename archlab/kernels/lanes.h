// The 16-lane float32 sums shared by archlab's float32 kernels (f32_rows.cpp, cached_attention.cpp, rms_norm.cpp): a
// sum is carried in 16 lanes and folded 8 + 8, 4 + 4, 2 + 2, 1 + 1. The AVX-512 variants hold the 16 lanes in one register,
// the AVX2 variants in two 8-lane halves (lanes 0-7, 8-15); both do the same operations on each lane in the same
// order, so they give the same result to the bit.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define ARCHLAB_AVX2 __attribute__((target("avx2,fma")))
#define ARCHLAB_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

namespace archlab_lanes {

constexpr int64_t kLanes = 16;

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
// 4 (i % 4) + i / 4 of the result. 30 shuffles and 15 additions for 16 sums, against 16 x 8 operations.
ARCHLAB_AVX512 inline __m512 fold16x16(const __m512* v) {
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

// a . b over D floats (D a multiple of 16): two chains of 16-lane blocks (even blocks, odd blocks), added, folded
ARCHLAB_AVX512 inline float dot512(const float* a, const float* b, int64_t D) {
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kLanes <= D; i += 2 * kLanes) {
    c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
    c1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + kLanes), _mm512_loadu_ps(b + i + kLanes), c1);
  }
  if (i < D) c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
  return fold16(_mm512_add_ps(c0, c1));
}

ARCHLAB_AVX2 inline float dot256(const float* a, const float* b, int64_t D) {
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

}  // namespace archlab_lanes
