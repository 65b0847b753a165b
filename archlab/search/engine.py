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

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.search.corpus import Document
from archlab.search.fuse import reciprocal_rank_fusion


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
    """The hits of one query, best first, the milliseconds spent in each stage that ran, and the stages asked for
    but skipped, each with the reason (``{"rerank": "..."}``)."""

    query: str
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


MODES = ("dense", "bm25", "hybrid")


class SearchEngine:
    """A searchable index folder (see :mod:`archlab.search.index` for its layout).

    ``reranker`` (optional) has ``.score(query, docs) -> list[float]`` (:mod:`archlab.search.rerank`);
    ``explainer`` (optional) has ``.explain(query, hits)``, filling each hit's evidence and explanation
    (:mod:`archlab.search.explain`). Open one with :meth:`open`.
    """

    def __init__(self, index_dir: Path, manifest: dict, docs: list[Document], faiss_index, encoder, bm25=None, *,
                 reranker=None, explainer=None, mode: str | None = None):  # fmt: skip
        self.index_dir = Path(index_dir)
        self.manifest = manifest
        self.docs = docs
        self.faiss_index = faiss_index
        self.encoder = encoder
        self.bm25 = bm25
        self.reranker = reranker
        self.explainer = explainer
        self.max_query_tokens = encoder.max_seq_length
        self._counter = Tokenizer.from_str(encoder.tokenizer.to_str())  # counts tokens, never truncates
        self._counter.no_truncation()
        self._counter.no_padding()
        self._warned_long = False
        self.mode = mode or ("hybrid" if bm25 is not None else "dense")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        if self.mode != "dense" and bm25 is None:
            raise ConfigError(f"mode={self.mode!r} needs BM25: build the index with --hybrid")

    @classmethod
    def open(cls, index_dir: str | Path, *, reranker=None, explainer=None, model: str | Path | None = None,
             mode: str | None = None) -> SearchEngine:  # fmt: skip
        """Open ``index_dir``; ``model`` (default: the one the manifest names) must be the encoder it was built with.

        ``mode``: ``dense``, ``bm25`` or ``hybrid`` first stage (default: hybrid when the index has BM25).
        """
        from archlab.search import encode, index

        index_dir = index.index_path(index_dir)
        manifest = index.read_manifest(index_dir)
        meta = manifest["encoder"]
        encoder = encode.load_encoder(meta["name"] if model is None else model, meta["precision"],
                                      given="the index's precision")  # fmt: skip
        identity = encode.encoder_identity(encoder)
        if encoder.dim != meta["dim"] or identity != meta["identity"]:
            raise CheckpointError(
                f"{index_dir} was built with encoder {meta['name']!r} (dimension {meta['dim']}, identity "
                f"{meta['identity']}); the encoder given is {str(model or meta['name'])!r} (dimension {encoder.dim}, "
                f"identity {identity}): query and document vectors would not be comparable; re-index with it"
            )
        faiss_index = index.read_faiss(index_dir / index.FAISS_FILE)
        count = manifest["corpus"]["count"]
        if faiss_index.d != meta["dim"] or faiss_index.ntotal != count:
            raise CheckpointError(f"{index_dir / index.FAISS_FILE} holds {faiss_index.ntotal} vectors of dimension "
                                  f"{faiss_index.d}, the manifest says {count} of dimension {meta['dim']}")  # fmt: skip
        faiss_index = index.searchable(index_dir, faiss_index, manifest["index"]["type"], manifest["index"]["params"])
        bm25 = None
        if manifest["hybrid"]:
            from archlab.search.lexical import BM25Index

            bm25 = BM25Index.load(index_dir / index.BM25_DIR, manifest.get("bm25") or {})
            if bm25.num_docs != count:
                raise CheckpointError(f"{index_dir / index.BM25_DIR} holds {bm25.num_docs} documents, the manifest "
                                      f"says {count}")  # fmt: skip
        docs = index.read_docs(index_dir / index.DOCS, count)
        return cls(index_dir, manifest, docs, faiss_index, encoder, bm25, reranker=reranker, explainer=explainer,
                   mode=mode)

    @property
    def hybrid(self) -> bool:
        return self.mode == "hybrid"

    def check_query(self, query: str) -> str:
        """The query, checked: a non-empty string; one longer than the encoder's limit is truncated (said once)."""
        if not isinstance(query, str):
            raise DataError(f"a query must be a str, got {type(query).__name__}")
        if not query.strip():
            raise DataError("the query is empty: type some words to search for")
        n = len(self._counter.encode(query).ids)
        if n > self.max_query_tokens and not self._warned_long:
            self._warned_long = True
            warnings.warn(f"a query of {n} tokens is longer than the encoder's limit of {self.max_query_tokens}: "
                          "its dense embedding reads the first part only (BM25 reads all of it)", stacklevel=3)  # fmt: skip
        return query

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """Unit query vectors ``[q, d]`` float32, as the documents were embedded."""
        return self.encoder.embed(list(queries), batch_size=32).numpy().astype(np.float32, copy=False)

    def dense_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of ``vectors`` ``[q, d]``: ``(scores [q, k], rows [q, k])``; missing slots have row -1."""
        return self.faiss_index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self.docs)))

    def _retrieve(self, query: str, k: int, timings: dict[str, float], dense_found=None) -> list[Hit]:
        """The first stage; ``dense_found`` = ``(scores [k], rows [k])`` of this query when already searched."""
        check_positive("k", k)
        query = self.check_query(query)
        if self.mode == "bm25":
            t = time.perf_counter()
            rows, scores = self.bm25.search(query, k)
            timings["bm25"] = _ms(t)
            return [Hit(self.docs[r], i, float(s), {"bm25": float(s)}) for i, (r, s) in enumerate(zip(rows, scores, strict=True), 1)]
        if dense_found is None:
            t = time.perf_counter()
            vector = self.embed_queries([query])
            timings["encode"] = _ms(t)
            t = time.perf_counter()
            scores, rows = self.dense_search(vector, k)
            timings["ann"] = _ms(t)
            dense_found = scores[0], rows[0]
        dense = {int(r): float(s) for r, s in zip(dense_found[1], dense_found[0], strict=True) if r >= 0}
        if self.mode == "dense":
            return [Hit(self.docs[r], i, s, {"dense": s}) for i, (r, s) in enumerate(dense.items(), 1)]
        t = time.perf_counter()
        bm25_rows, bm25_scores = self.bm25.search(query, k)
        timings["bm25"] = _ms(t)
        lexical = {int(r): float(s) for r, s in zip(bm25_rows, bm25_scores, strict=True)}
        t = time.perf_counter()
        fused = reciprocal_rank_fusion([list(dense), list(lexical)])[:k]
        timings["fuse"] = _ms(t)
        hits = []
        for i, (r, s) in enumerate(fused, 1):
            stages = {name: part[r] for name, part in (("dense", dense), ("bm25", lexical)) if r in part}
            hits.append(Hit(self.docs[r], i, s, {**stages, "fused": s}))
        return hits

    def retrieve(self, query: str, k: int = 100) -> list[Hit]:
        """The first-stage top ``k``: dense, or dense + BM25 fused when the index is hybrid."""
        return self._retrieve(query, k, {})

    def search(self, query: str, *, k: int = 10, rerank: int = 0, explain: int = 0) -> SearchResult:
        """Retrieve, re-rank the first ``rerank`` hits (needs a reranker), explain the first ``explain``.

        ``k`` results are returned; the first stage fetches ``max(k, rerank)``. Re-ranked hits take the
        cross-encoder's score, or its fusion with the first stage's order when the re-ranker has a
        ``first_stage_weight`` (:func:`archlab.search.rerank.fuse_ranks`); hits below the re-rank depth follow in
        their first-stage order. A re-ranker whose weight is 1 would keep the first stage's order: it is not run,
        and the result's ``skipped["rerank"]`` says so (:func:`keeps_first_stage`).
        """
        _check_depths(k, rerank, explain)
        return self._search(query, k, rerank, explain, time.perf_counter(), {})

    def search_batch(self, queries: list[str], *, k: int = 10, rerank: int = 0, explain: int = 0) -> list[SearchResult]:
        """:meth:`search` for several queries at once: one encoder pass ``[q, d]`` and one FAISS search for all, then
        each query's own BM25, fusion, re-ranking and explanation. Each result's ``encode`` and ``ann`` are the
        shared passes' milliseconds (its ``total`` includes them)."""
        _check_depths(k, rerank, explain)
        if isinstance(queries, str) or not isinstance(queries, list | tuple):
            hint = " (one query: search(query), or [query])" if isinstance(queries, str) else ""
            raise DataError(f"search_batch takes a list of queries, got {type(queries).__name__}{hint}")
        if not queries:
            return []
        start = time.perf_counter()
        queries = [self.check_query(q) for q in queries]
        shared: dict[str, float] = {}
        found = [None] * len(queries)
        if self.mode != "bm25":
            t = time.perf_counter()
            vectors = self.embed_queries(queries)
            shared["encode"] = _ms(t)
            t = time.perf_counter()
            scores, rows = self.dense_search(vectors, max(k, rerank))
            shared["ann"] = _ms(t)
            found = list(zip(scores, rows, strict=True))
        return [self._search(q, k, rerank, explain, start, dict(shared), f) for q, f in zip(queries, found, strict=True)]

    def _search(self, query, k, rerank, explain, start, timings, dense_found=None) -> SearchResult:
        if rerank and self.reranker is None:
            raise ConfigError(f"rerank={rerank} needs a reranker (SearchEngine.open(..., reranker=...))")
        if explain and self.explainer is None:
            raise ConfigError(f"explain={explain} needs an explainer (SearchEngine.open(..., explainer=...))")
        hits = self._retrieve(query, max(k, rerank), timings, dense_found)
        skipped = {}
        if rerank and keeps_first_stage(self.reranker):
            skipped["rerank"] = KEPT_FIRST_STAGE
        elif rerank:
            t = time.perf_counter()
            head, tail = hits[:rerank], hits[rerank:]
            scores = [float(s) for s in self.reranker.score(query, [h.doc for h in head])]
            final = self.reranker.final_scores(scores) if hasattr(self.reranker, "final_scores") else scores
            for hit, s, f in zip(head, scores, final, strict=True):
                hit.stage_scores["rerank"], hit.score = s, f  # f: fused with the first stage (rerank.fuse_ranks)
            head.sort(key=lambda h: -h.score)  # stable: first-stage order breaks ties
            hits = head + tail
            timings["rerank"] = _ms(t)
        hits = hits[:k]
        for i, hit in enumerate(hits, 1):
            hit.rank = i
        if explain:
            t = time.perf_counter()
            self.explainer.explain(query, hits[:explain])
            timings["explain"] = _ms(t)
        timings["total"] = _ms(start)
        return SearchResult(query, hits, timings, skipped)


KEPT_FIRST_STAGE = "first-stage weight 1: its order is the first stage's, so the cross-encoder is not run"


def keeps_first_stage(reranker) -> bool:
    """Whether ``reranker``'s final order is the first stage's whatever it scores: its saved fusion weight on the
    first stage is 1 (:func:`archlab.search.rerank.fuse_ranks`; ``archlab search adapt`` saves 1 when the re-ranker
    did not beat the first stage). The engine then skips the cross-encoder's forward passes."""
    return getattr(reranker, "first_stage_weight", 0.0) == 1.0


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """ConfigError unless ``value`` is an int >= 1 (>= 0 with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an int >= {low}")


def _check_depths(k: int, rerank: int, explain: int) -> None:
    """``k >= 1`` results; ``rerank`` and ``explain`` depths ``>= 0`` (ConfigError naming the argument)."""
    for name, value in (("k", k), ("rerank", rerank), ("explain", explain)):
        check_positive(name, value, allow_zero=name != "k")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


__all__ = ["KEPT_FIRST_STAGE", "Hit", "SearchEngine", "SearchResult", "keeps_first_stage"]
