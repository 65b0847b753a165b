// archlab's int4 kernel for a few rows (archlab/kernels/__init__.py describes it):
//   y[m, n] = sum_k x[m, k] W[n, k],   W[n, k] = (q[n, k] - 8) s[n, G] + z[n, G],   G = k / g,  q in 0..15
//           = sum_G s[n, G] (sum_{k in G} q[n, k] x[m, k]) + (z[n, G] - 8 s[n, G]) (sum_{k in G} x[m, k])
//
// Layout of a row's K/2 bytes (archlab.kernels.pack_int4): blocks of 128 inputs in 64 bytes, read as 32
// little-endian 16-bit words, word j holding inputs j, 32 + j, 64 + j, 96 + j of the block in its nibbles 0..3
// (so a 64-byte load gives four vectors of 32 inputs with shifts and masks only); where K % 128 = 64, a last
// block of 64 inputs in 32 bytes, byte j holding inputs j and 32 + j. scales_and_zeros [N, 2, K/g]: a row's
// s, then its z (float32 or bfloat16). K a multiple of 64; g in 32, 64, 128, 256, dividing K.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 16;
constexpr int64_t kPrefetch = 2;  // tiles (of R output rows) ahead that the AVX-512 variant prefetches

struct Args {
  const float* x;       // [M, K] float32
  const uint16_t* xb;   // [M, K] bfloat16 bits (the AVX512-BF16 variant; null otherwise)
  const float* xsum;    // [M, K/g]: sum of x over each group
  const uint8_t* w;     // [N, K/2]
  int64_t M, K, N, g;
};

template <typename O>
inline void store(O* p, float v) { *p = static_cast<O>(v); }

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

