"""The search engine: open an index folder, run the stages, return ranked hits with per-stage timings.

Stages of one query (card 5; ``K`` = retrieval depth, ``R`` = re-rank depth, ``E`` = explained hits)::

    encode   q = BERT(query) pooled, L2-normalised           [1, d]
    ann      top-K by inner product from the FAISS index     (dense)
    bm25     top-K by BM25 (hybrid indexes only)
    fuse     reciprocal rank fusion of the two rankings      (hybrid indexes only)
    rerank   cross-encoder score of the first R hits         (optional)
    explain  evidence sentences + a decoder's explanation of the first E hits (optional)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from archlab.errors import ConfigError
from archlab.search.corpus import Document


@dataclass
class Hit:
    """One ranked document: ``rank`` counts from 1; ``score`` is the final stage's score.

    ``stage_scores`` holds each stage's score of this document, e.g. ``{"dense": .., "bm25": .., "fused": ..,
    "rerank": ..}``; ``evidence``, ``explanation`` and ``quotes_ok`` are filled by the explainer.
    """

    doc: Document
    rank: int
    score: float
    stage_scores: dict[str, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
    explanation: str | None = None
    quotes_ok: bool | None = None
    bad_quotes: list[str] = field(default_factory=list)  # quoted spans not found in the document (quote guard)


@dataclass
class SearchResult:
    """The hits of one query, best first, and the milliseconds spent in each stage that ran."""

    query: str
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)


class SearchEngine:
    """A searchable index folder (see :mod:`archlab.search.index` for its layout)."""

    def __init__(self, index_dir: Path, *, reranker=None, explainer=None):
        self.index_dir = Path(index_dir)
        self.reranker = reranker
        self.explainer = explainer

    @classmethod
    def open(cls, index_dir: str | Path, *, reranker=None, explainer=None) -> SearchEngine:
        """Open ``index_dir`` (its manifest is checked against the encoder it names)."""
        raise NotImplementedError("SearchEngine.open is being written (issue 15, search-core)")

    def retrieve(self, query: str, k: int = 100) -> list[Hit]:
        """The first-stage top ``k``: dense, or dense + BM25 fused when the index is hybrid."""
        raise NotImplementedError("SearchEngine.retrieve is being written (issue 15, search-core)")

    def search(self, query: str, *, k: int = 10, rerank: int = 0, explain: int = 0) -> SearchResult:
        """Retrieve, re-rank the first ``rerank`` hits (needs a reranker), explain the first ``explain``."""
        if rerank and self.reranker is None:
            raise ConfigError(f"rerank={rerank} needs a reranker (SearchEngine.open(..., reranker=...))")
        if explain and self.explainer is None:
            raise ConfigError(f"explain={explain} needs an explainer (SearchEngine.open(..., explainer=...))")
        raise NotImplementedError("SearchEngine.search is being written (issue 15, search-core)")


__all__ = ["Hit", "SearchEngine", "SearchResult"]
