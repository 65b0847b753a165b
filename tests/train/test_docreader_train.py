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
        ({"data.questions": '["largest", "sum"]'}, "data.questions: unknown value 'sum'"),
        ({"data.questions": "[]"}, "data.questions=[] must name at least one kind"),
        ({"data.questions": '["count", "count"]'}, "data.questions=['count', 'count'] repeats a kind"),
        ({"data.question_shares": "[2, 1]"}, "data.question_shares=[2, 1] must be one positive integer per kind of "
                                             "question asked (['largest', 'digit', 'count']), or empty"),
        ({"data.questions": '["digit", "count"]', "data.question_shares": "[1, 0]"},
         "data.question_shares=[1, 0] must be one positive integer per kind of question asked (['digit', 'count'])"),
    ],
)  # fmt: skip
def test_data_the_reader_cannot_read_is_one_clear_line(capsys, tmp_path, change, words):
    line = error_line(capsys, "train", "docreader-tiny", "--out", tmp_path / "r", *sets(**change))
    assert words in line
    assert not (tmp_path / "r").exists()


def test_data_questions_picks_the_kinds_a_run_trains_and_validates_on():
    """One kind, as the recipes that learn train (archlab.labs.docreader): every training and validation document
    asks it; the default asks all three."""
    from archlab.data.documents import QUESTION_KINDS

    def kinds(**data) -> set[str]:  # a head per kind only so that each batch row says its kind (DocBatch.kinds)
        run = prepare(RunSpec("docreader-tiny", model={"answer_kinds": list(QUESTION_KINDS)},
                              data={"max_length": 3, "n_valid": 12, **data}, train={"batch_size": 12}))  # fmt: skip
        batches = [next(run.run_data.train), *run.run_data.valid()]
        return {QUESTION_KINDS[k] for b in batches for k in b["kinds"].tolist()}

    assert kinds(questions=["digit"]) == {"digit"}
    assert kinds(questions=["largest", "count"]) == {"largest", "count"}
    assert kinds() == {"largest", "digit", "count"}
    with pytest.raises(ConfigError, match="data.questions=\\['count'\\] asks kinds of question of the generated documents"):
        prepare(RunSpec("gpt-nano", data={"questions": ["count"]}))


def test_question_shares_set_each_kinds_share_of_the_documents():
    """``question_shares=(2, 1, 1)``: half the documents ask the first kind, a quarter each of the others; empty (the
    default) draws the kinds uniformly and writes the same documents as before the field existed; bad shares are
    refused naming the field."""
    from collections import Counter

    from archlab.data.documents import DocumentTask
    from archlab.labs.docreader import question_kind

    task = DocumentTask(min_pages=2, max_pages=3)
    skewed = task.replace(question_shares=(2, 1, 1))
    drawn = Counter(question_kind(skewed.document(i).question) for i in range(800))
    assert 0.45 < drawn["largest"] / 800 < 0.55 and all(0.2 < drawn[k] / 800 < 0.3 for k in ("digit", "count")), drawn
    uniform = Counter(question_kind(task.document(i).question) for i in range(800))
    assert all(0.28 < uniform[k] / 800 < 0.39 for k in ("largest", "digit", "count")), uniform
    assert task.document(7).question == "Which page's table lists the largest length?"  # the stream as it was
    for bad in ((2, 1), (2, 0, 1)):
        with pytest.raises(ConfigError, match="question_shares=.* must be empty or one positive integer per kind"):
            task.replace(question_shares=bad)
    for bad in ((2.0, 1, 1), (True, 1, 1)):  # the config's own type check
        with pytest.raises(ConfigError, match="question_shares="):
            task.replace(question_shares=bad)


