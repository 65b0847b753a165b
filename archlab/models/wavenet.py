r"""WaveNet (van den Oord et al. 2016): an autoregressive model of quantised audio built of causal dilated convolutions.

Read top to bottom it is the paper's figure 4, on ``V`` mu-law levels (the deck's atrous convolutions)::

    x_0 = E[q]                                              one-hot input, i.e. an embedding, [B, C, N]
    for l = 1 .. S L:  r_l = 2^((l-1) mod L)                dilations 1, 2, ..., 2^(L-1), in S stacks
        z_l = tanh(W_f,l *_{r_l} x_{l-1}) ⊙ sigmoid(W_g,l *_{r_l} x_{l-1})     gated unit, width k causal conv
        x_l = x_{l-1} + W_res,l z_l                         residual path
        s_l = W_skip,l z_l                                  skip path
    logits = W_2 relu(W_1 relu(sum_l s_l))                  1x1 convs, [B, N, V]; softmax over the V levels

Output ``t`` depends on samples ``t - R + 1 .. t`` only, ``R = 1 + (k - 1) S (2^L - 1)``
(:func:`receptive_field`), and predicts sample ``t + 1``. Generation keeps one queue per layer
(:class:`archlab.nn.conv.ConvCache`): a new sample costs one step through each layer, nothing is recomputed.

Audio in ``[-1, 1]`` becomes ``V = mu + 1`` levels by mu-law companding (:func:`mu_law_encode`,
:func:`mu_law_decode`): ``f(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)``, then uniform quantisation of ``f``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import Config, check_positive, check_probability, require
from archlab.errors import ConfigError, DataError, ShapeError
from archlab.generation import Step
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.conv import ConvCache, GatedResidualUnit, doubling_dilations
from archlab.nn.inputs import check_embedding_dtype


@dataclasses.dataclass(frozen=True)
class WaveNetConfig(ModelConfig, Config):
    """A WaveNet over ``vocab_size`` quantisation levels.

    Args:
        vocab_size: ``V``, the number of levels (256 = 8-bit mu-law, ``mu = 255``).
        residual_channels: ``C``, width of the residual stream.
        gate_channels: ``C_gate``, width of the gated activation ``z``.
        skip_channels: ``C_skip``, width of the skip paths and of the output's hidden layer.
        kernel_size: ``k``, width of each dilated convolution (2 in the paper).
        layers_per_stack: ``L``; dilations ``1 .. 2^(L-1)`` in each stack.
        n_stacks: ``S``, how many times the dilation schedule repeats.
        dropout: on the summed skip connections (0 in the paper).
    """

    vocab_size: int = 256
    residual_channels: int = 32
    gate_channels: int = 32
    skip_channels: int = 64
    kernel_size: int = 2
    layers_per_stack: int = 10
    n_stacks: int = 3
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("vocab_size", "residual_channels", "gate_channels", "skip_channels", "kernel_size",
                     "layers_per_stack", "n_stacks"):  # fmt: skip
            check_positive(name, getattr(self, name))
        require(self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2 (a softmax over levels)")
        require(self.layers_per_stack <= 30, f"layers_per_stack={self.layers_per_stack} must be <= 30 "
                                              f"(dilation 2^{self.layers_per_stack - 1} is past any sequence)")  # fmt: skip
        check_probability("dropout", self.dropout)

    @property
    def dilations(self) -> tuple[int, ...]:
        """``(1, 2, ..., 2^(L-1))`` repeated ``S`` times."""
        return doubling_dilations(self.layers_per_stack, self.n_stacks)

    @property
    def n_layers(self) -> int:
        return self.layers_per_stack * self.n_stacks

    @property
    def receptive_field(self) -> int:
        """:func:`receptive_field` of this config."""
        return receptive_field(self)


def receptive_field(config: WaveNetConfig) -> int:
    """Samples one output sees: ``1 + (k - 1) * S * (2^L - 1)`` (e.g. ``k=2, L=10, S=3`` -> 3070)."""
    c = config  # 1 + (k - 1) * sum of dilations (archlab.nn.conv.receptive_field), summed in closed form
    return 1 + (c.kernel_size - 1) * c.n_stacks * (2**c.layers_per_stack - 1)


# -- mu-law companding -------------------------------------------------------------------------------
def mu_law_encode(audio: Tensor, levels: int = 256) -> Tensor:
    """Audio in ``[-1, 1]`` -> integer levels in ``[0, levels)`` (``mu = levels - 1``), same shape, int64."""
    if not isinstance(audio, Tensor) or not audio.is_floating_point():
        raise DataError(f"audio must be a floating-point tensor in [-1, 1], got {getattr(audio, 'dtype', type(audio))}")
    if levels < 2:
        raise ConfigError(f"levels={levels} must be >= 2")
    if audio.numel() and (audio.abs().max() > 1 or audio.isnan().any()):
        raise DataError(f"audio must lie in [-1, 1]; got values up to |x| = {audio.abs().max().item():g}: normalise it first")
    mu = levels - 1
    f = torch.sign(audio) * torch.log1p(mu * audio.abs()) / math.log1p(mu)  # in [-1, 1]
    return torch.floor((f + 1) / 2 * mu + 0.5).long()


def mu_law_decode(levels_ids: Tensor, levels: int = 256) -> Tensor:
    """Integer levels in ``[0, levels)`` -> audio in ``[-1, 1]`` (float32): the inverse of the companding."""
    if not isinstance(levels_ids, Tensor) or levels_ids.is_floating_point():
        raise DataError("levels_ids must be an integer tensor of mu-law levels")
    if levels < 2:
        raise ConfigError(f"levels={levels} must be >= 2")
    if levels_ids.numel() and (levels_ids.min() < 0 or levels_ids.max() >= levels):
        raise DataError(f"levels_ids must be in [0, {levels}), got {levels_ids.min().item()}..{levels_ids.max().item()}")
    mu = levels - 1
    f = 2 * levels_ids.float() / mu - 1
    return torch.sign(f) * ((1 + mu) ** f.abs() - 1) / mu


# -- the model ---------------------------------------------------------------------------------------
class WaveNet(nn.Module):
    """``input_ids [B, N]`` (levels) -> ``logits [B, N, V]``; ``logits[:, t]`` predicts sample ``t + 1``.

    Submodules: ``embedding`` (``[V, C]``), ``layers`` (``S L`` :class:`~archlab.nn.conv.GatedResidualUnit`),
    ``out1`` and ``out2`` (the 1x1 output convolutions).
    """

    def __init__(self, config: WaveNetConfig):
        super().__init__()
        if not isinstance(config, WaveNetConfig):
            raise ConfigError(f"WaveNet needs a WaveNetConfig, got {type(config).__name__}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.residual_channels)
        self.layers = nn.ModuleList(
            GatedResidualUnit(c.residual_channels, c.gate_channels, c.skip_channels, c.kernel_size, r)
            for r in c.dilations
        )
        self.dropout = nn.Dropout(c.dropout)
        self.out1 = nn.Conv1d(c.skip_channels, c.skip_channels, 1)
        self.out2 = nn.Conv1d(c.skip_channels, c.vocab_size, 1)

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    def new_cache(self) -> ConvCache:
        """Empty per-layer queues for incremental generation (silence before the first sample)."""
        return ConvCache([layer.conv.context for layer in self.layers])

    def _check_inputs(self, input_ids: Tensor, cache: ConvCache | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ShapeError(f"input_ids must be a [B, N] tensor of levels, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ShapeError(f"input_ids must hold integer levels (mu_law_encode the audio), got dtype {input_ids.dtype}")
        check_embedding_dtype("input_ids", input_ids, "levels")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ShapeError(f"input_ids must be [B, N] with B, N >= 1, got shape {tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ShapeError(f"input_ids holds level {low if low < 0 else high}, outside [0, vocab_size={self.config.vocab_size})")
        if cache is not None:
            if not isinstance(cache, ConvCache) or len(cache.queues) != len(self.layers):
                raise ShapeError(f"cache must be a ConvCache of this model's {len(self.layers)} layers (model.new_cache())")
            held = cache.queues[0].buffer
            if held is not None and held.shape[0] != input_ids.shape[0]:
                raise ShapeError(f"cache holds batch {held.shape[0]} but input_ids has batch {input_ids.shape[0]}")

    def forward(self, input_ids: Tensor, *, cache: ConvCache | None = None) -> Tensor:
        """Next-sample logits ``[B, N, V]``.

        With a ``cache`` (:meth:`new_cache`), ``input_ids`` holds only the samples after those already
        fed; the result equals the full-sequence forward's last ``N`` positions.
        """
        self._check_inputs(input_ids, cache)
        x = self.embedding(input_ids).transpose(1, 2)  # [B, C, N]
        skips = 0
        for i, layer in enumerate(self.layers):
            x, skip = layer(x, None if cache is None else cache.queues[i])
            skips = skips + skip  # [B, C_skip, N]
        if cache is not None:
            cache.length += input_ids.shape[1]
        h = self.out1(F.relu(self.dropout(skips)))
        return self.out2(F.relu(h)).transpose(1, 2)  # [B, N, V]

    def decoder_step(self, attention_mask: Tensor | None = None) -> Step:
        """A step for :mod:`archlab.generation`: ``(samples [B, n], cache) -> logits [B, n, V]``.

        Audio has no padding: ``attention_mask`` must be ``None`` (or all ones).
        """
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ConfigError("WaveNet takes no padding: give prompts of equal length without attention_mask")
        return lambda tokens, cache=None: self(tokens, cache=cache)


register_family(
    "wavenet", WaveNetConfig, WaveNet,
    "WaveNet: causal dilated convolutions (dilation doubling per layer), gated units, residual + skip paths",
    task="lm",
)  # fmt: skip
register_preset(
    "wavenet-small", "wavenet", WaveNetConfig(layers_per_stack=8, n_stacks=2),
    "WaveNet on 256 mu-law levels: 2 stacks of dilations 1..128 (receptive field 511 samples), 32/32/64 channels",
)  # fmt: skip
register_preset(
    "wavenet-large", "wavenet",
    WaveNetConfig(residual_channels=128, gate_channels=128, skip_channels=256, layers_per_stack=10, n_stacks=3),
    "WaveNet on 256 mu-law levels: 3 stacks of dilations 1..512 (receptive field 3070 samples), 128/128/256 channels",
)  # fmt: skip
