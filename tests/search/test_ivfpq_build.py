"""IVF-PQ adding without FAISS's slow small-sub-vector encoder, and the streamed 10M build's resume.

``pq_encode`` / ``add_ivfpq`` (archlab.search.index) against FAISS's own ``compute_codes`` / ``add``;
``benchmarks/search_scale.build`` killed after a chunk and run again equals an uninterrupted build.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from archlab.errors import ConfigError
from archlab.search.index import add_ivfpq, pq_encode

D, M = 48, 8  # 6-d sub-vectors, as the card's 64 codes of a 384-d MiniLM vector


def unit(n: int, seed: int, d: int = D) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def trained_ivfpq(nlist: int = 300, d: int = D, m: int = M) -> faiss.IndexIVFPQ:
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = index.pq.cp.niter = 4
    index.train(unit(12_000, seed=0, d=d))
    return index


def list_contents(index) -> list[tuple[np.ndarray, np.ndarray]]:
    inv = index.invlists
    out = []
    for i in range(index.nlist):
        size = inv.list_size(i)
        codes = faiss.rev_swig_ptr(inv.get_codes(i), size * inv.code_size).copy()
        ids = faiss.rev_swig_ptr(inv.get_ids(i), size).copy()
        out.append((codes, ids))
    return out


def test_pq_encode_equals_faiss_codes():
    pq = faiss.ProductQuantizer(D, M, 8)
    pq.cp.niter = 4
    pq.train(unit(10_000, seed=1))
    x = unit(5_000, seed=2)
    ours, theirs = pq_encode(pq, x, block=333), pq.compute_codes(x)  # a block size that does not divide n
    assert ours.shape == theirs.shape == (5_000, M) and ours.dtype == np.uint8
    # the same codes, up to ties within rounding: where they differ, the two centroids are equally near
    differ = np.argwhere(ours != theirs)
    assert len(differ) <= 2
    centroids = faiss.vector_to_array(pq.centroids).reshape(M, 256, D // M)
    for row, j in differ:
        sub = x[row, j * 6 : (j + 1) * 6].astype(np.float64)
        d_ours = np.sum((sub - centroids[j, ours[row, j]]) ** 2)
        d_theirs = np.sum((sub - centroids[j, theirs[row, j]]) ** 2)
        assert abs(d_ours - d_theirs) < 1e-6


@pytest.mark.parametrize("nlist", [100, 300])  # 1- and 2-byte list numbers in FAISS's standalone codes
def test_add_ivfpq_equals_faiss_add(nlist):
    ours = trained_ivfpq(nlist)
    theirs = faiss.clone_index(ours)
    x = unit(4_000, seed=3)
    theirs.add(x)
    add_ivfpq(ours, x[:1_500])  # two calls: ids continue from ntotal
    timings: dict = {}
    add_ivfpq(ours, x[1_500:], timings)
    assert ours.ntotal == theirs.ntotal == 4_000
    assert set(timings) == {"assign", "encode"}
    for (c1, i1), (c2, i2) in zip(list_contents(ours), list_contents(theirs), strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(c1, c2)
    ours.nprobe = theirs.nprobe = 8
    q = unit(10, seed=4)
    np.testing.assert_array_equal(ours.search(q, 20)[1], theirs.search(q, 20)[1])


def test_add_ivfpq_bad_input():
    pq = faiss.ProductQuantizer(D, M, 4)
    with pytest.raises(ConfigError, match="nbits=4"):
        pq_encode(pq, unit(10, seed=5))
    packed = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, 4, M, 6, faiss.METRIC_INNER_PRODUCT)
    packed.train(unit(2_000, seed=6))
    add_ivfpq(packed, unit(10, seed=6))  # 6-bit codes: FAISS's own add
    assert packed.ntotal == 10
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, 4, M, 8, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    with pytest.raises(ConfigError, match="by_residual"):
        add_ivfpq(index, unit(10, seed=6))


# ------------------------------------------------------------------------------------------------
# the streamed build of benchmarks/search_scale.py: resumable
# ------------------------------------------------------------------------------------------------
def search_scale():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "search_scale.py"
    spec = importlib.util.spec_from_file_location("search_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = dict(n=9_000, chunk=2_000, nlist=16, m=M, train=10_000, niter=4, noise=0.5, queries=5)


def finished(workdir: Path) -> tuple[dict, bytes, np.ndarray, np.ndarray]:
    state = json.loads((workdir / "state.json").read_text())
    index = faiss.read_index(str(workdir / state["files"]["ivfpq"]))
    with np.load(workdir / state["truth"]) as f:
        rows = f["rows"]
    return state, faiss.serialize_index(index).tobytes(), rows, np.load(workdir / "rescore.npy")


def test_killed_build_resumes_from_its_last_chunk(tmp_path):
    scale = search_scale()
    base = unit(300, seed=7)
    spread = base.std(axis=0)
    lines: list[str] = []

    scale.build(tmp_path / "whole", base, spread, **SETTINGS, log=lines.append)
    state = scale.build(tmp_path / "killed", base, spread, **SETTINGS, stop_after=2, log=lines.append)
    assert state["done"] == 4_000
    (tmp_path / "killed" / "ivfpq-6000.index").write_bytes(b"half")  # a checkpoint the kill interrupted
    scale.build(tmp_path / "killed", base, spread, **SETTINGS, log=lines.append)
    assert any(line.startswith("resuming the build") and "4,000 of 9,000" in line for line in lines)
    assert not (tmp_path / "killed" / "ivfpq-6000.index").exists()

    whole, resumed = finished(tmp_path / "whole"), finished(tmp_path / "killed")
    assert whole[0]["done"] == resumed[0]["done"] == 9_000
    assert whole[1] == resumed[1]  # the same index, byte for byte
    np.testing.assert_array_equal(whole[2], resumed[2])  # the same exact top 100
    np.testing.assert_array_equal(whole[3], resumed[3])  # the same float16 store
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        "ivfpq-9000.index", "rescore.npy", "state.json", "truth-9000.npz"]  # fmt: skip

    # the exact top 100 is exact: a flat scan of the regenerated vectors
    vectors = np.concatenate([scale.synthetic_chunk(base, spread, 0.5, seed=s, n=min(2_000, 9_000 - s))
                              for s in range(0, 9_000, 2_000)])  # fmt: skip
    queries = scale.synthetic_chunk(base, spread, 0.5, seed=2**32 - 1, n=5)
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    top = np.take_along_axis(scores, whole[2], axis=1)
    assert np.all(top.min(axis=1) >= np.sort(scores, axis=1)[:, -100] - 1e-6)

    with pytest.raises(ConfigError, match="nlist"):  # resumed with other settings
        scale.build(tmp_path / "killed", base, spread, **{**SETTINGS, "nlist": 32}, log=lines.append)
