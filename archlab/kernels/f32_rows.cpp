// archlab's float32 kernel for a few rows (archlab/kernels/__init__.py describes it): y = x W^T + b
//   y[m, n] = b[n] + sum_k x[m, k] W[n, k]        x [..., K] of M = 1..16 rows; W [N, K] row-major as nn.Linear
// keeps it; y [..., N] (x's leading dimensions: one call, no reshape around it)
// Every (m, n) is summed the same way: 16 lanes, lane i holding the inputs k = 16 j + i; blocks j alternate between
// two chains (even j, odd j), each an FMA per block; then chain 0 + chain 1 lane by lane, the 16 lanes halved
// 8 + 8, 4 + 4, 2 + 2, 1 + 1; then + b[n]. The AVX2 variant carries each 16-lane chain as two 8-lane halves and
// halves the same way, so both variants compute the same operations in the same order: the same result to the bit,
// and a row's result does not depend on M nor on which loop below computed it.
// One row (memory-bound: each weight read once, for one multiply-add): one output row at a time, its K weights read
// front to back, one sequential stream per thread, the stream prefetched 4 KB ahead (AVX-512).
// 2-16 rows, AVX-512: tiles of NB output rows x R rows of x, the chains in registers, so each weight vector loaded
// serves R multiply-adds and each x vector NB (3 x 5 summing chain 0 then chain 1, 2 x 6 both at once for exactly 6
// rows, 3 x 4 both at once where K is large); the rows of x in groups of at most R, the tile's NB weight rows re-read
// from L1 by the groups after the first; the weights of a tile kAhead tiles on prefetched into L2 by every group.
// AVX2 (16 registers): the one-row loop carrying up to 4 rows, per output row and group of at most 4 rows past 4, the
// weights kAhead256 rows on prefetched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "lanes.h"
#include "rows.h"

namespace {

using archlab_lanes::fold16;
using archlab_lanes::kLanes;
constexpr int64_t kMaxRows = 16;
constexpr int kStreamRows = 4;  // AVX2: up to this many rows in one pass of rows256
constexpr int64_t kGrainElements = 1 << 15;  // weights per thread at least: a smaller product stays on one thread

using Args = archlab_rows::Args<float>;  // x [M, K], w [N, K], b [N] or nullptr, y [M, N]

inline void store(const Args& a, int m, int64_t n, float dot) { a.y[m * a.N + n] = a.b ? dot + a.b[n] : dot; }

// output rows n0 .. n1 against one row of x, each weight row in two chains of 16 lanes: one sequential stream per
// thread. Measured at 2 threads on [1536, 576]: 24 us; carrying 4 rows 52 (oneDNN's packed GEMM 53), 10 rows 138
// against oneDNN's 99 (each x vector loaded for one multiply-add): hence the tiles below from 2 rows.
// Each 64-byte line read prefetches (into L2) the line kAheadBytes on, within the thread's rows. Measured on the AMD
// EPYC (AVX-512) kind, 2026-12-05, 2 threads, 40 interleaved rounds, the median of each round's time without the
// prefetch over its time with it: gpt-mini's 25 matrices (120 MB) 1.108, SmolLM2-135M's 121 (538 MB) 1.030; 2 KB
// on gave 1.057 / 1.019, and 8 or 16 KB on were slower than 4 in a sweep. Four output rows at once (four streams
// per thread) were 1.3-1.8x slower than one (docs/speed.md, 2026-12-05).
constexpr int64_t kAheadBytes = 4096;

ARCHLAB_AVX512 void row512(const Args& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, B = K / kLanes;
  const float* end = a.w + n1 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = a.w + n * K;
    const char* ahead = reinterpret_cast<const char*>(w) + kAheadBytes;
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= B; j += 2) {
      const char* line = ahead + j * kLanes * sizeof(float);
      if (line + 2 * kLanes * sizeof(float) <= reinterpret_cast<const char*>(end)) {
        _mm_prefetch(line, _MM_HINT_T1);
        _mm_prefetch(line + kLanes * sizeof(float), _MM_HINT_T1);
      }
      c0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j * kLanes), _mm512_loadu_ps(a.x + j * kLanes), c0);
      c1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j * kLanes + kLanes), _mm512_loadu_ps(a.x + j * kLanes + kLanes), c1);
    }
    if (j < B) c0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j * kLanes), _mm512_loadu_ps(a.x + j * kLanes), c0);
    store(a, 0, n, fold16(_mm512_add_ps(c0, c1)));
  }
}

