// archlab's Q8_0 kernel for a few rows (archlab/kernels/__init__.py describes it): llama.cpp's Q8_0 x Q8_0 product
//   y[m, n] = sum_b (s[n, b] d[m, b]) (sum_{k in b} q[n, k] p[m, k])      b: blocks of 32 inputs
// q int8 weights in -127..127 with a float32 scale s per row and block; p the row x rounded per block:
//   d[m, b] = max_{k in b} |x[m, k]| / 127,   p[m, k] = round(x[m, k] / d[m, b]) in -127..127 (0 where d = 0)
// (the quotient as x * (1 / d) in float32, rounded half to even). Each block's sum of 32 products is an exact
// int32; the blocks' terms are added in float32, in block order, one FMA each.
//
// Layout (archlab.kernels.pack_q8): packed [N/16, K/4, 16, 4] uint8 = q + 128: tiles of 16 output rows, for each
// 4 consecutive inputs the tile's 16 rows x 4 bytes in one 64-byte line; scales [N/16, K/32, 16] float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "lanes.h"

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kRows = 16;   // output rows per tile
constexpr int64_t kBlock = 32;  // inputs per block
constexpr int64_t kMaxRows = 16;

struct Rows {  // x rounded per block (once per call)
  std::vector<int8_t> p;      // [M, K]
  std::vector<float> d;       // [M, K/32]
  std::vector<int32_t> sum;   // [M, K/32]: sum_{k in b} p
  std::vector<float> dsum;    // [M, K/32]: d sum_{k in b} p, rounded once (the Q4 kernel's zero term)
};

// x's 32 values of a block, widened to float32 (lanes.h's load8: a bfloat16 widens exactly)
template <typename X>
ARCHLAB_AVX2 inline void load_block(const X* x, __m256* v) {
  for (int j = 0; j < 4; ++j) v[j] = archlab_lanes::load8(x + 8 * j);
}

// Every row's blocks rounded, 8 lanes at a time: the same operations as the scalar rule in the header (the max of
// |x| ignoring NaN as std::max does, d = amax / 127, id = 1 / d, round(x id) half to even, clamped: a NaN goes to
// -127 as std::min / std::max send it), so archlab.kernels.round_rows_q8 is its reference to the bit. The 32
// int32 levels are packed to int8 in order (packs works within 128-bit halves: dwords 0, 4, 1, 5, ... are the
// blocks' 4-value groups in order).
template <typename X>
ARCHLAB_AVX2 Rows round_rows(const X* x, int64_t M, int64_t K) {
  const int64_t B = K / kBlock;
  Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * B), std::vector<int32_t>(M * B), std::vector<float>(M * B)};
  const __m256 sign = _mm256_set1_ps(-0.f), top = _mm256_set1_ps(127.f), bottom = _mm256_set1_ps(-127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < M * B; ++i) {
    __m256 v[4];
    load_block(x + i * kBlock, v);
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), amax);  // NaN: amax kept
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float d = _mm_cvtss_f32(m4) / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const __m256 idv = _mm256_set1_ps(id);
    __m256i q[4], sums = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256 t = _mm256_round_ps(_mm256_mul_ps(v[j], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, bottom), top));  // NaN: -127
      sums = _mm256_add_epi32(sums, q[j]);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.p.data() + i * kBlock), _mm256_permutevar8x32_epi32(bytes, order));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const int32_t sum = _mm_cvtsi128_si32(s4);
    r.d[i] = d;
    r.sum[i] = sum;
    r.dsum[i] = d * static_cast<float>(sum);
  }
  return r;
}

struct Args {
  const uint8_t* w;  // packed
  const float* s;    // scales (Q8_0), scales and zeros (Q4)
  const Rows* x;
  int64_t M, K, N;
};

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, op, ": x must be [M, K], M in 1..16");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x float32 or bfloat16");
  TORCH_CHECK(x.size(1) % kBlock == 0, op, ": K must be a multiple of 32");
}

