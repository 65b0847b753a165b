r"""Transformer blocks and stacks, post-norm and pre-norm.

Every sub-layer (attention, cross-attention, FFN) sits on the residual stream the same way:

* post-norm (the original paper): ``x <- LayerNorm(x + Dropout(Sublayer(x)))``
* pre-norm (the deck's six steps): ``x <- x + Dropout(Sublayer(LayerNorm(x)))``; a pre-norm stack
  leaves its output unnormalised, so :class:`Encoder` / :class:`Decoder` add one final norm.

:class:`EncoderBlock`: self-attention, then FFN. :class:`DecoderBlock`: masked self-attention,
cross-attention to the encoder memory (omitted in decoder-only models such as GPT), then FFN.
Shapes: ``x [B, N, d]``, ``memory [B, M, d]`` -> ``[B, N, d]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from archlab.config import check_positive, check_probability
from archlab.errors import ConfigError, ShapeError
from archlab.nn.attention import KVCache, MultiHeadAttention, rewind_rows
from archlab.nn.dropout import Dropout
from archlab.nn.feedforward import build_feedforward
from archlab.nn.linear import PackedLinear, is_logits_head
from archlab.nn.norm import build_norm


class _Block(nn.Module):
    """What encoder and decoder blocks share: the residual wiring and the FFN sub-layer."""

    def __init__(
        self, d_model, n_heads, d_ff, *, dropout, attn_dropout, ffn, norm, norm_first, eps, bias, ffn_bias, backend,
        d_k, d_v, n_kv_heads,
    ):  # fmt: skip
        super().__init__()
        check_positive("d_ff", d_ff)
        check_probability("dropout", dropout)
        self.norm_first = norm_first
        self.attn_kwargs = dict(n_kv_heads=n_kv_heads, d_k=d_k, d_v=d_v, bias=bias, dropout=attn_dropout, backend=backend)
        self.attn = MultiHeadAttention(d_model, n_heads, **self.attn_kwargs)
        self.attn_norm = build_norm(norm, d_model, eps)
        self.ffn = build_feedforward(ffn, d_model, d_ff, bias=bias if ffn_bias is None else ffn_bias)
        self.ffn_norm = build_norm(norm, d_model, eps)
        self.dropout = Dropout(dropout)

    def residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """One sub-layer on the residual stream, pre- or post-norm."""
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


_BLOCK_DEFAULTS = dict(
    dropout=0.0, attn_dropout=0.0, ffn="relu", norm="layernorm", norm_first=False, eps=1e-5,
    bias=True, ffn_bias=None, backend="auto", d_k=None, d_v=None, n_kv_heads=None,
)  # fmt: skip


class EncoderBlock(_Block):
    """Self-attention + FFN, each with residual and norm; ``[B, N, d] -> [B, N, d]``.

    Args:
        d_model, n_heads, d_ff: ``d``, ``A``, FFN hidden width.
        dropout: residual dropout ``P_drop`` on each sub-layer's output.
        attn_dropout: dropout on the attention weights.
        ffn: ``relu | gelu | gelu_tanh | silu | glu | geglu | swiglu`` (see ``build_feedforward``).
        norm: ``layernorm | rmsnorm``.
        norm_first: pre-norm (True) or post-norm (False, the paper).
        eps, bias, backend, d_k, d_v, n_kv_heads: passed to the norms and the attention (``bias``: the
            attention's projections; the FFN's too unless ``ffn_bias`` is given).
        ffn_bias: biases in the FFN; None: as ``bias``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, **kwargs):
        super().__init__(d_model, n_heads, d_ff, **{**_BLOCK_DEFAULTS, **kwargs})

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False, positional=None, cache: KVCache | None = None
    ) -> Tensor:
        """``x [B, N, d]``; ``mask`` broadcastable to ``[B, A, N, N]`` (True = may attend)."""
        x = self.residual(x, self.attn_norm, lambda h: self.attn(h, mask=mask, causal=causal, positional=positional, cache=cache))
        return self.residual(x, self.ffn_norm, self.ffn)


