"""FAISS index types, PQ sizing, chunked resumable/sharded encoding, BM25, RRF and the metrics (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.search import encode
from archlab.search.corpus import Corpus, Document
from archlab.search.evaluate import evaluate_run, write_trec_run
from archlab.search.fuse import reciprocal_rank_fusion
from archlab.search.index import (
    FORMAT,
    MANIFEST,
    VERSION,
    build_faiss,
    build_index,
    choose_index_type,
    default_params,
    min_ivfpq_vectors,
    pq_subquantizers,
    read_docs,
    read_manifest,
    write_json,
)
from archlab.search.lexical import BM25Index


def unit_vectors(n: int, d: int = 384, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (embeddings are clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ db.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_flat_is_exact_inner_product():
    db, queries = unit_vectors(500), unit_vectors(20, seed=1)
    index = build_faiss(db, "flat", default_params("flat", 500, 384))
    scores, rows = index.search(queries, 10)
    np.testing.assert_array_equal(rows, exact_top(db, queries, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ db.T, rows, axis=1), atol=1e-5)


def test_hnsw_recall_against_exact():
    db, queries = unit_vectors(3000), unit_vectors(50, seed=1)
    index = build_faiss(db, "hnsw", default_params("hnsw", 3000, 384))
    _, rows = index.search(queries, 10)
    assert recall(rows, exact_top(db, queries, 10)) >= 0.95


def test_ivfpq_parameters_and_too_few_vectors_is_a_clear_error():
    assert pq_subquantizers(384) == 64 and pq_subquantizers(768) == 64 and pq_subquantizers(100) == 50
    params = default_params("ivfpq", 12_000, 384)
    assert params["code_bytes"] == 64 and params["m"] == 64 and params["nbits"] == 8
    assert params["nlist"] == 12_000 // 39 and params["nprobe"] == 32
    assert min_ivfpq_vectors(4096) == 39 * 4096
    with pytest.raises(ConfigError, match=r"needs at least 9984 vectors .* the corpus has 500: use 'flat' or 'hnsw'"):
        build_faiss(unit_vectors(500), "ivfpq", default_params("ivfpq", 500, 384))


@pytest.mark.slow  # FAISS trains 64 sub-quantizers of 256 centroids: tens of CPU seconds
def test_ivfpq_codes_are_64_bytes_and_recall_is_far_above_chance():
    params = default_params("ivfpq", 12_000, 384)
    db, queries = unit_vectors(12_000, clusters=200), unit_vectors(30, seed=1, clusters=200)
    index = build_faiss(db, "ivfpq", params)
    assert index.pq.code_size == 64 and index.ntotal == 12_000 and index.nprobe == params["nprobe"]
    _, rows = index.search(queries, 100)
    assert recall(rows, exact_top(db, queries, 100)) >= 0.3  # compressed 24x: approximate, far above 100/12000


def test_index_type_by_size():
    assert [choose_index_type(n) for n in (10, 100_000, 100_001, 1_000_000, 10_000_000)] == [
        "flat", "flat", "hnsw", "hnsw", "ivfpq"]  # fmt: skip
    with pytest.raises(ConfigError, match="index type 'ivf' is not one of"):
        default_params("ivf", 10, 8)


class FakeEncoder:
    """Deterministic vectors from the text alone (as a real encoder's are), counting the texts it embeds."""

    dim = 8

    def __init__(self):
        self.embedded = 0

    def embed(self, texts, batch_size=32):
        self.embedded += len(texts)
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts]
        return torch.tensor(np.stack(rows), dtype=torch.float32)