// x (checked by check_x) rounded once, y [M, N] allocated in x's dtype, or float32 (float_out: an LM head's logits,
// the float32 sums not rounded to bfloat16), and the N/16 tiles split over torch's threads: tiles(a, y, t0, t1)
// computes tiles t0..t1 - 1 for y's element type
template <typename Tiles>
at::Tensor rows_product(const at::Tensor& x, const uint8_t* w, const float* s, int64_t N, bool float_out,
                        Tiles tiles) {
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const Rows r = xc.scalar_type() == at::kFloat ? round_rows(xc.data_ptr<float>(), M, K)
                                                : round_rows(xc.data_ptr<c10::BFloat16>(), M, K);
  at::Tensor y = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : x.scalar_type()));
  const Args a{w, s, &r, M, K, N};
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  at::parallel_for(0, N / kRows, 4, [&](int64_t t0, int64_t t1) {
    if (bf16) tiles(a, y.data_ptr<c10::BFloat16>(), t0, t1);
    else tiles(a, y.data_ptr<float>(), t0, t1);
  });
  return y;
}

template <typename O>
inline void store16(O* y, const float* v) {
  for (int i = 0; i < 16; ++i) y[i] = static_cast<O>(v[i]);
}

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

// a tile's T rows of 16 float32 sums -> y's rows m0.., columns of the tile (in y's dtype)
template <int T, typename O>
VNNI inline void store_rows(const __m512* f, const Args& a, int64_t tile, int64_t m0, O* y) {
  alignas(64) float out[16];
  for (int t = 0; t < T; ++t) {
    _mm512_store_ps(out, f[t]);
    store16(y + (m0 + t) * a.N + tile * kRows, out);
  }
}
template <int T, typename O>
ARCHLAB_AVX2 inline void store_rows(const __m256 (*f)[2], const Args& a, int64_t tile, int64_t m0, O* y) {
  alignas(32) float out[16];
  for (int t = 0; t < T; ++t) {
    _mm256_store_ps(out, f[t][0]);
    _mm256_store_ps(out + 8, f[t][1]);
    store16(y + (m0 + t) * a.N + tile * kRows, out);
  }
}

// Every tile's rows in groups of 4 (VNNI), 2 and 1: Kernel::vnni<T> / avx2<T> compute T rows of one tile; a row's
// arithmetic is the same in every group, so its result does not depend on the rows beside it
template <typename Kernel, typename O>
void tiles(const Args& a, O* y, int64_t t0, int64_t t1, int64_t isa) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t m = 0;
    if (isa == 512) {
      for (; m + 4 <= a.M; m += 4) Kernel::template vnni<4>(a, tile, m, y);
      for (; m + 2 <= a.M; m += 2) Kernel::template vnni<2>(a, tile, m, y);
      if (m < a.M) Kernel::template vnni<1>(a, tile, m, y);
    } else {
      for (; m + 2 <= a.M; m += 2) Kernel::template avx2<2>(a, tile, m, y);
      if (m < a.M) Kernel::template avx2<1>(a, tile, m, y);
    }
  }
}

