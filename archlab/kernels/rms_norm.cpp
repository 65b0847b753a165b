// archlab's RMSNorm for float32 and bfloat16 inference (archlab/kernels/__init__.py describes it), each row r of
// x [R, d]:
//   y[r] = (x[r] * s_r) * g,   s_r = 1 / sqrt(ss_r / d + eps),   ss_r = sum_i x[r, i]^2
// ss_r is lanes.h's dot of the row with itself (two chains of 16-lane blocks, folded 8 + 8, 4 + 4, 2 + 2, 1 + 1), s_r
// scalar, the two products lane by lane: the AVX-512 and AVX2 variants give the same result to the bit, and a row's
// result depends only on the row. bfloat16 x and g are widened exactly as they are read, and y rounded to bfloat16
// once, as PyTorch's CPU rms_norm rounds it. One op where PyTorch's CPU rms_norm dispatches about ten (a decoding
// step's norm is its dispatch: 12-30 us a call on SmolLM2's [1, 576] against 1-2 here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "lanes.h"

namespace {

using archlab_lanes::dot256;
using archlab_lanes::dot512;
using archlab_lanes::kLanes;
using archlab_lanes::load16;
using archlab_lanes::load8;

float inverse_rms(float ss, int64_t d, float eps) { return 1.f / std::sqrt(ss / static_cast<float>(d) + eps); }

// one row into float y (x, g of element type T: float32, or bfloat16 widened as it is read)
template <class T>
ARCHLAB_AVX512 void row512(float* y, const T* x, const T* g, int64_t d, float eps) {
  const __m512 s = _mm512_set1_ps(inverse_rms(dot512(x, x, d), d, eps));
  for (int64_t i = 0; i < d; i += kLanes)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i), s), load16(g + i)));
}

template <class T>
ARCHLAB_AVX2 void row256(float* y, const T* x, const T* g, int64_t d, float eps) {
  const __m256 s = _mm256_set1_ps(inverse_rms(dot256(x, x, d), d, eps));
  for (int64_t i = 0; i < d; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(load8(x + i), s), load8(g + i)));
}

// every row of x [rows, d] into y: float32 written in place; bfloat16 computed in float32 and rounded once (nearest
// even, c10's conversion: the same on either variant)
template <class T>
void rows(T* yp, const T* xp, const T* gp, int64_t rows, int64_t d, float eps, int64_t isa) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / d), [&](int64_t r0, int64_t r1) {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : d);
    for (int64_t r = r0; r < r1; ++r) {
      float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(yp + r * d) : buffer.data();
      if (isa == 512) row512(out, xp + r * d, gp, d, eps);
      else row256(out, xp + r * d, gp, d, eps);
      if constexpr (!std::is_same_v<T, float>)
        for (int64_t i = 0; i < d; ++i) yp[r * d + i] = T(out[i]);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps, int64_t isa) {
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() >= 1 && (dtype == at::kFloat || dtype == at::kBFloat16) && weight_in.scalar_type() == dtype,
              "x [..., d] and weight [d] must be both float32 or both bfloat16");
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == d && d > 0 && d % kLanes == 0,
              "weight must be [d] with x's last dimension d, a positive multiple of 16");
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "x and weight must be on the CPU");
  TORCH_CHECK(isa == 512 || isa == 256, "isa must be 512 or 256");
  const at::Tensor x = x_in.contiguous(), g = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const float feps = static_cast<float>(eps);
  const int64_t n = d ? x.numel() / d : 0;
  if (dtype == at::kFloat)
    rows(y.data_ptr<float>(), x.data_ptr<float>(), g.data_ptr<float>(), n, d, feps, isa);
  else
    rows(y.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), g.data_ptr<c10::BFloat16>(), n, d, feps, isa);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) { m.impl("rms_norm", rms_norm); }
