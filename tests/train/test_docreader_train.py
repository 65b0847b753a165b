"""The document reader through ``archlab train``: its data (generated documents, archlab.data.documents), a
bit-exact resume, clear errors (fast tier); and what the trained tiny reader learns against its baselines
(slow tier)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from archlab.errors import ConfigError
from archlab.models.docreader import DocBatch
from archlab.train.run import RunSpec, prepare
from archlab.train.sources import DOCUMENT_KEYS

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the CLI helpers of test_cli_train
from test_cli_train import error_line, ok, weights

SMALL = {"data.min_length": 2, "data.max_length": 2, "data.n_valid": 8, "train.batch_size": 4, "train.warmup": 1,
         "train.eval_every": 0, "train.log_every": 1, "train.schedule": "constant", "train.progress": "false",
         "train.tensorboard": "false"}  # fmt: skip  (constant: a resume may raise train.steps)


def sets(**more) -> list[str]:
    return [a for k, v in {**SMALL, **more}.items() for a in ("--set", f"{k}={v}")]


def test_the_reader_trains_on_generated_documents_by_default():
    run = prepare(RunSpec("docreader-tiny", data={"max_length": 3, "n_valid": 4}, train={"batch_size": 2}))
    assert (run.task, run.data.source, run.run_data.tokenizer) == ("custom", "documents", None)
    assert "generated documents of 1..3 pages" in run.run_data.describe
    batch = next(run.run_data.train)
    assert tuple(batch) == DOCUMENT_KEYS == DocBatch._fields
    assert batch["text_ids"].shape[:2] == (2, batch["page_mask"].shape[1]) and batch["answers"].shape == (2,)
    valid = list(run.run_data.valid())
    assert [len(b["answers"]) for b in valid] == [2, 2]


def test_resume_through_the_cli_is_bit_exact(capsys, tmp_path):
    ok(capsys, "train", "docreader-tiny", "--out", tmp_path / "straight", *sets(**{"train.steps": 4}))
    ok(capsys, "train", "docreader-tiny", "--out", tmp_path / "split", *sets(**{"train.steps": 2}))
    out = ok(capsys, "train", tmp_path / "split", "--resume", "--set", "train.steps=4")
    straight, resumed, at_2 = weights(tmp_path / "straight", 4), weights(tmp_path / "split", 4), weights(
        tmp_path / "split", 2)  # fmt: skip
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not torch.equal(at_2["head.weight"], resumed["head.weight"])  # it did train on
    assert "accuracy" in out
    evaluated = json.loads(ok(capsys, "eval", tmp_path / "split", "--json"))
    assert 0 <= evaluated["eval"]["accuracy"] <= 1


@pytest.mark.parametrize(
    "change, words",
    [
        ({"data.max_length": 9}, "data.max_length=9 pages: preset docreader-tiny (family docreader) reads documents "
                                 "of at most max_pages=8 pages"),
        ({"data.tokenizer": "bpe"}, "data.tokenizer='bpe': documents are read with the reader's own tokenizer"),
        ({"data.source": "stdlib"}, "its data is the generated documents (source 'documents')"),
        ({"model.max_text_len": 24}, "the reader cannot read these documents whole: max_text_len=24 < "),
    ],
)  # fmt: skip
def test_data_the_reader_cannot_read_is_one_clear_line(capsys, tmp_path, change, words):
    line = error_line(capsys, "train", "docreader-tiny", "--out", tmp_path / "r", *sets(**change))
    assert words in line
    assert not (tmp_path / "r").exists()


def test_a_token_window_model_is_refused_documents():
    with pytest.raises(ConfigError, match="its data is stdlib or a .txt/.jsonl/.csv text file, cut into token windows"):
        prepare(RunSpec("elmo-small", data={"source": "documents"}))


def test_reader_accuracy_measures_the_readers_memory_and_parameters():
    """Two training steps each (accuracy stays at chance): the measurements the slow tier compares. At the same
    batch the flat reader (every fused token to full attention) holds more than the hierarchical one, and the
    question-only reader, which reads no page, a fraction of either; each counts only the parameters it uses."""
    from archlab.labs.docreader import reader_accuracy

    runs = {r: reader_accuracy(r, v, steps=2, n_test=8)
            for r, v in (("hierarchical", "full"), ("flat", "full"), ("question", "question"))}  # fmt: skip
    for result in runs.values():
        assert set(result) == {"all", "largest", "digit", "count", "params", "peak_mb"}
        assert 0 <= result["all"] <= 1
    hierarchical, flat, question = runs["hierarchical"], runs["flat"], runs["question"]
    assert flat["peak_mb"] > 1.1 * hierarchical["peak_mb"] > 1.1 * 5 * question["peak_mb"], runs
    assert hierarchical["params"] > flat["params"] > question["params"] > 0  # flat: no Perceiver, no page levels


# -- slow tier: what the tiny reader learns, against its baselines, at the same training budget -----------------


#: The trained reader's margin over the better of the question-only and single-page baselines (accuracy on all
#: question kinds): the issue's "well above".
MARGIN = 0.10


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "issue 16 is open: run to completion (321 s, one loaded core) the four readers all stay at the answer priors "
    "on the 256 test documents (reader 0.242, question only 0.246, single page 0.246, flat 0.238); no recipe tried "
    "since learns all three kinds within 400 steps (curriculum, frozen MiniLM, fan-in init: 0.234 at 400); only "
    "counting over 2..3 pages is learnt (fan-in init + page_question='fusion': 0.599 at 400 steps, prior 0.323); "
    "README's Document reader section"))
def test_the_trained_reader_beats_the_question_only_and_single_page_baselines():
    """docreader-tiny trained 300 steps of 16 documents (2..4 pages) on the full documents, on the question alone,
    and on one page of each document, and the flat reader (every token, full attention) on the full documents;
    accuracy on 256 held-out test documents, per question kind, with each reader's parameters and its training
    step's allocator peak."""
    from archlab.labs.docreader import reader_accuracy

    runs = {"reader": reader_accuracy("hierarchical", "full"),
            "question only": reader_accuracy("question", "question"),
            "single page": reader_accuracy("hierarchical", "single"),
            "flat": reader_accuracy("flat", "full")}  # fmt: skip
    for name, r in runs.items():
        print(f"{name:13s} all {r['all']:.3f}  largest {r['largest']:.3f}  digit {r['digit']:.3f}  "
              f"count {r['count']:.3f}  params {r['params']:,}  peak {r['peak_mb']:.1f} MB")  # fmt: skip
    full, question, single, flat = runs.values()
    assert flat["peak_mb"] > full["peak_mb"], runs  # the same batch costs the flat reader more memory
    assert full["all"] >= max(question["all"], single["all"]) + MARGIN, runs