@dataclass
class BlockCache:
    """The KV caches of one decoder block: its self-attention and (if any) its cross-attention.

    ``memory`` keeps the encoder output seen on the first call, so later calls may pass
    ``memory=None`` (its keys and values are already in ``cross_attn``).
    """

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)
    memory: Tensor | None = None


class DecoderBlock(_Block):
    """Masked self-attention + cross-attention to ``memory`` + FFN; ``[B, N, d] -> [B, N, d]``.

    With ``cross_attention=False`` it is the block of a decoder-only model (GPT). Arguments as
    :class:`EncoderBlock`.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, cross_attention: bool = True, **kwargs):
        kwargs = {**_BLOCK_DEFAULTS, **kwargs}
        super().__init__(d_model, n_heads, d_ff, **kwargs)
        self.has_cross = cross_attention
        if cross_attention:
            self.cross_attn = MultiHeadAttention(d_model, n_heads, **self.attn_kwargs)
            self.cross_norm = build_norm(kwargs["norm"], d_model, kwargs["eps"])

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        causal: bool = True,
        positional=None,
        cache: BlockCache | None = None,
    ) -> Tensor:
        """``x [B, N, d]``, ``memory [B, M, d]``; ``mask`` for self-attention, ``memory_mask`` (broadcastable
        to ``[B, A, N, M]``) for cross-attention. With a ``cache``, ``x`` holds only the new tokens."""
        if memory is not None and not self.has_cross:  # it would be ignored: no silent decoder-only run
            raise ShapeError("memory was given, but this DecoderBlock has no cross-attention (cross_attention=False): "
                             "pass memory=None, or build it with cross_attention=True")  # fmt: skip
        self_cache = None if cache is None else cache.self_attn
        x = self.residual(
            x, self.attn_norm, lambda h: self.attn(h, mask=mask, causal=causal, positional=positional, cache=self_cache)
        )
        if self.has_cross:
            if memory is None:
                # memory=None would make MultiHeadAttention run *self*-attention on the cross cache.
                if cache is None or cache.memory is None or not cache.cross_attn.length:
                    raise ShapeError("memory=None, but this DecoderBlock has cross-attention: pass the encoder output [B, M, d]")
                memory = cache.memory
            elif cache is not None:
                cache.memory = memory
            cross_cache = None if cache is None else cache.cross_attn
            x = self.residual(x, self.cross_norm, lambda h: self.cross_attn(h, memory, mask=memory_mask, cache=cross_cache))
        return self.residual(x, self.ffn_norm, self.ffn)


class DecodingCache:
    """All the KV caches of a decoder stack, one :class:`BlockCache` per block.

    ``length`` is the number of positions already decoded: the position offset of the next token.
    ``output`` is the model's output projection packed for this decoding run
    (:class:`archlab.nn.linear.PackedLinear`: on a multi-threaded CPU a copy of the ``[V, d]`` LM head,
    the largest matrix a decoding step reads, in the layout few-row products read fastest), or ``None``.
    Models apply it with :meth:`project`.
    """

    def __init__(self, n_layers: int):
        self.blocks = [BlockCache() for _ in range(n_layers)]
        self.output: Callable[[Tensor], Tensor] | None = None

    @property
    def length(self) -> int:
        return self.blocks[0].self_attn.length if self.blocks else 0

    def project(self, h: Tensor, head: nn.Module) -> Tensor:
        """Logits of the decoder output ``h [B, N, d]``: through the packed ``output`` if there is one,
        else through the model's own ``head``. A head with forward hooks (a FLOP counter, a probe) is
        called as the module, so whatever watches it sees the call."""
        observed = bool(head._forward_hooks or head._forward_pre_hooks)
        return head(h) if self.output is None or observed else self.output(h)

    def reorder(self, index: Tensor) -> None:
        """Beam search: batch row ``b`` becomes old row ``index[b]`` in every layer."""
        for block in self.blocks:
            block.self_attn.reorder(index)
            block.cross_attn.reorder(index)
            if block.memory is not None:
                block.memory = block.memory.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (self-attention only)."""
        for block in self.blocks:
            block.self_attn.crop(length)

    def rewind_rows(self, n: Sequence[int]) -> None:
        """Row ``b`` forgets its last ``n[b]`` positions in every block, every row still ending at the last position
        (:func:`archlab.nn.attention.rewind_rows`: one move of all the blocks' rows)."""
        rewind_rows([block.self_attn for block in self.blocks], n)

    def empty_like(self) -> DecodingCache:
        """An empty cache of as many blocks that shares this one's packed ``output`` (no second copy of the head)."""
        cache = DecodingCache(len(self.blocks))
        cache.output = self.output
        return cache

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` positions in every block (self-attention: :meth:`KVCache.drop_front`)."""
        for block in self.blocks:
            block.self_attn.drop_front(n)

    def pad_front(self, n: int) -> None:
        """``n`` positions of zero keys and values before the first, in every block (:meth:`KVCache.pad_front`)."""
        for block in self.blocks:
            block.self_attn.pad_front(n)

    def join(self, other: DecodingCache) -> None:
        """Append ``other``'s batch rows after this cache's (same length: :meth:`KVCache.join`); self-attention only,
        so a decoder-only model's cache. The packed ``output`` stays this cache's."""
        if len(other.blocks) != len(self.blocks):
            raise ShapeError(f"join needs caches of as many blocks, got {len(self.blocks)} and {len(other.blocks)}")
        for mine, theirs in zip(self.blocks, other.blocks, strict=True):
            if mine.memory is not None or theirs.memory is not None or mine.cross_attn.length or theirs.cross_attn.length:
                raise ConfigError("join serves decoder-only caches (no cross-attention memory)")
            mine.self_attn.join(theirs.self_attn)


class Encoder(nn.Module):
    """A stack of ``n_layers`` :class:`EncoderBlock`; pre-norm stacks end with a final norm."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, **block_kwargs):
        super().__init__()
        check_positive("n_layers", n_layers)
        kw = {**_BLOCK_DEFAULTS, **block_kwargs}
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, **kw) for _ in range(n_layers))
        self.final_norm = build_norm(kw["norm"], d_model, kw["eps"]) if kw["norm_first"] else nn.Identity()

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False, positional=None) -> Tensor:
        """``x [B, N, d] -> [B, N, d]``."""
        for block in self.blocks:
            x = block(x, mask=mask, causal=causal, positional=positional)
        return self.final_norm(x)


class Decoder(nn.Module):
    """A stack of ``n_layers`` :class:`DecoderBlock`; pre-norm stacks end with a final norm."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, *, cross_attention: bool = True, **block_kwargs):
        super().__init__()
        check_positive("n_layers", n_layers)
        kw = {**_BLOCK_DEFAULTS, **block_kwargs}
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff, cross_attention=cross_attention, **kw) for _ in range(n_layers)
        )
        self.final_norm = build_norm(kw["norm"], d_model, kw["eps"]) if kw["norm_first"] else nn.Identity()

    def new_cache(self, output: nn.Linear | None = None) -> DecodingCache:
        """An empty cache; ``output`` (the model's LM head) is packed into it for decoding steps, if it is an
        ``nn.Linear`` (a head replaced by another module, e.g. int8 by ``quantize_dynamic``, is called as it is)."""
        cache = DecodingCache(len(self.blocks))
        if isinstance(output, nn.Linear):
            cache.output = PackedLinear(output.weight, output.bias, head=is_logits_head(output))
        return cache

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        causal: bool = True,
        positional=None,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """``x [B, N, d]`` (only the new tokens when a cache is given), ``memory [B, M, d]`` -> ``[B, N, d]``."""
        if cache is not None and (not isinstance(cache, DecodingCache) or len(cache.blocks) != len(self.blocks)):
            raise ShapeError(f"cache must be a DecodingCache of this decoder's {len(self.blocks)} blocks "
                             "(decoder.new_cache())")  # fmt: skip
        for i, block in enumerate(self.blocks):
            block_cache = None if cache is None else cache.blocks[i]
            x = block(x, memory, mask=mask, memory_mask=memory_mask, causal=causal, positional=positional, cache=block_cache)
        return self.final_norm(x)
