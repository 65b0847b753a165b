r"""The original encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

Read top to bottom, the model is the paper's figure 1::

    src_ids [B, M] -> E[src] * sqrt(d) + PE -> Dropout -> Encoder (N blocks)            -> memory [B, M, d]
    tgt_ids [B, N] -> E[tgt] * sqrt(d) + PE -> Dropout -> Decoder (N blocks: masked
                      self-attention, cross-attention to memory, FFN)                    -> h [B, N, d]
    logits [B, N, V] = h E^T        (the pre-softmax linear shares E with both embeddings)

* Encoder block: ``x <- LayerNorm(x + Dropout(SelfAttn(x)))``, ``x <- LayerNorm(x + Dropout(FFN(x)))``
  (post-norm, the paper); ``norm_first=True`` gives pre-norm blocks and a final norm on each stack.
* Decoder block: masked self-attention (query ``i`` sees target positions ``<= i``), then
  encoder-decoder attention (Q from the decoder, K and V from ``memory``), then the FFN.
* ``FFN(x) = max(0, x W_1 + b_1) W_2 + b_2``; ``MultiHead(Q, K, V) = Concat(head_1..head_A) W_O``
  with ``d_k = d_v = d / A``.
* Regularisation: residual dropout ``P_drop`` on every sub-layer's output and on the sums of
  embeddings and positional encodings (label smoothing belongs to the loss, not the model).

Presets: ``transformer-base`` (N=6, d=512, A=8, d_ff=2048, P_drop=0.1), ``transformer-big``
(d=1024, A=16, d_ff=4096, P_drop=0.3), both with a shared 37,000-token vocabulary, and
``transformer-tiny`` for tests and demos.

Decoding: :meth:`EncoderDecoderTransformer.decoder_step` returns the ``step(tokens, cache)``
callable that :mod:`archlab.generation` drives (greedy, sampling, beam search).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.config import (
    Config,
    check_choice,
    check_divisible,
    check_positive,
    check_probability,
    require,
)
from archlab.errors import ShapeError
from archlab.models.base import AttentionConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.attention import padding_mask
from archlab.nn.blocks import Decoder, DecodingCache, Encoder
from archlab.nn.feedforward import FEEDFORWARDS
from archlab.nn.inputs import check_token_ids
from archlab.nn.linear import Linear
from archlab.nn.positional import POSITIONAL_KINDS, build_positional, check_rope_width

StepFn = Callable[[Tensor, DecodingCache | None], Tensor]


@dataclass(frozen=True)
class TransformerConfig(AttentionConfig, Config):
    """Hyper-parameters of the encoder-decoder Transformer; the defaults are the paper's base model.

    Attributes:
        vocab_size: ``V``, one vocabulary shared by source and target (37,000 BPE tokens for EN-DE).
        d_model: ``d``, the width of the residual stream and of every embedding.
        n_heads: ``A``; ``d_k = d_v = d / A``.
        n_layers: ``N``, the number of blocks in the encoder and in the decoder (each).
        d_ff: hidden width of the position-wise FFN.
        dropout: ``P_drop``: residual dropout on each sub-layer's output and on the embedding sums.
        attn_dropout: dropout on the attention weights (the paper uses none).
        positional: ``sinusoidal`` (the paper), ``learned``, ``rope``, ``alibi`` or ``none``.
        max_len: positions of a ``learned`` table (its hard limit); the initial cached length of a
            ``sinusoidal`` one (which grows on demand). Unused by ``rope`` / ``alibi``.
        norm_first: pre-norm blocks (True) or post-norm (False, the paper).
        ffn: the FFN kind (``relu`` is the paper's; see :func:`archlab.nn.build_feedforward`).
        share_embeddings: one matrix ``E [V, d]`` for the source embedding, the target embedding
            and the pre-softmax linear (the paper). False gives three separate matrices.
        scale_embeddings: multiply embeddings by ``sqrt(d)`` before adding positions (the paper).
        pad_id: the padding token id, for data pipelines and losses (``ignore_index``). The model
            does not infer masks from it: pass ``src_mask``.
    """

    vocab_size: int = 37000
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attn_dropout: float = 0.0
    positional: str = "sinusoidal"
    max_len: int = 1024
    norm_first: bool = False
    ffn: str = "relu"
    share_embeddings: bool = True
    scale_embeddings: bool = True
    pad_id: int = 0

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            check_positive(name, getattr(self, name))
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        for name in ("dropout", "attn_dropout"):
            check_probability(name, getattr(self, name))
        check_choice("positional", self.positional, POSITIONAL_KINDS)
        check_rope_width(self.positional, self.d_model, self.n_heads)
        check_choice("ffn", self.ffn, FEEDFORWARDS)
        require(
            0 <= self.pad_id < self.vocab_size, f"pad_id={self.pad_id} must be in [0, vocab_size={self.vocab_size})"
        )

    @property
    def d_k(self) -> int:
        """Per-head width of queries and keys, ``d_k = d / A`` (values have the same, ``d_v = d_k``)."""
        return self.d_model // self.n_heads


class EncoderDecoderTransformer(nn.Module):
    """The Transformer of Vaswani et al. (2017): an encoder stack, a decoder stack, shared embeddings.

    Submodules: ``src_embed``, ``tgt_embed`` (``nn.Embedding [V, d]``), ``src_pos``, ``tgt_pos``
    (positional encodings, one per stack), ``encoder``, ``decoder`` (:class:`archlab.nn.Encoder`,
    :class:`archlab.nn.Decoder`) and ``lm_head`` (``d -> V``, no bias). With
    ``share_embeddings`` the three matrices are one Parameter.

    Initialisation: every weight matrix of the stacks Xavier-uniform with zero biases (as
    ``torch.nn.Transformer``); embeddings ``N(0, 1/d)``, so that after the ``sqrt(d)`` scale each
    token vector has unit-variance entries and the tied logits ``h E^T`` start near unit scale.
    A ``learned`` position table keeps torch's ``N(0, 1)``, the same scale.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.src_embed = nn.Embedding(c.vocab_size, c.d_model)
        self.tgt_embed = self.src_embed if c.share_embeddings else nn.Embedding(c.vocab_size, c.d_model)
        self.src_pos = build_positional(c.positional, d_model=c.d_model, n_heads=c.n_heads, max_len=c.max_len)
        self.tgt_pos = build_positional(c.positional, d_model=c.d_model, n_heads=c.n_heads, max_len=c.max_len)
        self.embed_dropout = nn.Dropout(c.dropout)
        stack = dict(dropout=c.dropout, attn_dropout=c.attn_dropout, ffn=c.ffn, norm_first=c.norm_first)
        self.encoder = Encoder(c.n_layers, c.d_model, c.n_heads, c.d_ff, **stack)
        self.decoder = Decoder(c.n_layers, c.d_model, c.n_heads, c.d_ff, cross_attention=True, **stack)
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, head=True)  # float32 logits from bf16 (head_logits)
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embeddings else 1.0
        self.reset_parameters()
        if c.share_embeddings:
            self.lm_head.weight = self.src_embed.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices and zero biases in the stacks; ``N(0, 1/d)`` embeddings."""
        for stack in (self.encoder, self.decoder):
            for name, p in stack.named_parameters():
                if p.ndim >= 2:
                    nn.init.xavier_uniform_(p)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
        std = self.config.d_model**-0.5
        for embedding in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(embedding.weight, 0.0, std)
        if not self.config.share_embeddings:
            nn.init.xavier_uniform_(self.lm_head.weight)

    # -- input checks (before any computation) ---------------------------------------------------
    def _check_ids(self, name: str, ids: Tensor) -> None:
        check_token_ids(name, ids, self.config.vocab_size)

    @staticmethod
    def _check_mask(
        name: str, mask: Tensor | None, ids_name: str, shape: tuple[int, ...], *, values: bool = False
    ) -> None:
        """Shape (and with ``values``, once per source rather than per decoding step: 0/1 entries) of a padding mask."""
        if mask is None:
            return
        if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ShapeError(f"{name} must be [B, M] = {shape} like {ids_name} (1 = real token), got {got}")
        if values and mask.dtype != torch.bool and not mask.is_meta and not ((mask == 0) | (mask == 1)).all():
            raise ShapeError(f"{name} must hold only 0 (padding) and 1 (real token), or be boolean")

    def _check_memory(self, memory: Tensor, batch: int | None = None) -> None:
        d = self.config.d_model
        ok = isinstance(memory, Tensor) and memory.ndim == 3 and memory.shape[-1] == d
        if not ok or (batch is not None and memory.shape[0] != batch):
            shape = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            expected = f"[B={batch}, M, d_model={d}]" if batch is not None else f"[B, M, d_model={d}]"
            raise ShapeError(f"memory must be the encoder output {expected}, got {shape}")

    # -- the model ---------------------------------------------------------------------------------
    def _embed(self, embedding: nn.Embedding, positional: nn.Module, ids: Tensor, offset: int) -> Tensor:
        """``ids [B, N]`` -> ``Dropout(E[ids] * sqrt(d) + PE[offset : offset + N])``, ``[B, N, d]``."""
        x = embedding(ids) * self.embed_scale
        return self.embed_dropout(positional.add_to_input(x, offset))

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Source ``src_ids [B, M]`` -> ``memory [B, M, d]``.

        ``src_mask [B, M]``: 1 (or True) for real tokens, 0 for padding; padded keys get zero
        attention weight. ``None`` means every token is real.
        """
        self._check_ids("src_ids", src_ids)
        self._check_mask("src_mask", src_mask, "src_ids", tuple(src_ids.shape), values=True)
        mask = None if src_mask is None else padding_mask(src_mask)
        x = self._embed(self.src_embed, self.src_pos, src_ids, 0)
        return self.encoder(x, mask=mask, positional=self.src_pos)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        *,
        memory_mask: Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """Target ``tgt_ids [B, N]`` and ``memory [B, M, d]`` -> ``logits [B, N, V]`` (causal).

        Args:
            memory_mask: ``[B, M]``, the ``src_mask`` the memory was encoded with (1 = real).
            cache: from :meth:`new_cache`. Then ``tgt_ids`` are only the *new* tokens; their
                positions start at ``cache.length`` and the cache is extended in place. Right
                padding of targets needs no mask: causal attention never looks past a position.
        """
        self._check_ids("tgt_ids", tgt_ids)
        self._check_memory(memory, tgt_ids.shape[0])
        self._check_mask("memory_mask", memory_mask, "memory", tuple(memory.shape[:2]))
        if cache is not None and len(cache.blocks) != self.config.n_layers:
            raise ShapeError(
                f"cache has {len(cache.blocks)} layers but the decoder has n_layers={self.config.n_layers}; "
                "make it with model.new_cache()"
            )
        offset = 0 if cache is None else cache.length
        mask = None if memory_mask is None else padding_mask(memory_mask)
        y = self._embed(self.tgt_embed, self.tgt_pos, tgt_ids, offset)
        h = self.decoder(y, memory, memory_mask=mask, positional=self.tgt_pos, cache=cache)
        return self.lm_head(h) if cache is None else cache.project(h, self.lm_head)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """``src_ids [B, M]``, ``tgt_ids [B, N]`` (teacher forcing) -> ``logits [B, N, V]``.

        ``logits[:, i]`` predicts target token ``i + 1`` from ``tgt_ids[:, : i + 1]`` and the source.
        """
        self._check_ids("tgt_ids", tgt_ids)  # both inputs checked before the encoder runs
        memory = self.encode(src_ids, src_mask)
        return self.decode(tgt_ids, memory, memory_mask=src_mask)

    # -- incremental decoding ------------------------------------------------------------------------
    def new_cache(self) -> DecodingCache:
        """An empty :class:`~archlab.nn.DecodingCache` (one self- and one cross-attention KV cache per block),
        the LM head packed in it."""
        return self.decoder.new_cache(output=self.lm_head)

    def decoder_step(self, memory: Tensor, memory_mask: Tensor | None = None) -> StepFn:
        """The decoding protocol of :mod:`archlab.generation`: ``step(tokens [B, n], cache) -> logits [B, n, V]``.

        ``memory [B, M, d]`` and ``memory_mask [B, M]`` are fixed for the whole generation; for
        beam search, expand them per beam first (``repeat_interleave(k, dim=0)``). The first call
        fills the cross-attention caches from ``memory``; :meth:`DecodingCache.reorder` must keep
        each row among the beams of its own source, since ``memory_mask`` is not reordered.
        """
        self._check_memory(memory)
        self._check_mask("memory_mask", memory_mask, "memory", tuple(memory.shape[:2]), values=True)

        def step(tokens: Tensor, cache: DecodingCache | None = None) -> Tensor:
            return self.decode(tokens, memory, memory_mask=memory_mask, cache=cache)

        return step


register_family(
    "transformer",
    TransformerConfig,
    EncoderDecoderTransformer,
    "the original encoder-decoder Transformer (Vaswani et al. 2017)",
    task="seq2seq",
)
register_preset(
    "transformer-base",
    "transformer",
    TransformerConfig(),
    "Vaswani 2017 base: N=6, d=512, A=8, d_ff=2048, P_drop=0.1, shared 37k vocab (paper: 65M params)",
)
register_preset(
    "transformer-big",
    "transformer",
    TransformerConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    "Vaswani 2017 big: N=6, d=1024, A=16, d_ff=4096, P_drop=0.3, shared 37k vocab (paper: 213M params)",
)
register_preset(
    "transformer-tiny",
    "transformer",
    TransformerConfig(vocab_size=128, d_model=64, n_heads=4, n_layers=2, d_ff=256, max_len=256),
    "tiny encoder-decoder for tests and demos: N=2, d=64, A=4, d_ff=256, vocab 128",
)
