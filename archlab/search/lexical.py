r"""BM25 through ``bm25s`` (English stop words removed, Snowball stemming by PyStemmer), saved in the index folder.

Okapi BM25 of a document ``D`` for a query ``Q`` (bm25s' ``lucene`` variant: no ``(k1 + 1)`` factor, which
scales every score alike)::

    score(D, Q) = sum_{t in Q} IDF(t) * f(t, D) / (f(t, D) + k1 * (1 - b + b * |D| / avgdl))
    IDF(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))       (N documents, df(t) of them hold t)

The index is the sparse matrix of per-term scores that bm25s precomputes; adding documents rebuilds it
(bm25s has no incremental update; it takes seconds for thousands of documents).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from archlab.errors import CheckpointError, DataError

DEFAULT_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en", "stemmer": "english"}


def _stemmer(language: str):
    import Stemmer

    return Stemmer.Stemmer(language)


class BM25Index:
    """A BM25 index over rows ``0 .. n`` of a corpus; :meth:`search` returns rows and scores, best first."""

    def __init__(self, retriever, params: dict):
        self.retriever = retriever
        self.params = dict(params)
        self._stem = _stemmer(self.params["stemmer"])

    @classmethod
    def build(cls, texts: Sequence[str], params: dict | None = None) -> BM25Index:
        import bm25s

        params = {**DEFAULT_PARAMS, **(params or {})}
        tokens = bm25s.tokenize(list(texts), stopwords=params["stopwords"], stemmer=_stemmer(params["stemmer"]),
                                show_progress=False)  # fmt: skip
        if not tokens.vocab:
            raise DataError(f"BM25 finds no word to index in the {len(tokens.ids)} document(s): every text is empty or "
                            "stop words; index them without hybrid (dense only)")  # fmt: skip
        retriever = bm25s.BM25(method=params["method"], k1=params["k1"], b=params["b"])
        retriever.index(tokens, show_progress=False)
        return cls(retriever, params)

    def save(self, folder: str | Path) -> None:
        self.retriever.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: str | Path, params: dict) -> BM25Index:
        import bm25s

        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing: the index is hybrid but its BM25 part was not saved")
        try:
            retriever = bm25s.BM25.load(str(folder), show_progress=False)
        except Exception as e:  # bm25s raises OSError/ValueError/JSON errors
            raise CheckpointError(f"cannot read the BM25 index in {folder}: {e}") from None
        return cls(retriever, {**DEFAULT_PARAMS, **params})

    @property
    def num_docs(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)`` of the ``k`` best documents (fewer if fewer contain a query term), best first."""
        import bm25s

        tokens = bm25s.tokenize([query], stopwords=self.params["stopwords"], stemmer=self._stem, show_progress=False,
                                return_ids=False)  # fmt: skip
        vocab = self.retriever.vocab_dict
        ids = [[vocab[t] for t in tokens[0] if t in vocab]]
        if not ids[0]:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        k = min(k, self.num_docs)
        rows, scores = self.retriever.retrieve(ids, k=k, show_progress=False, n_threads=1)
        rows, scores = rows[0], scores[0]
        keep = scores > 0  # documents holding no query term score 0: not a match
        return rows[keep].astype(np.int64), scores[keep].astype(np.float32)


__all__ = ["BM25Index", "DEFAULT_PARAMS"]
