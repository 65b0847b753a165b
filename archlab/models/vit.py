r"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

The deck's card: chop the image into fixed ``P x P`` patches, flatten each, project it linearly to
``d``, prepend a learnable ``[class]`` embedding, add learned position embeddings, and run a standard
Transformer encoder; classify from the ``[class]`` token's final state.

Shapes (``C`` channels, image ``H = W``, patch ``P``, ``n_patches = (H / P)^2``, ``N = 1 + n_patches``)::

    pixel_values      [B, C, H, W]
    patches           [B, n_patches, C P P]       flattened, channel-major (c, row, col)
    patch embeddings  [B, n_patches, d]           = patches @ E^T + b,   E in R^{d x C P P}
    tokens            [B, N, d]                   = [x_class; patch embeddings] + E_pos
    hidden states     [B, N, d]                   pre-norm encoder, final LayerNorm
    logits            [B, n_classes]              = head(hidden[:, 0])

The encoder block is the paper's pre-norm one (eq. 2-3): ``z' = z + MSA(LN(z))``,
``z = z' + MLP(LN(z'))`` with a GELU MLP, which is :class:`archlab.nn.Encoder` with
``norm_first=True, ffn="gelu"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_divisible, check_positive, check_probability, require
from archlab.errors import ShapeError
from archlab.models.base import AttentionConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.backends import check_backend
from archlab.nn.blocks import Encoder
from archlab.nn.inputs import check_not_empty
from archlab.nn.positional import LearnedPositionalEncoding

POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class ViTConfig(AttentionConfig, Config):
    """A Vision Transformer; the defaults are ViT-B/16 on ImageNet-1k (``vit-base-16``).

    Attributes:
        image_size: side ``H = W`` of the square input images, in pixels.
        patch_size: side ``P`` of the square patches; must divide ``image_size``.
        n_channels: ``C`` (3 for RGB, 1 for grey).
        d_model, n_heads, n_layers, d_ff: ``d``, ``A``, number of encoder blocks, MLP hidden width.
        dropout: after the position embeddings and on each sub-layer's output.
        attn_dropout: on the attention weights.
        eps: LayerNorm epsilon (1e-12 as in Hugging Face's ViT; the JAX original uses 1e-6).
        n_classes: classes of the linear head on the pooled token; 0 = no head (the model returns
            the pooled features ``[B, d]``).
        pooling: ``cls`` (the paper: the ``[class]`` token's final state) or ``mean`` (average of
            the patch tokens' final states, the paper's "GAP" ablation; the ``[class]`` token is
            still in the sequence so weights stay interchangeable, but it is not read out).
        backend: attention backend (``auto``, ``math``, ``sdpa``).
    """

    image_size: int = 224
    patch_size: int = 16
    n_channels: int = 3
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 3072
    dropout: float = 0.0
    attn_dropout: float = 0.0
    eps: float = 1e-12
    n_classes: int = 1000
    pooling: str = "cls"
    backend: str = "auto"

    inputs = "images"

    @property
    def context_length(self) -> int:
        return self.seq_len

    def validate(self) -> None:
        for name in ("image_size", "patch_size", "n_channels", "d_model", "n_heads", "n_layers", "d_ff", "eps"):
            check_positive(name, getattr(self, name))
        check_divisible("image_size", self.image_size, "patch_size", self.patch_size)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        require(self.n_classes >= 0, f"n_classes={self.n_classes!r} must be >= 0 (0 = no classification head)")
        check_choice("pooling", self.pooling, POOLINGS)
        check_backend(self.backend)

    @property
    def grid_size(self) -> int:
        """Patches per side, ``H / P``."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """``(H / P)^2``."""
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Tokens the encoder sees: ``1 + n_patches`` (the ``[class]`` token first)."""
        return 1 + self.n_patches


