"""The inference-levers lab: the card's factors, the alternating-rounds ratio on a fake clock, and the quick run
(random tiny Llama: undecided)."""

import pytest

from archlab.errors import ConfigError
from archlab.hardware import describe_cpu
from archlab.labs import run_lab
from archlab.labs.common import Speedup, alternating_speedup
from archlab.labs.inference_levers import CARD, COLUMNS, INT8_FORMS, QUICK_ROUNDS, card_holds, holds


def test_holds_reads_the_cards_factors():
    assert holds(2.0, "INT8 weights") and not holds(1.9, "speculative decoding")
    assert holds(10.0, "batching") and not holds(9.0, "batching")
    assert holds(2.0, "INT8 weights+activations") and not holds(1.99, "INT8 weights+activations")
    assert set(CARD) == {"KV cache", "INT8 weights", "INT8 weights+activations", "speculative decoding", "batching"}


def test_the_claim_holds_with_every_lever_and_int8_in_either_form():
    every = dict.fromkeys(CARD, True)
    assert card_holds(every)
    for form in INT8_FORMS:  # one INT8 form short of 2x: the other carries the claim
        assert card_holds({**every, form: False})
    assert not card_holds({**every, **dict.fromkeys(INT8_FORMS, False)})
    assert not card_holds({**every, "batching": False})


class FakeClock:
    """A clock that moves only when a fake call runs: each call advances it by its next scripted duration."""

    def __init__(self):
        self.now, self.order = 0.0, []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, durations: list[float]):
        def run():
            self.order.append(name)
            self.now += durations.pop(0)

        return run


def test_alternating_speedup_takes_each_rounds_ratio_on_a_fake_clock():
    clock = FakeClock()
    # a load that comes and goes: the baseline swings 4 s .. 8 s a call, the lever runs at half its round's baseline
    base = clock.call("base", [4.0, 8.0, 5.0, 4.0, 6.0])
    fast = clock.call("fast", [2.0, 4.0, 2.0, 2.5, 3.0])
    up = alternating_speedup(base, fast, 5, base_work=24, fast_work=24, clock=clock)
    assert clock.order == ["base", "fast", "fast", "base"] * 2 + ["base", "fast"]  # the order swaps every round
    assert up.base_rates == (6.0, 3.0, 4.8, 6.0, 4.0)  # 24 tokens / seconds
    assert up.ratios == pytest.approx((2.0, 2.0, 2.5, 1.6, 2.0))
    assert up.median == pytest.approx(2.0) and up.low == pytest.approx(1.6) and up.high == pytest.approx(2.5)
    assert up.straddles(2.0) and not up.straddles(1.5) and not up.straddles(3.0)


def test_alternating_speedup_credits_work_per_call():
    clock = FakeClock()
    up = alternating_speedup(clock.call("base", [1.0, 1.0]), clock.call("fast", [1.0, 1.0]), 2, base_work=10,
                             fast_work=15, clock=clock)  # fmt: skip
    assert up == Speedup((10.0, 10.0), (15.0, 15.0)) and up.median == 1.5


@pytest.mark.parametrize(("kwargs", "named"), [({"rounds": 0}, "rounds=0"), ({"rounds": True}, "rounds=True"),
                                                ({"rounds": 2, "fast_work": 0}, "fast_work=0")])  # fmt: skip
def test_alternating_speedup_rejects_bad_input_before_timing(kwargs, named):
    calls = []
    with pytest.raises(ConfigError, match=named):
        alternating_speedup(lambda: calls.append(1), lambda: calls.append(1), **kwargs)
    assert calls == []


def test_quick_run_is_undecided_with_the_same_tokens():
    result = run_lab("inference-levers", quick=True).result
    assert result.verdict == "undecided" and "quick run" in result.undecided
    assert [r[0] for r in result.rows] == list(CARD)
    assert result.columns == COLUMNS
    same = {r[0]: r[COLUMNS.index("same tokens")] for r in result.rows}
    assert same["speculative decoding"] == "yes"  # draft-and-verify gives the greedy tokens
    assert all(r[1] > 0 and r[2] > 0 and r[4] <= r[3] <= r[5] for r in result.rows)  # lowest <= median <= highest
    assert f"median of {QUICK_ROUNDS} alternating rounds" in result.finding
    straddled = [r[0] for r in result.rows if r[4] < r[6] <= r[5]]
    assert (f"the rounds of {' and '.join(straddled)} straddle" in result.finding) == bool(straddled)
    assert f"this run's CPU: {describe_cpu()}" in result.notes  # INT8's bf16 speed depends on the CPU kind
