"""archlab.nn.recurrent: the cell equations written independently, masking and reversal in ``run_cell``,
right-padding masks, the decoding cache, and the errors for bad input. (Parity with PyTorch's cells
and fused layers is in tests/parity/test_torch_recurrent.py.)"""

from __future__ import annotations

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.nn.recurrent import (
    GRUCell,
    LSTMCell,
    RecurrentCache,
    RecurrentStack,
    RNNCell,
    build_cell,
    build_rnn,
    lengths_from_mask,
    run_cell,
)

F64 = torch.float64


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def big(cell):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-1, 1)
    return cell.to(F64)


def test_lstm_cell_is_the_gate_equations():
    """Gate by gate with separately sliced matrices: i, f, g, o rows in that order."""
    cell = big(LSTMCell(3, 4))
    x, h, c = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    W, U, b1, b2 = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh

    def gate(k):
        rows = slice(4 * k, 4 * k + 4)
        return x @ W[rows].T + b1[rows] + h @ U[rows].T + b2[rows]

    i, f, g, o = sigmoid(gate(0)), sigmoid(gate(1)), torch.tanh(gate(2)), sigmoid(gate(3))
    c_next = f * c + i * g
    h_next, c_out = cell(x, (h, c))
    torch.testing.assert_close(c_out, c_next, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_next, o * torch.tanh(c_next), atol=1e-12, rtol=0)


def test_gru_cell_is_the_gate_equations():
    """r, z, n rows; the reset gate multiplies (W_hn h + b_hn), after the bias."""
    cell = big(GRUCell(3, 4))
    x, h = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    W, U, b1, b2 = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    part = lambda M, v, b, k: v @ M[4 * k : 4 * k + 4].T + b[4 * k : 4 * k + 4]
    r = sigmoid(part(W, x, b1, 0) + part(U, h, b2, 0))
    z = sigmoid(part(W, x, b1, 1) + part(U, h, b2, 1))
    n = torch.tanh(part(W, x, b1, 2) + r * part(U, h, b2, 2))
    torch.testing.assert_close(cell(x, h), (1 - z) * n + z * h, atol=1e-12, rtol=0)


def test_rnn_cell_is_tanh_of_the_affine_sum():
    cell = big(RNNCell(3, 4))
    x, h = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    expected = torch.tanh(x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh)
    torch.testing.assert_close(cell(x, h), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(cell(x), cell(x, torch.zeros(2, 4, dtype=F64)), atol=0, rtol=0)


@pytest.mark.parametrize("cls", [RNNCell, LSTMCell, GRUCell])
def test_default_init_is_uniform_within_one_over_sqrt_h(cls):
    torch.manual_seed(0)
    cell = cls(30, 100)
    for p in cell.parameters():
        assert p.abs().max() <= 0.1 and p.abs().max() > 0.09  # U(-1/sqrt(100), 1/sqrt(100))


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_run_cell_mask_keeps_state_on_padding_in_both_directions(kind):
    """A right-padded row ends in the same state as the row alone, read forwards or backwards."""
    cell = big(build_cell(kind, 3, 5, fused=False))
    x = torch.randn(2, 6, 3, dtype=F64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for reverse in (False, True):
        out, final = run_cell(cell, x, mask=mask, reverse=reverse)
        alone_out, alone_final = run_cell(cell, x[1:, :4], reverse=reverse)
        torch.testing.assert_close(out[1:, :4], alone_out, atol=1e-12, rtol=0)
        pick = (lambda s: s[0][1:]) if kind == "lstm" else (lambda s: s[1:])
        alone = alone_final[0] if kind == "lstm" else alone_final
        torch.testing.assert_close(pick(final), alone, atol=1e-12, rtol=0)
        assert torch.all(out[1, 4:] == 0)


def test_run_cell_reverse_reads_from_the_end():
    cell = big(RNNCell(2, 3))
    x = torch.randn(1, 5, 2, dtype=F64)
    out, _ = run_cell(cell, x, reverse=True)
    out_flipped, _ = run_cell(cell, x.flip(1))
    torch.testing.assert_close(out, out_flipped.flip(1), atol=0, rtol=0)


def test_lengths_from_mask_accepts_right_padding_and_rejects_the_rest():
    assert lengths_from_mask(torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [2, 3]
    assert lengths_from_mask(torch.tensor([[True, False]])).tolist() == [1]
    with pytest.raises(ShapeError, match=r"row 0 is \[0, 1, 1\]: recurrent models need right padding"):
        lengths_from_mask(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ShapeError, match="row 1 is"):
        lengths_from_mask(torch.tensor([[1, 1, 1], [1, 0, 1]]))
    with pytest.raises(ShapeError, match="row 1 has no real token"):
        lengths_from_mask(torch.tensor([[1, 0], [0, 0]]), "src_mask")
    with pytest.raises(ShapeError, match="only True/1"):
        lengths_from_mask(torch.tensor([[1, 2]]))


def test_recurrent_cache_reorders_rows_along_its_batch_axis():
    cache = RecurrentCache(batch_dim=1)
    h = torch.arange(6.0).reshape(1, 3, 2)
    cache.update((h, -h), 4)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.length == 4 and cache.batch_size() == 3
    assert cache.state[0][0, :, 0].tolist() == [4.0, 4.0, 0.0]
    assert cache.state[1][0, :, 0].tolist() == [-4.0, -4.0, -0.0]


def test_errors_name_the_parameter_and_what_is_allowed():
    with pytest.raises(ConfigError, match="kind: unknown value 'lstn' \\(did you mean 'lstm'\\?\\)"):
        build_rnn("lstn", 3, 4)
    with pytest.raises(ConfigError, match="kind: unknown value 'gur'"):
        build_cell("gur", 3, 4)
    with pytest.raises(ConfigError, match="hidden_size=0 must be > 0"):
        RecurrentStack("gru", 3, 0)
    with pytest.raises(ConfigError, match="dropout=0.5 acts between recurrent layers"):
        build_rnn("gru", 3, 4, dropout=0.5)
    cell = LSTMCell(3, 4)
    with pytest.raises(ShapeError, match=r"x must be \[B, d_in=3\]"):
        cell(torch.randn(2, 5))
    with pytest.raises(ShapeError, match=r"state must be \(h, c\), each \[2, 4\]"):
        cell(torch.randn(2, 3), torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"state must be h \[2, 4\], got \(2, 5\)"):
        GRUCell(3, 4)(torch.randn(2, 3), torch.zeros(2, 5))
    with pytest.raises(ShapeError, match=r"state must be h \[2, 2, 4\]"):
        RecurrentStack("gru", 3, 4, 2)(torch.randn(2, 5, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ShapeError, match=r"mask must be a bool \[B, N\] = \[2, 5\]"):
        run_cell(cell, torch.randn(2, 5, 3), mask=torch.ones(2, 4, dtype=torch.bool))
