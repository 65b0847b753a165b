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

// an NB x R tile's sums: chain 0 + chain 1 lane by lane, then the folds 16 at a time (fold16x16: fold16's
// operations); sum i is (o, r) = (i / R, i % R), handed to Store(a, r, n + o, its value), the kernel's own rounding
template <int NB, int R, auto Store, class A>
ARCHLAB_AVX512 inline void fold_tile(const __m512 (&c0)[NB][R], const __m512 (&c1)[NB][R], const A& a, int64_t n) {
  constexpr int S = NB * R, F = (S + 15) / 16;
  __m512 sums[16 * F];
  for (int i = 0; i < 16 * F; ++i)
    sums[i] = i < S ? _mm512_add_ps(c0[i / R][i % R], c1[i / R][i % R]) : _mm512_setzero_ps();
  for (int f = 0; f < F; ++f) {
    alignas(64) float folded[16];
    _mm512_store_ps(folded, archlab_lanes::fold16x16(sums + 16 * f));
    for (int i = 16 * f; i < (S < 16 * f + 16 ? S : 16 * f + 16); ++i) {
      const int l = i - 16 * f;
      Store(a, i % R, n + i / R, folded[4 * (l % 4) + l / 4]);
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
