"""The six-alignment-scores lab: alignment accuracy on constructed attention, its criterion on constructed scores,
and the quick run (undecided: 12 steps teach no score to reverse)."""

import torch

from archlab.labs import run_lab
from archlab.labs.alignment_scores import SCORES, WORKS, alignment_hits, judge
from archlab.nn.attention import SCORES as ARCHLAB_SCORES


def test_the_deck_six_are_archlab_scores():
    assert sorted(name for name, _ in SCORES) == sorted(ARCHLAB_SCORES)


def test_alignment_hits_on_constructed_attention():
    src_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])  # n = 3 and 2
    alpha = torch.zeros(2, 4, 4)  # [B, M, N]; rows past n (the EOS row, padding) must not count
    for i, j in enumerate([2, 1, 0]):
        alpha[0, i, j] = 1.0  # reversal: row i on source n - 1 - i
    alpha[0, 3, 0] = 1.0
    alpha[1, 0, 0] = 1.0  # wrong: should be 1
    alpha[1, 1, 0] = 1.0  # right
    assert alignment_hits(alpha, src_mask) == (4, 5)


def test_judge_names_the_scores_that_fall_short():
    good = {"exact": 0.95, "alignment": 0.9}
    scores = {name: dict(good) for name, _ in SCORES}
    assert judge(scores) == (True, [], "")
    scores["location"] = {"exact": 0.9, "alignment": WORKS - 0.01}
    assert judge(scores) == (False, ["location"], "")
    nothing = {name: {"exact": 0.1, "alignment": 0.2} for name, _ in SCORES}
    assert "no score learned" in judge(nothing)[2]


def test_quick_run_is_undecided():
    result = run_lab("alignment-scores", quick=True).result
    assert result.verdict == "undecided" and "no score learned" in result.undecided
    assert [row[0] for row in result.rows] == [label for _, label in SCORES]