// ---- AVX512-VNNI: vpdpbusd multiplies the tile's 16 rows x 4 unsigned bytes (q + 128) by 4 signed p, broadcast,
// adding into 16 int32 lanes (one per row); the lane starts at -128 sum p of the block (Rows' sum), so it ends at
// sum q p.
template <int T, typename O>
VNNI void tile_vnni(const Args& a, int64_t tile, int64_t m0, O* y) {
  const int64_t K = a.K, B = K / kBlock;
  const uint8_t* w = a.w + tile * kRows * K;
  const float* s = a.s + tile * B * kRows;
  __m512 f[T];
  for (int t = 0; t < T; ++t) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) {
      acc0[t] = _mm512_set1_epi32(-128 * a.x->sum[(m0 + t) * B + b]);
      acc1[t] = _mm512_setzero_si512();
    }
    const uint8_t* wb = w + b * kBlock * kRows;  // 8 lines of 64 bytes
    for (int j = 0; j < 8; j += 2) {
      const __m512i w0 = _mm512_loadu_si512(wb + j * 64), w1 = _mm512_loadu_si512(wb + (j + 1) * 64);
      for (int t = 0; t < T; ++t) {
        const int32_t* p = reinterpret_cast<const int32_t*>(a.x->p.data() + (m0 + t) * K + b * kBlock);
        acc0[t] = _mm512_dpbusd_epi32(acc0[t], w0, _mm512_set1_epi32(p[j]));
        acc1[t] = _mm512_dpbusd_epi32(acc1[t], w1, _mm512_set1_epi32(p[j + 1]));
      }
    }
    const __m512 sv = _mm512_loadu_ps(s + b * kRows);
    for (int t = 0; t < T; ++t) {
      const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(a.x->d[(m0 + t) * B + b]));
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0[t], acc1[t])), scale, f[t]);
    }
  }
  store_rows<T>(f, a, tile, m0, y);
}

// ---- AVX2: the same int32 sums by vpmaddubsw (|p| unsigned times q with p's sign, pairs in int16: at most
// 2 x 127 x 127, no saturation) and vpmaddwd by ones; 8 rows per ymm, two per tile.
template <int T, typename O>
ARCHLAB_AVX2 void tile_avx2(const Args& a, int64_t tile, int64_t m0, O* y) {
  const int64_t K = a.K, B = K / kBlock;
  const uint8_t* w = a.w + tile * kRows * K;
  const float* s = a.s + tile * B * kRows;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 f[T][2];
  for (int t = 0; t < T; ++t) f[t][0] = f[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m256i acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
    const uint8_t* wb = w + b * kBlock * kRows;
    for (int j = 0; j < 8; ++j) {
      __m256i q[2];
      for (int h = 0; h < 2; ++h)
        q[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64 + h * 32)), flip);
      for (int t = 0; t < T; ++t) {
        const int32_t* p = reinterpret_cast<const int32_t*>(a.x->p.data() + (m0 + t) * K + b * kBlock);
        const __m256i pv = _mm256_set1_epi32(p[j]), ap = _mm256_abs_epi8(pv);
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(ap, _mm256_sign_epi8(q[h], pv));
          acc[t][h] = _mm256_add_epi32(acc[t][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m256 dv = _mm256_set1_ps(a.x->d[(m0 + t) * B + b]);
      for (int h = 0; h < 2; ++h) {
        const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(s + b * kRows + 8 * h), dv);
        f[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][h]), scale, f[t][h]);
      }
    }
  }
  store_rows<T>(f, a, tile, m0, y);
}

struct Q8Tiles {
  template <int T, typename O>
  static void vnni(const Args& a, int64_t tile, int64_t m, O* y) { tile_vnni<T>(a, tile, m, y); }
  template <int T, typename O>
  static void avx2(const Args& a, int64_t tile, int64_t m, O* y) { tile_avx2<T>(a, tile, m, y); }
};

at::Tensor q8_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t isa,
                   bool float_out) {
  check_x("q8_rows", x);
  const int64_t K = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) == K &&
                  packed.size(0) % kRows == 0 && packed.is_contiguous(),
              "q8_rows: packed must be uint8 [N, K] contiguous, N a multiple of 16");
  const int64_t N = packed.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3 && scales.size(0) == N / kRows &&
                  scales.size(1) == K / kBlock && scales.size(2) == kRows && scales.is_contiguous(),
              "q8_rows: scales must be float32 [N/16, K/32, 16] contiguous");
  TORCH_CHECK(isa == 512 || isa == 256, "q8_rows: isa must be 512 (AVX512-VNNI) or 256 (AVX2)");
  return rows_product(x, packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), N, float_out,
                      [isa](const Args& a, auto* y, int64_t t0, int64_t t1) { tiles<Q8Tiles>(a, y, t0, t1, isa); });
}

