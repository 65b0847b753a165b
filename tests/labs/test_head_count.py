"""The heads-at-fixed-compute lab: its criteria on constructed per-seed losses, and the quick run (undecided:
20 steps) with its two sweeps (row A: heads at fixed d, equal parameters; row B: a smaller d_k at fixed A)."""

from pathlib import Path

from archlab.labs import get_lab, run_lab
from archlab.labs.head_count import KEY_HEADS, MARGIN, hurts, judge_heads, judge_key_width
from archlab.labs.registry import verdict_label


def test_hurts_wants_a_mean_gap_of_the_margin_and_every_seed_positive():
    assert hurts([MARGIN, MARGIN * 1.5, MARGIN * 0.6])  # mean 1.033 x margin, all positive
    assert not hurts([MARGIN * 0.9, MARGIN * 0.9])  # below the margin on average
    assert not hurts([MARGIN * 4, MARGIN * 2, -0.001])  # a large mean, but one seed goes the other way
    assert hurts([MARGIN])


def test_judge_heads_wants_an_interior_best_with_both_ends_worse_on_every_seed():
    losses = {1: [2.0, 2.1], 2: [1.9, 1.95], 4: [1.8, 1.85], 8: [1.85, 1.9], 16: [1.9, 1.92]}
    supported, best, gaps = judge_heads(losses)
    assert (supported, best) == (True, 4)
    assert [round(g, 6) for g in gaps[1]] == [0.2, 0.25] and [round(g, 6) for g in gaps[16]] == [0.1, 0.07]
    assert judge_heads({1: [1.7], 2: [1.9], 4: [1.8], 16: [1.9]})[:2] == (False, 1)  # the fewest heads are best
    assert judge_heads({1: [2.0], 4: [1.8], 16: [1.7]})[:2] == (False, 16)  # the most heads are best
    assert judge_heads({1: [1.8 + MARGIN / 2], 4: [1.8], 16: [2.0]})[:2] == (False, 4)  # one end within the margin
    # the best by the mean, but one extreme is better than it on one seed: not "hurts"
    assert judge_heads({1: [1.9, 1.79], 4: [1.8, 1.8], 16: [2.0, 2.0]})[:2] == (False, 4)


def test_judge_key_width_compares_the_smallest_with_the_largest_d_k():
    assert judge_key_width({16: [1.80, 1.82], 8: [1.83, 1.81], 4: [1.86, 1.85]}) == (True, [1.86 - 1.80, 1.85 - 1.82])
    assert not judge_key_width({16: [1.80, 1.82], 4: [1.81, 1.83]})[0]  # worse, but by less than the margin
    assert not judge_key_width({16: [1.80, 1.82], 4: [1.90, 1.81]})[0]  # better on one seed


def test_quick_run_is_undecided_with_both_sweeps():
    result = run_lab("heads-fixed-compute", quick=True).result
    assert result.verdict == "undecided" and "learned too little" in result.undecided
    assert verdict_label(result.verdict, quick=True) == "undecided (quick)"
    # [ablation, A, d_k, d_v]: row A at d = 64 (d_k = d_v = d / A), row B at A = 4 (d_v = 16, d_k 16 then 4)
    assert [row[:4] for row in result.rows] == [
        ["A: heads", 1, 64, 64], ["A: heads", 4, 16, 16], ["A: heads", 16, 4, 4],
        ["B: d_k", KEY_HEADS, 16, 16], ["B: d_k", KEY_HEADS, 4, 16],
    ]  # fmt: skip
    params = {(row[0], row[2]): row[4] for row in result.rows}
    assert len({params["A: heads", d] for d in (64, 16, 4)}) == 1  # A heads of d / A: the same parameters at every A
    assert params["B: d_k", 16] == params["A: heads", 16]  # row B's d_k = d / A is row A's A = 4 model
    # W_Q and W_K lose A (16 - 4) rows of d weights + 1 bias in each of the 2 blocks
    assert params["B: d_k", 16] - params["B: d_k", 4] == 2 * 2 * KEY_HEADS * (16 - 4) * (64 + 1)
    assert result.rows[3][5] == result.rows[1][5]  # the same model, the same held-out loss
    # the deck words row A as keeping d_k constant; the lab (like the paper) keeps the compute constant and says so
    assert get_lab("heads-fixed-compute").claim.startswith("At constant computation")
    assert "'while keeping dk constant'" in result.notes and "keeps the computation constant" in result.notes
    deck = Path(__file__).resolve().parents[3] / "shared" / "lessons" / "attention-transformers-deck.txt"
    if deck.is_file():  # ../shared beside the checkout
        assert "while keeping dk constant" in deck.read_text(encoding="utf-8")
