import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.optimization import fit, mode_strengths


def test_gd_from_zero_reaches_the_pseudo_inverse_solution_and_adam_fits_elsewhere():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    lr = 5 / torch.linalg.matrix_norm(X, ord=2).item() ** 2
    w_gd, w_adam = fit(X, y, "gd", 3000, lr), fit(X, y, "adam", 3000, 1e-2)
    pinv = torch.linalg.lstsq(X, y, driver="gelsd").solution  # minimum-norm least squares, independently
    torch.testing.assert_close(w_gd, pinv, rtol=0, atol=1e-10)
    torch.testing.assert_close(X @ w_adam, y, rtol=0, atol=1e-8)
    assert (w_adam - pinv).norm() > 0.05 * pinv.norm()


def test_mode_strengths_read_the_singular_values_of_the_map():
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    W = U[:, :3] @ torch.diag(s) @ V[:, :3].T
    torch.testing.assert_close(mode_strengths(W, U[:, :3], V[:, :3]), s, rtol=0, atol=1e-12)


def test_quick_optimizer_bias():
    result = run_lab("optimizer-bias", quick=True).result
    (gd, adam) = result.rows
    assert gd[1] < 1e-6 and adam[1] < 1e-6 and gd[2] < 1e-6 and adam[2] > 0.05
    assert result.verdict == "supported"


def test_quick_sequential_learning_half_times_scale_like_one_over_s():
    result = run_lab("sequential-learning", quick=True).result
    half = [row[2] for row in result.rows]
    assert all(isinstance(h, int) for h in half)
    for faster, slower in zip(half, half[1:]):  # s halves from mode to mode: the time roughly doubles
        assert 0.4 < faster / slower < 0.6
    assert all(row[3] == pytest.approx(1, abs=1e-3) for row in result.rows)
    assert result.verdict == "supported"
