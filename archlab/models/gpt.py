r"""GPT: a decoder-only Transformer language model (Radford et al. 2018, 2019).

Read top to bottom it is the GPT-2 forward pass::

    x_0  = E[tokens] + P[positions]                        token + learned position embeddings, [B, N, d]
    x_l  = x_{l-1} + Attn(LN(x_{l-1}))  (causal)           pre-norm blocks, A heads of width d_k = d_v = d / A
    x_l  = x_l     + FFN(LN(x_l))                          FFN(h) = gelu_tanh(h W_1 + b_1) W_2 + b_2
    logits = LN_f(x_L) E^T                                 tied LM head, [B, N, V]

Everything but the config and the init lives in :class:`~archlab.models.decoder.DecoderLM`, the
decoder-only base GPT shares with the Llama family (input checks, positions and padding, the fused
loss, cached decoding): the blocks are :class:`~archlab.nn.DecoderBlock` without cross-attention,
stacked in a :class:`~archlab.nn.Decoder` (which adds the final LayerNorm of a pre-norm stack). RoPE,
ALiBi and sinusoidal positions replace the learned table on request.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from archlab.config import Config, check_choice, check_divisible, check_positive, check_probability
from archlab.models.decoder import DecoderConfig, DecoderLM, positions_from_mask
from archlab.models.registry import register_family, register_preset
from archlab.nn.backends import check_backend
from archlab.nn.feedforward import FEEDFORWARDS
from archlab.nn.positional import POSITIONAL_KINDS, check_rope_width

__all__ = ["GPT", "GPTConfig", "positions_from_mask"]


@dataclasses.dataclass(frozen=True)
class GPTConfig(DecoderConfig, Config):
    """A GPT. The defaults are GPT-2 small (124M parameters).

    Args:
        vocab_size: ``V``.
        max_len: context length; the size of the learned position table (GPT-2's ``n_positions``).
            RoPE, ALiBi and sinusoidal positions are not limited by it.
        d_model: ``d``.
        n_heads: ``A``; ``d_v = d / A``, and ``d_k = d / A`` unless ``d_k`` is set.
        d_k: the query/key width of each head; ``None`` means ``d / A`` (GPT-2). Values keep ``d_v = d / A``,
            so the attention's output and ``W_O [A d_v, d]`` do not change, ``W_Q`` and ``W_K`` become
            ``[d, A d_k]`` and the scores are scaled by ``1 / sqrt(d_k)``: Vaswani et al.'s table 3 rows B (a
            smaller key size at a fixed number of heads). GPT-2's Hugging Face format has no such field
            (:func:`archlab.interop.gpt2.config_to_gpt2` refuses a set ``d_k``).
        n_layers: number of blocks ``L``.
        d_ff: FFN hidden width; ``None`` means ``4 d``.
        dropout: on the embeddings and on each sub-layer's output (GPT-2's embd/resid_pdrop).
        attn_dropout: on the attention weights (attn_pdrop).
        positional: ``learned`` (GPT-2) | ``rope`` | ``alibi`` | ``sinusoidal`` | ``none``.
        norm_first: pre-norm with a final LayerNorm (GPT-2) or post-norm (GPT-1).
        ffn: FFN kind; ``gelu_tanh`` is GPT-2's ``gelu_new`` (see ``archlab.nn.build_feedforward``).
        eps: LayerNorm epsilon.
        bias: biases in the linear layers (LayerNorms keep theirs).
        tie_embeddings: the LM head is the token embedding matrix (one Parameter).
        backend: attention backend, ``auto | math | sdpa``.
    """

    vocab_size: int = 50257
    max_len: int = 1024
    d_model: int = 768
    n_heads: int = 12
    d_k: int | None = None
    n_layers: int = 12
    d_ff: int | None = None
    dropout: float = 0.1
    attn_dropout: float = 0.1
    positional: str = "learned"
    norm_first: bool = True
    ffn: str = "gelu_tanh"
    eps: float = 1e-5
    bias: bool = True
    tie_embeddings: bool = True
    backend: str = "auto"

    def validate(self) -> None:
        # field types (int, bool, ...) are checked by Config before validate() runs
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers"):
            check_positive(name, getattr(self, name))
        for name in ("d_k", "d_ff"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)  # d_v = d / A
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        check_choice("positional", self.positional, POSITIONAL_KINDS)
        check_choice("ffn", self.ffn, FEEDFORWARDS)
        check_backend(self.backend)
        check_positive("eps", self.eps)
        check_rope_width(self.positional, self.d_model, self.n_heads, self.d_k)


class GPT(DecoderLM):
    """Decoder-only language model; ``input_ids [B, N] -> logits [B, N, V]`` (see :class:`DecoderLM`).

    Submodules: ``tok_emb`` (``E``, ``[V, d]``), ``pos`` (the positional encoding), ``decoder``
    (:class:`~archlab.nn.Decoder` of ``L`` causal blocks, final norm included), ``lm_head``
    (``[V, d]``; the same Parameter as ``tok_emb.weight`` when tied).
    """

    config_cls = GPTConfig

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: weights ``N(0, 0.02)``, biases 0, LayerNorm ``(1, 0)``; the two projections that
        write into the residual stream (attention ``W_O``, FFN ``W_2``) get ``std 0.02 / sqrt(2 L)``."""
        super().reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.decoder.blocks:
            nn.init.normal_(block.attn.out_proj.weight, 0.0, residual_std)
            nn.init.normal_(block.ffn.w2.weight, 0.0, residual_std)


register_family("gpt", GPTConfig, GPT, "decoder-only Transformer language model (GPT-1/2; RoPE/ALiBi on request)")
register_preset("gpt2-small", "gpt", GPTConfig(), "GPT-2 small: 124M, 12 layers, d=768, 12 heads, 1024 ctx")
register_preset(
    "gpt2-medium", "gpt", GPTConfig(d_model=1024, n_heads=16, n_layers=24),
    "GPT-2 medium: 355M, 24 layers, d=1024, 16 heads, 1024 ctx",
)  # fmt: skip
register_preset(
    "gpt2-large", "gpt", GPTConfig(d_model=1280, n_heads=20, n_layers=36),
    "GPT-2 large: 774M, 36 layers, d=1280, 20 heads, 1024 ctx",
)  # fmt: skip
register_preset(
    "gpt2-xl", "gpt", GPTConfig(d_model=1600, n_heads=25, n_layers=48),
    "GPT-2 XL: 1.56B, 48 layers, d=1600, 25 heads, 1024 ctx",
)  # fmt: skip
register_preset(
    "gpt-mini", "gpt", GPTConfig(vocab_size=50304, max_len=256, d_model=384, n_heads=6, n_layers=6),
    "small GPT for single-machine training: 6 layers, d=384, 6 heads, 256 ctx, GPT-2 vocab padded to 50304",
)  # fmt: skip
register_preset(
    "gpt-nano", "gpt",
    GPTConfig(vocab_size=256, max_len=128, d_model=48, n_heads=3, n_layers=3, dropout=0.0, attn_dropout=0.0),
    "tiny GPT for tests and demos: 3 layers, d=48, 3 heads, 128 ctx, byte vocabulary (256); "
    "`archlab train` sets the vocabulary from its tokenizer",
)  # fmt: skip
