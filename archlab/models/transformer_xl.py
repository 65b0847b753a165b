r"""Transformer-XL (Dai et al. 2019): a GPT that reads a long text segment by segment, with memory.

Each layer ``l`` keeps the hidden states it received for the previous segment, ``m^{l-1}`` ``[B, M, d]``,
and attends over them as extra, earlier keys; gradients stop there (``SG``)::

    h~    = [SG(m^{l-1}) ; h^{l-1}]                          [B, M + N, d]
    q     = h^{l-1} W_q,   k = h~ W_k,   v = h~ W_v          A heads of width d_k = d / A
    x     = h^{l-1} + Attn(q, k, v)   (causal: query i sees keys j <= M + i)
    h^l   = x + FFN(LN(x))                                    pre-norm, as GPT-2 (LN before Attn too)
    m'^{l-1} = last M of [m^{l-1} ; h^{l-1}]                  the memory for the next segment

Positions are relative, so a key's score does not depend on which segment it came from. Dai's
relative score of query ``i`` and key ``j`` at distance ``i - j`` (``R`` sinusoidal, not learned)::

    A_ij = q_i^T k_j  +  q_i^T W_R R_{i-j}  +  u^T k_j  +  v^T W_R R_{i-j}
         = (q_i + u)^T k_j + (q_i + v)^T W_R R_{i-j}              (a) + (c),  (b) + (d)

with ``u, v in R^{A x d_k}`` learned and ``W_R`` learned; the score is then scaled by ``1/sqrt(d_k)``.
The position half is an additive bias of :func:`~archlab.nn.attend`, so every backend that takes a
score bias works (``sdpa``, ``chunked``, ``sliding``, ...). ``positional="rope"`` instead rotates
queries and keys by their positions in ``[memory; segment]`` (RoPE is relative too).

``TransformerXL.forward(input_ids, memory) -> (logits, new memory)`` runs one segment;
:class:`TransformerXLLM` (the class trained for task ``lm``) runs a ``[B, T]`` window segment by segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_divisible, check_positive, check_probability, require
from archlab.errors import ConfigError, ShapeError
from archlab.models.decoder import DecoderWidths
from archlab.models.registry import register_family, register_preset
from archlab.nn.attention import MultiHeadAttention, attend, broadcast
from archlab.nn.backends import TILED, check_backend, parse_backend
from archlab.nn.feedforward import FEEDFORWARDS, build_feedforward
from archlab.nn.inputs import check_token_ids
from archlab.nn.linear import Linear
from archlab.nn.norm import LayerNorm
from archlab.nn.positional import RotaryPositionalEncoding, check_rope_width, sinusoid_table

XL_POSITIONAL = ("relative", "rope")


@dataclass(frozen=True)
class TransformerXLConfig(DecoderWidths, Config):
    """A Transformer-XL language model (GPT-style pre-norm blocks).

    Args:
        vocab_size: ``V``.
        d_model: ``d``.
        n_heads: ``A``; ``d_k = d / A``.
        n_layers: ``L``.
        d_ff: FFN hidden width; ``None`` means ``4 d``.
        segment_len: ``N``, tokens per segment when :class:`TransformerXLLM` splits a window.
        mem_len: ``M``, hidden states kept per layer for the next segment (0: no memory).
        positional: ``relative`` (Dai 2019, with ``u``, ``v``) or ``rope``.
        dropout: on the embeddings and each sub-layer's output.
        attn_dropout: on the attention weights.
        ffn: FFN kind (see ``archlab.nn.build_feedforward``).
        eps: LayerNorm epsilon.
        tie_embeddings: the LM head is the token embedding matrix.
        backend: attention backend (see :func:`archlab.nn.attend`); ``relative`` needs one that adds
            a score bias: ``auto``, ``math``, ``sdpa``, ``chunked``, ``sliding``, ``bigbird``.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int | None = None
    segment_len: int = 64
    mem_len: int = 64
    positional: str = "relative"
    dropout: float = 0.1
    attn_dropout: float = 0.0
    ffn: str = "gelu"
    eps: float = 1e-5
    tie_embeddings: bool = True
    backend: str = "auto"

    @property
    def context_length(self) -> int:
        return self.segment_len

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "segment_len"):
            check_positive(name, getattr(self, name))
        if self.d_ff is not None:
            check_positive("d_ff", self.d_ff)
        require(self.mem_len >= 0, f"mem_len={self.mem_len} must be >= 0 (0: no memory)")
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        check_choice("positional", self.positional, XL_POSITIONAL)
        check_choice("ffn", self.ffn, FEEDFORWARDS)
        check_backend(self.backend)
        check_positive("eps", self.eps)
        check_rope_width(self.positional, self.d_model, self.n_heads)
        kind = parse_backend(self.backend).kind
        if self.positional == "relative" and kind not in ("auto", "math", "sdpa", *TILED):
            raise ConfigError(
                f"positional='relative' adds a score bias, which backend={self.backend!r} cannot take; use "
                f"auto, math, sdpa, {', '.join(TILED)}, or positional='rope'"
            )