// ---- AVX512-BF16 ------------------------------------------------------------------------------------------------
// The nibbles become bfloat16 128 + q (bits 0x4300 | q: exact) and vdpbf16ps multiplies 32 of them with 32
// bfloat16 x exactly, adding into 16 float32 lanes. sum (128 + q) x = sum q x + 128 sum x: the second term joins
// the zero term, z - 8 s - 128 s = z - 136 s, computed 16 groups at a time.
AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// T rows of x (m0 ..) times R output rows (n ..): R independent accumulator chains per x row, each x vector
// loaded once for the R rows. GS: the group size.
template <int T, int R, int GS, typename S, typename O>
AVX512 void tile512bf(const Args& a, const S* sz, int64_t n, int64_t m0, O* y) {
  const int64_t K = a.K, groups = K / GS;
  const __m512i bias = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(0x000f);
  const uint8_t* wr[R];
  const S* sr[R];
  for (int r = 0; r < R; ++r) { wr[r] = a.w + (n + r) * (K / 2); sr[r] = sz + (n + r) * groups * 2; }
  __m512 acc[T][R], part[T][R];
  alignas(64) float sbuf[R][16];
  const uint8_t* ahead = wr[0] + kPrefetch * R * (K / 2);  // prefetched as this tile runs: the weights ...
  {  // ... and, now, the scales and zeros
    const char* p = reinterpret_cast<const char*>(sr[0] + kPrefetch * R * groups * 2);
    for (int64_t i = 0; i < int64_t(R * groups * 2 * sizeof(S)); i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = part[t][r] = _mm512_setzero_ps();

  // one vector of 32 inputs: k .. k + 31 (chunk c = k / 32), q[r] their bfloat16 128 + q
  auto chunk = [&](int64_t k, const __m512i* q) AVX512 __attribute__((always_inline)) {
    if constexpr (GS == 32) {  // each chunk a whole group: its products scaled at once, no partial sum kept
      __m512bh xv[T];          // (the same operations per row and output as below: 0 + products, then the FMA)
      for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(a.xb + (m0 + t) * K + k);
      const int j = int((k / GS) % 16);
      for (int r = 0; r < R; ++r) {
        const __m512 vs = _mm512_set1_ps(sbuf[r][j]);
        for (int t = 0; t < T; ++t)
          acc[t][r] = _mm512_fmadd_ps(vs, _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)q[r], xv[t]), acc[t][r]);
      }
      return;
    }
    for (int t = 0; t < T; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(a.xb + (m0 + t) * K + k);
      for (int r = 0; r < R; ++r) part[t][r] = _mm512_dpbf16_ps(part[t][r], (__m512bh)q[r], xv);
    }
    if ((k + 32) % GS == 0) {  // the group ends: scale it
      const int j = int((k / GS) % 16);
      for (int r = 0; r < R; ++r) {
        const __m512 vs = _mm512_set1_ps(sbuf[r][j]);
        for (int t = 0; t < T; ++t) {
          acc[t][r] = _mm512_fmadd_ps(vs, part[t][r], acc[t][r]);
          part[t][r] = _mm512_setzero_ps();
        }
      }
    }
  };

  for (int64_t G0 = 0; G0 < groups; G0 += 16) {  // 16 groups: 512 inputs or more, whole blocks of 128
    const int cnt = groups - G0 < 16 ? int(groups - G0) : 16;
    const __mmask16 mask = __mmask16((1u << cnt) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 sv = load16(sr[r] + G0, mask);
      _mm512_store_ps(sbuf[r], sv);
      const __m512 mv = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), sv, load16(sr[r] + groups + G0, mask));
      for (int t = 0; t < T; ++t)
        acc[t][r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, a.xsum + (m0 + t) * groups + G0), acc[t][r]);
    }
    const int64_t end = (G0 + cnt) * GS;
    int64_t k = G0 * GS;
    for (; k + 128 <= end; k += 128) {  // a block of 128: 64 bytes, 32 words
      // the R rows kPrefetch tiles ahead (contiguous, R K/2 bytes: R lines per block of 128 inputs)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + (k / 32 + r) * 64), _MM_HINT_T0);
      __m512i wv[R], q[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(wr[r] + k / 2);
      for (int r = 0; r < R; ++r) q[r] = _mm512_ternarylogic_epi32(wv[r], low, bias, 0xEA);  // (w & 15) | bias
      chunk(k, q);
      for (int r = 0; r < R; ++r) q[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wv[r], 4), low, bias, 0xEA);
      chunk(k + 32, q);
      for (int r = 0; r < R; ++r) q[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wv[r], 8), low, bias, 0xEA);
      chunk(k + 64, q);
      for (int r = 0; r < R; ++r) q[r] = _mm512_or_si512(_mm512_srli_epi16(wv[r], 12), bias);
      chunk(k + 96, q);
    }
    if (k < end) {  // the last 64 inputs of a row with K % 128 = 64: 32 bytes
      __m512i b[R], q[R];
      for (int r = 0; r < R; ++r)
        b[r] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + k / 2)));
      for (int r = 0; r < R; ++r) q[r] = _mm512_ternarylogic_epi32(b[r], low, bias, 0xEA);
      chunk(k, q);
      for (int r = 0; r < R; ++r) q[r] = _mm512_or_si512(_mm512_srli_epi16(b[r], 4), bias);
      chunk(k + 32, q);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) store(y + (m0 + t) * a.N + n + r, _mm512_reduce_add_ps(acc[t][r]));
}

// the rows of x for R output rows from n, in tiles of up to TM rows (TM = 4 or 2)
template <int TM, int R, int GS, typename S, typename O>
void tiles512bf(const Args& a, const S* sz, int64_t n, O* y) {
  int64_t m = 0;
  for (; m + TM <= a.M; m += TM) tile512bf<TM, R, GS>(a, sz, n, m, y);
  switch (a.M - m) {
    case 3: tile512bf<3, R, GS>(a, sz, n, m, y); break;
    case 2: tile512bf<2, R, GS>(a, sz, n, m, y); break;
    case 1: tile512bf<1, R, GS>(a, sz, n, m, y); break;
    default: break;
  }
}

template <int GS, typename S, typename O>
void rows512bf(const Args& a, const S* sz, O* y, int64_t n0, int64_t n1) {
  // groups of 32 keep no partial sums (tile512bf), so 4 rows x 4 outputs fit the registers; else 2 x 4
  constexpr int TM = GS == 32 ? 4 : 2;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tiles512bf<TM, 4, GS>(a, sz, n, y);
  for (; n < n1; ++n) tiles512bf<TM, 1, GS>(a, sz, n, y);
}

// ---- AVX2 + FMA: float32 x, 8 lanes -----------------------------------------------------------------------------
#define AVX2 __attribute__((target("avx2,fma")))

// q of inputs k0 + 8 i .. k0 + 8 i + 7 (i in 0..3) of the 32-input chunk `sub` of the block at p, as float32
AVX2 inline __m256 nibbles8(const uint8_t* p, bool tail, int sub, int i) {
  const __m256i v = tail ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i)))
                         : _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * sub), _mm256_set1_epi32(15)));
}

AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int T, typename S, typename O>
AVX2 void tile256(const Args& a, const S* sz, int64_t n, int64_t m0, O* y) {
  const int64_t K = a.K, g = a.g, groups = K / g;
  const uint8_t* wr = a.w + n * (K / 2);
  const S* sr = sz + n * groups * 2;
  __m256 acc[T], part[T];
  float zero[T];
  for (int t = 0; t < T; ++t) { acc[t] = part[t] = _mm256_setzero_ps(); zero[t] = 0.f; }
  for (int64_t k = 0; k < K; k += 32) {  // chunk of 32 inputs
    const int64_t blk = k / 128 * 128;
    const bool tail = blk + 128 > K;
    const uint8_t* p = wr + blk / 2;
    const int sub = int((k - blk) / 32);
    for (int i = 0; i < 4; ++i) {
      const __m256 q = nibbles8(p, tail, sub, i);
      for (int t = 0; t < T; ++t)
        part[t] = _mm256_fmadd_ps(q, _mm256_loadu_ps(a.x + (m0 + t) * K + k + 8 * i), part[t]);
    }
    if ((k + 32) % g == 0) {
      const int64_t G = k / g;
      const float s = static_cast<float>(sr[G]), z = static_cast<float>(sr[groups + G]);
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(s), part[t], acc[t]);
        part[t] = _mm256_setzero_ps();
        zero[t] += (z - 8.f * s) * a.xsum[(m0 + t) * groups + G];
      }
    }
  }
  for (int t = 0; t < T; ++t) store(y + (m0 + t) * a.N + n, hsum256(acc[t]) + zero[t]);
}

template <typename S, typename O>
void rows256(const Args& a, const S* sz, O* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) tile256<4>(a, sz, n, m, y);
    switch (a.M - m) {
      case 3: tile256<3>(a, sz, n, m, y); break;
      case 2: tile256<2>(a, sz, n, m, y); break;
      case 1: tile256<1>(a, sz, n, m, y); break;
      default: break;
    }
  }
}

template <typename S, typename O>
void rows(const Args& a, const S* sz, O* y, int64_t n0, int64_t n1, int64_t isa) {
  if (isa != 513) return rows256(a, sz, y, n0, n1);
  switch (a.g) {
    case 32: return rows512bf<32>(a, sz, y, n0, n1);
    case 64: return rows512bf<64>(a, sz, y, n0, n1);
    case 128: return rows512bf<128>(a, sz, y, n0, n1);
    default: return rows512bf<256>(a, sz, y, n0, n1);
  }
}

template <typename S, typename O>
void run(const Args& a, const S* sz, O* y, int64_t isa) {
  // torch's thread pool (torch.set_num_threads), chunks of whole blocks of 4 output rows
  at::parallel_for(0, (a.N + 3) / 4, 4, [&](int64_t b0, int64_t b1) {
    rows<S, O>(a, sz, y, 4 * b0, std::min(4 * b1, a.N), isa);
  });
}

at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group_size,
                     int64_t isa, bool float_out) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, "int4_rows: x must be [M, K], M in 1..16");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_rows: x float32 or bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), "int4_rows: packed");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), g = group_size;
  TORCH_CHECK(K % 64 == 0 && packed.size(1) == K / 2, "int4_rows: K must be a multiple of 64 and packed [N, K/2]");
  TORCH_CHECK((g == 32 || g == 64 || g == 128 || g == 256) && K % g == 0,
              "int4_rows: group_size must be 32, 64, 128 or 256, dividing K");
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == N && sz.size(1) == 2 && sz.size(2) == K / g && sz.is_contiguous(),
              "int4_rows: scales_and_zeros must be [N, 2, K/g] contiguous");
  TORCH_CHECK(sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16, "int4_rows: sz dtype");
  TORCH_CHECK(isa == 513 || isa == 256, "int4_rows: isa must be 513 (AVX512-BF16) or 256 (AVX2 + FMA)");
  // the bfloat16 variant multiplies x as it is: bfloat16 only (float32 x takes the float32 variant)
  if (isa == 513 && x.scalar_type() != at::kBFloat16) isa = 256;
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(M * K), xsum(M * (K / g), 0.f);
  if (xc.scalar_type() == at::kFloat) {
    std::copy(xc.data_ptr<float>(), xc.data_ptr<float>() + M * K, xf.begin());
  } else {
    const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xb[i]);
  }
  for (int64_t i = 0; i < M * K; ++i) xsum[i / g] += xf[i];  // row-major: i / g = m * (K/g) + k / g
  // y in x's dtype, or float32 (float_out: an LM head's logits, the float32 sums not rounded to bfloat16)
  at::Tensor y = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : x.scalar_type()));
  const uint16_t* xb = isa == 513 ? reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()) : nullptr;
  const Args a{xf.data(), xb, xsum.data(), packed.data_ptr<uint8_t>(), M, K, N, g};
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  if (sz.scalar_type() == at::kFloat) {
    if (out_bf16) run(a, sz.data_ptr<float>(), y.data_ptr<c10::BFloat16>(), isa);
    else run(a, sz.data_ptr<float>(), y.data_ptr<float>(), isa);
  } else {
    if (out_bf16) run(a, sz.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), isa);
    else run(a, sz.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), isa);
  }
  return y;
}

