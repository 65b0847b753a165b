// What archlab's few-row product kernels (f32_rows.cpp, bf16_rows.cpp) share: their arguments, the rows of x taken
// in groups, a tile's two chains folded and stored, and the walk of the tiles over the output rows. The element type
// and the tile functions are the kernels' own; the order of every sum is lanes.h's.
#pragma once

#include <array>
#include <cstdint>

#include "lanes.h"

namespace archlab_rows {

template <class T, class Y = T>
struct Args {
  const T* x;  // [M, K]
  const T* w;  // [N, K]
  const T* b;  // [N] or nullptr
  Y* y;        // [M, N]
  int64_t K, N;
};

// x's rows m0 .. of a (and y's), as Args of the rows from m0
template <class T, class Y>
inline Args<T, Y> rows_from(const Args<T, Y>& a, int m0) {
  return Args<T, Y>{a.x + m0 * a.K, a.w, a.b, a.y + m0 * a.N, a.K, a.N};
}

// the M rows of x in groups of at most `most`, as even as they come: f(first row, rows) for each group
template <class F>
inline void for_groups(int M, int most, F&& f) {
  const int groups = (M + most - 1) / most;
  for (int g = 0, m0 = 0; g < groups; ++g) {
    const int r = (M - m0) / (groups - g);
    f(m0, r);
    m0 += r;
  }
}

// fold_tile's Lanes for a float32 y: the sums kept
ARCHLAB_AVX512 inline void float_lanes(__m512 v, float* out) { _mm512_store_ps(out, v); }

// an NB x R tile's sums: chain 0 + chain 1 lane by lane, the folds 16 at a time (folds16x16: fold16's operations),
// plus the bias, in lanes; then Lanes(v, out) writes the 16 results in y's type (the kernel's own rounding, lane by
// lane: the bits a scalar conversion gives) and each is stored to its place: sum i is (o, r) = (i / R, i % R),
// y[r, n + o]. (One conversion per 16 sums: storing each sum through a scalar conversion took a 3 x 5 bf16 tile about
// 700 more instructions.)
template <int NB, int R, auto Lanes, class T, class Y>
ARCHLAB_AVX512 inline void fold_tile(const __m512 (&c0)[NB][R], const __m512 (&c1)[NB][R], const Args<T, Y>& a,
                                     int64_t n) {
  constexpr int S = NB * R, F = (S + 15) / 16;
  __m512 sums[16 * F];
  for (int i = 0; i < 16 * F; ++i)
    sums[i] = i < S ? _mm512_add_ps(c0[i / R][i % R], c1[i / R][i % R]) : _mm512_setzero_ps();
  for (int f = 0; f < F; ++f) {
    const int count = S < 16 * f + 16 ? S - 16 * f : 16;  // sums 16 f .. 16 f + count - 1
    __m512 folded = archlab_lanes::folds16x16(sums + 16 * f);  // lane l: sum 16 f + l
    if (a.b) {
      alignas(64) float bias[16] = {};
      for (int l = 0; l < count; ++l) bias[l] = static_cast<float>(a.b[n + (16 * f + l) / R]);
      folded = _mm512_add_ps(folded, _mm512_load_ps(bias));
    }
    alignas(64) Y out[16];
    Lanes(folded, out);
    for (int l = 0; l < count; ++l) {
      const int i = 16 * f + l;
      a.y[(i % R) * a.N + n + i / R] = out[l];
    }
  }
}

// output rows n0 .. n1 against the M rows of x: NB output rows at a time (one at a time at the end), each against
// the rows of x in groups of at most RMAX (wide[r - 1] / one[r - 1]: the tile of NB / 1 output rows and r rows of x);
// every group's pass of a tile prefetches the weights of the tile Ahead tiles on (f32_rows.cpp's tiles512 comment
// has why every group, not the first only)
template <int NB, int RMAX, int Ahead, class T, class Y, class Tile>
inline void walk_tiles(const Args<T, Y>& a, int64_t n0, int64_t n1, int M, const std::array<Tile, RMAX>& wide,
                       const std::array<Tile, RMAX>& one) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const int64_t next = n + Ahead * NB;
    const T* ahead = next + NB <= a.N ? a.w + next * a.K : nullptr;
    for_groups(M, RMAX, [&](int m0, int r) { wide[r - 1](rows_from(a, m0), n, ahead); });
  }
  for (; n < n1; ++n) for_groups(M, RMAX, [&](int m0, int r) { one[r - 1](rows_from(a, m0), n, nullptr); });
}

}  // namespace archlab_rows
