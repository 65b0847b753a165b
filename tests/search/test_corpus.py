"""Corpus readers (BEIR, JSONL, text) and the built-in standard-library corpus with its evaluation set."""

from __future__ import annotations

import json

import pytest

from archlab.errors import DataError
from archlab.search import corpus as corpus_mod
from archlab.search.corpus import (
    Corpus,
    Document,
    EvalSet,
    builtin_corpus,
    builtin_evalset,
    fingerprint,
    load_beir,
    load_corpus,
    load_qrels,
    load_queries,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def beir(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "Metformin", "text": "Side effects in the elderly."},
                                            {"_id": 2, "text": "No title here."}])  # fmt: skip
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "metformin elderly"}, {"_id": "q2", "text": "x"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\t0\n")
    return tmp_path


def test_beir_folder(beir):
    corpus, evalset = load_beir(beir)
    assert [d.id for d in corpus] == ["d1", "2"]  # a numeric _id becomes its string
    assert corpus[0] == Document("d1", "Metformin", "Side effects in the elderly.")
    assert corpus[1].title == "" and corpus[1].full_text == "No title here."
    assert corpus[0].full_text == "Metformin\n\nSide effects in the elderly."
    assert evalset.queries == {"q1": "metformin elderly"}  # only judged queries
    assert evalset.qrels == {"q1": {"d1": 1, "2": 0}}
    assert corpus.row("2") == 1


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("First  paragraph\nstill first.\n\n\nSecond one.\n")
    corpus = load_corpus(tmp_path / "a.txt")
    assert [(d.id, d.text) for d in corpus] == [("a:1", "First paragraph still first."), ("a:2", "Second one.")]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "x.txt").write_text("one")
    (folder / "sub" / "y.txt").write_text("two\nlines")
    corpus = load_corpus(folder)
    assert [(d.id, d.title, d.text) for d in corpus] == [("sub/y.txt", "y", "two lines"), ("x.txt", "x", "one")]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"_id": "a", "text": "t"}', '{"_id": "a", "text": "u"}'], r"corpus.jsonl:2: duplicate _id 'a' \(first on line 1\)"),
        (['{"_id": "a", "text": "t"}', '{"_id": "b"}'], r"corpus.jsonl:2: missing field 'text'"),
        (['{"text": "t"}'], r"corpus.jsonl:1: missing field '_id'"),
        (['{"_id": "a", "text": "t"}', "", '{"_id": "b", "text": '], r"corpus.jsonl:3: malformed JSON"),
        (['["a", "b"]'], r"corpus.jsonl:1: expected a JSON object"),
        (['{"_id": "a", "text": 5}'], r"corpus.jsonl:1: field 'text' must be a string"),
        (["", "  "], r"is empty"),
    ],
)  # fmt: skip
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_corpus(path)


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="neither 'builtin' nor an existing"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "c.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"must end in \.jsonl or \.txt"):
        load_corpus(tmp_path / "c.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither corpus.jsonl"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(tmp_path / "blank.txt")
    with pytest.raises(DataError, match="duplicate document id 'a'"):
        Corpus([Document("a", "", "x"), Document("a", "", "y")])


def test_files_that_are_not_utf8_are_a_data_error_naming_the_file(tmp_path):
    for name in ("q.tsv", "q.jsonl", "r.tsv", "c.txt", "c.jsonl"):
        (tmp_path / name).write_bytes(b"q1\t\xff\xfe latin-1 bytes\n")
    for load, name in ((load_queries, "q.tsv"), (load_queries, "q.jsonl"), (load_qrels, "r.tsv"),
                       (load_corpus, "c.txt"), (load_corpus, "c.jsonl")):  # fmt: skip
        with pytest.raises(DataError, match=rf"cannot read .*{name}: 'utf-8' codec can't decode"):
            load(tmp_path / name)


def test_queries_and_qrels_errors(tmp_path, beir):
    (tmp_path / "q.tsv").write_text("q1\tfirst\nq2 no tab\n")
    with pytest.raises(DataError, match=r"q.tsv:2: expected 'query-id<TAB>text'"):
        load_queries(tmp_path / "q.tsv")
    (tmp_path / "r.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tgood\n")
    with pytest.raises(DataError, match=r"r.tsv:2: score 'good' is not a number"):
        load_qrels(tmp_path / "r.tsv")
    (tmp_path / "r.tsv").write_text("q1 0 d1 2\n")  # TREC qrels
    assert load_qrels(tmp_path / "r.tsv") == {"q1": {"d1": 2}}
    corpus, _ = load_beir(beir)
    with pytest.raises(DataError, match="no document with id 'd9'"):
        EvalSet({"q1": "x"}, {"q1": {"d9": 1}}).check(corpus)
    with pytest.raises(DataError, match="not among the 1 queries"):
        EvalSet({"q1": "x"}, {"q2": {"d1": 1}}).check(corpus)


def test_fingerprint_sees_every_field_and_the_order():
    a, b = Document("a", "t", "x"), Document("b", "", "y")
    base = fingerprint([a, b])
    assert fingerprint([b, a]) != base
    assert fingerprint([Document("a", "t", "x "), b]) != base
    assert fingerprint([Document("a", "", "tx"), b]) != base  # fields are separated
    assert Corpus([a, b]).fingerprint == base


def test_builtin_corpus_and_evalset():
    corpus, evalset = builtin_corpus(), builtin_evalset()
    assert 2000 <= len(corpus) <= 6000
    assert len(evalset.queries) >= 200 and set(evalset.queries) == set(evalset.qrels)
    evalset.check(corpus)
    rebuilt, rebuilt_eval = corpus_mod._builtin.__wrapped__()  # deterministic: a fresh build is identical
    assert rebuilt.fingerprint == corpus.fingerprint and rebuilt_eval.queries == evalset.queries
    assert corpus[corpus.row("json.dumps")].title == "json.dumps"
    for qid, query in evalset.queries.items():
        (doc_id,) = evalset.qrels[qid]
        doc = corpus[corpus.row(doc_id)]
        assert len(query.split()) >= corpus_mod.MIN_SUMMARY_WORDS
        assert query not in doc.text  # the summary sentence is held out of its document
        assert len(doc.text.split()) >= corpus_mod.MIN_BODY_WORDS
    assert len({q.lower() for q in evalset.queries.values()}) == len(evalset.queries)


def test_documents_hold_strings_and_a_corpus_holds_documents():
    for fields, words in ((("1", None, "t"), "Document title=None must be a str, got NoneType"),
                          ((7, "", "t"), "Document id=7 must be a str, got int"),
                          (("a", "", b"t"), "Document text=b't' must be a str, got bytes")):  # fmt: skip
        with pytest.raises(DataError, match=words):
            Document(*fields)
    with pytest.raises(DataError, match=r"corpus <memory>: document 1 is a dict, not an archlab.search.Document"):
        Corpus([Document("a", "", "x"), {"id": "b", "text": "y"}])
    with pytest.raises(DataError, match="a corpus is made of a list of Document, got str"):
        Corpus("abc")
    with pytest.raises(DataError, match="got NoneType"):
        Corpus(None)