// AVX2: the weights kAhead256 output rows on prefetched into L2 as each row is read. Measured with this variant on the
// AMD EPYC (AVX-512) kind, SmolLM2-135M's fused matrices (2026-12-04, 2 threads, ms, without / with): 1 row 18.7 /
// 18.6, 4 rows 24.4 / 20.1, 9 rows 34.8 / 27.2, 16 rows 74.1 / 57.8 (4 and 16 rows ahead: the same within noise). An
// AVX2-only CPU was not at hand.
constexpr int64_t kAhead256 = 8;

template <int M>
ARCHLAB_AVX2 void rows256(const Args& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, B = K / kLanes;
  const float* x = a.x;
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = a.w + n * K;
    const float* ahead = n + kAhead256 < a.N ? w + kAhead256 * K : nullptr;
    __m256 lo0[M], hi0[M], lo1[M], hi1[M];  // chain 0 and chain 1, lanes 0-7 and 8-15
    for (int m = 0; m < M; ++m) lo0[m] = hi0[m] = lo1[m] = hi1[m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= B; j += 2) {
      const float* wj = w + j * kLanes;
      if (ahead) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * kLanes), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * kLanes + kLanes), _MM_HINT_T1);
      }
      const __m256 a0 = _mm256_loadu_ps(wj), b0 = _mm256_loadu_ps(wj + 8);
      const __m256 a1 = _mm256_loadu_ps(wj + 16), b1 = _mm256_loadu_ps(wj + 24);
      for (int m = 0; m < M; ++m) {
        const float* xj = x + m * K + j * kLanes;
        lo0[m] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(xj), lo0[m]);
        hi0[m] = _mm256_fmadd_ps(b0, _mm256_loadu_ps(xj + 8), hi0[m]);
        lo1[m] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(xj + 16), lo1[m]);
        hi1[m] = _mm256_fmadd_ps(b1, _mm256_loadu_ps(xj + 24), hi1[m]);
      }
    }
    if (j < B) {
      const float* wj = w + j * kLanes;
      const __m256 a0 = _mm256_loadu_ps(wj), b0 = _mm256_loadu_ps(wj + 8);
      for (int m = 0; m < M; ++m) {
        const float* xj = x + m * K + j * kLanes;
        lo0[m] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(xj), lo0[m]);
        hi0[m] = _mm256_fmadd_ps(b0, _mm256_loadu_ps(xj + 8), hi0[m]);
      }
    }
    for (int m = 0; m < M; ++m) store(a, m, n, fold16(_mm256_add_ps(lo0[m], lo1[m]), _mm256_add_ps(hi0[m], hi1[m])));
  }
}

// The AVX-512 tiles. Measured at 2 threads on the AMD EPYC (AVX-512) over SmolLM2-135M's 121 matrices (538 MB, so
// every weight comes from memory), in-process rounds, ms, against oneDNN's packed copies (2026-11): 5 rows 24.5 / 26.7,
// 9 rows 27.8 / 27.7, 10 rows 31.5 / 31.5, 12 rows 42 / 34, 16 rows 58 / 40; and against the one-row loop carrying
// the rows (two rounds): 2 rows 24.7 / 26.9 and 22.3 / 23.8, 3 rows 23.2 / 26.5 and 17.8 / 19.0, 4 rows 19.7 / 23.4
// and 20.5 / 23.9 (1 row: 16.7 / 16.8 and 21.7 / 21.3, so one row stays on row512). Without the prefetch the 9-row
// products took 45 ms: the multiply-adds between a thread's loads leave too few of them in flight for the weights to
// stream. A dot product of K = 576 is 36 multiply-adds and a fold, so the tiles reach about 78% of oneDNN's
// multiply-add rate with the weights in cache (1 thread, 9 rows: 78 against 96-100 GFLOP/s).
// Two changes of 2026-12-04, measured the same way (the K = 576 matrices, 432 MB / the K = 1536 ones, 106 MB; ms,
// before -> after; tiles512's comment has why):
//   rows   2 x 6, first group prefetching   ->   every group prefetching, 3 x 4 tiles where K > kNarrowK
//   9      17.7 / 6.8                        ->   17.5 / 5.3
//   10     20.1 / 6.7                        ->   17.5 / 4.8
//   16     37.1 / 9.6                        ->   29.8 / 7.0
//   2-8    K = 576 unchanged (memory-bound); K = 1536 at 5-8 rows 15-30% faster with 3 x 4 tiles
constexpr int kAhead = 4;  // tiles between a tile and the one whose weights it prefetches
// Up to this K a group of 6 rows of x takes at most half of a 32 KB L1 (6 K floats <= 16 KB) and the tiles are the
// phased 3 x 5 (15 chains at a time, 3 weight vectors, 1 of x; 2 x 6 at exactly 6 rows: 24 chains, 4 weight vectors, 2
// of x in the 32 registers); past it x comes from L2 and 3 x 4 tiles (each x vector loaded for 3 multiply-adds, not 2)
// were faster than 2 x 6: at K = 1536 (SmolLM2's down projection) 5.3 against 6.0 ms at 9 rows, 4.8 against 6.2 at 10.
// At K = 576 2 x 6 was the faster of those two up to 14 rows (9 rows 17.5 against 21.3 ms). Measured on the AMD EPYC
// kind only, at K = 384, 576 and 1536.
constexpr int64_t kNarrowK = 16 * 1024 / (6 * sizeof(float));

