"""The heads-at-fixed-compute lab: its criterion on constructed losses, and the quick run (undecided: 20 steps)."""

from archlab.labs import run_lab
from archlab.labs.head_count import MARGIN, judge


def test_judge_wants_an_interior_best_with_both_ends_worse():
    assert judge({1: 2.0, 2: 1.9, 4: 1.8, 8: 1.85, 16: 1.9}) == (True, 4)
    assert judge({1: 1.7, 2: 1.9, 4: 1.8, 16: 1.9}) == (False, 1)  # the fewest heads are best
    assert judge({1: 2.0, 4: 1.8, 16: 1.7}) == (False, 16)  # the most heads are best
    assert judge({1: 1.8 + MARGIN / 2, 4: 1.8, 16: 2.0}) == (False, 4)  # one end within the margin


def test_quick_run_is_undecided_with_equal_parameters():
    result = run_lab("heads-fixed-compute", quick=True).result
    assert result.verdict == "undecided" and "learned too little" in result.undecided
    assert [row[:2] for row in result.rows] == [[1, 64], [4, 16], [16, 4]]
    assert len({row[2] for row in result.rows}) == 1  # A heads of d / A: the same parameters at every A
