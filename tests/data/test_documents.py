"""The synthetic multi-page documents (archlab.data.documents): exact answers, determinism, disjoint splits,
the baseline views, resumable and shardable batches, clear errors."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from archlab.data.documents import (
    HIDDEN_PAGE,
    KEYWORDS,
    MENTIONS,
    NO_DOCUMENT,
    QUESTION_KINDS,
    SPLITS,
    DocumentBatches,
    DocumentTask,
    answer_classes,
    figures,
    mentions,
    passages,
    solve,
    view,
)
from archlab.errors import ConfigError, DataError
from archlab.models.docreader import Document, Page

TASK = DocumentTask(min_pages=2, max_pages=6, image_size=16)
N_DOCS = 150  # per split


def digit_of(split: str):
    """Reads a figure back: the label of the dataset image it was made from (8x8, so exact equality)."""
    images, labels = figures()[split]

    def read(image: torch.Tensor) -> int:
        small = image[:, :: image.shape[1] // 8, :: image.shape[2] // 8]
        hits = (images == small).flatten(1).all(1)
        found = set(labels[hits].tolist())
        assert len(found) == 1, f"the figure matches images of digits {found}"
        return found.pop()

    return read


@pytest.fixture(scope="module")
def docs() -> dict[str, list[Document]]:
    return {split: TASK.documents(N_DOCS, seed=3, split=split) for split in SPLITS}


def kind_of(doc: Document) -> str:
    return {"Which": "largest", "What": "digit", "How": "count"}[doc.question.split()[0]]


def test_every_answer_is_what_the_pages_say(docs):
    for split, some in docs.items():
        read = digit_of(split)
        for doc in some:
            assert solve(doc, read) == doc.answer, (split, doc.question)


def test_every_document_carries_its_question_kind(docs):
    """``Document.kind`` (what routes a document to its kind's answer head) is the kind its question asks."""
    assert all(d.kind == kind_of(d) for some in docs.values() for d in some)


def test_answers_cover_their_range_and_fit_the_label_set(docs):
    seen = Counter((kind_of(d), d.answer) for some in docs.values() for d in some)
    assert {k for k, _ in seen} == set(QUESTION_KINDS)
    assert {a for k, a in seen if k == "digit"} == set(range(10))
    assert {a for k, a in seen if k == "count"} == set(range(TASK.max_pages + 1))
    assert {a for k, a in seen if k == "largest"} == set(range(1, TASK.max_pages + 1))
    assert all(0 <= a < TASK.n_answers == answer_classes(6) == 10 for _, a in seen)
    assert answer_classes(50) == 51


def test_pages_tables_and_figures_have_the_promised_shapes(docs):
    for doc in docs["train"]:
        assert TASK.min_pages <= len(doc.pages) <= TASK.max_pages
        for page in doc.pages:
            assert page.text.strip()
            if page.table is not None:
                assert len(page.table) == TASK.table_rows + 1
                assert all(len(row) == TASK.table_columns + 1 for row in page.table)
                assert all(1 <= int(v) <= TASK.max_value for row in page.table[1:] for v in row[1:])
            if page.image is not None:
                assert page.image.shape == (1, 16, 16) and page.image.dtype == torch.float32
                assert 0 <= page.image.min() and page.image.max() <= 1
    modalities = Counter((p.table is not None, p.image is not None) for d in docs["train"] for p in d.pages)
    assert len(modalities) == 4  # pages with and without tables and figures


def test_the_same_seed_gives_the_same_document_and_another_seed_another():
    a, b = TASK.document(17, seed=5, split="valid"), TASK.document(17, seed=5, split="valid")
    assert (a.question, a.answer, [p.text for p in a.pages], [p.table for p in a.pages]) == \
        (b.question, b.answer, [p.text for p in b.pages], [p.table for p in b.pages])  # fmt: skip
    for pa, pb in zip(a.pages, b.pages, strict=True):
        assert (pa.image is None) == (pb.image is None)
        if pa.image is not None:
            assert torch.equal(pa.image, pb.image)
    others = [TASK.document(17, seed=s, split="valid") for s in (6, 7, 8)]
    assert any([p.text for p in o.pages] != [p.text for p in a.pages] for o in others)


def test_splits_share_no_passage_and_no_image(docs):
    pools = passages()
    assert all(len(pools[s]) >= 50 for s in SPLITS)
    for s, t in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(pools[s]) & set(pools[t])
    assert not any(mentions(p, k) for pool in pools.values() for p in pool for k in KEYWORDS)
    mention = re.compile("|".join(re.escape(m).replace(r"\{\}", r"\w+") for m in MENTIONS))
    for split, some in docs.items():  # every page's passage comes from its own split's pool
        starts = {" ".join(p.split()[:4]) for p in pools[split]}
        for doc in some[:40]:
            for page in doc.pages:
                passage = " ".join(mention.sub("", page.text).split())
                assert " ".join(passage.split()[:4]) in starts, (split, page.text)
    flat = {s: figures()[s][0].flatten(1) for s in SPLITS}
    assert len(flat["valid"]) + len(flat["test"]) + len(flat["train"]) == 1797
    # the same pixels may recur in the dataset; the split is by image, so count only exact copies across
    for s, t in (("train", "valid"), ("train", "test"), ("valid", "test")):
        copies = (flat[s][:, None, :] == flat[t][None, :, :]).all(-1).any(0).sum()
        assert copies <= 2, (s, t, int(copies))


def test_views_hide_what_the_baselines_must_not_see(docs):
    doc = next(d for d in docs["train"] if len(d.pages) >= 4)
    alone = view(doc, "question")
    assert [p.text for p in alone.pages] == [NO_DOCUMENT] and alone.pages[0].image is None
    assert (alone.question, alone.answer, alone.kind) == (doc.question, doc.answer, doc.kind)
    shown = [view(doc, "single", i) for i in range(30)]
    for one in shown:
        assert len(one.pages) == len(doc.pages) and (one.question, one.answer, one.kind) == (doc.question,
                                                                                             doc.answer, doc.kind)
        visible = [p for p in one.pages if p.text != HIDDEN_PAGE]
        assert len(visible) == 1 and visible[0] in doc.pages
        assert all(p.table is None and p.image is None for p in one.pages if p.text == HIDDEN_PAGE)
    assert len({[p.text for p in one.pages].index(next(p.text for p in one.pages if p.text != HIDDEN_PAGE))
                for one in shown}) > 1  # fmt: skip  (the page shown varies with the index)
    assert view(doc, "full") is doc


def fake_collate(docs):
    """Stands in for the reader's collate: one row per document, enough to check order and sharding."""
    return {
        "answers": torch.tensor([d.answer for d in docs]),
        "pages": torch.tensor([len(d.pages) for d in docs]),
        "first_word": torch.tensor([hash(d.pages[0].text) % 100_000 for d in docs]),
    }


def test_batches_resume_exactly_and_shard_by_rows():
    source = DocumentBatches(TASK, fake_collate, batch_size=4, seed=1, n_valid=10)
    first = [next(source) for _ in range(3)]
    state = source.state_dict()
    later = [next(source) for _ in range(2)]
    again = DocumentBatches(TASK, fake_collate, batch_size=4, seed=1, n_valid=10)
    again.load_state_dict(state)
    for a, b in zip(later, [next(again) for _ in range(2)], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(first[0]["first_word"], first[1]["first_word"])
    ranks = [DocumentBatches(TASK, fake_collate, batch_size=4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for k in first[0]:
        assert torch.equal(torch.cat([r.batch(0)[k] for r in ranks]), first[0][k])
    valid = list(source.eval_batches())
    assert [len(b["answers"]) for b in valid] == [4, 4, 2]
    assert all(torch.equal(a["first_word"], b["first_word"]) for a, b in zip(valid, source.eval_batches(), strict=True))
    with pytest.raises(DataError, match="view="):
        DocumentBatches(TASK, fake_collate, batch_size=4, seed=1, view="single").load_state_dict(state)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"min_pages": 0}, "min_pages=0"),
        ({"max_pages": 51}, "max_pages=51"),
        ({"min_pages": 5, "max_pages": 3}, "max_pages=3"),
        ({"image_size": 12}, "image_size=12"),
        ({"max_words": 2}, "max_words=2"),
        ({"table_rows": 0}, "table_rows=0"),
        ({"table_columns": 9}, "table_columns=9"),
        ({"max_value": 1}, "max_value=1"),
        ({"questions": ("largest", "colour")}, "colour"),
        ({"questions": ()}, "questions"),
    ],
)
def test_bad_settings_are_refused_by_name(fields, match):
    with pytest.raises(ConfigError, match=match):
        DocumentTask(**fields)


