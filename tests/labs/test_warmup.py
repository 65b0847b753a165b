"""The warmup lab: its two schedules against the paper's formula, its failure test and criterion on constructed
runs, and the quick run (undecided: 12 steps)."""

import math

import pytest

from archlab.labs import run_lab
from archlab.labs.warmup import D_MODEL, FAILED_MARGIN, failed, judge, multiplier


def paper(step: int, warmup: int) -> float:
    """Vaswani et al. 2017, eq. 3, written out."""
    return D_MODEL**-0.5 * min(step**-0.5, step * warmup**-1.5)


@pytest.mark.parametrize("step", [1, 5, 10, 11, 40, 1000])
def test_schedules_against_the_paper(step):
    warmup = 10
    peak = paper(warmup, warmup)
    assert multiplier("warmup", warmup)(step - 1) == pytest.approx(paper(step, warmup) / peak, rel=1e-12)
    none = multiplier("none", warmup)(step - 1)
    assert none == pytest.approx(1.0 if step <= warmup else paper(step, warmup) / peak, rel=1e-12)


def test_failed_runs():
    assert failed([3.0, 2.0], 2.0, 3.0) is False
    assert failed([3.0, math.nan], math.nan, 3.0) is True
    assert failed([3.0, 2.9], 3.0 - FAILED_MARGIN / 2, 3.0) is True  # learned next to nothing


def test_judge_on_constructed_runs():
    def runs(*pairs):
        return [{"held": h, "failed": f} for h, f in pairs]

    results = {(1e-3, "warmup"): runs((2.0, False)), (1e-3, "none"): runs((2.1, False)),
               (3e-3, "warmup"): runs((2.2, False)), (3e-3, "none"): runs((math.nan, True))}  # fmt: skip
    assert judge(results) == (True, True, True)
    results[(3e-3, "none")] = runs((2.1, False))
    assert judge(results) == (False, False, False)


def test_quick_run_is_undecided():
    result = run_lab("warmup-schedule", quick=True).result
    assert result.verdict == "undecided" and "learned too little" in result.undecided
    assert [row[1] for row in result.rows] == ["warmup", "none"]
    # a run ending above the baseline fails too, so the text says "less than ... below", not "within ... of"
    assert failed([3.0, 3.5], 3.0 + 2 * FAILED_MARGIN, 3.0) is True
    for text in (result.criterion, result.finding):
        assert f"less than {FAILED_MARGIN} nats below the unigram baseline" in text and "within" not in text
