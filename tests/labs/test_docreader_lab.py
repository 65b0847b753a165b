"""The docreader-memory lab: its measurement (torch.profiler's allocator events) sees a known allocation, and the
quick run's numbers hang together."""

from __future__ import annotations

import torch

from archlab.labs import VERDICTS, run_lab
from archlab.labs.common import peak_bytes
from archlab.labs.docreader import GRID_QUICK, full_documents, reader_config


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


def test_quick_run_measures_both_readers_at_every_page_count():
    report = run_lab("docreader-memory", quick=True)
    result = report.result
    assert result.verdict in VERDICTS
    assert [row[0] for row in result.rows] == list(GRID_QUICK)
    hier, flat = [r[1] for r in result.rows], [r[2] for r in result.rows]
    assert all(b > a for a, b in zip(hier, hier[1:])) and all(b > a for a, b in zip(flat, flat[1:]))  # more pages
    assert flat[-1] > hier[-1]  # at the most pages, the flat reader holds more
    assert "N = " in result.finding
