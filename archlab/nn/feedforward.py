r"""Position-wise feed-forward networks: the "feature mixing" half of a block.

* ``FeedForward``: ``FFN(x) = act(x W_1 + b_1) W_2 + b_2``; with ReLU this is the paper's
  ``max(0, x W_1 + b_1) W_2 + b_2`` (``d = 512``, ``d_ff = 2048``).
* ``GatedFeedForward`` (Shazeer 2020): ``(act(x W) * (x V)) W_2``; GLU (sigmoid), GeGLU (GELU),
  SwiGLU (SiLU).

Shapes: ``[B, N, d] -> [B, N, d]``, hidden ``[B, N, d_ff]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import check_choice, check_positive, check_probability
from archlab.errors import ShapeError
from archlab.nn.dropout import Dropout
from archlab.nn.linear import Linear

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def _check_width(ffn: nn.Module, x: Tensor) -> None:
    """ShapeError unless ``x`` is ``[..., d_model]`` (a shape check only: FFNs run in every decoding step)."""
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != ffn.d_model or not x.is_floating_point():
        got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{type(ffn).__name__} built for d_model={ffn.d_model}: x must be float [..., d_model], "
                         f"got {got}")  # fmt: skip


class FeedForward(nn.Module):
    """``act(x W_1 + b_1) W_2 + b_2``; ``[B, N, d] -> [B, N, d]``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("d_ff", d_ff)
        check_choice("activation", activation, list(ACTIVATIONS))
        check_probability("dropout", dropout)
        self.activation, self.d_model = activation, d_model
        self.act = ACTIVATIONS[activation]
        self.w1 = Linear(d_model, d_ff, bias=bias)
        self.w2 = Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_width(self, x)
        return self.w2(self.dropout(self.act(self.w1(x))))


GATES = {"glu": "sigmoid", "geglu": "gelu", "swiglu": "silu"}


class GatedFeedForward(nn.Module):
    """``(act(x W) * (x V)) W_2``: GLU / GeGLU / SwiGLU; ``[B, N, d] -> [B, N, d]``.

    ``W`` and ``V`` are fused into one ``[2 d_ff, d]`` projection ``w_in`` (rows: ``W`` then ``V``).
    """

    def __init__(self, d_model: int, d_ff: int, gate: str = "swiglu", dropout: float = 0.0, bias: bool = False):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("d_ff", d_ff)
        check_choice("gate", gate, list(GATES))
        check_probability("dropout", dropout)
        self.gate, self.d_model, self.d_ff = gate, d_model, d_ff
        self.act = ACTIVATIONS[GATES[gate]]
        self.w_in = Linear(d_model, 2 * d_ff, bias=bias)
        self.w2 = Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    def fused_rows(self) -> dict[str, dict[str, tuple[int, int]]]:
        """The row blocks of ``w_in`` ``[W; V]``: ``gate`` and ``up`` (LoRA targets them by name, :mod:`archlab.nn.lora`)."""
        return {"w_in": {"gate": (0, self.d_ff), "up": (self.d_ff, 2 * self.d_ff)}}

    def forward(self, x: Tensor) -> Tensor:
        _check_width(self, x)
        gate, value = self.w_in(x).chunk(2, dim=-1)
        return self.w2(self.dropout(self.act(gate) * value))


FEEDFORWARDS = ("relu", "gelu", "gelu_tanh", "silu", "glu", "geglu", "swiglu")


def build_feedforward(kind: str, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True) -> nn.Module:
    """By name: plain ``relu | gelu | gelu_tanh | silu`` or gated ``glu | geglu | swiglu``."""
    check_choice("ffn", kind, FEEDFORWARDS)
    if kind in GATES:
        return GatedFeedForward(d_model, d_ff, gate=kind, dropout=dropout, bias=bias)
    return FeedForward(d_model, d_ff, activation=kind, dropout=dropout, bias=bias)
