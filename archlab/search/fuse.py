r"""Reciprocal rank fusion (Cormack, Clarke and Büttcher, 2009): combine rankings by their ranks alone.

For rankings ``r_1 .. r_m`` (each a list of ids, best first; ranks count from 1)::

    RRF(d) = sum_j 1 / (k0 + rank_j(d))          (a ranking that misses d adds nothing; k0 = 60)

Scores of different retrievers (cosine, BM25) live on different scales; ranks do not, so no tuning is
needed. Ties are broken by the best single rank, then by first appearance.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from archlab.errors import ConfigError

DEFAULT_K0 = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k0: float = DEFAULT_K0) -> list[tuple[Hashable, float]]:
    """``[(id, fused score), ...]`` best first, over every id in any of ``rankings``."""
    if k0 < 0:
        raise ConfigError(f"k0={k0} must be >= 0")
    score: dict[Hashable, float] = {}
    best: dict[Hashable, tuple[int, int]] = {}
    for j, ranking in enumerate(rankings):
        for rank, item in enumerate(ranking, 1):
            score[item] = score.get(item, 0.0) + 1.0 / (k0 + rank)
            best[item] = min(best.get(item, (rank, j)), (rank, j))
    return sorted(score.items(), key=lambda kv: (-kv[1], best[kv[0]]))


__all__ = ["DEFAULT_K0", "reciprocal_rank_fusion"]
