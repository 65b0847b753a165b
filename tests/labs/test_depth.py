"""The depth-table lab: the card's words per cell, the reading of an accuracy as a word, the nets compared, and the
quick run (undecided: 20 layers only)."""

from archlab.labs import run_lab
from archlab.labs.depth import FAILS, TRAINABLE, agrees, build, expected


def test_the_cards_table():
    assert [expected(d, False) for d in (20, 50, 100, 1000)] == ["trainable", "difficult", "fails", "impossible"]
    assert {expected(d, True) for d in (20, 50, 100, 1000)} == {"trainable"}


def test_agrees_on_constructed_accuracies():
    assert agrees("trainable", TRAINABLE, 0.9) and not agrees("trainable", TRAINABLE - 0.01, 0.9)
    assert agrees("fails", FAILS, 0.9) and agrees("impossible", 0.1, 0.9) and not agrees("fails", FAILS + 0.01, 0.9)
    assert agrees("difficult", 0.7, 0.95) and not agrees("difficult", 0.9, 0.95)


def test_plain_and_residual_nets_have_the_same_parameters():
    plain, residual = build(20, False, "layernorm", 0), build(20, True, "layernorm", 0)
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(plain) == shapes(residual)
    assert len(plain.layers) == 20 and plain.config.residual is False and residual.config.residual is True


def test_quick_run_is_undecided():
    result = run_lab("depth-table", quick=True).result
    assert result.verdict == "undecided" and "quick run" in result.undecided
    assert [(r[0], r[1], r[2]) for r in result.rows] == [(20, n, norm) for norm in ("none", "layernorm")
                                                        for n in ("plain", "residual")]
    assert all(0.0 <= r[4] <= 1.0 for r in result.rows)