class ViT(nn.Module):
    """Vision Transformer: ``pixel_values [B, C, H, W]`` -> ``logits [B, n_classes]`` (or features ``[B, d]``).

    The patch embedding "flatten each ``P x P`` patch, then a linear projection ``E in R^{d x C P P}``"
    is stored as a ``Conv2d(C, d, kernel_size=P, stride=P)``: with stride equal to the kernel the
    windows do not overlap, so each output position is exactly ``E . flatten(patch) + b`` with
    ``E = conv.weight.reshape(d, C * P * P)`` (flattened channel-major). It is the same linear map, in
    the weight layout of the reference checkpoints, and needs no copy of the unfolded patches.

    Attributes:
        patch_embed: the projection ``E`` (``weight [d, C, P, P]``).
        cls_token: ``x_class`` ``[1, 1, d]``.
        positional: learned position embeddings ``E_pos``, ``N = 1 + n_patches`` rows of width ``d``.
        encoder: pre-norm :class:`~archlab.nn.Encoder` ending with a LayerNorm.
        head: ``Linear(d, n_classes)``, absent when ``n_classes == 0``.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.n_channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.positional = LearnedPositionalEncoding(c.seq_len, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = Encoder(
            c.n_layers, c.d_model, c.n_heads, c.d_ff,
            dropout=c.dropout, attn_dropout=c.attn_dropout, ffn="gelu", norm="layernorm",
            norm_first=True, eps=c.eps, backend=c.backend,
        )  # fmt: skip
        self.head = nn.Linear(c.d_model, c.n_classes) if c.n_classes > 0 else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Truncated-normal(0, ``std``) weights, zero biases, unit LayerNorm gains (the reference init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=std)
        nn.init.trunc_normal_(self.positional.embedding.weight, std=std)

    # -- input checks -------------------------------------------------------------------------------
    def check_pixels(self, pixel_values: Tensor) -> Tensor:
        """Raise :class:`ShapeError` unless ``pixel_values`` is a float ``[B, C, H, W]`` of the configured size.

        Returns the pixels cast to the model's dtype (float32 images into a float64 model, say).
        """
        c = self.config
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ShapeError(f"pixel_values must be [B, C, H, W], got {shape}")
        check_not_empty("pixel_values", pixel_values)
        if not pixel_values.is_floating_point():
            raise ShapeError(
                f"pixel_values has dtype {pixel_values.dtype}; pass floating-point pixels (scale integer images first)"
            )
        _, channels, height, width = pixel_values.shape
        if channels != c.n_channels:
            raise ShapeError(f"pixel_values has C={channels} channels, but the model takes n_channels={c.n_channels}")
        if height % c.patch_size or width % c.patch_size:
            raise ShapeError(
                f"image size {height}x{width} is not a multiple of patch_size={c.patch_size}: the image does not "
                "split into whole patches"
            )
        if (height, width) != (c.image_size, c.image_size):
            raise ShapeError(
                f"image size {height}x{width} != the model's image_size={c.image_size} ({c.image_size}x{c.image_size}); "
                f"the learned position table holds exactly {c.n_patches} patch positions: resize the images"
            )
        return pixel_values.to(self.patch_embed.weight.dtype)

    # -- the forward pass, step by step ------------------------------------------------------------
    def embed_patches(self, pixel_values: Tensor) -> Tensor:
        """Linear projection of the flattened patches: ``[B, C, H, W]`` -> ``[B, n_patches, d]``.

        Patches are numbered row by row (raster order), as the position table expects.
        """
        x = self.check_pixels(pixel_values)
        return self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, d, H/P, W/P] -> [B, n_patches, d]

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Encoder input: ``[x_class; x_p^1 E; ...; x_p^n E] + E_pos``, ``[B, C, H, W]`` -> ``[B, 1 + n_patches, d]``."""
        patches = self.embed_patches(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.dropout(self.positional.add_to_input(torch.cat([cls, patches], dim=1)))

    def hidden_states(self, pixel_values: Tensor) -> Tensor:
        """The encoder's final (normalised) states: ``[B, C, H, W]`` -> ``[B, 1 + n_patches, d]``; row 0 is ``[class]``."""
        return self.encoder(self.embed(pixel_values))

    def pool(self, hidden: Tensor) -> Tensor:
        """``[B, N, d]`` -> ``[B, d]``: the ``[class]`` state, or the mean of the patch states."""
        return hidden[:, 0] if self.config.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values [B, C, H, W]`` -> ``logits [B, n_classes]``, or pooled features ``[B, d]`` without a head."""
        features = self.pool(self.hidden_states(pixel_values))
        return features if self.head is None else self.head(features)


register_family(
    "vit", ViTConfig, ViT, "Vision Transformer: image patches as tokens, [class] token, pre-norm encoder",
    task="classification",
)
register_preset(
    "vit-base-16", "vit", ViTConfig(),
    "ViT-B/16: 224x224 RGB, 16x16 patches (196 + [class]), d=768, 12 layers, 12 heads, 1000 classes (~86.6M params)",
)  # fmt: skip
register_preset(
    "vit-large-16", "vit", ViTConfig(d_model=1024, n_heads=16, n_layers=24, d_ff=4096),
    "ViT-L/16: 224x224 RGB, 16x16 patches, d=1024, 24 layers, 16 heads, 1000 classes (~304M params)",
)  # fmt: skip
register_preset(
    "vit-tiny", "vit",
    ViTConfig(image_size=8, patch_size=2, n_channels=1, d_model=64, n_heads=4, n_layers=4, d_ff=128, n_classes=10),
    "a tiny ViT for scikit-learn's 8x8 grey digits: 2x2 patches (16 + [class]), d=64, 4 layers, 4 heads, 10 classes",
)  # fmt: skip