def test_data_question_shares_weight_the_training_documents_not_the_validation_ones():
    """`--set data.question_shares=[2,1,1]` (MIXED_RECIPE's mix through `archlab train`): about half the training
    documents ask the largest value; the validation documents ask each kind alike, as without shares; a source
    without questions refuses the field."""
    from collections import Counter

    from archlab.data.documents import QUESTION_KINDS

    def drawn(shares) -> tuple[Counter, Counter]:
        run = prepare(RunSpec("docreader-tiny", model={"answer_kinds": list(QUESTION_KINDS)},
                              data={"max_length": 3, "n_valid": 300, "question_shares": shares},
                              train={"batch_size": 100}))  # fmt: skip
        train = Counter(QUESTION_KINDS[k] for _ in range(4) for k in next(run.run_data.train)["kinds"].tolist())
        valid = Counter(QUESTION_KINDS[k] for b in run.run_data.valid() for k in b["kinds"].tolist())
        return train, valid

    train, valid = drawn([2, 1, 1])
    assert 0.42 < train["largest"] / 400 < 0.58 and all(0.18 < train[k] / 400 < 0.32 for k in ("digit", "count"))
    assert valid == drawn([])[1]  # the same validation documents as a run without shares
    assert all(0.25 < valid[k] / 300 < 0.42 for k in QUESTION_KINDS), valid
    with pytest.raises(ConfigError, match="data.question_shares=\\[2, 1, 1\\] weights kinds of question"):
        prepare(RunSpec("gpt-nano", data={"question_shares": [2, 1, 1]}))


def test_a_token_window_model_is_refused_documents():
    with pytest.raises(ConfigError, match="its data is stdlib or a .txt/.jsonl/.csv text file, cut into token windows"):
        prepare(RunSpec("elmo-small", data={"source": "documents"}))


def test_a_run_reads_its_image_encoder_from_image_init_and_keeps_it_frozen(capsys, tmp_path):
    """``--set model.image_init=VIT --set 'model.frozen=["image"]'``: the run's checkpoints hold the ViT's weights in
    the image encoder, unchanged by training, and the rest of the reader trains; a ViT that saw the documents'
    held-out figures (``archlab train``'s default 10% split) is one clear line. A ViT of the preset's image sizes
    with random weights stands in for :func:`archlab.labs.docreader.pretrain_image_encoder`'s (slow tier)."""
    from archlab.interop.io import save_model
    from archlab.models.docreader import image_vit_config
    from archlab.models.registry import get_config
    from archlab.models.vit import ViT

    torch.manual_seed(3)
    vit = ViT(image_vit_config(get_config("docreader-tiny"), n_classes=10))
    save_model(vit, tmp_path / "vit")
    image = ["--set", f"model.image_init={tmp_path / 'vit'}", "--set", 'model.frozen=["image"]']
    ok(capsys, "train", "docreader-tiny", "--out", tmp_path / "doc", *image, *sets(**{"train.steps": 2}))
    start, trained = weights(tmp_path / "doc", 2), vit.state_dict()
    assert all(torch.equal(start[f"image.vit.{k}"], v) for k, v in trained.items() if not k.startswith("head."))
    ok(capsys, "train", tmp_path / "doc", "--resume", "--set", "train.steps=3")
    resumed = weights(tmp_path / "doc", 3)
    assert all(torch.equal(resumed[k], start[k]) for k in start if k.startswith("image."))
    assert not torch.equal(resumed["head.weight"], start["head.weight"])
    (tmp_path / "leaky").mkdir()
    (tmp_path / "leaky" / "run.json").write_text(json.dumps({"data": {"source": "digits", "valid_percent": 10,
                                                                       "seed": 0}}))  # fmt: skip
    save_model(vit, tmp_path / "leaky" / "checkpoints" / "step-00000001")
    line = error_line(capsys, "train", "docreader-tiny", "--out", tmp_path / "doc2", "--set",
                      f"model.image_init={tmp_path / 'leaky' / 'checkpoints' / 'step-00000001'}",
                      *sets(**{"train.steps": 1}))  # fmt: skip
    assert "data.valid_percent=10 and data.seed=0: its training images include figures of the documents'" in line


def test_reader_accuracy_measures_the_readers_memory_and_parameters():
    """Two training steps each (accuracy stays at chance): the measurements the slow tier compares. At the same
    batch of 2..8-page documents the flat reader (every fused token to full attention) holds more than the
    hierarchical one (124.6 against 144.0 MB when written; at 2..4 pages 77.2 against 84.0, too close for a
    margin since attention stopped copying its output to zero queries without keys), and the
    question-only reader, which reads no page, a fraction of either; each counts only the parameters it uses."""
    from archlab.labs.docreader import reader_accuracy

    runs = {r: reader_accuracy(r, v, steps=2, n_test=8, pages=8)
            for r, v in (("hierarchical", "full"), ("flat", "full"), ("question", "question"))}  # fmt: skip
    for result in runs.values():
        assert set(result) == {"all", "largest", "digit", "count", "majority", "params", "peak_mb"}
        assert 0 <= result["all"] <= 1 and set(result["majority"]) <= {"largest", "digit", "count"}
        assert all(0 < share <= 1 for share in result["majority"].values())
    counting = reader_accuracy("question", "question", steps=1, n_test=8, questions=("count",), pages=3)
    assert set(counting) == {"all", "count", "majority", "params", "peak_mb"} and counting["all"] == counting["count"]
    hierarchical, flat, question = runs["hierarchical"], runs["flat"], runs["question"]
    assert flat["peak_mb"] > 1.1 * hierarchical["peak_mb"] > 1.1 * 5 * question["peak_mb"], runs
    assert hierarchical["params"] > flat["params"] > question["params"] > 0  # flat: no Perceiver, no page levels


