r"""Normalisation, applied to each token's vector on its own (not across the sequence).

LayerNorm on one token ``x in R^d`` (deck)::

    mu = (1/d) sum_i x_i
    sigma = sqrt((1/d) sum_i (x_i - mu)^2 + eps)
    LayerNorm(x) = gamma * (x - mu) / sigma + beta

RMSNorm drops the centring and the offset: ``RMSNorm(x) = g * x / sqrt((1/d) sum_i x_i^2 + eps)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab import kernels
from archlab.config import check_choice, check_positive
from archlab.errors import ShapeError


def layer_norm_equation(x: Tensor, gamma: Tensor, beta: Tensor | None, eps: float = 1e-5) -> Tensor:
    """The deck's four steps written out, ``x [..., d]`` -> ``[..., d]``; the readable reference of :class:`LayerNorm`."""
    mu = x.mean(dim=-1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(dim=-1, keepdim=True) + eps)
    x_hat = (x - mu) / sigma
    return gamma * x_hat + (0.0 if beta is None else beta)


class _TokenNorm(nn.Module):
    def __init__(self, d_model: int, eps: float):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("eps", eps)
        self.d_model, self.eps = d_model, eps

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ShapeError(f"{type(self).__name__} built for d_model={self.d_model}, got input width {x.shape[-1]}")

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


class LayerNorm(_TokenNorm):
    """LayerNorm over the last axis: ``[..., d] -> [..., d]``, gain ``gamma`` and offset ``beta`` (optional).

    Computes :func:`layer_norm_equation` with PyTorch's fused kernel.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(d_model, eps)
        self.weight = nn.Parameter(torch.ones(d_model))  # gamma
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None  # beta

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)


class RMSNorm(_TokenNorm):
    """RMSNorm over the last axis: ``g * x / sqrt(mean(x^2) + eps)``; ``[..., d] -> [..., d]``.

    PyTorch's ``F.rms_norm``, or in float32 or bfloat16 inference on the CPU archlab's one-op kernel
    (:func:`archlab.kernels.rms_norm`: the same equation, another float rounding; PyTorch's CPU op dispatches about
    ten, which at a decoding step's few rows is its whole cost)."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__(d_model, eps)
        self.weight = nn.Parameter(torch.ones(d_model))  # g

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if kernels.rms_norm_serves(x, self.weight):
            return torch.ops.archlab_kernels.rms_norm(x, self.weight, self.eps, kernels.f32_kernel())
        return F.rms_norm(x, (self.d_model,), self.weight, self.eps)


NORMS = ("layernorm", "rmsnorm")


def build_norm(kind: str, d_model: int, eps: float = 1e-5) -> nn.Module:
    """``layernorm`` or ``rmsnorm``."""
    check_choice("norm", kind, NORMS)
    return LayerNorm(d_model, eps) if kind == "layernorm" else RMSNorm(d_model, eps)