using archlab_rows::for_groups;
using archlab_rows::rows_from;

// outputs n .. n + NB - 1 against the R rows of a: row512's chains; ahead (or nullptr): weights to prefetch into L2,
// NB rows of K from there. Two ways to hold the chains, the same operations in the same order either way:
//   Phased = false: both chains at once, 2 NB R accumulators (2 NB weight vectors and 2 of x a step);
//   Phased = true: chain 0 over the even blocks, then chain 1 over the odd blocks, NB R accumulators, so a tile can
//   hold more output rows (each x vector loaded for NB multiply-adds: 3 x 5 against 2 x 6).
template <int NB, int R, bool Phased>
ARCHLAB_AVX512 void tile512(const Args& a, int64_t n, const float* ahead) {
  const int64_t K = a.K, B = K / kLanes;
  const float* w = a.w + n * K;
  const float* x = a.x;
  __m512 c0[NB][R], c1[NB][R];
  if constexpr (Phased) {
    __m512 acc[NB][R];  // the chain being summed, in registers; chain 0 kept in c0 while chain 1 runs
    for (int phase = 0; phase < 2; ++phase) {
      for (int o = 0; o < NB; ++o)
        for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
      for (int64_t j = phase; j < B; j += 2) {
        __m512 wv[NB];
        for (int o = 0; o < NB; ++o) {
          if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + o * K + j * kLanes), _MM_HINT_T1);
          wv[o] = _mm512_loadu_ps(w + o * K + j * kLanes);
        }
        for (int r = 0; r < R; ++r) {
          __m512 xv = _mm512_loadu_ps(x + r * K + j * kLanes);
          asm("" : "+v"(xv));  // held in a register: one load of x serves NB multiply-adds
          for (int o = 0; o < NB; ++o) acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
        }
      }
      for (int o = 0; o < NB; ++o)
        for (int r = 0; r < R; ++r) (phase ? c1 : c0)[o][r] = acc[o][r];
    }
  } else {
    for (int o = 0; o < NB; ++o)
      for (int r = 0; r < R; ++r) c0[o][r] = c1[o][r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= B; j += 2) {
      __m512 w0[NB], w1[NB];
      if (ahead)
        for (int o = 0; o < NB; ++o) {
          _mm_prefetch(reinterpret_cast<const char*>(ahead + o * K + j * kLanes), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(ahead + o * K + j * kLanes + kLanes), _MM_HINT_T1);
        }
      for (int o = 0; o < NB; ++o) {
        w0[o] = _mm512_loadu_ps(w + o * K + j * kLanes);
        w1[o] = _mm512_loadu_ps(w + o * K + j * kLanes + kLanes);
      }
      for (int r = 0; r < R; ++r) {
        __m512 x0 = _mm512_loadu_ps(x + r * K + j * kLanes), x1 = _mm512_loadu_ps(x + r * K + j * kLanes + kLanes);
        asm("" : "+v"(x0), "+v"(x1));  // held in registers: one load of x serves NB multiply-adds (gcc re-reads it)
        for (int o = 0; o < NB; ++o) {
          c0[o][r] = _mm512_fmadd_ps(w0[o], x0, c0[o][r]);
          c1[o][r] = _mm512_fmadd_ps(w1[o], x1, c1[o][r]);
        }
      }
    }
    if (j < B) {
      for (int o = 0; o < NB; ++o) {
        const __m512 w0 = _mm512_loadu_ps(w + o * K + j * kLanes);
        for (int r = 0; r < R; ++r) c0[o][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + j * kLanes), c0[o][r]);
      }
    }
  }
  archlab_rows::fold_tile<NB, R, archlab_rows::float_lanes>(c0, c1, a, n);
}