class XLOutput(NamedTuple):
    """``logits [B, N, V]`` and the new ``memory``: one ``[B, M', d]`` tensor per layer (detached)."""

    logits: Tensor
    memory: tuple[Tensor, ...]


class XLAttention(MultiHeadAttention):
    """Attention of a segment ``x [B, N, d]`` over ``context = [memory; x]`` ``[B, M + N, d]``, causal,
    with Dai's relative positions (``pos_proj`` = ``W_R``, ``u``, ``v``) or RoPE."""

    def __init__(self, d_model: int, n_heads: int, *, positional: str, dropout: float, backend: str):
        super().__init__(d_model, n_heads, bias=False, dropout=dropout, backend=backend)
        self.positional = positional
        if positional == "relative":
            self.pos_proj = Linear(d_model, n_heads * self.d_k, bias=False)  # W_R
            self.u = nn.Parameter(torch.zeros(n_heads, self.d_k))  # content bias
            self.v = nn.Parameter(torch.zeros(n_heads, self.d_k))  # position bias
        else:
            self.rope = RotaryPositionalEncoding(self.d_k)

    def position_scores(self, q: Tensor, n_keys: int) -> Tensor:
        """Terms (b) + (d): ``(q_i + v)^T W_R R_{(M+i)-j}`` for every query ``i`` and key ``j``; ``[B, A, N, M+N]``.

        Computed once per distance ``t = 0 .. M+N-1`` (``[B, A, N, M+N]``) and gathered at
        ``t = M + i - j`` (future keys, ``t < 0``, are masked by causality; they read ``t = 0``).
        """
        n = q.shape[-2]
        r = sinusoid_table(n_keys, self.d_model, dtype=q.dtype, device=q.device)  # R_t, t = 0..M+N-1: [M+N, d]
        r = self.pos_proj(r).view(n_keys, self.n_heads, self.d_k).transpose(0, 1)  # [A, M+N, d_k]
        by_distance = (q + self.v[:, None, :]) @ r.transpose(-2, -1)  # [B, A, N, t]
        i = torch.arange(n, device=q.device)[:, None] + (n_keys - n)
        j = torch.arange(n_keys, device=q.device)[None, :]
        distance = (i - j).clamp_min(0).expand(*by_distance.shape[:-1], n_keys)
        return by_distance.gather(-1, distance)

    def extra_score_flops(self, batch: int, n_queries: int, n_keys: int) -> int:
        """FLOPs of the position term ``(q_i + v)^T (W_R R_t)`` beyond ``Q K^T`` (for
        :mod:`archlab.analysis.flops`): ``2 B A N (M+N) d_k``; ``W_R`` itself is a Linear, counted where it runs."""
        return 2 * batch * self.n_heads * n_queries * n_keys * self.d_k if self.positional == "relative" else 0

    def forward(self, x: Tensor, context: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """``x [B, N, d]`` (normed segment), ``context [B, M+N, d]`` (normed memory and segment) -> ``[B, N, d]``."""
        q = self._project_q(x)  # [B, A, N, d_k]
        k, v = self._project_kv(context)  # [B, A, M+N, d_k], [B, A, M+N, d_v]
        n_mem = context.shape[1] - x.shape[1]
        bias = None
        if self.positional == "relative":
            bias = self.position_scores(q, context.shape[1]) / math.sqrt(self.d_k)
            q = q + self.u[:, None, :]
        else:
            q, k = self.rope.rotate(q, n_mem), self.rope.rotate(k, 0)
        attention = attend if self.backend_module is None else self.backend_module
        out = attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.d_v))


