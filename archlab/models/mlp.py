r"""The multilayer perceptron (lesson 8, card 1), plain or residual, at any depth (card 4: 20 to 1000 layers).

Read top to bottom, for ``inputs [B, d_in]``::

    h_0 = x W_in + b_in                                    stem, [B, d]
    F_l(h) = act(norm_l(h)) W_l + b_l                      one layer: norm, ReLU, linear ("pre-activation")
    h_l = F_l(h_{l-1})               (plain)               l = 1 .. L
    h_l = h_{l-1} + F_l(h_{l-1})     (residual: y = F(x) + x, the card's identity shortcut)
    logits = act(norm_f(h_L)) W_out + b_out                [B, C]

With ``norm="none"`` the plain net is the textbook MLP ``Linear-ReLU-Linear-ReLU-...-Linear``
(``L + 2`` linear layers). Plain and residual nets have the same layers and parameters; only the
``+ h_{l-1}`` differs, so they can be compared layer for layer.

Initialisation. Linear layers get He (Kaiming) normal weights, ``std = sqrt(2 / fan_in)``, which keeps the
signal's variance through ReLU layers, and zero biases. A residual branch's weights are further scaled by
``1 / sqrt(L)``: the stream then grows by a factor ``~(1 + 1/L)`` per layer, ``~e`` in all, so a
1000-layer residual net starts finite with or without normalisation (the idea of Fixup and GPT-2's init).

:func:`gradient_vs_depth` measures the card's gradient-flow claim on any family with a ``with_depth``
config (this MLP, :mod:`archlab.models.resnet`): the gradient norm at the first layer and at the output
layer of freshly initialised nets of growing depth. What it shows (tests/models/test_mlp.py):
plain nets lose the first layer's gradient exponentially with depth (vanishing with ``layernorm`` or
``none``: ~1e-6 of the 20-layer value at 1000 layers; exploding relative to the output with
``batchnorm``, as in the ResNet paper's plain nets), residual nets keep it within a small factor.
At 100 layers the plain net's gradient at initialisation is not reliably smaller yet (seed-dependent;
with He init and no norm it is healthy there), but it already fails to train: on digits a 100-layer
plain net stays at chance while the residual one reaches ~97% (the slow test).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_positive, check_probability, require
from archlab.errors import ConfigError, ShapeError
from archlab.models.base import ModelConfig
from archlab.models.registry import build_model, register_family, register_preset
from archlab.nn.inputs import check_not_empty

NORMS = ("none", "layernorm", "batchnorm")


@dataclasses.dataclass(frozen=True)
class MLPConfig(ModelConfig, Config):
    """A plain or residual MLP classifier.

    Args:
        d_in: input features (64 for 8x8 digits).
        n_classes: ``C``.
        d_hidden: ``d``, the width of every hidden layer.
        n_layers: ``L``, hidden ``d -> d`` layers between the stem and the output layer (``L >= 0``).
        residual: ``h_l = h_{l-1} + F_l(h_{l-1})`` instead of ``F_l(h_{l-1})``.
        norm: ``none`` | ``layernorm`` | ``batchnorm``, before each activation.
        dropout: before each hidden and output linear layer.
    """

    d_in: int = 64
    n_classes: int = 10
    d_hidden: int = 128
    n_layers: int = 2
    residual: bool = False
    norm: str = "none"
    dropout: float = 0.0

    inputs = "features"

    def validate(self) -> None:
        for name in ("d_in", "n_classes", "d_hidden"):
            check_positive(name, getattr(self, name))
        require(self.n_layers >= 0, f"n_layers={self.n_layers} must be >= 0")
        check_choice("norm", self.norm, NORMS)
        check_probability("dropout", self.dropout)

    def with_depth(self, depth: int) -> Self:
        """The same MLP with ``depth`` hidden layers (``n_layers``)."""
        return self.replace(n_layers=depth)


def norm_layer(kind: str, width: int) -> nn.Module:
    """``none`` | ``layernorm`` (over the features of each example) | ``batchnorm`` (over the batch)."""
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "batchnorm":
        return nn.BatchNorm1d(width)
    return nn.Identity()


class Layer(nn.Module):
    """``F(h) = act(norm(h)) W + b``, ``[B, d] -> [B, d]``."""

    def __init__(self, d: int, norm: str, dropout: float):
        super().__init__()
        self.norm = norm_layer(norm, d)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.dropout(F.relu(self.norm(h))))


class MLP(nn.Module):
    """``inputs [B, d_in] -> logits [B, C]``.

    Submodules: ``stem`` (``d_in -> d``), ``layers`` (``L`` :class:`Layer`), ``final_norm``, ``head`` (``d -> C``).
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        if not isinstance(config, MLPConfig):
            raise ConfigError(f"MLP needs an MLPConfig, got {type(config).__name__}")
        self.config = c = config
        self.stem = nn.Linear(c.d_in, c.d_hidden)
        self.layers = nn.ModuleList(Layer(c.d_hidden, c.norm, c.dropout) for _ in range(c.n_layers))
        self.final_norm = norm_layer(c.norm, c.d_hidden)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.d_hidden, c.n_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He normal for the stem and hidden layers (residual branches scaled by ``1/sqrt(L)``), zero biases;
        the head keeps PyTorch's default (small logits)."""
        branch_scale = 1 / math.sqrt(self.config.n_layers) if self.config.residual and self.config.n_layers else 1.0
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="relu")
        nn.init.zeros_(self.stem.bias)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.linear.weight, nonlinearity="relu")
            layer.linear.weight.mul_(branch_scale)
            nn.init.zeros_(layer.linear.bias)

    @property
    def first_layer(self) -> nn.Module:
        """The layer furthest from the loss (its gradient is the one that vanishes)."""
        return self.stem

    def forward(self, inputs: Tensor) -> Tensor:
        """``inputs [B, d_in]`` (float) -> ``logits [B, C]``."""
        c = self.config
        if not isinstance(inputs, Tensor) or inputs.ndim != 2 or inputs.shape[1] != c.d_in:
            shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ShapeError(f"inputs must be [B, d_in={c.d_in}], got {shape}")
        check_not_empty("inputs", inputs)
        if not inputs.is_floating_point():
            raise ShapeError(f"inputs must be floating point features, got dtype {inputs.dtype}")
        h = self.stem(inputs.to(self.stem.weight.dtype))  # [B, d]
        for layer in self.layers:
            h = h + layer(h) if c.residual else layer(h)
        return self.head(self.dropout(F.relu(self.final_norm(h))))