// ==== Q4 x Q8: llama.cpp's Q4_0 / Q4_1 x Q8 product ================================================================
//   y[m, n] = sum_b d[m, b] (s[n, b] sum_{k in b} (q[n, k] - 8) p[m, k] + z[n, b] sum_{k in b} p[m, k])
// q in 0..15 with a scale s and zero z per row and block of 32 inputs (archlab.quant.Int4Weight with groups of 32:
// w = (q - 8) s + z; GGUF's Q4_1 w = d q + m is s = d, z = m + 8 d; Q4_0 is z = 0), p and d x's Q8 rounding as above.
// Each block's integer sum S = sum (q - 8) p is exact; its term is added in float32 as two FMAs, in block order:
//   f = fma(float(S), s d, f);   f = fma(z, dsum, f)        (s d and dsum = d sum p each rounded once)
//
// Layout (archlab.kernels.pack_q4): packed [N/16, K/8, 16, 4] uint8, tiles of 16 output rows, for each 8 consecutive
// inputs k..k+7 the tile's 16 rows x 4 bytes in one 64-byte line, byte j = q[k + j] | q[k + 4 + j] << 4 (the low
// nibbles are 4 inputs, the high nibbles the next 4: a mask and a shift give two lines of bytes as the Q8_0 tiles
// hold them); scales_and_zeros [N/16, K/32, 2, 16] float32: each block's 16 scales, then its 16 zeros.

// ---- AVX512-VNNI: vpdpbusd of the 16 rows x 4 nibble bytes (unsigned, 0..15) by 4 signed p; the lane starts at
// -8 sum p, so it ends at S.
template <int T, typename O>
VNNI void q4_tile_vnni(const Args& a, int64_t tile, int64_t m0, O* y) {
  const int64_t K = a.K, B = K / kBlock;
  const uint8_t* w = a.w + tile * kRows * K / 2;
  const float* sz = a.s + tile * B * 2 * kRows;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 f[T];
  for (int t = 0; t < T; ++t) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) {
      acc0[t] = _mm512_set1_epi32(-8 * a.x->sum[(m0 + t) * B + b]);
      acc1[t] = _mm512_setzero_si512();
    }
    const uint8_t* wb = w + b * kBlock * kRows / 2;  // 4 lines of 64 bytes
    for (int j = 0; j < 4; ++j) {
      const __m512i line = _mm512_loadu_si512(wb + j * 64);
      const __m512i lo = _mm512_and_si512(line, low), hi = _mm512_and_si512(_mm512_srli_epi16(line, 4), low);
      for (int t = 0; t < T; ++t) {
        const int32_t* p = reinterpret_cast<const int32_t*>(a.x->p.data() + (m0 + t) * K + b * kBlock);
        acc0[t] = _mm512_dpbusd_epi32(acc0[t], lo, _mm512_set1_epi32(p[2 * j]));
        acc1[t] = _mm512_dpbusd_epi32(acc1[t], hi, _mm512_set1_epi32(p[2 * j + 1]));
      }
    }
    const __m512 sv = _mm512_loadu_ps(sz + b * 2 * kRows), zv = _mm512_loadu_ps(sz + b * 2 * kRows + kRows);
    for (int t = 0; t < T; ++t) {
      const int64_t i = (m0 + t) * B + b;
      const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(a.x->d[i]));
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0[t], acc1[t])), scale, f[t]);
      f[t] = _mm512_fmadd_ps(zv, _mm512_set1_ps(a.x->dsum[i]), f[t]);
    }
  }
  store_rows<T>(f, a, tile, m0, y);
}