using TileFn = void (*)(const Args&, int64_t, const float*);

template <int NB, bool Phased, int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {tile512<NB, R + 1, Phased>...};
}

// output rows n0 .. n1 against M = 2..16 rows of x: NB output rows at a time (one at a time at the end), each
// against the rows of x in groups of at most RMAX, as even as they come (the tile's weights re-read from L1 by the
// groups after the first). Every group's pass prefetches the weights kAhead tiles on, the same lines again after the
// first group: with only the first group prefetching, the products of 10 rows took 20.1 / 6.7 ms (K = 576 / 1536)
// against 17.5 / 6.2, and of 16 rows 37.1 against 29.8 (prefetching further ahead instead, 8 tiles, changed nothing).
// Our reading, not proven: a software prefetch can be dropped when the core's miss queue is full, and the later
// groups' prefetches give it another chance.
template <int NB, int RMAX, bool Phased>
void tiles512(const Args& a, int64_t n0, int64_t n1, int M) {
  static constexpr auto wide = tile_table<NB, Phased>(std::make_integer_sequence<int, RMAX>());
  static constexpr auto one = tile_table<1, Phased>(std::make_integer_sequence<int, RMAX>());
  archlab_rows::walk_tiles<NB, RMAX, kAhead>(a, n0, n1, M, wide, one);
}

using Fn = void (*)(const Args&, int64_t, int64_t);

// AVX2: up to 4 rows in one pass of rows256; past that each output row against the rows of x in groups of at most 4
// (the row's weights re-read from L1 by the groups after the first)
ARCHLAB_AVX2 void rows256_any(const Args& a, int64_t n0, int64_t n1, int M) {
  static constexpr Fn fns[] = {rows256<1>, rows256<2>, rows256<3>, rows256<4>};
  if (M <= kStreamRows) return fns[M - 1](a, n0, n1);
  for (int64_t n = n0; n < n1; ++n)
    for_groups(M, kStreamRows, [&](int m0, int r) { fns[r - 1](rows_from(a, m0), n, n + 1); });
}

at::Tensor f32_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    int64_t isa) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be float32 [..., K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be contiguous float32 [N, K]");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1..", kMaxRows, " rows");
  TORCH_CHECK(weight.size(1) == K && K % kLanes == 0 && K > 0, "weight must be [N, K] with K a multiple of 16");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat),
              "bias must be float32 [N]");
  TORCH_CHECK(isa == 512 || isa == 256, "isa must be 512 or 256");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const Args a{xc.data_ptr<float>(), weight.data_ptr<float>(), bias ? bc.data_ptr<float>() : nullptr,
               y.data_ptr<float>(), K, N};
  const int64_t grain = std::max<int64_t>(1, kGrainElements / K);
  const int rows = static_cast<int>(M);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (isa == 256)
      rows256_any(a, n0, n1, rows);
    else if (rows == 1)
      row512(a, n0, n1);
    // 2026-12-05, the phased 3 x 5 tiles against 2 x 6 (SmolLM2's 121 matrices, 2 threads, paired in-process rounds,
    // the same bits): 7 rows 1.075x, 9 rows 1.047-1.056x, 10 rows 1.068-1.090x, 13 rows 1.076x, 16 rows 1.134-1.144x,
    // 2-5 rows 0.99-1.02x; at exactly 6 rows (one full group) phased tiles lost (0.82x for 3 x 5 in groups of 3,
    // 0.97x for 3 x 6) and 2 x 6 stays. Where K > kNarrowK the phased tiles lost at 5 rows (0.80x: x read twice
    // from past half the L1), so 3 x 4 stays there (docs/speed.md).
    else if (K > kNarrowK)
      tiles512<3, 4, false>(a, n0, n1, rows);
    else if (rows == 6)
      tiles512<2, 6, false>(a, n0, n1, rows);
    else
      tiles512<3, 5, true>(a, n0, n1, rows);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("f32_rows(Tensor x, Tensor weight, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) { m.impl("f32_rows", f32_rows); }
