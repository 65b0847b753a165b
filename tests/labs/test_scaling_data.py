"""The L(D) lab: its data sizes, early stopping and criterion on constructed losses, and the quick run (undecided:
three data sizes cannot show a power law)."""

import pytest

from archlab.analysis import fit_power_law
from archlab.labs import run_lab
from archlab.labs.scaling_data import MIN_SIZES, best_loss, data_sizes, judge


def test_data_sizes_double():
    assert data_sizes(1000, 4) == [1000, 2000, 4000, 8000]


def test_best_loss_is_early_stopping():
    assert best_loss({10: 3.0, 20: 2.5, 40: 2.7, 80: 2.9}) == (20, 2.5)  # the minimum, not the last
    assert best_loss({10: 2.0, 20: 2.0, 30: 2.1}) == (10, 2.0)  # the earliest on a tie


def test_judge_on_an_exact_power_law_and_on_a_bump():
    sizes = data_sizes(1000, MIN_SIZES)
    exact = [(5e4 / d) ** 0.1 for d in sizes]
    fit = fit_power_law(sizes, exact)
    assert fit.alpha == pytest.approx(0.1) and fit.r2 == pytest.approx(1.0)
    assert judge(exact, fit.r2, len(sizes)) == (True, True, "")
    bumped = exact[:2] + [exact[1] + 0.01] + exact[3:]
    assert judge(bumped, fit_power_law(sizes, bumped).r2, len(sizes))[:2] == (False, False)
    supported, decreasing, undecided = judge(exact[:3], 1.0, 3)
    assert decreasing and "3 data sizes" in undecided


def test_quick_run_is_undecided():
    result = run_lab("scaling-data", quick=True).result
    assert result.verdict == "undecided" and "fewer than" in result.undecided
    assert [row[0] for row in result.rows] == data_sizes(4096, 3)
