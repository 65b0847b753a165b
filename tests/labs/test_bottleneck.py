"""The RNNenc-vs-RNNsearch length lab: its bucketing and scoring on constructed outputs, its criterion on
constructed chrF curves, and the quick run (undecided: 40 steps teach neither model to copy)."""

import pytest

from archlab.data.synthetic import in_validation
from archlab.labs import VERDICTS, run_lab
from archlab.labs.bottleneck import (
    ALPHABET,
    COLLAPSE,
    LEARNED,
    STABLE,
    buckets,
    copy_pairs,
    judge,
    letter_accuracy,
    score_by_length,
)


def test_buckets_cover_every_length_once():
    assert buckets(list(range(2, 12)), 5) == [(2, 6), (7, 11)]
    assert buckets([2, 30, 5], 7) == [(2, 8), (9, 15), (16, 22), (23, 29), (30, 30)]


def test_letter_accuracy_counts_reference_positions():
    assert letter_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert letter_accuracy([1, 2, 3, 4], [1, 9, 3]) == 0.5  # a short output misses the rest
    assert letter_accuracy([1, 2], [1, 2, 7, 7, 7]) == 1.0  # letters past the reference are not counted


def test_score_by_length_on_constructed_outputs():
    decoded = [("ab", "ab", "ab"), ("abc", "abc", "abc"), ("abcdefgh", "abcdefgh", "abcdxxxx"),
               ("abcdefg", "abcdefg", "")]
    short, long = score_by_length(decoded, [(2, 3), (7, 8)])
    assert (short["n"], short["exact"], short["accuracy"]) == (2, 1.0, 1.0)
    assert short["chrf"] == pytest.approx(100.0)
    assert (long["n"], long["exact"]) == (2, 0.0)
    assert long["accuracy"] == pytest.approx((4 / 8 + 0) / 2)
    assert 0 < long["chrf"] < 60


def test_judge_needs_a_collapse_of_rnnenc_and_a_level_rnnsearch():
    learned = {"RNNenc": 0.9, "RNNsearch": 1.0}
    ok, ratio, undecided = judge({"RNNenc": [95.0, 70.0, 40.0], "RNNsearch": [99.0, 98.0, 97.0]}, learned)
    assert ok and not undecided and ratio["RNNenc"] == pytest.approx(40 / 95)
    assert not judge({"RNNenc": [95.0, 90.0, 95 * COLLAPSE + 1], "RNNsearch": [99.0, 98.0, 97.0]}, learned)[0]
    assert not judge({"RNNenc": [95.0, 70.0, 40.0], "RNNsearch": [99.0, 90.0, 99 * STABLE - 1]}, learned)[0]
    short = judge({"RNNenc": [95.0, 40.0], "RNNsearch": [99.0, 99.0]}, {"RNNenc": LEARNED - 0.01, "RNNsearch": 1.0})[2]
    assert f"RNNenc {LEARNED - 0.01:.2f}" in short and "RNNsearch" not in short


def test_copy_pairs_are_copies_split_by_the_synthetic_rule():
    train, valid = copy_pairs(300, 9, seed=0, split="train"), copy_pairs(50, 9, seed=0, split="valid")
    assert all(s == t and 2 <= len(s) <= 9 and set(s) <= set(ALPHABET) for s, t in train + valid)
    assert not any(in_validation(s) for s, _ in train) and all(in_validation(s) for s, _ in valid)
    assert copy_pairs(50, 9, seed=0, split="valid") == valid  # deterministic


def test_quick_run_is_undecided_with_one_row_per_model_and_bucket():
    result = run_lab("rnnsearch-long-sentences", quick=True).result
    assert result.verdict in VERDICTS
    assert result.verdict == "undecided" and "learned too little" in result.undecided
    assert [row[:2] for row in result.rows] == [[m, r] for m in ("RNNenc", "RNNsearch") for r in ("2-6", "7-11")]
    assert sum(row[2] for row in result.rows) == 2 * 120
