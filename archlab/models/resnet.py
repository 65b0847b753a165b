r"""A ResNet-style CNN (He et al. 2015, the CIFAR-10 networks of section 4.2), residual or plain, any depth.

Read top to bottom, for ``images [B, C_in, H, W]``::

    x = relu(BN(conv3x3(images)))                          stem, width w_1
    for each stage s = 1 .. S (widths w_s; stages after the first halve H and W):
        n blocks:  F(x) = BN(conv3x3(relu(BN(conv3x3(x)))))
                   x = relu(F(x) + shortcut(x))   (residual: y = F(x) + x)
                   x = relu(F(x))                 (plain: the same layers, no shortcut)
    logits = mean_{H, W}(x) W_fc + b_fc                   global average pooling, [B, classes]

Depth (weighted layers) = ``2 S n + 2``: with the paper's three stages (16, 32, 64), ``n = 3, 9, 18, 200``
give ResNet-20, 56, 110 and 1202, the card's 20 / 50 / 100 / 1000 layers. The shortcut is the paper's
option A: the identity, and where a stage halves the map and widens it, ``x[:, :, ::2, ::2]``
padded with zero channels, so residual and plain nets have exactly the same parameters.

BatchNorm follows every convolution, as in the paper: it is what makes 20-layer plain nets trainable
at all, and it is the setting of the paper's point that plain nets still degrade with depth while residual
ones do not. In a plain BatchNorm net the first layer's gradient grows exponentially with depth relative
to the output layer's (measured by :func:`archlab.models.mlp.gradient_vs_depth`: ~7x at 20 layers,
~5e6x at 110), while a residual net's stays near 0.5 at every depth. BatchNorm makes the output of a batch depend on the
batch in training mode; call ``model.eval()`` for per-example predictions. Weights: He normal (fan out),
BN ``(gamma, beta) = (1, 0)``.
"""

from __future__ import annotations

import dataclasses
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import Config, check_positive, require
from archlab.errors import ConfigError, ShapeError
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.inputs import check_not_empty


