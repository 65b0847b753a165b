"""What every family's config declares to the rest of archlab (training, analysis, the CLI).

The consumers ask three questions; a config answers them instead of being probed by attribute name:

* ``inputs``: what ``forward`` reads: ``"tokens"`` (ids ``[B, N]``), ``"images"`` (``[B, C, H, W]``) or
  ``"features"`` (vectors ``[B, d_in]``);
* ``context_length``: the sequence length the model is built for (``archlab train``'s default sequence
  length, ``archlab inspect``'s default length), or None;
* ``attention_shape``: the self-attention layers as the analysis code counts them (layers, query heads,
  key/value heads, width), or None for a family without attention.

:class:`ModelConfig` gives the answers of a token model without attention; a family overrides what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

INPUTS = ("tokens", "images", "features")


@dataclass(frozen=True)
class AttentionShape:
    """``L`` layers of self-attention with ``A`` query heads and ``G`` key/value heads of width ``d_k = d / A``."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int

    @property
    def d_head(self) -> int:
        """``d_k = d / A``."""
        return self.d_model // self.n_heads


class ModelConfig:
    """The declarations of a family's config (mixed into its frozen :class:`~archlab.config.Config`)."""

    inputs: ClassVar[str] = "tokens"

    @property
    def context_length(self) -> int | None:
        """The sequence length the model is built for, or None when it has none."""
        return None

    @property
    def attention_shape(self) -> AttentionShape | None:
        """The model's self-attention layers, or None when it has none."""
        return None
