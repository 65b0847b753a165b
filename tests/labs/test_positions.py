import math

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.positions import (
    _derangement,
    equivariance_error,
    fit_offset_matrix,
    frequencies,
    offset_matrix,
    rope_scores,
    shift_error,
    wiggles,
)
from archlab.nn import MultiHeadAttention
from archlab.nn.positional import RotaryPositionalEncoding, sinusoid_table


def test_equivariance_error_of_an_elementwise_map_and_of_a_running_sum():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    assert equivariance_error(torch.square, x, perm) == 0.0
    # cumsum: f(x) = [1, 3, 6]; f(x[perm]) = cumsum [3, 1, 2] = [3, 4, 6]; f(x)[perm] = [6, 1, 3]
    assert equivariance_error(lambda t: t.cumsum(1), x, perm) == pytest.approx(3 / 6)


def test_derangement_moves_every_token():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 10):
        perm = _derangement(n, g)
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()


def test_one_attention_layer_is_equivariant_without_a_mask_and_not_with_a_causal_one():
    attn = MultiHeadAttention(16, 2).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    perm = _derangement(9, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert equivariance_error(attn, x, perm) < 1e-14
        assert equivariance_error(lambda t: attn(t, causal=True), x, perm) > 0.05


def test_frequencies_and_the_offset_matrix_against_the_formula():
    d, k, pos = 8, 5, 3
    assert frequencies(d).tolist() == pytest.approx([10000 ** (-2 * i / d) for i in range(d // 2)], rel=1e-15)

    def pe(p: int) -> torch.Tensor:  # the deck's formula, entry by entry
        angle = [p / 10000 ** (2 * (j // 2) / d) for j in range(d)]
        return torch.tensor([math.cos(a) if j % 2 else math.sin(a) for j, a in enumerate(angle)], dtype=torch.float64)

    m = offset_matrix(d, k)
    torch.testing.assert_close(pe(pos) @ m, pe(pos + k), rtol=0, atol=1e-15)
    torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-15)
    blocks = torch.block_diag(*[torch.ones(2, 2)] * (d // 2)).bool()
    assert (m[~blocks] == 0).all()  # one 2x2 rotation per frequency, nothing between frequencies
    torch.testing.assert_close(sinusoid_table(10, d, dtype=torch.float64)[pos], pe(pos), rtol=0, atol=1e-15)


def test_fit_offset_matrix_recovers_the_rotation_over_a_long_window():
    pe = sinusoid_table(4096, 8, dtype=torch.float64)  # the slowest pair (w = 1e-3) turns 4 rad: well conditioned
    m, residual = fit_offset_matrix(pe, 7)
    assert residual < 1e-12
    torch.testing.assert_close(m, offset_matrix(8, 7), rtol=0, atol=1e-12)


def test_rope_scores_against_the_complex_formula():
    d, length = 16, 300
    rope = RotaryPositionalEncoding(d).double()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, d, dtype=torch.float64, generator=g)
    # pair i = features (i, i + d/2) as z = x_i + i x_{i+d/2}; R_r turns it by r theta_i, <a, b> = Re(a conj(b))
    zq, zk = torch.complex(q[:, : d // 2], q[:, d // 2 :]), torch.complex(k[:, : d // 2], k[:, d // 2 :])
    theta = torch.tensor([10000 ** (-i / (d // 2)) for i in range(d // 2)], dtype=torch.float64)
    r = torch.arange(length, dtype=torch.float64)
    expected = (zq[:, None] * zk.conj()[:, None] * torch.exp(1j * r[:, None] * theta)).real.sum(-1)
    torch.testing.assert_close(rope_scores(rope, q, k, length), expected, rtol=0, atol=1e-12)
    assert shift_error(rope, q, k, 1000) < 1e-12


def test_wiggles_counts_upward_steps_and_sign_changes():
    ups, signs = wiggles(torch.tensor([[3.0, 2.0, 2.5, -1.0, 1.0], [4.0, 3.0, 2.0, 1.0, 0.5]]))
    assert ups.tolist() == [0.5, 0.0] and signs.tolist() == [2, 0]


def test_quick_position_needed_shows_equivariance_only_without_positions():
    report = run_lab("position-needed", quick=True)
    errors = {(r[0].split(" (")[0], r[1]): r[3] for r in report.result.rows}
    assert errors[("encoder", "none")] < 1e-12
    assert min(errors[("encoder", k)] for k in ("sinusoidal", "learned", "rope", "alibi")) > 0.01
    assert errors[("causal decoder", "none")] > 0.01
    assert report.result.verdict == "supported"


def test_quick_sinusoidal_offset_fits_the_rotation():
    report = run_lab("sinusoidal-offset", quick=True)
    *long, short = report.result.rows
    assert all(r[2] < 1e-9 and r[3] < 1e-9 and r[4] < 1e-9 for r in long)
    assert short[2] < 1e-9 < 1e-7 < short[4]  # a short window fits as well but does not pin M_k down
    assert report.result.verdict == "supported"


def test_quick_rope_distance_is_relative_not_decaying_and_slow_pairs_keep_their_sign():
    report = run_lab("rope-distance", quick=True)

    def value(case: str, measurement: str) -> float:
        (row,) = [r for r in report.result.rows if r[0].startswith(case) and r[1].startswith(measurement)]
        return row[2]

    assert value("relative position", "max shift error") < 1e-9
    assert value("q = k = ones", "fraction of steps up") > 0.3
    assert value("q = k ~ N(0, I)", "fraction of steps up (min)") > 0.3
    assert value("q, k ~ N(0, I) independent", "RMS score") == pytest.approx(1, abs=0.3)
    assert value("k = R_(r*) q", "argmax") == 256
    assert value("q = k in the slow pairs", "min_r") > 0.5
    assert value("q = k in as many fast pairs", "min_r") < 0
    assert report.result.verdict == "supported"
