"""IVF-PQ re-scoring: PQ candidates re-scored with stored vectors reach exact search's neighbours; manifest fields."""

from __future__ import annotations

import math

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
    rescore_factor,
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


def test_the_default_factor_grows_with_the_corpus_as_measured():
    """4 up to 1M vectors (200k needed x2 for recall@100 0.996), 16 at 10M (x16: 0.934, x4: 0.590), ~4 sqrt(n / 1M)."""
    expected = {0: 4, 10_000: 4, 200_000: 4, 1_000_000: 4, 1_000_001: 8, 4_000_000: 8, 4_000_001: 16,
                10_000_000: 16, 16_000_000: 16, 16_000_001: 32, 100_000_000: 64}  # fmt: skip
    assert {n: rescore_factor(n) for n in expected} == expected
    sizes = np.unique(np.geomspace(1, 1e9, 400).astype(np.int64)).tolist()
    factors = [rescore_factor(n) for n in sizes]
    assert all(a <= b for a, b in zip(factors, factors[1:], strict=False))  # never fewer candidates for more vectors
    for n, f in zip(sizes, factors, strict=True):  # a power of two >= 4 and >= 4 sqrt(n / 1M), less than twice that
        need = 4 * math.sqrt(n / 1e6)
        assert f >= 4 and f & (f - 1) == 0 and f >= need and (f == 4 or f < 2 * need), (n, f)
    assert default_params("ivfpq", 10_000_000, 384)["rescore"] == 16
    assert default_params("ivfpq", 200_000, 384)["rescore"] == 4
    for bad in (-1, 2.5, True, "1000"):
        with pytest.raises(ConfigError, match=rf"n={bad!r} must be an int >= 0 \(the number of vectors"):
            rescore_factor(bad)


@pytest.fixture
def stand_in_encoder(monkeypatch):
    monkeypatch.setattr(index_module, "PQ_MAX_M", 2)  # 2 sub-quantizers: trains in seconds (the card's 64: minutes)
    monkeypatch.setattr(encode, "load_encoder", lambda model, precision: ClusteredEncoder())
    monkeypatch.setattr(encode, "encoder_identity", lambda encoder: "clustered-test-encoder")
    return Corpus([Document(f"d{i}", "", f"doc {i}") for i in range(N)], "test")


def test_an_explicit_rescore_wins_and_the_manifest_keeps_the_factor(tmp_path, monkeypatch, stand_in_encoder):
    out = tmp_path / "index"
    # a 10k-vector index whose size rule is taken to give 32: the manifest records what the build chose
    monkeypatch.setattr(index_module, "rescore_factor", lambda n: 32)
    manifest = build_index(stand_in_encoder, out, index="ivfpq", precision="fp32", chunk_size=2500)
    assert manifest["index"]["params"]["rescore"] == 32 == read_manifest(out)["index"]["params"]["rescore"]
    # an index opens with its manifest's factor whatever the rule says now (old indexes open unchanged)
    monkeypatch.setattr(index_module, "rescore_factor", lambda n: 4)
    engine_params = read_manifest(out)["index"]["params"]
    assert searchable(out, read_faiss(out / "faiss.index"), "ivfpq", engine_params).factor == 32
    # an index from before re-scoring (no "rescore" in its parameters) opens with PQ scores only
    old = {k: v for k, v in engine_params.items() if k not in ("rescore", "rescore_dtype")}
    assert not isinstance(searchable(out, read_faiss(out / "faiss.index"), "ivfpq", old), RescoredIndex)
    # building again with an explicit factor changes it without re-encoding or retraining
    index_bytes = (out / "faiss.index").read_bytes()
    messages = []
    manifest = build_index(stand_in_encoder, out, precision="fp32", chunk_size=2500, rescore=8, log=messages.append)
    assert manifest["index"]["params"]["rescore"] == 8 == read_manifest(out)["index"]["params"]["rescore"]
    assert "re-scoring factor 32 -> 8" in messages and (out / "faiss.index").read_bytes() == index_bytes
    assert searchable(out, read_faiss(out / "faiss.index"), "ivfpq", manifest["index"]["params"]).factor == 8
    # and without one it keeps the recorded factor (not the rule's 4)
    assert build_index(stand_in_encoder, out, precision="fp32", chunk_size=2500)["index"]["params"]["rescore"] == 8
    # 0: PQ scores only
    manifest = build_index(stand_in_encoder, out, precision="fp32", chunk_size=2500, rescore=0)
    assert not isinstance(searchable(out, read_faiss(out / "faiss.index"), "ivfpq", manifest["index"]["params"]),
                          RescoredIndex)  # fmt: skip


def test_an_invalid_rescore_is_refused_before_any_encoding(tmp_path, monkeypatch, stand_in_encoder):
    def no_encoder(model, precision):
        raise AssertionError("the encoder was loaded before the argument was checked")

    monkeypatch.setattr(encode, "load_encoder", no_encoder)
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match=rf"rescore={bad!r} must be an int >= 0 \(IVF-PQ candidates"):
            build_index(stand_in_encoder, tmp_path / "a", index="ivfpq", rescore=bad)
    with pytest.raises(ConfigError, match=r"rescore=8 applies to 'ivfpq' indexes only; this one is 'flat' \(chosen "
                       r"by size for 10,000 documents\)"):  # fmt: skip
        build_index(stand_in_encoder, tmp_path / "b", rescore=8)
    with pytest.raises(ConfigError, match=r"rescore=2 applies to 'ivfpq' indexes only; this one is 'hnsw' \(asked"):
        build_index(stand_in_encoder, tmp_path / "c", index="hnsw", rescore=2)
    assert not any(tmp_path.iterdir())  # nothing written