def test_chunks_resume_and_shards(tmp_path):
    texts = [f"document {i}" for i in range(23)]
    one = tmp_path / "one"
    enc = FakeEncoder()
    assert encode.encode_chunks(texts, one, encoder=enc, chunk_size=5) == 23
    reference = encode.load_vectors(one, 23, 8)
    # a killed run: one chunk lost; the next run encodes that chunk only
    (one / "chunk-000000010-000000015.npy").unlink()
    with pytest.raises(DataError, match="rows 10..15 have no vectors"):
        encode.load_vectors(one, 23, 8)
    assert encode.pending_rows(one, 23, 5) == 5
    enc = FakeEncoder()
    encode.encode_chunks(texts, one, encoder=enc, chunk_size=5)
    assert enc.embedded == 5
    np.testing.assert_array_equal(encode.load_vectors(one, 23, 8), reference)
    # two ranks: disjoint chunks whose union is the one-process result, bit for bit
    two = tmp_path / "two"
    done = [encode.encode_chunks(texts, two, encoder=FakeEncoder(), chunk_size=5, rank=r, world_size=2) for r in (0, 1)]
    assert done == [5 + 5 + 3, 5 + 5]
    np.testing.assert_array_equal(encode.load_vectors(two, 23, 8), reference)
    # an append: rows 23.. go to new chunks
    encode.encode_chunks(["new a", "new b"], one, first_row=23, encoder=FakeEncoder(), chunk_size=5)
    assert (one / "chunk-000000023-000000025.npy").is_file()
    assert encode.load_vectors(one, 25, 8).shape == (25, 8)
    np.save(one / "chunk-000000000-000000005.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(CheckpointError, match=r"expected float32\[5, 8\]"):
        encode.load_vectors(one, 25, 8)
    with pytest.raises(ConfigError, match="chunk_size=0"):
        encode.chunk_ranges(0, 10, 0)


def test_bm25_matches_its_equation():
    docs = ["cat cat dog", "dog fish", "fish fish fish bird", "bird"]
    bm25 = BM25Index.build(docs)
    k1, b = bm25.params["k1"], bm25.params["b"]
    lengths = [len(d.split()) for d in docs]
    avgdl = sum(lengths) / len(docs)

    def score(doc: str, query: list[str]) -> float:
        words, total = doc.split(), 0.0
        for t in query:
            df = sum(t in d.split() for d in docs)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))  # Lucene's idf
            f = words.count(t)
            total += idf * f / (f + k1 * (1 - b + b * len(words) / avgdl))  # Lucene drops (k1 + 1)
        return total

    rows, scores = bm25.search("fish dog", 4)
    expected = sorted(((score(d, ["fish", "dog"]), i) for i, d in enumerate(docs)), reverse=True)
    expected = [(s, i) for s, i in expected if s > 0]
    assert rows.tolist() == [i for _, i in expected]
    np.testing.assert_allclose(scores, [s for s, _ in expected], rtol=1e-5)
    assert bm25.search("zebra", 4)[0].size == 0  # no known term: no match
    assert bm25.search("Cats!", 4)[0].tolist() == [0]  # lower-cased and stemmed like the documents


def test_rrf_equation_and_ties():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], k0=60))
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61})
    # equal fused scores: the better single rank first, then the first ranking
    assert [d for d, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
    with pytest.raises(ConfigError, match="k0=-1"):
        reciprocal_rank_fusion([["a"]], k0=-1)


def test_metrics_through_ir_measures_and_trec_run(tmp_path):
    run = {"q1": [("d2", 1.0), ("d1", 0.5)], "q2": [("d3", 1.0)], "q3": []}
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 2, "d4": 1}, "q3": {"d9": 1}}
    metrics = evaluate_run(run, qrels)
    ndcg_q1 = 1 / math.log2(3)
    ndcg_q2 = 2 / (2 + 1 / math.log2(3))  # trec_eval's linear gain
    assert metrics["nDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)
    assert metrics["recall@100"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["MRR@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    # ties in score are ranked as listed, not by doc id
    assert evaluate_run({"q": [("z", 1.0), ("a", 1.0)]}, {"q": {"z": 1}})["MRR@10"] == 1.0
    path = write_trec_run(tmp_path / "run.trec", run, tag="t")
    assert path.read_text().splitlines() == ["q1 Q0 d2 1 1.000000 t", "q1 Q0 d1 2 0.500000 t", "q2 Q0 d3 1 1.000000 t"]
    with pytest.raises(DataError, match="ids with spaces"):
        write_trec_run(tmp_path / "bad.trec", {"q": [("a b", 1.0)]})
    assert not (tmp_path / "bad.trec").exists()  # refused before writing: no empty or partial run file is left


def test_damaged_index_files_are_a_checkpoint_error(tmp_path):
    docs = tmp_path / "docs.jsonl"
    for content, message in ((b"\xff\xfe\n", "can't decode"), (b"5\n", "not subscriptable"),
                             (b'{"_id": "a"}\n', "'title'")):  # fmt: skip
        docs.write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"docs.jsonl:1: unreadable document \(.*{message}"):
            read_docs(docs, 1)
    write_json(tmp_path / MANIFEST, {"format": FORMAT, "version": VERSION, "index": {}, "hybrid": False})
    with pytest.raises(CheckpointError, match="manifest.json has no encoder, corpus: it is damaged; rebuild the index"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"encoder": "minilm-l6"}, "encoder.name=None must be a string"),
        ({"corpus": {"count": "3"}}, "corpus.count='3' must be an integer >= 1"),
        ({"corpus": {"count": 0}}, "corpus.count=0 must be an integer >= 1"),
        ({"index": {"type": "ivf", "params": {}}}, r"index.type='ivf' must be one of \('flat', 'hnsw', 'ivfpq'\)"),
        ({"index": {"type": "flat"}}, "index.params=None must be an object"),
        ({"hybrid": "false"}, "hybrid='false' must be true or false"),
    ],
)
def test_a_manifest_with_fields_of_the_wrong_kind_is_a_checkpoint_error(tmp_path, change, words):
    good = {"format": FORMAT, "version": VERSION, "hybrid": False, "corpus": {"count": 3},
            "encoder": {"name": "minilm-l6", "identity": "0" * 16, "dim": 384, "precision": "fp32"},
            "index": {"type": "flat", "params": {}}}  # fmt: skip
    write_json(tmp_path / MANIFEST, good)
    assert read_manifest(tmp_path) == good
    write_json(tmp_path / MANIFEST, {**good, **change})
    with pytest.raises(CheckpointError, match=words + ": it is damaged; rebuild the index"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="index_dir=None must be the path of an index folder"):
        read_manifest(None)


