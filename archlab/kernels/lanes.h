// The 16-lane float32 sums shared by archlab's float32 kernels (f32_rows.cpp, one_query_attention.cpp): a sum is
// carried in 16 lanes and folded 8 + 8, 4 + 4, 2 + 2, 1 + 1. The AVX-512 variants hold the 16 lanes in one register,
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

}  // namespace archlab_lanes