# -- the gradient-flow measurement of card 4 -----------------------------------------------------------
class GradientNorms(NamedTuple):
    """``||dL/dW||`` (Frobenius) at the first layer and at the output layer, and their ratio."""

    first: float
    last: float

    @property
    def ratio(self) -> float:
        return self.first / self.last


def gradient_norms(model: nn.Module, inputs: Tensor, targets: Tensor) -> GradientNorms:
    """One cross-entropy backward through ``model`` (train mode); the gradient norms of
    ``model.first_layer.weight`` and ``model.head.weight``. Leaves the gradients in the model."""
    model.train().zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()
    return GradientNorms(model.first_layer.weight.grad.norm().item(), model.head.weight.grad.norm().item())


def gradient_vs_depth(
    config: Config, depths: Iterable[int], inputs: Tensor, targets: Tensor, *, seed: int = 0
) -> dict[int, GradientNorms]:
    """Card 4, measured: ``{depth: GradientNorms}`` for fresh models ``config.with_depth(depth)``.

    Each model is built after ``torch.manual_seed(seed)``; ``config`` is an :class:`MLPConfig` or a
    :class:`~archlab.models.resnet.ResNetConfig` (whose depth is the paper's ``6n + 2``). Compare a
    plain and a residual config: the plain one's ``first`` (or ``ratio``) drifts exponentially with depth.
    """
    if not callable(getattr(config, "with_depth", None)):
        raise ConfigError(f"{type(config).__name__} has no with_depth(); use an MLPConfig or a ResNetConfig")
    out = {}
    for depth in depths:
        torch.manual_seed(seed)
        out[depth] = gradient_norms(build_model(config.with_depth(depth)), inputs, targets)
    return out


register_family("mlp", MLPConfig, MLP, "multilayer perceptron, plain or residual, any depth", task="classification")
register_preset(
    "mlp-digits", "mlp", MLPConfig(d_in=64, n_classes=10, d_hidden=128, n_layers=2),
    "textbook MLP for 8x8 digits: 64 -> 128 -> 128 -> 128 -> 10, ReLU, no norm",
)  # fmt: skip
register_preset(
    "mlp-deep-residual", "mlp", MLPConfig(d_hidden=64, n_layers=100, residual=True, norm="layernorm"),
    "100 residual pre-norm layers of width 64 for 8x8 digits (card 4: trainable)",
)  # fmt: skip
register_preset(
    "mlp-deep-plain", "mlp", MLPConfig(d_hidden=64, n_layers=100, residual=False, norm="layernorm"),
    "the same 100 layers without the shortcut (card 4: fails)",
)  # fmt: skip
register_preset(
    "mlp-1000-residual", "mlp", MLPConfig(d_hidden=64, n_layers=1000, residual=True, norm="layernorm"),
    "1000 residual pre-norm layers of width 64 for 8x8 digits (card 4's 1000 layers)",
)  # fmt: skip