class XLBlock(nn.Module):
    """``x = h + Attn(LN([SG(m); h]))``, ``h' = x + FFN(LN(x))``; ``h [B, N, d]``, ``memory [B, M, d]``."""

    def __init__(self, c: TransformerXLConfig):
        super().__init__()
        self.attn_norm = LayerNorm(c.d_model, c.eps)
        self.attn = XLAttention(
            c.d_model, c.n_heads, positional=c.positional, dropout=c.attn_dropout, backend=c.backend
        )
        self.ffn_norm = LayerNorm(c.d_model, c.eps)
        self.ffn = build_feedforward(c.ffn, c.d_model, c.ffn_width)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, h: Tensor, memory: Tensor | None, *, mask: Tensor | None = None) -> Tensor:
        context = h if memory is None else torch.cat([memory.detach(), h], dim=1)  # SG(m)
        normed = self.attn_norm(context)
        x = h + self.drop(self.attn(normed[:, -h.shape[1] :], normed, mask=mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class TransformerXL(nn.Module):
    """One segment at a time: ``(input_ids [B, N], memory) -> XLOutput(logits [B, N, V], new memory)``.

    Submodules: ``tok_emb`` (``[V, d]``), ``blocks`` (``L`` :class:`XLBlock`), ``final_norm``,
    ``lm_head`` (tied to ``tok_emb`` by default). No absolute position embedding.
    """

    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        if not isinstance(config, TransformerXLConfig):
            raise ConfigError(f"TransformerXL needs a TransformerXLConfig, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(XLBlock(c) for _ in range(c.n_layers))
        self.final_norm = LayerNorm(c.d_model, c.eps)
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, head=True)  # float32 logits from bf16 (head_logits)
        self.reset_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: weights ``N(0, 0.02)``, biases 0, LayerNorm ``(1, 0)``, ``u = v = 0``; the
        projections into the residual stream get ``0.02 / sqrt(2 L)``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, 0.0, 0.02 / math.sqrt(2 * self.config.n_layers))
            nn.init.normal_(block.ffn.w2.weight, 0.0, 0.02 / math.sqrt(2 * self.config.n_layers))

    def _check_inputs(self, input_ids: Tensor, memory, mask) -> None:
        c = self.config
        check_token_ids("input_ids", input_ids, c.vocab_size)
        b, n = input_ids.shape
        n_mem = 0
        if memory is not None:
            if not isinstance(memory, Sequence) or len(memory) != c.n_layers:
                raise ShapeError(
                    f"memory must hold one [B, M, d] tensor per layer ({c.n_layers}), as returned by forward"
                )
            n_mem = memory[0].shape[1] if isinstance(memory[0], Tensor) and memory[0].ndim == 3 else -1
            for layer, m in enumerate(memory):
                if not isinstance(m, Tensor) or m.ndim != 3 or tuple(m.shape) != (b, n_mem, c.d_model):
                    got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                    raise ShapeError(
                        f"memory[{layer}] must be [B, M, d] = [{b}, M, {c.d_model}], the same M in every layer, "
                        f"got {got}"
                    )
        if mask is not None:
            target = (b, c.n_heads, n, n_mem + n)
            if (
                not isinstance(mask, Tensor)
                or mask.dtype != torch.bool
                or broadcast(tuple(mask.shape), target) != target
            ):
                got = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
                raise ShapeError(f"mask must be boolean and broadcast to [B, A, N, M+N] = {list(target)}, got {got}")

    def _next_memory(self, memory: Tensor | None, h: Tensor) -> Tensor:
        """The last ``mem_len`` of ``[memory; h]``, detached."""
        context = h if memory is None else torch.cat([memory, h], dim=1)
        return context[:, context.shape[1] - min(self.config.mem_len, context.shape[1]) :].detach()

    def forward(
        self, input_ids: Tensor, memory: Sequence[Tensor] | None = None, *, mask: Tensor | None = None
    ) -> XLOutput:
        """One segment.

        Args:
            input_ids: ``[B, N]`` token ids.
            memory: the ``memory`` of the previous segment's output (``L`` tensors ``[B, M, d]``), or None.
            mask: optional boolean, broadcastable to ``[B, A, N, M + N]``, ANDed with causality (padding).

        Returns:
            ``XLOutput(logits [B, N, V], memory)``: ``logits[:, i]`` predicts the token after ``input_ids[:, i]``.
        """
        self._check_inputs(input_ids, memory, mask)
        h = self.drop(self.tok_emb(input_ids))  # [B, N, d]
        new_memory = []
        for layer, block in enumerate(self.blocks):
            m = None if memory is None else memory[layer]
            new_memory.append(self._next_memory(m, h))
            h = block(h, m, mask=mask)
        return XLOutput(self.lm_head(self.final_norm(h)), tuple(new_memory))


class TransformerXLLM(TransformerXL):
    """The class trained for task ``lm``: ``input_ids [B, T] -> logits [B, T, V]``, the window read in
    segments of ``segment_len`` tokens, each with the memory of the ones before (Dai's training)."""

    def forward(self, input_ids: Tensor) -> Tensor:  # type: ignore[override]
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ShapeError("input_ids must be a [B, T] tensor of token ids")
        memory, logits = None, []
        for segment in input_ids.split(self.config.segment_len, dim=1):
            out = super().forward(segment, memory)
            logits.append(out.logits)
            memory = out.memory
        return torch.cat(logits, dim=1)


register_family(
    "transformer-xl", TransformerXLConfig, TransformerXL,
    "Transformer-XL language model: segment recurrence with memory, relative positions (Dai 2019) or RoPE",
    task="lm", train_cls=TransformerXLLM,
)  # fmt: skip
register_preset(
    "transformer-xl-tiny", "transformer-xl",
    TransformerXLConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=2, segment_len=32, mem_len=32, dropout=0.0),
    "tiny byte-level Transformer-XL for tests and demos: 2 layers, d=64, 4 heads, segments of 32, memory 32",
)  # fmt: skip