// ---- dequantization to bfloat16, for products of many rows (a prompt's) ----------------------------------------
// 16 consecutive inputs of one group: (q - 8) s + z in one FMA (exact q - 8, one float32 rounding), then rounded to
// bfloat16 (to nearest even)
template <typename S>
AVX512 inline void dequant16(__m512i q32, const S* sr, int64_t groups, int64_t G, c10::BFloat16* out) {
  const __m512 qm8 = _mm512_sub_ps(_mm512_cvtepi32_ps(q32), _mm512_set1_ps(8.f));
  const __m512 w = _mm512_fmadd_ps(qm8, _mm512_set1_ps(static_cast<float>(sr[G])),
                                   _mm512_set1_ps(static_cast<float>(sr[groups + G])));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(w));
}

// 32 consecutive inputs from k (their 16-bit words in w32)
template <typename S>
AVX512 inline void dequant32(__m512i w32, const S* sr, int64_t groups, int64_t g, int64_t k, c10::BFloat16* out) {
  dequant16(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w32)), sr, groups, k / g, out + k);
  dequant16(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w32, 1)), sr, groups, (k + 16) / g, out + k + 16);
}

template <typename S>
AVX512 void dequant_row(const uint8_t* w, const S* sr, int64_t K, int64_t g, c10::BFloat16* out) {
  const __m512i low = _mm512_set1_epi16(0x000f);
  const int64_t groups = K / g, full = K / 128 * 128;
  for (int64_t k = 0; k < full; k += 128) {  // word j of the block: inputs j, 32 + j, 64 + j, 96 + j
    const __m512i wv = _mm512_loadu_si512(w + k / 2);
    for (int sh = 0; sh < 4; ++sh)
      dequant32(_mm512_and_si512(_mm512_srli_epi16(wv, 4 * sh), low), sr, groups, g, k + 32 * sh, out);
  }
  if (full < K) {  // the last 64 inputs: byte j holds inputs j and 32 + j
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + full / 2)));
    dequant32(_mm512_and_si512(b, low), sr, groups, g, full, out);
    dequant32(_mm512_srli_epi16(b, 4), sr, groups, g, full + 32, out);
  }
}

// W [N, K] in bfloat16 from the kernel's layout (AVX512-BF16 only: the caller asks archlab.kernels.isa first)
at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& sz, int64_t group_size) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), "int4_dequant: packed");
  const int64_t N = packed.size(0), K = 2 * packed.size(1), g = group_size;
  TORCH_CHECK(K % 64 == 0 && (g == 32 || g == 64 || g == 128 || g == 256) && K % g == 0,
              "int4_dequant: K a multiple of 64 and group_size 32, 64, 128 or 256 dividing K");
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == N && sz.size(1) == 2 && sz.size(2) == K / g && sz.is_contiguous() &&
              (sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16),
              "int4_dequant: scales_and_zeros must be [N, 2, K/g] contiguous, float32 or bfloat16");
  at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kBFloat16));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  const int64_t row_sz = 2 * (K / g);  // a row's scales and zeros
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (sz.scalar_type() == at::kFloat)
        dequant_row(w + n * (K / 2), sz.data_ptr<float>() + n * row_sz, K, g, o + n * K);
      else
        dequant_row(w + n * (K / 2), sz.data_ptr<c10::BFloat16>() + n * row_sz, K, g, o + n * K);
    }
  });
  return out;
}

