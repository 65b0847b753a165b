// archlab's bfloat16 kernel for a few rows (archlab/kernels/__init__.py describes it): y = x W^T + b
//   y[m, n] = bf16(b[n] + sum_k x[m, k] W[n, k])   x [..., K] bfloat16, M = 1..16 rows; W [N, K] bfloat16 row-major as
// nn.Linear keeps it; b [N] bfloat16 or none; y [..., N] bfloat16, the float32 sum rounded once (nearest even), or
// with float_out the float32 sum itself (an LM head's logits: 8-bit logits tie where the model's top two differ by
// less than their spacing, 0.125 at 16-32).
// AVX512-BF16 only: vdpbf16ps multiplies 32 bfloat16 pairs exactly (a bfloat16 product fits a float32) and adds each
// lane's two products into its float32 lane. Every (m, n) is summed the same way: 16 lanes, lane i holding the inputs
// k = 32 j + 2 i, 32 j + 2 i + 1 of block j; blocks j alternate between two chains (even j, odd j); then chain 0 +
// chain 1 lane by lane and the 16 lanes folded as the float32 kernel folds them (lanes.h). So a row's result does not
// depend on M nor on which loop below computed it: a verify pass and one-token steps give a position the same bits.
// One row (memory-bound: each weight read once): one output row at a time, its weights one sequential stream per
// thread prefetched 4 KB ahead, as f32_rows.cpp's one-row loop. 2-16 rows: tiles of NB output rows x R rows of x (2 x R
// up to 4 rows, then 3 x 5), one chain at a time (chain 0 over the even blocks, then chain 1 over the odd ones: NB R
// accumulators), each weight vector loaded serving R products and each x vector NB; the weights kAhead tiles on
// prefetched by every group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "lanes.h"
#include "rows.h"

#define ARCHLAB_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

namespace {

using archlab_lanes::fold16;
constexpr int64_t kBlock = 32;  // bfloat16 inputs per 64-byte block: K must be a multiple of it
constexpr int64_t kMaxRows = 16;
constexpr int64_t kGrainElements = 1 << 15;  // weights per thread at least: a smaller product stays on one thread
constexpr int64_t kAheadBytes = 4096;       // the one-row stream's prefetch distance (f32_rows.cpp measured it)
constexpr int kAhead = 4;                   // tiles between a tile and the one whose weights it prefetches

using bf16 = c10::BFloat16;

// x [M, K], w [N, K], b [N] or nullptr bfloat16; y [M, N] bfloat16, or float32 (float_out: an LM head's logits)
template <class Y>
using Args = archlab_rows::Args<bf16, Y>;

// the float32 sum plus the bias: rounded to bfloat16 once (c10's conversion, to nearest even), or kept as float32
template <class Y>
inline void store(const Args<Y>& a, int m, int64_t n, float dot) {
  const float v = a.b ? dot + static_cast<float>(a.b[n]) : dot;
  a.y[m * a.N + n] = static_cast<Y>(v);
}

// fold_tile's Lanes for a bfloat16 y: each float32 lane rounded as store's conversion (c10's: to nearest even, NaN to
// 0x7FC0) rounds it, in integer lanes, so the same bits: u + 0x7FFF + (bit 16 of u), its upper 16 bits
ARCHLAB_AVX512 inline void bf16_lanes(__m512 v, bf16* out) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}

ARCHLAB_AVX512BF16 inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }

template <class Y>
ARCHLAB_AVX512BF16 void row(const Args<Y>& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, B = K / kBlock;
  const char* end = reinterpret_cast<const char*>(a.w + n1 * K);
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* w = a.w + n * K;
    const char* ahead = reinterpret_cast<const char*>(w) + kAheadBytes;
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= B; j += 2) {
      const char* line = ahead + j * kBlock * sizeof(bf16);
      if (line + 2 * 64 <= end) {
        _mm_prefetch(line, _MM_HINT_T1);
        _mm_prefetch(line + 64, _MM_HINT_T1);
      }
      c0 = _mm512_dpbf16_ps(c0, load_bh(w + j * kBlock), load_bh(a.x + j * kBlock));
      c1 = _mm512_dpbf16_ps(c1, load_bh(w + j * kBlock + kBlock), load_bh(a.x + j * kBlock + kBlock));
    }
    if (j < B) c0 = _mm512_dpbf16_ps(c0, load_bh(w + j * kBlock), load_bh(a.x + j * kBlock));
    store(a, 0, n, fold16(_mm512_add_ps(c0, c1)));
  }
}

