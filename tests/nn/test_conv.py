"""Causal dilated convolutions, their queues, and WaveNet's gated residual unit, against torch's conv1d
with explicit left padding and the equations written out (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.nn.conv import (
    CausalConv1d,
    ConvCache,
    ConvQueue,
    GatedResidualUnit,
    doubling_dilations,
    receptive_field,
)

TOL = dict(atol=1e-10, rtol=0)
SHAPES = [(1, 1), (2, 1), (2, 2), (2, 8), (3, 1), (3, 4), (5, 3)]  # (kernel_size k, dilation r)


def conv(k: int, r: int, c_in: int = 3, c_out: int = 5, bias: bool = True, seed: int = 0) -> CausalConv1d:
    torch.manual_seed(seed)
    return CausalConv1d(c_in, c_out, k, dilation=r, bias=bias).double()


@pytest.mark.parametrize("k, r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_is_conv1d_with_left_padding(k, r, bias):
    """``(k - 1) r`` zeros on the left, then torch's dilated conv1d: same length out as in."""
    layer = conv(k, r, bias=bias)
    x = torch.randn(2, 3, 17, dtype=torch.float64)
    expected = F.conv1d(F.pad(x, ((k - 1) * r, 0)), layer.weight, layer.bias, dilation=r)
    out = layer(x)
    assert out.shape == (2, 5, 17)
    torch.testing.assert_close(out, expected, **TOL)
    assert layer.context == (k - 1) * r


@pytest.mark.parametrize("k, r", SHAPES)
def test_causal_conv_equation(k, r):
    """``y_t = b + sum_j W[:, :, j] x_{t - (k-1-j) r}``, with ``x`` = 0 before the start."""
    layer = conv(k, r)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    expected = torch.zeros(2, 5, 12, dtype=torch.float64)
    for t in range(12):
        expected[:, :, t] = layer.bias
        for j in range(k):
            s = t - (k - 1 - j) * r
            if s >= 0:
                expected[:, :, t] += x[:, :, s] @ layer.weight[:, :, j].T
    torch.testing.assert_close(layer(x), expected, **TOL)


@pytest.mark.parametrize("k, r", [(2, 1), (3, 2), (2, 4)])
def test_causal_conv_never_sees_the_future(k, r):
    """Changing inputs from ``t + 1`` on leaves outputs ``0..t`` exactly unchanged."""
    layer = conv(k, r)
    x = torch.randn(1, 3, 20, dtype=torch.float64)
    y = torch.randn(1, 3, 20, dtype=torch.float64)
    for t in range(20):
        mixed = torch.cat([x[..., : t + 1], y[..., t + 1 :]], dim=-1)
        assert torch.equal(layer(mixed)[..., : t + 1], layer(x)[..., : t + 1])


@pytest.mark.parametrize("k, r", SHAPES)
def test_queue_steps_equal_the_full_forward(k, r):
    """One sample at a time through a ConvQueue (the ring wraps many times) == the whole sequence at once."""
    layer = conv(k, r)
    x = torch.randn(2, 3, 30, dtype=torch.float64)
    queue = ConvQueue(layer.context)
    steps = torch.cat([layer(x[..., t : t + 1], queue) for t in range(30)], dim=-1)
    torch.testing.assert_close(steps, layer(x), **TOL)


@pytest.mark.parametrize("k, r", [(2, 1), (3, 2), (2, 8)])
@pytest.mark.parametrize("chunks", [[7, 1, 1, 5, 1, 15], [1, 29], [30]])
def test_queue_chunks_then_steps_equal_the_full_forward(k, r, chunks):
    """A prompt in one chunk, then single samples, then another chunk: the queue carries the history."""
    layer = conv(k, r)
    x = torch.randn(2, 3, 30, dtype=torch.float64)
    queue, outs, t = ConvQueue(layer.context), [], 0
    for n in chunks:
        outs.append(layer(x[..., t : t + n], queue))
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=-1), layer(x), **TOL)


def test_queue_holds_the_last_inputs_oldest_first():
    queue = ConvQueue(3)
    for t in range(5):
        queue.ensure(torch.zeros(1, 1, 1))
        queue.push(torch.tensor([[float(t)]]))
    assert queue.ordered().flatten().tolist() == [2.0, 3.0, 4.0]
    assert queue.taps(dilation=1).flatten().tolist() == [2.0, 3.0, 4.0]  # k = 4, r = 1: x_{t-3}, x_{t-2}, x_{t-1}
    six = ConvQueue(6)
    six.ensure(torch.zeros(1, 1, 1))
    for t in range(9):
        six.push(torch.tensor([[float(t)]]))
    assert six.taps(dilation=3).flatten().tolist() == [3.0, 6.0]  # k = 3, r = 3: x_{t-6}, x_{t-3} for t = 9


