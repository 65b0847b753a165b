r"""Causal dilated convolutions and WaveNet's gated residual unit, with the queues of fast generation.

A causal convolution of width ``k`` and dilation ``r`` sees the input at ``t, t - r, ..., t - (k-1) r``
and nothing later (the sequence is padded on the left with ``R = (k - 1) r`` zeros)::

    y_t = b + sum_{j=0}^{k-1} W[:, :, j] x_{t - (k-1-j) r}            x [B, C_in, N] -> y [B, C_out, N]

Stacking layers with dilations ``r_1, r_2, ...`` gives a receptive field of
``1 + (k - 1) sum_l r_l`` inputs (:func:`receptive_field`); doubling the dilation per layer
(1, 2, 4, ..., 2^(L-1)) makes it grow exponentially with depth (the deck's atrous convolutions).

Fast generation (Paine et al. 2016, "Fast WaveNet"): each layer keeps a :class:`ConvQueue` of its last
``R`` inputs, so one new sample costs one matrix product per layer and recomputes nothing.

WaveNet's residual unit (:class:`GatedResidualUnit`), ``x [B, C, N]``::

    z = tanh(W_f *_r x) ⊙ sigmoid(W_g *_r x)      gated activation, [B, C_gate, N]
    x_next = x + W_res z                           residual path (1x1 conv), [B, C, N]
    s = W_skip z                                   skip path (1x1 conv), [B, C_skip, N]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import check_positive
from archlab.errors import ShapeError


def receptive_field(kernel_size: int, dilations: list[int] | tuple[int, ...]) -> int:
    """Inputs seen by one output of stacked causal convolutions: ``1 + (k - 1) * sum(dilations)``."""
    return 1 + (kernel_size - 1) * sum(dilations)


def doubling_dilations(layers_per_stack: int, n_stacks: int = 1) -> tuple[int, ...]:
    """``(1, 2, 4, ..., 2^(L-1))`` repeated ``n_stacks`` times (WaveNet's dilation schedule)."""
    return tuple(2**i for i in range(layers_per_stack)) * n_stacks


class ConvQueue:
    """The last ``R = (k - 1) r`` inputs of one causal convolution, for incremental decoding.

    A ring buffer ``buffer [B, C, R]`` whose oldest input sits in slot ``start``; before any input it is
    all zeros (the left padding). A step reads the ``k - 1`` taps ``x_{t-(k-1)r}, ..., x_{t-r}`` at slots
    ``start, start + r, ...`` (mod ``R``), then overwrites the oldest slot with ``x_t``: O(1) work per step.
    """

    def __init__(self, size: int):
        self.size = size
        self.buffer: Tensor | None = None
        self.start = 0

    def ensure(self, like: Tensor) -> None:
        """Create the zero buffer for inputs like ``like [B, C, n]`` (first use), or check it matches."""
        b, c = like.shape[:2]
        if self.buffer is None:
            self.buffer = like.new_zeros(b, c, self.size)
        elif self.buffer.shape[:2] != (b, c):
            raise ShapeError(f"this queue holds batch {self.buffer.shape[0]} x {self.buffer.shape[1]} channels, "
                             f"got input of batch {b} x {c} channels")  # fmt: skip

    def ordered(self) -> Tensor:
        """The held inputs oldest first, ``[B, C, R]``."""
        return self.buffer.roll(-self.start, dims=-1)

    def taps(self, dilation: int) -> Tensor:
        """``[B, C, k - 1]``: the inputs ``R, R - r, ..., r`` steps back, for the next output."""
        slots = (self.start + torch.arange(0, self.size, dilation, device=self.buffer.device)) % self.size
        return self.buffer.index_select(-1, slots)

    def push(self, x_t: Tensor) -> None:
        """Append ``x_t [B, C]``, forgetting the oldest input."""
        self.buffer[..., self.start] = x_t
        self.start = (self.start + 1) % self.size

    def replace(self, latest: Tensor) -> None:
        """Hold exactly ``latest [B, C, R]`` (oldest first)."""
        self.buffer, self.start = latest.clone(), 0  # a copy: push() writes into it

    def reorder(self, index: Tensor) -> None:
        """Beam search: batch row ``b`` becomes old row ``index[b]``."""
        if self.buffer is not None:
            self.buffer = self.buffer.index_select(0, index)


class ConvCache:
    """One :class:`ConvQueue` per causal convolution of a stack; ``length`` = samples seen so far."""

    def __init__(self, sizes: list[int] | tuple[int, ...]):
        self.queues = [ConvQueue(size) for size in sizes]
        self.length = 0

    def reorder(self, index: Tensor) -> None:
        for queue in self.queues:
            queue.reorder(index)


class CausalConv1d(nn.Conv1d):
    """Causal dilated 1-D convolution, ``x [B, C_in, N] -> [B, C_out, N]``; output ``t`` sees inputs ``<= t``.

    Same parameters as ``nn.Conv1d`` (``weight [C_out, C_in, k]``, ``bias [C_out]``). Pass a
    :class:`ConvQueue` of size :attr:`context` to continue a sequence: ``x`` then holds only the new
    inputs, and the queue (the inputs before them) replaces the zero padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, bias: bool = True):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("dilation", dilation)):  # fmt: skip
            check_positive(name, value)
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, bias=bias)

    @property
    def context(self) -> int:
        """``R = (k - 1) r``: how many past inputs an output needs besides the current one."""
        return (self.kernel_size[0] - 1) * self.dilation[0]

    def forward(self, x: Tensor, queue: ConvQueue | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"CausalConv1d expects [B, C_in={self.in_channels}, N], got {shape}")
        R = self.context
        if R == 0:  # width 1: nothing to remember
            return F.conv1d(x, self.weight, self.bias)
        if queue is None:
            return F.conv1d(F.pad(x, (R, 0)), self.weight, self.bias, dilation=self.dilation)
        queue.ensure(x)
        if x.shape[-1] == 1:  # one new sample: k taps, one product, O(1)
            window = torch.cat([queue.taps(self.dilation[0]), x], dim=-1)  # [B, C_in, k]
            queue.push(x[..., 0])
            return F.conv1d(window, self.weight, self.bias)
        full = torch.cat([queue.ordered(), x], dim=-1)  # a chunk (a prompt): the queue is its left padding
        queue.replace(full[..., -R:])
        return F.conv1d(full, self.weight, self.bias, dilation=self.dilation)


class GatedResidualUnit(nn.Module):
    """WaveNet's residual unit: ``x [B, C, N] -> (x + W_res z [B, C, N], W_skip z [B, C_skip, N])``.

    ``z = tanh(W_f *_r x) ⊙ sigmoid(W_g *_r x)``, with ``W_f`` and ``W_g`` fused in one causal
    convolution ``conv`` (output channels: filter first, then gate).
    """

    def __init__(self, residual_channels: int, gate_channels: int, skip_channels: int, kernel_size: int = 2,
                 dilation: int = 1):  # fmt: skip
        super().__init__()
        for name, value in (("residual_channels", residual_channels), ("gate_channels", gate_channels),
                            ("skip_channels", skip_channels)):  # fmt: skip
            check_positive(name, value)
        self.conv = CausalConv1d(residual_channels, 2 * gate_channels, kernel_size, dilation)
        self.residual_proj = nn.Conv1d(gate_channels, residual_channels, 1)
        self.skip_proj = nn.Conv1d(gate_channels, skip_channels, 1)

    def forward(self, x: Tensor, queue: ConvQueue | None = None) -> tuple[Tensor, Tensor]:
        filt, gate = self.conv(x, queue).chunk(2, dim=1)
        z = torch.tanh(filt) * torch.sigmoid(gate)  # [B, C_gate, N]
        return x + self.residual_proj(z), self.skip_proj(z)