// outputs n .. n + NB - 1 against the R rows of a, chain 0 then chain 1; ahead (or nullptr): NB weight rows to
// prefetch into L2
template <int NB, int R, class Y>
ARCHLAB_AVX512BF16 void tile(const Args<Y>& a, int64_t n, const bf16* ahead) {
  const int64_t K = a.K, B = K / kBlock;
  const bf16* w = a.w + n * K;
  __m512 c0[NB][R], c1[NB][R];
  for (int phase = 0; phase < 2; ++phase) {
    __m512 acc[NB][R];
    for (int o = 0; o < NB; ++o)
      for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
    for (int64_t j = phase; j < B; j += 2) {
      __m512bh wv[NB];
      for (int o = 0; o < NB; ++o) {
        if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + o * K + j * kBlock), _MM_HINT_T1);
        wv[o] = load_bh(w + o * K + j * kBlock);
      }
      for (int r = 0; r < R; ++r) {
        __m512i xi = _mm512_loadu_si512(a.x + r * K + j * kBlock);
        asm("" : "+v"(xi));  // held in a register: one load of x serves NB products
        for (int o = 0; o < NB; ++o) acc[o][r] = _mm512_dpbf16_ps(acc[o][r], wv[o], (__m512bh)xi);
      }
    }
    for (int o = 0; o < NB; ++o)
      for (int r = 0; r < R; ++r) (phase ? c1 : c0)[o][r] = acc[o][r];
  }
  if constexpr (std::is_same_v<Y, float>)
    archlab_rows::fold_tile<NB, R, archlab_rows::float_lanes>(c0, c1, a, n);
  else
    archlab_rows::fold_tile<NB, R, bf16_lanes>(c0, c1, a, n);
}

template <class Y>
using TileFn = void (*)(const Args<Y>&, int64_t, const bf16*);

template <int NB, class Y, int... R>
constexpr std::array<TileFn<Y>, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {tile<NB, R + 1, Y>...};
}

template <int NB, int RMAX, class Y>
void tiles(const Args<Y>& a, int64_t n0, int64_t n1, int M) {
  static constexpr auto wide = tile_table<NB, Y>(std::make_integer_sequence<int, RMAX>());
  static constexpr auto one = tile_table<1, Y>(std::make_integer_sequence<int, RMAX>());
  archlab_rows::walk_tiles<NB, RMAX, kAhead>(a, n0, n1, M, wide, one);
}

// y's rows n0 .. n1 (of N), every row of x: the one-row stream, or the tiles (the shapes measured below)
template <class Y>
void rows(const Args<Y>& a, int64_t n0, int64_t n1, int M) {
  // SmolLM2-135M's 121 matrices at 2 threads (AMD EPYC AVX512-BF16, 2026-12-05, median of 9 in-process rounds, ms,
  // the same bits whichever tiles): 2-4 rows in 2 x R tiles (one group) 6.5-6.8 against 6.9-8.1 for 3 x 5; from 5
  // rows 3 x 5 was the best or within 5% of the best of 3 x 5, 4 x 5, 2 x 10, 3 x 8, 2 x 8 and 4 x 6 (9 rows 11.4,
  // 10 rows 12.0, 16 rows 18.5 against 17.7 for 4 x 5); one row streams at 6.7 (2-3 row tiles 7.6-8.8 at one row).
  if (M == 1)
    row(a, n0, n1);
  else if (M <= 4)
    tiles<2, 4>(a, n0, n1, M);
  else
    tiles<3, 5>(a, n0, n1, M);
}

at::Tensor bf16_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     bool float_out) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [..., K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "weight must be contiguous bfloat16 [N, K]");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1..", kMaxRows, " rows");
  TORCH_CHECK(weight.size(1) == K && K % kBlock == 0 && K > 0, "weight must be [N, K] with K a multiple of 32");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kBFloat16),
              "bias must be bfloat16 [N]");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const bf16* b = bias ? bc.data_ptr<bf16>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / K);
  const int m = static_cast<int>(M);
  if (float_out) {
    const Args<float> a{xc.data_ptr<bf16>(), weight.data_ptr<bf16>(), b, y.data_ptr<float>(), K, N};
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(a, n0, n1, m); });
  } else {
    const Args<bf16> a{xc.data_ptr<bf16>(), weight.data_ptr<bf16>(), b, y.data_ptr<bf16>(), K, N};
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(a, n0, n1, m); });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("bf16_rows(Tensor x, Tensor weight, Tensor? bias, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) { m.impl("bf16_rows", bf16_rows); }