def test_bm25_of_texts_without_a_word_to_index_is_a_data_error():
    with pytest.raises(DataError, match=r"BM25 finds no word to index in the 2 document\(s\): every text is empty or "
                                        "stop words"):  # fmt: skip
        BM25Index.build(["", "the of a"])


def test_build_index_checks_its_arguments_before_loading_the_encoder(tmp_path):
    docs = [Document("a", "", "some text")]
    with pytest.raises(ConfigError, match="batch_size=0 must be an int >= 1"):
        build_index(Corpus(docs), tmp_path / "i", batch_size=0)  # was: range() arg 3 must not be zero
    with pytest.raises(ConfigError, match="batch_size=-1 must be an int >= 1"):
        build_index(Corpus(docs), tmp_path / "i", batch_size=-1)  # was: vectors never written (torch.empty)
    with pytest.raises(ConfigError, match="hybrid='no' must be True or False"):
        build_index(Corpus(docs), tmp_path / "i", hybrid="no")
    with pytest.raises(DataError, match="corpus <memory> is empty"):
        build_index([], tmp_path / "i")  # a list of Document is checked as a Corpus
    with pytest.raises(DataError, match="duplicate document id 'a'"):
        build_index(docs + docs, tmp_path / "i")
    assert not (tmp_path / "i").exists()


class WordCountingEncoder(FakeEncoder):
    """A stand-in encoder that counts one token per word, plus [CLS] and [SEP], and reads at most 8 tokens."""

    max_seq_length, pooling = 8, "mean"

    def token_counts(self, texts):
        return [len(t.split()) + 2 for t in texts]


def test_build_index_says_how_many_documents_are_longer_than_the_encoder_reads(tmp_path, monkeypatch):
    """A document past the encoder's token limit gets a vector of its beginning only: the build says how many (it
    said nothing: a 50-page file of a .txt folder was embedded from its first 256 tokens, silently)."""
    monkeypatch.setattr(encode, "load_encoder", lambda model, precision: WordCountingEncoder())
    monkeypatch.setattr(encode, "encoder_identity", lambda encoder: "word-counting-test-encoder")
    docs = [Document("short", "", "six words fit in eight tokens"),
            Document("long", "", "seven words do not fit in eight"), Document("longer", "", " ".join(["word"] * 40))]
    said: list[str] = []
    build_index(Corpus(docs, "test"), tmp_path / "i", hybrid=True, precision="fp32", log=said.append)
    notes = [m for m in said if m.startswith("note:")]
    assert notes == [("note: 2 of 3 documents are longer than the encoder's 8 tokens: their vectors read each one's "
                      "beginning only (BM25 indexes their whole text)")]
    said.clear()  # an append counts the new documents only; none too long: nothing said
    build_index(Corpus(docs + [Document("new", "", "a short one")], "test"), tmp_path / "i", precision="fp32",
                log=said.append)
    assert said == ["appended 1 documents to the flat index (3 before)"]
    said.clear()
    build_index(Corpus(docs[1:], "test"), tmp_path / "j", precision="fp32", log=said.append)
    assert said == [("note: 2 of 2 documents are longer than the encoder's 8 tokens: their vectors read each one's "
                     "beginning only (--hybrid adds BM25, which indexes the whole text)")]
