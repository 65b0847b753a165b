r"""The decoder-only language model that GPT and the Llama family share.

One forward pass, whatever the family::

    x_0  = E[tokens] (+ P[positions] for an absolute encoding)        [B, N, d]
    x_l  = x_{l-1} + Attn(Norm(x_{l-1}))   (causal; RoPE / ALiBi inside attention)
    x_l  = x_l     + FFN(Norm(x_l))                                     pre-norm blocks
    logits = Norm_f(x_L) W_head^T                                       [B, N, V]; W_head = E when tied

Attention has ``A`` query heads and ``G`` key/value heads (grouped-query attention; ``G = A`` is
multi-head), values of width ``d_v = d / A`` and queries and keys of width ``d_k = d / A`` unless the config sets
``d_k`` (GPT's field). A family is a config that declares its choices (the attributes
of :class:`DecoderConfig`) and, if it likes, its own initialisation; input checks, positions, the fused
loss, ``logits_to_keep`` and cached decoding are written here once.

Positions and padding. A token's position is the number of real tokens before it. Without an
``attention_mask`` that is ``offset + i`` (``offset`` = what the cache holds); with one it is
``cumsum(attention_mask) - 1`` (:func:`positions_from_mask`), so a left-padded row gets the same
positions, hence the same logits, as the row alone: what batched generation needs. Explicit
``position_ids`` are honoured by the absolute encodings (learned, sinusoidal). RoPE rotates a masked
batch's queries and keys at those positions too (``at_rows``): its scores depend on ``i - j`` only, but
a rotation by the storage index would round differently from the row alone. ALiBi's bias reads the
distance ``i - j``, which a per-row shift leaves unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.errors import ConfigError, ShapeError
from archlab.generation import Step, check_logits_to_keep
from archlab.models.base import AttentionConfig
from archlab.nn.attention import padding_mask
from archlab.nn.blocks import Decoder, DecodingCache
from archlab.nn.dropout import Dropout
from archlab.nn.inputs import check_class_ids, check_token_ids, describe as _describe
from archlab.nn.linear import Linear
from archlab.nn.loss import IGNORE_INDEX, linear_cross_entropy
from archlab.nn.norm import LayerNorm, RMSNorm
from archlab.nn.positional import LearnedPositionalEncoding, build_positional, sinusoid_table

ABSOLUTE_POSITIONAL = ("learned", "sinusoidal")  # added to the input; the ones position_ids act on


class DecoderWidths(AttentionConfig):
    """The derived widths of a decoder-only config with ``d_model``, ``n_heads`` and ``d_ff`` (GPT, Llama,
    Transformer-XL). A config with grouped-query attention declares the field ``n_kv_heads``."""

    @property
    def d_head(self) -> int:
        """``d / A``: every head's value width ``d_v``, and its query/key width unless the config sets ``d_k``."""
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        """The FFN hidden width: ``d_ff``, or ``4 d`` when it is None."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff


class DecoderConfig(DecoderWidths):
    """What :class:`DecoderLM` reads from a family's config (a frozen :class:`~archlab.config.Config`).

    Fields every family has: ``vocab_size``, ``max_len``, ``d_model``, ``n_heads``, ``n_layers``, ``d_ff``,
    ``dropout``, ``attn_dropout``, ``eps``, ``tie_embeddings``, ``backend``. The choices below are
    properties with GPT-2's answers; a family overrides them with fields or properties of its own (GPT's field
    ``d_k`` overrides :class:`~archlab.models.base.AttentionConfig`'s ``d_k = None``, i.e. ``d / A``).
    """

    positional = "learned"  # learned | sinusoidal | rope | alibi | none
    norm = "layernorm"  # layernorm | rmsnorm
    norm_first = True  # pre-norm with a final norm
    ffn = "gelu_tanh"  # see archlab.nn.build_feedforward (swiglu for Llama)
    bias = True  # biases of the attention projections
    rope_theta = 10000.0  # RoPE's base

    @property
    def ffn_bias(self) -> bool:
        """Biases of the FFN projections: as the attention's unless the family says otherwise."""
        return self.bias

    @property
    def context_limit(self) -> int | None:
        """The most positions a sequence may have (prompt + generated), or None when the model has no limit
        (GPT with RoPE, ALiBi or sinusoidal positions). A learned position table ends at ``max_len``."""
        return self.max_len if self.positional == "learned" else None


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, M]`` 0/1 mask of real tokens -> ``[B, M]`` positions ``cumsum - 1`` (padding gets 0).

    ``[[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]]``: a left-padded row's real tokens sit at 0, 1, 2 as if
    unpadded. The same rule as Hugging Face's ``generate``.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class DecoderLM(nn.Module):
    """Decoder-only language model; ``input_ids [B, N] -> logits [B, N, V]``.

    Submodules: ``tok_emb`` (``E``, ``[V, d]``), ``pos`` (the positional encoding), ``decoder``
    (:class:`~archlab.nn.Decoder` of ``L`` causal blocks, final norm included), ``lm_head``
    (``[V, d]``; the same Parameter as ``tok_emb.weight`` when tied). A subclass names its config class
    in ``config_cls`` and may override :meth:`reset_parameters`.
    """

    config_cls: type[DecoderConfig] = DecoderConfig
    #: LoRA targets by name (:func:`archlab.nn.lora.apply_lora`): the row blocks of every attention's fused
    #: ``in_proj`` and its output projection (Hugging Face's q_proj, k_proj, v_proj, o_proj)
    lora_names: ClassVar[dict[str, str]] = {
        "q": "*.attn.in_proj:q", "k": "*.attn.in_proj:k", "v": "*.attn.in_proj:v", "o": "*.attn.out_proj",
    }  # fmt: skip

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = build_positional(
            c.positional, d_model=c.d_model, n_heads=c.n_heads, max_len=c.max_len, rope_base=c.rope_theta, d_k=c.d_k
        )
        self.drop = Dropout(c.dropout)
        self.decoder = Decoder(
            c.n_layers, c.d_model, c.n_heads, c.ffn_width, cross_attention=False, n_kv_heads=c.n_kv_heads, d_k=c.d_k,
            dropout=c.dropout, attn_dropout=c.attn_dropout, ffn=c.ffn, norm=c.norm, norm_first=c.norm_first,
            eps=c.eps, bias=c.bias, ffn_bias=c.ffn_bias, backend=c.backend,
        )  # fmt: skip
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, head=True)  # float32 logits from bf16 (head_logits)
        self.reset_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights ``N(0, 0.02)``, biases 0, norms ``(1, 0)`` (GPT-2's and Llama's ``initializer_range``)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, (LayerNorm, RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, LayerNorm, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self) -> DecodingCache:
        """An empty KV cache for incremental decoding (one per sequence batch), the LM head packed in it.
        Each layer keeps ``k [B, G, M, d_k]``, ``v [B, G, M, d_v]``: ``G`` key/value heads only."""
        return self.decoder.new_cache(output=self.lm_head)

    # -- input checks, before any computation ------------------------------------------------------
    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, cache: DecodingCache | None) -> None:
        c = self.config
        check_token_ids("input_ids", input_ids, c.vocab_size)
        b, n = input_ids.shape
        seen = 0
        if cache is not None:
            if not isinstance(cache, DecodingCache) or len(cache.blocks) != c.n_layers:
                raise ShapeError(f"cache must be a DecodingCache of this model's {c.n_layers} layers (model.new_cache())")
            seen, held = cache.length, cache.blocks[0].self_attn.keys
            if held is not None and held.shape[0] != b:
                raise ShapeError(f"cache holds batch {held.shape[0]} but input_ids has batch {b}")
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, seen + n):
                raise ShapeError(
                    f"attention_mask must be [B, M] = [{b}, {seen + n}] (1 = real token; the cache's {seen} "
                    f"positions + {n} new ones), got {_describe(attention_mask)}"
                )
            if attention_mask.dtype != torch.bool and not ((attention_mask == 0) | (attention_mask == 1)).all():
                raise ShapeError("attention_mask must hold only 0 (padding) and 1 (real token)")

    def _positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, offset: int
    ) -> Tensor | None:
        """The absolute positions ``[B, N]`` of the new tokens, checked against the context limit; ``None``
        when they are simply ``offset .. offset + N - 1`` or the encoding is relative."""
        c = self.config
        b, n = input_ids.shape
        if position_ids is not None:
            if c.positional not in ABSOLUTE_POSITIONAL:
                raise ConfigError(
                    f"position_ids are used only by absolute encodings {ABSOLUTE_POSITIONAL}; this model has "
                    f"positional={c.positional!r}, whose scores depend on i - j only, so padding needs no position ids"
                )
            if not isinstance(position_ids, Tensor) or position_ids.ndim != 2 or position_ids.shape[1] != n \
                    or position_ids.shape[0] not in (1, b) or position_ids.dtype.is_floating_point:  # fmt: skip
                raise ShapeError(
                    f"position_ids must be integer [B, N] = [{b}, {n}] (or [1, {n}]), got {_describe(position_ids)}"
                )
            if int(position_ids.min()) < 0:
                raise ShapeError(f"position_ids holds {int(position_ids.min())}; positions must be >= 0")
        elif attention_mask is not None and c.positional in ABSOLUTE_POSITIONAL:
            position_ids = positions_from_mask(attention_mask)[:, -n:]
        limit = c.context_limit
        if limit is not None:
            last = offset + n - 1 if position_ids is None else int(position_ids.max())
            if last >= limit:
                if c.positional == "learned":
                    raise ShapeError(
                        f"position {last} is past the learned position table of max_len={c.max_len} positions "
                        f"(0..{c.max_len - 1}); a learned encoding cannot extrapolate: shorten the input or use "
                        "'rope' / 'alibi'"
                    )
                raise ShapeError(
                    f"position {last} is past the context of max_len={c.max_len} positions (0..{c.max_len - 1}) "
                    f"this {type(self).__name__} was trained for: shorten the input"
                )
        return position_ids

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: DecodingCache | None = None,
        labels: Tensor | None = None,
        label_smoothing: float = 0.0,
        logits_to_keep: int | None = None,
    ) -> Tensor:
        """Next-token logits; with ``labels``, the training loss :meth:`loss` instead.

        Args:
            input_ids: ``[B, N]`` token ids in ``[0, V)``; with a ``cache``, only the new tokens.
            attention_mask: ``[B, M]`` with ``M`` = cached positions + ``N``; 1 for real tokens, 0 for
                padding (keys that no query may attend). Positions then follow :func:`positions_from_mask`.
            position_ids: ``[B, N]`` (or ``[1, N]``) explicit positions; absolute encodings only.
            cache: a :meth:`new_cache` to decode incrementally; keys and values of ``input_ids`` are
                appended to it.
            labels: ``[B, N]`` next-token targets (``-100`` = ignored): return
                ``self.loss(input_ids, labels, attention_mask=, label_smoothing=)``, the scalar mean loss
                with the LM head fused into the cross-entropy. Going through ``forward`` lets wrappers
                (DDP, FSDP, ``torch.compile``) see the call. Not with ``cache`` or ``position_ids``.
            label_smoothing: ``eps`` of the loss (with ``labels`` only).
            logits_to_keep: ``k``: project only the last ``k`` positions through the LM head, as
                generation does with ``k = 1`` (a prompt's other positions need keys and values, not
                logits: ``N x V`` floats saved, 1.6 GB for ``B = 8``, ``N = 1024``, GPT-2's vocabulary).
                ``None``: every position.

        Returns:
            ``logits [B, N, V]`` (``[B, min(k, N), V]`` with ``logits_to_keep``); ``logits[:, i]``
            predicts the token after ``input_ids[:, i]``. With ``labels``: the scalar loss.
        """
        check_logits_to_keep(logits_to_keep)
        if labels is not None:
            if cache is not None or position_ids is not None or logits_to_keep is not None:
                raise ConfigError(
                    "labels= computes the loss of whole sequences: pass no cache, position_ids or logits_to_keep with it"
                )
            return self.loss(input_ids, labels, attention_mask=attention_mask, label_smoothing=label_smoothing)
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]  # [B, k, d]
        return self.lm_head(h) if cache is None else cache.project(h, self.lm_head)

    def loss(
        self,
        input_ids: Tensor,
        labels: Tensor,
        *,
        attention_mask: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> Tensor:
        """Mean next-token cross-entropy, the LM head fused with the loss (no ``[B, N, V]`` logits are kept).

        Args:
            input_ids: ``[B, N]``.
            labels: ``[B, N]``: ``labels[:, i]`` is the token that should follow ``input_ids[:, i]``
                (already shifted), ``-100`` where no loss is taken (padding).
            attention_mask: as in :meth:`forward`.
            label_smoothing: ``eps`` (see :func:`archlab.nn.loss.linear_cross_entropy`).

        Equal to ``F.cross_entropy(self(input_ids).flatten(0, 1), labels.flatten(), label_smoothing=eps)``;
        faster and far smaller in memory for large vocabularies.
        """
        if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            raise ShapeError(f"labels must have the shape of input_ids {_describe(input_ids)}, got {_describe(labels)}")
        check_class_ids("labels", labels, self.config.vocab_size, ignore_index=IGNORE_INDEX)  # before the decoder runs
        h = self.hidden_states(input_ids, attention_mask=attention_mask)
        if not isinstance(self.lm_head, nn.Linear):  # a quantized head (archlab.quant) has no float weight to fuse
            logits = self.lm_head(h).float().flatten(0, 1)  # [B N, V]
            return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
        return linear_cross_entropy(h, self.lm_head.weight, labels, label_smoothing=label_smoothing)

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """The final (normed) hidden states ``[B, N, d]`` that the LM head reads; arguments as :meth:`forward`."""
        self._check_inputs(input_ids, attention_mask, cache)
        offset = 0 if cache is None else cache.length
        position_ids = self._positions(input_ids, attention_mask, position_ids, offset)
        x = self.tok_emb(input_ids)  # [B, N, d]
        x = self.pos.add_to_input(x, offset) if position_ids is None else x + self._position_vectors(position_ids, x)
        x = self.drop(x)
        if attention_mask is None:
            mask, positional = None, self.pos
        else:  # each row's tokens at its own positions (RoPE: rotated as the row alone would be)
            mask = padding_mask(attention_mask)  # [B, 1, 1, M]
            # an absolute encoding has its positions already (from the mask, or given) and ignores them in at_rows
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]  # all < the mask's length
            positional = self.pos.at_rows(position_ids, end=attention_mask.shape[1])
        return self.decoder(x, mask=mask, causal=True, positional=positional, cache=cache)  # [B, N, d]

    def _position_vectors(self, position_ids: Tensor, x: Tensor) -> Tensor:
        """Absolute position vectors ``[B, N, d]`` at arbitrary ``position_ids [B, N]``."""
        position_ids = position_ids.to(x.device)
        if isinstance(self.pos, LearnedPositionalEncoding):
            return self.pos.embedding(position_ids)
        table = sinusoid_table(int(position_ids.max()) + 1, self.config.d_model, dtype=x.dtype, device=x.device)
        return table[position_ids]

    def decoder_step(self, attention_mask: Tensor | None = None, *, logits_to_keep: int | None = None) -> Step:
        """A step for :mod:`archlab.generation`: ``(tokens [B, n], cache) -> logits [B, n, V]``.

        ``attention_mask [B, n0]`` marks the prompt's real tokens (left padding); every token fed
        after the prompt counts as real. With ``cache=None`` the step expects the whole sequence so far.
        ``logits_to_keep = k``: the step returns the last ``k`` positions' logits only (see :meth:`forward`);
        :func:`~archlab.generation.generate` asks for 1.
        """
        check_logits_to_keep(logits_to_keep)
        if attention_mask is None:
            return lambda tokens, cache=None: self(tokens, cache=cache, logits_to_keep=logits_to_keep)
        if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2:
            raise ShapeError(f"attention_mask must be [B, n0], got {_describe(attention_mask)}")
        prompt = attention_mask

        def step(tokens: Tensor, cache: DecodingCache | None = None) -> Tensor:
            total = (0 if cache is None else cache.length) + tokens.shape[-1]
            grown = total - prompt.shape[1]
            if grown < 0:
                raise ShapeError(f"the step saw {total} positions; the prompt's attention_mask covers {prompt.shape[1]}")
            mask = torch.cat([prompt, prompt.new_ones(prompt.shape[0], grown)], dim=1)
            return self(tokens, attention_mask=mask, cache=cache, logits_to_keep=logits_to_keep)

        return step