# -- slow tier: what the tiny reader learns, against its baselines, at the same training budget -----------------


#: The trained reader's margin over the better of the question-only and single-page baselines, and over the
#: majority answer of the kind: the issue's "well above".
MARGIN = 0.10
#: The least held-out accuracy the digit recipe must reach (of 10 digits; majority about 0.13).
DIGIT_FLOOR = 0.30


def trained_readers(**recipe) -> dict[str, dict]:
    """The hierarchical reader on the full documents, the question-only reader on the question, the hierarchical
    reader on one page of each document and the flat reader on the full documents, each trained by ``recipe``
    (:func:`archlab.labs.docreader.reader_accuracy`), printed."""
    from archlab.labs.docreader import reader_accuracy

    runs = {"reader": reader_accuracy("hierarchical", "full", **recipe),
            "question only": reader_accuracy("question", "question", **recipe),
            "single page": reader_accuracy("hierarchical", "single", **recipe),
            "flat": reader_accuracy("flat", "full", **recipe)}  # fmt: skip
    for name, r in runs.items():
        show(name, r)
    return runs


def show(name: str, r: dict) -> None:
    """One line of a trained reader's results (pytest -s shows it)."""
    kinds = "  ".join(f"{k} {r[k]:.3f} (majority {m:.3f})" for k, m in r["majority"].items())
    print(f"{name:13s} all {r['all']:.3f}  {kinds}  params {r['params']:,}  peak {r['peak_mb']:.1f} MB")


@pytest.mark.slow
def test_the_trained_reader_counts_pages_well_above_its_baselines():
    """COUNT_RECIPE (``docreader-tiny``, fan-in init, ``page_question="fusion"``; "How many pages mention the X?"
    on 2..3 pages; 800 steps of 16 new documents): on 256 held-out test documents the reader's accuracy is at least
    MARGIN above the question-only reader, the single-page reader and the majority count, and at least 0.50
    (measured: reader 0.613, question only 0.297, single page 0.469, majority 0.309, flat 0.664; 439 s on the
    2 cores nearly idle, 1,339 s loaded). At 2..3 pages the two readers' training steps hold about the same memory
    (flat 58.4, reader 58.7 MB; 61.4 against 60.6 before 0c586d9 dropped attention's zero-query copy, which this test
    asserted the order of): the hierarchy's memory saving is at many pages, which the fast tier's
    ``test_reader_accuracy_measures_the_readers_memory_and_parameters`` and ``archlab lab docreader-memory`` measure.
    The single-page reader knows how many pages there are (hidden pages count), which alone gets 0.583 of these
    counts right at best; a second seed gave reader 0.582, single page 0.441."""
    from archlab.labs.docreader import COUNT_RECIPE

    full, question, single, flat = trained_readers(**COUNT_RECIPE).values()
    best_blind = max(question["count"], single["count"], full["majority"]["count"])
    assert full["count"] >= best_blind + MARGIN, (full, question, single)
    assert full["count"] >= 0.50, full


@pytest.mark.slow
def test_the_trained_reader_finds_the_digit_on_the_page_a_keyword_names():
    """DIGIT_RECIPE (the count recipe's reader with ``figure_global=True``: each page's fused figure ``[class]``
    state a global token of the reasoning module; "What digit is shown on the page that mentions the X?" on 2..3
    pages; 800 steps of 16 new documents): on 256 held-out test documents the reader's accuracy is at least MARGIN
    above the question-only reader (the same recipe, the question alone) and above the majority digit, and at least
    DIGIT_FLOOR (measured: reader 0.402, question only 0.102, majority 0.129; 740 s loaded at load ~7-11, 207 s of
    CPU time)."""
    from archlab.labs.docreader import DIGIT_RECIPE, reader_accuracy

    full = reader_accuracy("hierarchical", "full", **DIGIT_RECIPE)
    question = reader_accuracy("question", "question", **DIGIT_RECIPE)
    show("reader", full)
    show("question only", question)
    assert full["digit"] >= max(question["digit"], full["majority"]["digit"]) + MARGIN, (full, question)
    assert full["digit"] >= DIGIT_FLOOR, full