def test_bad_requests_are_refused_by_name():
    with pytest.raises(ConfigError, match="split"):
        TASK.document(0, split="dev")
    with pytest.raises(ConfigError, match="index=-1"):
        TASK.document(-1)
    with pytest.raises(ConfigError, match="view"):
        view(TASK.document(0), "half")
    with pytest.raises(DataError, match="none of the generator's"):
        solve(Document([Page("a page")], "Who wrote it?", 0), digit_of("train"))
    with pytest.raises(ConfigError, match="n_valid=0"):
        DocumentBatches(TASK, fake_collate, batch_size=2, n_valid=0)


def test_the_tiny_reader_reads_every_document_whole_and_a_smaller_one_is_refused_by_name():
    from archlab.data.documents import documents_fit
    from archlab.models.docreader import DocReaderTokenizer
    from archlab.models.registry import get_config

    tiny, tok = get_config("docreader-tiny"), DocReaderTokenizer()
    task = DocumentTask(max_pages=tiny.max_pages, image_size=tiny.image_size)
    documents_fit(task, tiny, tok)  # the bounds hold
    docs = task.replace(min_pages=tiny.max_pages).documents(40, split="test")
    assert max(len(tok.text(p.text, 1 << 30)) for d in docs for p in d.pages) <= tiny.max_text_len
    for change, match in [({"max_text_len": 20}, "max_text_len=20 < "), ({"max_table_len": 12}, "max_table_len=12"),
                          ({"max_question_len": 8}, "max_question_len=8"), ({"n_answers": 9}, "n_answers=9 < 10"),
                          ({"max_table_rows": 3}, "max_table_rows=3"), ({"image_size": 16}, "image_size=16")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            documents_fit(task, tiny.replace(**change), tok)
    with pytest.raises(ConfigError, match="max_pages=4 < 8 pages"):
        documents_fit(task, tiny.replace(max_pages=4), tok)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"table_rows": 10**7}, r"table_rows=10000000 must be in 1\.\.1000"),  # was: minutes, then MemoryError
        ({"image_size": 8 * 4096}, r"image_size=32768 must be a multiple of 8 .* in 8\.\.1024"),  # 4 GB an image
        ({"max_value": 10**9}, r"max_value=1000000000 must be in 2\.\.1,000,000"),  # documents_fit: 1e9 strings
    ],
)
def test_sizes_that_would_take_gigabytes_are_refused_by_name(fields, match):
    with pytest.raises(ConfigError, match=match):
        DocumentTask(**fields)
