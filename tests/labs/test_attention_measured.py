"""The measured-attention lab: the three kinds compute attention (against softmax(QK^T/sqrt(d_k))V in float64), the
power-law fit and the criterion on constructed numbers, and the quick run (undecided: short sequences)."""

import math

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.attention_measured import KINDS, LONG, WINDOW, attention_call, judge, power_fit


def test_every_kind_is_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, WINDOW, 8, generator=g, dtype=torch.float64) for _ in range(3))
    reference = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1) @ v
    for kind in KINDS:  # the window covers every key at this length, so sparse is full attention too
        torch.testing.assert_close(attention_call(kind, q, k, v), reference, rtol=1e-10, atol=1e-10)


def test_power_fit_recovers_an_exact_power_law():
    ns = [1000, 2000, 8000]
    c, p = power_fit(ns, [3e-9 * n**2 for n in ns])
    assert p == pytest.approx(2.0) and c == pytest.approx(3e-9)


def test_judge_on_constructed_numbers():
    standard, flash = {"time": 4.0, "peak": 1e9}, {"time": 1.0, "peak": 1e7}
    assert judge(standard, flash, 1.3e9) == (True, [True, True, True])
    assert judge(standard, {"time": 2.5, "peak": 1e7}, 1.3e9)[1] == [False, True, True]
    assert judge(standard, flash, 3e9)[1] == [True, True, False]


def test_quick_run_is_undecided_and_standard_memory_grows_fastest():
    result = run_lab("attention-measured", quick=True).result
    assert result.verdict == "undecided" and "quick run" in result.undecided
    measured = [r for r in result.rows if r[3] == "measured" and r[6] == "measured"]
    assert len(measured) == 3 and result.rows[-1][0] == LONG
    first, last = measured[0], measured[-1]
    assert last[2] / first[2] > 8  # standard: N^2 from 512 to 2048 tokens is 16x
    assert last[2] > 10 * last[5]  # the score matrix dwarfs the fused kernel's workspace at 2048 tokens
