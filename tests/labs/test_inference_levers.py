"""The inference-levers lab: the card's factors, the timer, and the quick run (random tiny Llama: undecided)."""

from archlab.hardware import describe_cpu
from archlab.labs import run_lab
from archlab.labs.inference_levers import CARD, best_time, holds


def test_holds_reads_the_cards_factors():
    assert holds(2.0, "INT8 weights") and not holds(1.9, "speculative decoding")
    assert holds(10.0, "batching") and not holds(9.0, "batching")
    assert set(CARD) == {"KV cache", "INT8 weights", "speculative decoding", "batching"}


def test_best_time_runs_each_round():
    calls = []
    assert best_time(lambda: calls.append(1), 3) >= 0.0 and len(calls) == 3


def test_quick_run_is_undecided_with_the_same_tokens():
    result = run_lab("inference-levers", quick=True).result
    assert result.verdict == "undecided" and "quick run" in result.undecided
    assert [r[0] for r in result.rows] == list(CARD)
    same = {r[0]: r[6] for r in result.rows}
    assert same["speculative decoding"] == "yes"  # draft-and-verify gives the greedy tokens
    assert all(r[1] > 0 and r[2] > 0 for r in result.rows)
    assert f"this run's CPU: {describe_cpu()}" in result.notes  # INT8's bf16 speed depends on the CPU kind
