"""What every family's config declares to the rest of archlab (training, analysis, the CLI).

The consumers ask three questions; a config answers them instead of being probed by attribute name:

* ``inputs``: what ``forward`` reads: ``"tokens"`` (ids ``[B, N]``), ``"images"`` (``[B, C, H, W]``) or
  ``"features"`` (vectors ``[B, d_in]``);
* ``context_length``: the sequence length the model is built for (``archlab train``'s default sequence
  length, ``archlab inspect``'s default length), or None;
* ``attention_shape``: the self-attention layers as the analysis code counts them (layers, query heads,
  key/value heads, width), or None for a family without attention.

:class:`ModelConfig` gives the answers of a token model without attention, :class:`AttentionConfig` those of
a Transformer; a family overrides what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

INPUTS = ("tokens", "images", "features")


@dataclass(frozen=True)
class AttentionShape:
    """``L`` layers of self-attention with ``A`` query heads and ``G`` key/value heads: queries and keys of width
    ``d_k`` (``d / A`` unless the config sets ``key_width``), values of width ``d_v = d / A``."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    key_width: int | None = None  # d_k where the config sets it apart from d / A (GPTConfig.d_k)

    @property
    def d_v(self) -> int:
        """``d_v = d / A``."""
        return self.d_model // self.n_heads

    @property
    def d_k(self) -> int:
        """``d_k``: ``key_width``, or ``d / A`` when it is None."""
        return self.d_v if self.key_width is None else self.key_width


class ModelConfig:
    """The declarations of a family's config (mixed into its frozen :class:`~archlab.config.Config`)."""

    inputs: ClassVar[str] = "tokens"
    #: Fields that change how the model trains or which kernels run it, not what its weights compute: a run that
    #: starts from pretrained weights (``model.init``, :mod:`archlab.train.run`) may set these and no others.
    tunable: ClassVar[tuple[str, ...]] = ("dropout", "attn_dropout", "backend", "grad_clip")

    @property
    def context_length(self) -> int | None:
        """The sequence length the model is built for, or None when it has none."""
        return None

    @property
    def attention_shape(self) -> AttentionShape | None:
        """The model's self-attention layers, or None when it has none."""
        return None


class AttentionConfig(ModelConfig):
    """The declarations of a Transformer config with fields ``n_layers``, ``n_heads``, ``d_model`` and ``max_len``
    (BERT, the encoder-decoder, ViT, the decoders): multi-head attention, unless the config has a field
    ``n_kv_heads`` (grouped-query attention), and the context ``max_len``."""

    #: the query/key width ``d_k`` of each head where a family sets it apart from ``d / A`` (GPT's field ``d_k``);
    #: None: ``d / A``
    d_k = None

    @property
    def n_kv_heads(self) -> int:
        """``G``, the key/value heads: ``A`` (multi-head attention) unless the config has the field."""
        return self.n_heads

    @property
    def context_length(self) -> int | None:
        return self.max_len

    @property
    def attention_shape(self) -> AttentionShape:
        return AttentionShape(self.n_layers, self.n_heads, self.n_kv_heads, self.d_model, self.d_k)