// ---- AVX2: vpmaddubsw of the nibble bytes (unsigned) by p (signed): pairs in int16, at most 2 x 15 x 127 = 3,810,
// so a block's 8 of them add in int16 without overflow (30,480); vpmaddwd by ones, then -8 sum p. 8 rows per ymm.
template <int T, typename O>
ARCHLAB_AVX2 void q4_tile_avx2(const Args& a, int64_t tile, int64_t m0, O* y) {
  const int64_t K = a.K, B = K / kBlock;
  const uint8_t* w = a.w + tile * kRows * K / 2;
  const float* sz = a.s + tile * B * 2 * kRows;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 f[T][2];
  for (int t = 0; t < T; ++t) f[t][0] = f[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m256i acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
    const uint8_t* wb = w + b * kBlock * kRows / 2;
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < 2; ++h) {
        const __m256i line = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64 + h * 32));
        const __m256i lo = _mm256_and_si256(line, low), hi = _mm256_and_si256(_mm256_srli_epi16(line, 4), low);
        for (int t = 0; t < T; ++t) {
          const int32_t* p = reinterpret_cast<const int32_t*>(a.x->p.data() + (m0 + t) * K + b * kBlock);
          acc[t][h] = _mm256_add_epi16(acc[t][h], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(p[2 * j])));
          acc[t][h] = _mm256_add_epi16(acc[t][h], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(p[2 * j + 1])));
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const int64_t i = (m0 + t) * B + b;
      const __m256 dv = _mm256_set1_ps(a.x->d[i]), cv = _mm256_set1_ps(a.x->dsum[i]);
      const __m256i corr = _mm256_set1_epi32(-8 * a.x->sum[i]);
      for (int h = 0; h < 2; ++h) {
        const __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(acc[t][h], ones), corr);
        const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(sz + b * 2 * kRows + 8 * h), dv);
        f[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, f[t][h]);
        f[t][h] = _mm256_fmadd_ps(_mm256_loadu_ps(sz + b * 2 * kRows + kRows + 8 * h), cv, f[t][h]);
      }
    }
  }
  store_rows<T>(f, a, tile, m0, y);
}

struct Q4Tiles {
  template <int T, typename O>
  static void vnni(const Args& a, int64_t tile, int64_t m, O* y) { q4_tile_vnni<T>(a, tile, m, y); }
  template <int T, typename O>
  static void avx2(const Args& a, int64_t tile, int64_t m, O* y) { q4_tile_avx2<T>(a, tile, m, y); }
};

at::Tensor q4_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t isa,
                   bool float_out) {
  check_x("q4_rows", x);
  const int64_t K = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == K &&
                  packed.size(0) % kRows == 0 && packed.is_contiguous(),
              "q4_rows: packed must be uint8 [N, K/2] contiguous, N a multiple of 16");
  const int64_t N = packed.size(0);
  const auto& sz = scales_and_zeros;
  TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.dim() == 4 && sz.size(0) == N / kRows &&
                  sz.size(1) == K / kBlock && sz.size(2) == 2 && sz.size(3) == kRows && sz.is_contiguous(),
              "q4_rows: scales_and_zeros must be float32 [N/16, K/32, 2, 16] contiguous");
  TORCH_CHECK(isa == 512 || isa == 256, "q4_rows: isa must be 512 (AVX512-VNNI) or 256 (AVX2)");
  return rows_product(x, packed.data_ptr<uint8_t>(), sz.data_ptr<float>(), N, float_out,
                      [isa](const Args& a, auto* y, int64_t t0, int64_t t1) { tiles<Q4Tiles>(a, y, t0, t1, isa); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("q8_rows(Tensor x, Tensor packed, Tensor scales, int isa, bool float_out=False) -> Tensor");
  m.def("q4_rows(Tensor x, Tensor packed, Tensor scales_and_zeros, int isa, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) {
  m.impl("q8_rows", &q8_rows);
  m.impl("q4_rows", &q4_rows);
}
