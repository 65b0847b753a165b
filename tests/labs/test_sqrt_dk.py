import math

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.sqrt_dk import softmax_stats


def test_softmax_stats_against_the_explicit_jacobian():
    scores = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    top, entropy, jac = softmax_stats(scores)
    p = scores.softmax(-1)
    explicit = torch.stack([torch.linalg.matrix_norm(torch.diag(r) - torch.outer(r, r)) for r in p]).mean()
    assert jac == pytest.approx(explicit.item(), rel=1e-12)
    assert top == pytest.approx(p.max(-1).values.mean().item(), rel=1e-12)
    assert entropy == pytest.approx(torch.special.entr(p).sum(-1).mean().item(), rel=1e-12)


def test_uniform_scores_have_the_largest_entropy_and_a_one_hot_has_no_gradient():
    _, entropy, _ = softmax_stats(torch.zeros(1, 8, dtype=torch.float64))
    assert entropy == pytest.approx(math.log(8))
    top, _, jac = softmax_stats(torch.tensor([[1000.0, 0.0, 0.0]], dtype=torch.float64))
    assert top == 1.0 and jac == 0.0


def test_quick_run_shows_unscaled_saturation_and_scaled_stability():
    report = run_lab("sqrt-dk", quick=True)
    rows = {(r[0], r[1]): r for r in report.result.rows}
    assert rows[(4096, "unscaled")][2] == pytest.approx(64, rel=0.05)  # score std = sqrt(d_k)
    assert rows[(4096, "scaled")][2] == pytest.approx(1, rel=0.05)
    assert rows[(4096, "unscaled")][3] > 0.9 > 0.2 > rows[(4096, "scaled")][3]
    assert report.result.verdict == "supported"
