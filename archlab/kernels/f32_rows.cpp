// archlab's float32 kernel for a few rows (archlab/kernels/__init__.py describes it): y = x W^T + b
//   y[m, n] = b[n] + sum_k x[m, k] W[n, k]        x [..., K] of M = 1..4 rows; W [N, K] row-major as nn.Linear
// keeps it; y [..., N] (x's leading dimensions: one call, no reshape around it)
// One output row at a time, its K weights read front to back (one sequential stream per thread: walking several
// rows side by side halved the rate a core streams at, measured on the AMD EPYC kind). The sum: 16 lanes, lane i
// holding the inputs k = 16 j + i; blocks j alternate between two chains (even j, odd j), each an FMA per block;
// then chain 0 + chain 1 lane by lane, the 16 lanes halved 8 + 8, 4 + 4, 2 + 2, 1 + 1; then + b[n]. The AVX2
// variant carries each 16-lane chain as two 8-lane halves and halves the same way, so both variants compute the
// same operations in the same order: the same result to the bit, and a row's result does not depend on M.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lanes.h"

namespace {

using archlab_lanes::fold16;
using archlab_lanes::kLanes;
constexpr int64_t kMaxRows = 4;  // past 4 rows the product is bound by FMAs, and oneDNN's packed GEMM wins
constexpr int64_t kGrainElements = 1 << 15;  // weights per thread at least: a smaller product stays on one thread

struct Args {
  const float* x;  // [M, K]
  const float* w;  // [N, K]
  const float* b;  // [N] or nullptr
  float* y;        // [M, N]
  int64_t K, N;
};

inline void store(const Args& a, int m, int64_t n, float dot) { a.y[m * a.N + n] = a.b ? dot + a.b[n] : dot; }

// output rows n0 .. n1 against the M rows of x (M <= 4), each weight row in two chains of 16 lanes. Measured at 2
// threads on [1536, 576]: 1 row 24 us, 4 rows 52 (oneDNN's packed GEMM 53); a 10-row version 138 against oneDNN's
// 99 (multiply-adds bound it by then): hence kMaxRows.
template <int M>
ARCHLAB_AVX512 void rows512(const Args& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, B = K / kLanes;
  const float* x = a.x;
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = a.w + n * K;
    __m512 c0[M], c1[M];
    for (int m = 0; m < M; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= B; j += 2) {
      const __m512 w0 = _mm512_loadu_ps(w + j * kLanes), w1 = _mm512_loadu_ps(w + j * kLanes + kLanes);
      for (int m = 0; m < M; ++m) {
        c0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + j * kLanes), c0[m]);
        c1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + j * kLanes + kLanes), c1[m]);
      }
    }
    if (j < B) {
      const __m512 w0 = _mm512_loadu_ps(w + j * kLanes);
      for (int m = 0; m < M; ++m) c0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + j * kLanes), c0[m]);
    }
    for (int m = 0; m < M; ++m) store(a, m, n, fold16(_mm512_add_ps(c0[m], c1[m])));
  }
}

template <int M>
ARCHLAB_AVX2 void rows256(const Args& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, B = K / kLanes;
  const float* x = a.x;
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = a.w + n * K;
    __m256 lo0[M], hi0[M], lo1[M], hi1[M];  // chain 0 and chain 1, lanes 0-7 and 8-15
    for (int m = 0; m < M; ++m) lo0[m] = hi0[m] = lo1[m] = hi1[m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= B; j += 2) {
      const float* wj = w + j * kLanes;
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

using Fn = void (*)(const Args&, int64_t, int64_t);

template <int M>
Fn pick(int64_t isa) {
  return isa == 512 ? rows512<M> : rows256<M>;
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
  const Fn fns[] = {pick<1>(isa), pick<2>(isa), pick<3>(isa), pick<4>(isa)};
  const Fn fn = fns[M - 1];
  const int64_t grain = std::max<int64_t>(1, kGrainElements / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(a, n0, n1); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("f32_rows(Tensor x, Tensor weight, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) { m.impl("f32_rows", f32_rows); }