@pytest.mark.slow
def test_the_trained_reader_finds_the_page_with_the_largest_value():
    """LARGEST_RECIPE (the digit recipe's reader with ``table_numbers=True``: each number cell's tokens get a numeric
    embedding of sign and log-magnitude in the table encoder; "Which page's table lists the largest X?" on 2..3
    pages; 800 steps of 16 new documents): on 256 held-out test documents the reader's accuracy is at least MARGIN
    above the question-only reader (the same recipe, the question alone) and above the majority page (measured:
    reader 0.566, question only 0.434, majority 0.434; 740 s loaded at load ~8, nice 19; seed 1 by a /tmp script
    with the same rules: 0.562, majority 0.418; seed 2, reader_accuracy with seed=2: 0.555, question only and
    majority 0.453, a margin of 0.102, so the asserted 0.10 has little slack on other seeds). Without the numbers
    the same recipe reached 0.473 and, seed 1, 0.512:
    800 steps take it part of the way, the numbers add 0.09 and 0.05 and the margin over the majority clears 0.10 on
    both seeds (0.13 and 0.14) where without them it did on neither (0.04 and 0.09)."""
    from archlab.labs.docreader import LARGEST_RECIPE, reader_accuracy

    full = reader_accuracy("hierarchical", "full", **LARGEST_RECIPE)
    question = reader_accuracy("question", "question", **LARGEST_RECIPE)
    show("reader", full)
    show("question only", question)
    assert full["largest"] >= max(question["largest"], full["majority"]["largest"]) + MARGIN, (full, question)


#: MIXED_RECIPE's asserted margins over the better of the question-only reader and the kind's majority answer, per
#: kind (measured on seed 0, the test's: largest 0.094, digit 0.744, count 0.259; seeds 1 / 2 / 3: largest 0.049 /
#: 0.021 / 0.080, digit 0.691 / 0.739 / 0.720, count 0.322 / 0.295 / 0.278: the largest value's margin is thin).
MIXED_MARGINS = {"largest": 0.05, "digit": 0.40, "count": 0.15}


@pytest.mark.slow
def test_one_reader_answers_the_three_kinds_mixed_with_a_pretrained_frozen_image_encoder(tmp_path):
    """MIXED_RECIPE (the card's way at this scale: the image encoder pretrained as a digit classifier on the
    documents' training figures alone and frozen; fusion, Perceiver, page and reasoning levels, text and table
    encoders trained; 800 steps of 48 documents, half of them asking the largest value): on 768 held-out test
    documents of the three kinds (drawn uniformly) one reader beats the question-only reader (the same recipe, the
    question alone) and the kind's majority answer on every kind by MIXED_MARGINS. The pretrained ViT itself is
    right on at least 95% of the held-out digits (measured 97.8%, 600 steps, about 10 s of CPU time). Measured
    (seed 0, one thread, the shared 2-core machine loaded, nice 19): reader largest 0.551, digit 0.874, count 0.595
    against majorities 0.457, 0.130, 0.336 and the question-only reader's 0.457, 0.119, 0.293; 1,426 s for the
    reader (474 s of CPU time), 123 s for the question-only one."""
    from archlab.labs.docreader import mixed_recipe, pretrain_image_encoder, reader_accuracy

    digits = pretrain_image_encoder(tmp_path / "vit")["eval"]["accuracy"]
    print(f"pretrained image encoder: {digits:.3f} of the held-out digits")
    assert digits >= 0.95
    recipe = mixed_recipe(tmp_path / "vit")  # the run above, reused
    full = reader_accuracy("hierarchical", "full", **recipe)
    question = reader_accuracy("question", "question", **recipe)
    show("reader", full)
    show("question only", question)
    for kind, margin in MIXED_MARGINS.items():
        assert full[kind] >= max(question[kind], full["majority"][kind]) + margin, (kind, full, question)
