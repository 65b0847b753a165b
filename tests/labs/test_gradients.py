import math

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.gradients import (
    D_IN,
    HIDDEN,
    backprop_through_time,
    clipped,
    mlp_stack,
    per_step_factor,
    recurrent_stack,
)
from archlab.models.mlp import gradient_norms


def test_per_step_factor_recovers_a_geometric_sequence_and_skips_underflow():
    steps = range(3, 40)
    r, r2 = per_step_factor(steps, [2.5 * 0.7**k for k in steps])
    assert r == pytest.approx(0.7, rel=1e-12) and r2 == pytest.approx(1.0, abs=1e-12)
    r, _ = per_step_factor([0, 1, 2, 3], [1.0, 3.0, 9.0, 0.0])  # 0: underflowed, left out
    assert r == pytest.approx(3.0, rel=1e-12)
    r, r2 = per_step_factor(range(6), [1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    assert r2 < 0.2  # no exponential trend: a poor fit


def test_pytorch_init_plain_and_residual_stacks_share_weights_and_differ_only_by_the_shortcut():
    plain, residual = mlp_stack(4, False, "pytorch", seed=3), mlp_stack(4, True, "pytorch", seed=3)
    for a, b in zip(plain.parameters(), residual.parameters(), strict=True):
        assert torch.equal(a, b)
    bound = 1 / math.sqrt(plain.config.d_hidden)  # nn.Linear's U(-1/sqrt(d), 1/sqrt(d))
    assert all(layer.linear.weight.abs().max() <= bound for layer in plain.layers)
    he = mlp_stack(4, False, "he", seed=3)
    assert he.layers[0].linear.weight.std().item() == pytest.approx(math.sqrt(2 / he.config.d_hidden), rel=0.1)


def test_plain_stack_gradient_is_the_product_of_the_layer_jacobians():
    """dL/dW_in = x^T (dL/dh_0), dL/dh_0 = dL/dh_L J_L ... J_1, J_l = W_l^T diag(h_{l-1} > 0) for F(h) = relu(h) W."""
    model = mlp_stack(6, False, "pytorch", seed=1).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 64, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 9, 2])
    first = gradient_norms(model, x, y).first
    with torch.no_grad():
        hs = [x @ model.stem.weight.T + model.stem.bias]
        for layer in model.layers:
            hs.append(torch.relu(hs[-1]) @ layer.linear.weight.T + layer.linear.bias)
        logits = torch.relu(hs[-1]) @ model.head.weight.T + model.head.bias
        grad = (logits.softmax(-1) - torch.nn.functional.one_hot(y, 10)) / len(y)  # dL/dlogits of the mean CE
        grad = (grad @ model.head.weight) * (hs[-1] > 0)  # dL/dh_L
        for layer, h in zip(reversed(model.layers), reversed(hs[:-1]), strict=True):
            grad = (grad @ layer.linear.weight) * (h > 0)
    assert first == pytest.approx((grad.T @ x).norm().item(), rel=1e-10)


def test_backprop_through_time_matches_the_elman_jacobian_product():
    """``dh_N/dx_t = diag(1 - h_N^2) W_hh ... diag(1 - h_t^2) W_ih``, ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)``."""
    rnn = recurrent_stack("rnn", 2.0, None, seed=0)
    g = torch.Generator().manual_seed(1)
    b, n = 3, 12
    x = torch.randn(b, n, D_IN, generator=g, dtype=torch.float64)
    v = torch.randn(b, HIDDEN, generator=g, dtype=torch.float64)
    curve = backprop_through_time(rnn, x, v)
    w_ih, w_hh, bias = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    expected = torch.zeros(b, n, dtype=torch.float64)
    with torch.no_grad():
        for row in range(b):
            h, hs = torch.zeros(HIDDEN, dtype=torch.float64), []
            for t in range(n):
                h = torch.tanh(w_ih @ x[row, t] + w_hh @ h + bias)
                hs.append(h)
            u = v[row]  # u^T = v^T dh_N/dh_t, walked back from t = N
            for t in reversed(range(n)):
                u = u * (1 - hs[t] ** 2)
                expected[row, n - 1 - t] = (u @ w_ih).norm()
                u = u @ w_hh
    torch.testing.assert_close(curve, expected.pow(2).mean(0).sqrt(), rtol=1e-10, atol=0)
    std = rnn.weight_hh_l0.std().item() * math.sqrt(HIDDEN)
    assert std == pytest.approx(2.0, rel=0.05)  # the gain asked for


def test_gate_bias_opens_the_lstm_forget_gate_and_clipping_caps_the_global_norm():
    lstm = recurrent_stack("lstm", 1 / math.sqrt(3), 1.0, seed=0)
    forget = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[HIDDEN : 2 * HIDDEN]
    assert torch.all(forget == 1.0)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert clipped(params, 1.0) == pytest.approx((5.0, 1.0), rel=1e-5)
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5)  # same direction
    assert clipped(params, 10.0) == pytest.approx((1.0, 1.0), rel=1e-5)  # below the cap: untouched


def test_quick_residual_highway_plain_vanishes_residual_trains():
    report = run_lab("residual-highway", quick=True)
    rows = {(r[0], r[1], r[2]): r for r in report.result.rows}
    assert rows["plain", "PyTorch", 100][4] < 1e-20  # ~0.41^95 of the 5-layer gradient
    assert 0.5 < rows["residual", "He", 100][4] < 2  # the highway: about the 5-layer gradient
    assert rows["residual", "PyTorch", 100][4] > 1  # the +1 without branch scaling: grows
    assert rows["plain", "He", 100][6] <= 0.5 and rows["residual", "He", 100][6] >= 0.8  # test accuracy
    assert report.result.verdict == "supported"


def test_quick_rnn_gradients_vanish_explode_and_gated_cells_decay_at_pytorch_init():
    report = run_lab("rnn-gradients", quick=True)
    rows = {(r[0], r[1], r[2]): r for r in report.result.rows}
    small, large = rows["rnn", "0.58", "PyTorch"], rows["rnn", "3.00", "PyTorch"]
    assert small[5] < 0.7 and small[7] > 0.99  # exponential decay
    assert large[5] > 1.2 and large[7] > 0.95  # exponential growth
    assert large[8] > 1e3 and large[9] <= 5.0 + 1e-9  # clipped to RNNConfig.grad_clip
    for cell in ("lstm", "gru"):
        assert rows[cell, "3.00", "PyTorch"][5] < 1.1  # gated cells tame the large gain
        assert 0.55 < rows[cell, "0.58", "PyTorch"][5] < 0.7  # ... but decay nearly as fast at PyTorch's init
        assert rows[cell, "0.58", "+1"][5] > 0.75  # unless the gate is biased open
    assert report.result.verdict == "not supported"
    not_met = report.result.finding.split("Not met: ")[1]  # what failed, in words, not a check's name
    assert not_met.startswith("LSTM and GRU at PyTorch's gate biases taking >= 3x the RNN's steps per decade")
    assert "gated keep it" not in not_met
