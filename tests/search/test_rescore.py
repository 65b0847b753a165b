"""IVF-PQ re-scoring: PQ candidates re-scored with stored vectors reach exact search's neighbours; manifest fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archlab.errors import CheckpointError, ConfigError
from archlab.search import encode, index as index_module
from archlab.search.corpus import Corpus, Document
from archlab.search.index import (
    RESCORE_FILE,
    RescoredIndex,
    build_faiss,
    build_index,
    default_params,
    read_faiss,
    read_manifest,
    searchable,
)

D, N = 32, 10_000  # 256 PQ centroids need 39 x 256 = 9,984 training vectors


def clustered(n: int, seed: int, d: int = D, clusters: int = 40) -> np.ndarray:
    """Unit vectors around fixed random centres (the same centres for every seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, d))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries.astype(np.float64) @ db.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def pq_index():
    """IVF-PQ with 4 six-bit codes for 32 dimensions (coarse, so PQ's own ranking is clearly approximate)."""
    db = clustered(N, seed=0)
    params = {**default_params("ivfpq", N, D), "m": 4, "nbits": 6, "nlist": 16, "nprobe": 16}
    return db, build_faiss(db, "ivfpq", params)


def test_rescoring_recovers_the_exact_neighbours_that_pq_misses(pq_index):
    db, index = pq_index
    queries, k = clustered(40, seed=1), 20
    truth = exact_top(db, queries, k)
    _, pq_rows = index.search(queries, k)
    store = db.astype(np.float16)
    scores, rows = RescoredIndex(index, store, 16).search(queries, k)
    _, rows_4 = RescoredIndex(index, store, 4).search(queries, k)
    pq_recall, rescored_recall = recall(pq_rows, truth), recall(rows, truth)
    assert pq_recall < 0.5  # 3-byte codes: PQ alone misses most of the true top 20 (measured 0.25)
    assert rescored_recall >= 0.97  # measured 0.996: the true top 20 are among PQ's top 320
    assert pq_recall < recall(rows_4, truth) < rescored_recall  # more candidates, higher recall (0.65 at 4)
    # the scores are the exact inner products with the stored (float16) vectors, best first
    expected = np.einsum("qd,qkd->qk", queries.astype(np.float64), store[rows].astype(np.float64))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_rescoring_pads_when_fewer_candidates_and_checks_its_inputs(pq_index):
    db, index = pq_index
    index.nprobe = 1  # one list: may hold fewer than k candidates for some query
    try:
        scores, rows = RescoredIndex(index, db, 2).search(clustered(5, seed=2), 2000)
    finally:
        index.nprobe = 16
    assert rows.shape == (5, 2000) and np.all((rows >= 0) == np.isfinite(scores))
    for found in rows:
        valid = found[found >= 0]
        assert len(set(valid.tolist())) == len(valid) and np.all(found[len(valid):] == -1)
    with pytest.raises(CheckpointError, match=r"store holds \[10, 32\] vectors, the index \[10000, 32\]"):
        RescoredIndex(index, db[:10], 4)
    with pytest.raises(ConfigError, match="rescore=0 must be an int >= 1"):
        RescoredIndex(index, db, 0)


class ClusteredEncoder:
    """A stand-in encoder: document ``"doc i"`` gets row ``i`` of :func:`clustered` (no model to run)."""

    dim, max_seq_length, pooling = D, 64, "mean"

    def __init__(self):
        self.table = torch.from_numpy(clustered(N, seed=0))

    def embed(self, texts, batch_size=32):
        return self.table[[int(t.split()[-1]) for t in texts]]


def test_an_ivfpq_index_folder_records_and_uses_its_rescoring(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "PQ_MAX_M", 2)  # 2 sub-quantizers: trains in seconds (the card's 64: minutes)
    monkeypatch.setattr(encode, "load_encoder", lambda model, precision: ClusteredEncoder())
    monkeypatch.setattr(encode, "encoder_identity", lambda encoder: "clustered-test-encoder")
    docs = [Document(f"d{i}", "", f"doc {i}") for i in range(N)]
    out = tmp_path / "index"
    manifest = build_index(Corpus(docs, "test"), out, index="ivfpq", precision="fp32", chunk_size=2500)
    params, sizes = manifest["index"]["params"], manifest["index"]
    assert params["code_bytes"] == 2 and params["rescore"] == 4 and params["rescore_dtype"] == "float16"
    assert sizes["rescore_bytes"] == (out / RESCORE_FILE).stat().st_size and sizes["rescore_bytes"] >= N * D * 2
    assert sizes["rescore_bytes_per_doc"] == pytest.approx(sizes["rescore_bytes"] / N, abs=0.1)
    assert read_manifest(out)["index"] == manifest["index"]

    searcher = searchable(out, read_faiss(out / "faiss.index"), "ivfpq", params)
    assert isinstance(searcher, RescoredIndex) and searcher.factor == 4 and searcher.index.nprobe == params["nprobe"]
    assert isinstance(searcher.store, np.memmap) and searcher.store.dtype == np.float16
    # its results: the 4 x 10 PQ candidates of the index, ordered by exact inner product with the stored vectors
    queries, store = clustered(20, seed=3), clustered(N, seed=0).astype(np.float16)
    _, rows = searcher.search(queries, 10)
    _, candidates = searcher.index.search(queries, 40)
    for q, found, cands in zip(queries, rows, candidates, strict=True):
        exact = store[cands].astype(np.float64) @ q.astype(np.float64)
        assert set(found.tolist()) == set(cands[np.argsort(-exact, kind="stable")[:10]].tolist())
    assert not isinstance(searchable(out, read_faiss(out / "faiss.index"), "ivfpq", {**params, "rescore": 0}),
                          RescoredIndex)  # fmt: skip
    (out / RESCORE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"rescore.npy is missing: the manifest asks for re-scoring"):
        searchable(out, read_faiss(out / "faiss.index"), "ivfpq", params)