@dataclasses.dataclass(frozen=True)
class ResNetConfig(ModelConfig, Config):
    """A CIFAR-style ResNet (or its plain counterpart).

    Args:
        in_channels: ``C_in`` of the images (3 for RGB, 1 for grey digits).
        n_classes: ``C``, or 0 for no head (``forward`` returns the pooled features ``[B, w_S]``).
        widths: ``(w_1, ..., w_S)``, the channels of each stage; each stage after the first halves H and W.
        blocks_per_stage: ``n``, two-convolution blocks per stage.
        residual: add the shortcut (ResNet) or not (the paper's "plain" net).
    """

    in_channels: int = 3
    n_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 3
    residual: bool = True

    inputs = "images"

    def validate(self) -> None:
        check_positive("in_channels", self.in_channels)
        require(self.n_classes >= 0, f"n_classes={self.n_classes} must be >= 0 (0: no classification head)")
        require(len(self.widths) >= 1, "widths=() must name at least one stage")
        for i, w in enumerate(self.widths):
            check_positive(f"widths[{i}]", w)
        check_positive("blocks_per_stage", self.blocks_per_stage)

    @property
    def depth(self) -> int:
        """Weighted layers: the stem, two per block, the classifier: ``2 S n + 2``."""
        return 2 * len(self.widths) * self.blocks_per_stage + 2

    def with_depth(self, depth: int) -> Self:
        """The same net with ``depth = 2 S n + 2`` weighted layers (20, 56, 110, 1202 for three stages)."""
        per = 2 * len(self.widths)
        if not isinstance(depth, int) or depth < per + 2 or (depth - 2) % per:
            raise ConfigError(
                f"depth={depth!r} must be {per} n + 2 for {len(self.widths)} stages (n >= 1 blocks per stage): "
                f"e.g. {', '.join(str(per * n + 2) for n in (1, 3, 9, 18))}"
            )
        return self.replace(blocks_per_stage=(depth - 2) // per)

    @property
    def downsampling(self) -> int:
        """How many times the map is halved: ``S - 1``; inputs must be at least ``2^(S-1)`` pixels."""
        return len(self.widths) - 1


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, and the option-A shortcut; ``[B, c_in, H, W] -> [B, c_out, H/s, W/s]``."""

    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.residual, self.stride, self.extra_channels = residual, stride, c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:
        """Option A: identity; subsampled and zero-padded to ``c_out`` channels where the block reshapes."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # F(x)
        return F.relu(out + self.shortcut(x) if self.residual else out)


class ResNet(nn.Module):
    """``images [B, C_in, H, W] -> logits [B, C]``.

    Submodules: ``stem`` (conv, BN), ``stages`` (one ``nn.Sequential`` of :class:`BasicBlock` per width), ``head``.
    """

    def __init__(self, config: ResNetConfig):
        super().__init__()
        if not isinstance(config, ResNetConfig):
            raise ConfigError(f"ResNet needs a ResNetConfig, got {type(config).__name__}")
        self.config = c = config
        self.stem = nn.Conv2d(c.in_channels, c.widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c.widths[0])
        stages, c_in = [], c.widths[0]
        for s, width in enumerate(c.widths):
            blocks = []
            for b in range(c.blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride, c.residual))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c_in, c.n_classes) if c.n_classes else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def first_layer(self) -> nn.Module:
        """The layer furthest from the loss."""
        return self.stem

    def check_images(self, images: Tensor) -> Tensor:
        """Raise :class:`ShapeError` unless ``images`` is a float ``[B, C_in, H, W]``; returns it in the model's dtype."""
        c = self.config
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ShapeError(f"images must be [B, C, H, W], got {shape}")
        check_not_empty("images", images)
        if not images.is_floating_point():
            raise ShapeError(f"images have dtype {images.dtype}; pass floating-point pixels (scale integer images first)")
        if images.shape[1] != c.in_channels:
            raise ShapeError(f"images have C={images.shape[1]} channels, but the model takes in_channels={c.in_channels}")
        smallest = 2**c.downsampling
        if min(images.shape[2:]) < smallest:
            raise ShapeError(
                f"images of {images.shape[2]}x{images.shape[3]} pixels are too small for {len(c.widths)} stages, "
                f"which halve the map {c.downsampling} times: need at least {smallest}x{smallest}"
            )
        return images.to(self.stem.weight.dtype)

    def features(self, images: Tensor) -> Tensor:
        """``[B, C_in, H, W] -> [B, w_S]``: the stages, then global average pooling."""
        x = F.relu(self.stem_bn(self.stem(self.check_images(images))))
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C_in, H, W]`` -> ``logits [B, C]`` (features ``[B, w_S]`` without a head)."""
        features = self.features(images)
        return features if self.head is None else self.head(features)


register_family(
    "resnet", ResNetConfig, ResNet, "ResNet-style CNN (CIFAR ResNets of He et al. 2015), residual or plain, any depth",
    task="classification",
)  # fmt: skip
register_preset(
    "resnet-digits", "resnet", ResNetConfig(in_channels=1, widths=(16, 32, 64), blocks_per_stage=3),
    "ResNet-20 for scikit-learn's 1x8x8 digits (maps 8x8 -> 4x4 -> 2x2), 10 classes",
)  # fmt: skip
register_preset(
    "resnet-digits-plain", "resnet", ResNetConfig(in_channels=1, blocks_per_stage=3, residual=False),
    "plain-20 for 1x8x8 digits: resnet-digits without its shortcuts",
)  # fmt: skip
for _n, _depth, _params in ((3, 20, "0.27M"), (9, 56, "0.85M"), (18, 110, "1.7M"), (200, 1202, "19.4M")):
    register_preset(
        f"resnet-{_depth}", "resnet", ResNetConfig(blocks_per_stage=_n),
        f"ResNet-{_depth} for 3x32x32 CIFAR-10 (He et al. 2015, {_params} parameters)",
    )  # fmt: skip
    if _depth <= 110:
        register_preset(
            f"resnet-plain-{_depth}", "resnet", ResNetConfig(blocks_per_stage=_n, residual=False),
            f"plain-{_depth} for CIFAR-10: ResNet-{_depth} without shortcuts (the paper's plain net)",
        )  # fmt: skip
