"""The docreader-memory lab: its measurement (torch.profiler's allocator events) sees a known allocation, and the
quick run's numbers hang together."""

from __future__ import annotations

import torch

from archlab.labs import VERDICTS, run_lab
from archlab.labs.common import peak_bytes
from archlab.labs.docreader import (
    GRID_LONG_QUICK,
    GRID_QUICK,
    LONG_TEXT,
    REF_LONG_QUICK,
    TARGET,
    full_documents,
    pages_within,
    reader_config,
    saved_by_component,
)
from archlab.models.docreader import DocReaderTokenizer, collate


def test_peak_bytes_sees_a_known_allocation_and_its_release():
    def step() -> None:
        a = torch.ones(1_000_000)  # 4 MB, held while b is made
        b = torch.ones(500_000)  # 2 MB
        del a, b
        torch.ones(250_000)  # 1 MB, after both were freed

    assert 6_000_000 <= peak_bytes(step) < 6_100_000


def test_full_documents_have_every_modality_on_every_page():
    config = reader_config("hierarchical", 4)
    docs = full_documents(3, config, seed=0)
    assert all(len(d.pages) == 3 for d in docs)
    assert all(p.table is not None and p.image is not None and p.text for d in docs for p in d.pages)


def test_card_like_pages_fill_every_text_token_and_keep_the_question_answerable():
    config = reader_config("hierarchical", 2, text_tokens=LONG_TEXT)
    short, long = full_documents(2, config, seed=0), full_documents(2, config, seed=0, fill_text=True)
    batch = collate(long, config, DocReaderTokenizer())
    assert batch.text_ids.shape == (2, 2, LONG_TEXT) and bool(batch.text_mask.all())  # every page LONG_TEXT tokens
    for s, d in zip(short, long, strict=True):  # the generated page comes first: its mentions (the answers) stay
        assert d.question == s.question and all(b.text.startswith(a.text) for a, b in zip(s.pages, d.pages))
    assert long[0].pages[0].text != long[0].pages[1].text  # each page continues with passages of its own


def test_frozen_page_encoders_save_nothing_for_backward_and_compression_saves_above_fusion():
    """What one training forward saves for backward at card-like pages (one page, a real CPU forward): nothing in
    the frozen text, table and image encoders; the same fusion in both readers; less above it in the hierarchical
    reader (Perceiver, pages, reasoning over latents) than in the flat one (reasoning over every token)."""
    saved = {r: saved_by_component(r, 1, seed=0, text_tokens=LONG_TEXT) for r in ("hierarchical", "flat")}
    for r in saved.values():
        assert r["text encoder"] == r["table encoder"] == r["image encoder"] == 0, r
    assert saved["hierarchical"]["fusion layers"] == saved["flat"]["fusion layers"] > 0
    above = {r: s["hierarchical encoder"] + s["reasoning module"] for r, s in saved.items()}
    assert saved["flat"]["hierarchical encoder"] == 0 and above["flat"] > 2 * above["hierarchical"] > 0, saved


def test_quick_run_measures_both_readers_at_every_page_count():
    report = run_lab("docreader-memory", quick=True)
    result = report.result
    assert result.verdict in VERDICTS
    assert [row[0] for row in result.rows] == list(GRID_QUICK)
    hier, flat = [r[1] for r in result.rows], [r[2] for r in result.rows]
    assert all(b > a for a, b in zip(hier, hier[1:])) and all(b > a for a, b in zip(flat, flat[1:]))  # more pages
    assert flat[-1] > hier[-1]  # at the most pages, the flat reader holds more
    assert result.finding.count("N = ") == 2  # card-like pages and the preset's
    long = {row[0]: row[4:] for row in result.rows}
    assert all(long[p] == ["-"] * 3 for p in GRID_QUICK if p not in GRID_LONG_QUICK)
    for p in GRID_LONG_QUICK:  # card-like pages: more memory than the preset's, and more for the flat reader
        hier_long, flat_long, ratio = long[p]
        assert flat_long > hier_long > result.rows[GRID_QUICK.index(p)][1] and ratio > 1
    hier_peaks = {p: long[p][0] for p in GRID_LONG_QUICK}  # the verdict is the card-like N's
    n_long = pages_within(hier_peaks, long[REF_LONG_QUICK][1]) / REF_LONG_QUICK
    assert f"N = {n_long:.2f}" in result.finding
    assert result.verdict == VERDICTS[0 if n_long >= TARGET else 1]