// ---- int8 weights as two nibbles (archlab.kernels.pack_int8) --------------------------------------------------
// W[n, k] = q[n, k] s[n], q in -127..127: u = q + 128 = 16 hi + lo (hi, lo in 0..15) makes W the int4 matrix
// [N, 2K] whose block of 128 inputs c holds the hi of inputs 64c .. 64c + 63, then their lo, in groups of 64 (hi:
// scale 16 s, zero 0; lo: scale s, zero 8 s), so (16 s (hi - 8)) + (s (lo - 8) + 8 s) = s (u - 128) = q s.
// Its product takes x [M, K] as [M, 2K], each 64 inputs twice: int4_rows' arithmetic on the same integers.
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t isa, bool float_out) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 64 == 0, "int8_rows: x must be [M, K], K a multiple of 64");
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) == x.size(1), "int8_rows: packed must be [N, K]");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), e = xc.element_size();
  at::Tensor x2 = at::empty({M, 2 * K}, xc.options());
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(x2.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K / 64; ++c) {
      const char* from = src + (m * K + 64 * c) * e;
      std::memcpy(dst + (m * 2 * K + 128 * c) * e, from, 64 * e);       // against the hi nibbles
      std::memcpy(dst + (m * 2 * K + 128 * c + 64) * e, from, 64 * e);  // against the lo nibbles
    }
  return int4_rows(x2, packed, sz, 64, isa, float_out);
}

AVX512 inline void store16(float* out, __m512 w) { _mm512_storeu_ps(out, w); }
AVX512 inline void store16(c10::BFloat16* out, __m512 w) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(w));
}

// a row's K weights q s from its K bytes (int8_rows' layout): word j of the block c holds the nibbles hi, then lo
// of inputs 64c + j (bits 0-3, 8-11) and 64c + 32 + j (bits 4-7, 12-15); q s in float32 (one rounding, none where
// s is bfloat16), then in O (bfloat16: rounded to nearest even)
template <typename O>
AVX512 void int8_dequant_row(const uint8_t* w, float s, int64_t K, O* out) {
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i nib = _mm512_set1_epi32(0x0f), high = _mm512_set1_epi32(0xf0), off = _mm512_set1_epi32(128);
  for (int64_t c = 0; c < K / 64; ++c) {
    const __m512i wv = _mm512_loadu_si512(w + 64 * c);
    for (int h = 0; h < 2; ++h) {  // words 16h .. 16h + 15
      const __m512i v = _mm512_cvtepu16_epi32(h ? _mm512_extracti64x4_epi64(wv, 1) : _mm512_castsi512_si256(wv));
      const __m512i a = _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(v, nib), 4),
                                         _mm512_and_si512(_mm512_srli_epi32(v, 8), nib));
      const __m512i b = _mm512_add_epi32(_mm512_and_si512(v, high), _mm512_srli_epi32(v, 12));
      store16(out + 64 * c + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, off)), vs));
      store16(out + 64 * c + 32 + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(b, off)), vs));
    }
  }
}

// W [N, K] = q s in scale's dtype (float32 or bfloat16) from int8_rows' layout (AVX512-BF16 only, as int4_dequant)
at::Tensor int8_dequant(const at::Tensor& packed, const at::Tensor& scale) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) % 64 == 0, "int8_dequant: packed must be uint8 [N, K] contiguous, K a multiple of 64");
  const int64_t N = packed.size(0), K = packed.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && (scale.scalar_type() == at::kFloat ||
              scale.scalar_type() == at::kBFloat16), "int8_dequant: scale must be [N], float32 or bfloat16");
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({N, K}, packed.options().dtype(scale.scalar_type()));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const bool bf16 = scale.scalar_type() == at::kBFloat16;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (bf16) int8_dequant_row(w + n * K, sp[n], K, out.data_ptr<c10::BFloat16>() + n * K);
      else int8_dequant_row(w + n * K, sp[n], K, out.data_ptr<float>() + n * K);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(archlab_kernels, m) {
  m.def("int4_rows(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, int isa, bool float_out=False) "
        "-> Tensor");
  m.def("int4_dequant(Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("int8_rows(Tensor x, Tensor packed, Tensor scales_and_zeros, int isa, bool float_out=False) -> Tensor");
  m.def("int8_dequant(Tensor packed, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) {
  m.impl("int4_rows", &int4_rows);
  m.impl("int4_dequant", &int4_dequant);
  m.impl("int8_rows", &int8_rows);
  m.impl("int8_dequant", &int8_dequant);
}