def test_conv_cache_reorder_moves_rows():
    layer = conv(2, 2)
    cache = ConvCache([layer.context])
    x = torch.randn(3, 3, 6, dtype=torch.float64)
    layer(x, cache.queues[0])
    before = cache.queues[0].ordered().clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.queues[0].ordered(), before[[2, 2, 0]], atol=0, rtol=0)


def test_gated_residual_unit_equation():
    """``z = tanh(W_f * x) ⊙ sigmoid(W_g * x)``; ``x + W_res z`` and ``W_skip z``; the conv written with F.conv1d."""
    torch.manual_seed(0)
    unit = GatedResidualUnit(residual_channels=4, gate_channels=6, skip_channels=5, kernel_size=2, dilation=4).double()
    x = torch.randn(2, 4, 19, dtype=torch.float64)
    w_f, w_g = unit.conv.weight[:6], unit.conv.weight[6:]
    b_f, b_g = unit.conv.bias[:6], unit.conv.bias[6:]
    padded = F.pad(x, (4, 0))
    z = torch.tanh(F.conv1d(padded, w_f, b_f, dilation=4)) * torch.sigmoid(F.conv1d(padded, w_g, b_g, dilation=4))
    residual = x + F.conv1d(z, unit.residual_proj.weight, unit.residual_proj.bias)
    skip = torch.einsum("sg,bgn->bsn", unit.skip_proj.weight[:, :, 0], z) + unit.skip_proj.bias[:, None]
    out, out_skip = unit(x)
    torch.testing.assert_close(out, residual, **TOL)
    torch.testing.assert_close(out_skip, skip, **TOL)


def test_gated_unit_with_queue_equals_full():
    torch.manual_seed(1)
    unit = GatedResidualUnit(4, 6, 5, kernel_size=3, dilation=2).double()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    queue = ConvQueue(unit.conv.context)
    outs = [unit(x[..., t : t + 1], queue) for t in range(16)]
    full, full_skip = unit(x)
    torch.testing.assert_close(torch.cat([o for o, _ in outs], -1), full, **TOL)
    torch.testing.assert_close(torch.cat([s for _, s in outs], -1), full_skip, **TOL)


def test_receptive_field_and_dilations():
    assert doubling_dilations(4) == (1, 2, 4, 8)
    assert doubling_dilations(3, 2) == (1, 2, 4, 1, 2, 4)
    assert receptive_field(2, doubling_dilations(10, 3)) == 1 + 3 * 1023 == 3070
    assert receptive_field(3, (1, 2, 4)) == 1 + 2 * 7
    assert receptive_field(1, (1, 2)) == 1


def test_receptive_field_is_what_stacked_convs_see():
    """Gradient of the last output of a stack w.r.t. its input: nonzero on exactly the receptive field."""
    torch.manual_seed(0)
    k, dilations = 3, (1, 2, 4)
    layers = [CausalConv1d(2, 2, k, r).double() for r in dilations]
    x = torch.randn(1, 2, 40, dtype=torch.float64, requires_grad=True)
    h = x
    for layer in layers:
        h = layer(h)
    h[0, :, -1].sum().backward()
    seen = (x.grad[0].abs().sum(0) != 0).nonzero().flatten()
    assert seen.tolist() == list(range(40 - receptive_field(k, dilations), 40))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="kernel_size=0 must be > 0"):
        CausalConv1d(2, 2, 0)
    with pytest.raises(ConfigError, match="dilation=0 must be > 0"):
        CausalConv1d(2, 2, 2, dilation=0)
    with pytest.raises(ConfigError, match="gate_channels=0 must be > 0"):
        GatedResidualUnit(4, 0, 4)
    layer = CausalConv1d(3, 2, 2)
    with pytest.raises(ShapeError, match=r"expects \[B, C_in=3, N\], got \(2, 4, 5\)"):
        layer(torch.zeros(2, 4, 5))
    with pytest.raises(ShapeError, match=r"expects \[B, C_in=3, N\], got \(3, 5\)"):
        layer(torch.zeros(3, 5))
    queue = ConvQueue(layer.context)
    layer(torch.zeros(2, 3, 4), queue)
    with pytest.raises(ShapeError, match="queue holds batch 2 x 3 channels, got input of batch 5 x 3"):
        layer(torch.zeros(5, 3, 1), queue)
