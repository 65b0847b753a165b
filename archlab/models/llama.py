r"""The Llama family: the modern decoder of the lecture notes' block (Touvron et al. 2023; SmolLM2, Mistral, Qwen).

Read top to bottom::

    x_0  = E[tokens]                                       [B, N, d]; no position table
    x_l  = x_{l-1} + Attn(RMSNorm(x_{l-1}))  (causal)      RoPE on q, k; A query heads, G key/value heads
    x_l  = x_l     + FFN(RMSNorm(x_l))                     FFN(h) = (silu(h W) * (h V)) W_2   (SwiGLU)
    logits = RMSNorm_f(x_L) W_head^T                       [B, N, V]; W_head = E when tied

Grouped-query attention (Ainslie et al. 2023): ``G = n_kv_heads`` key/value heads, each shared by
``A / G`` query heads, so the KV cache is ``A / G`` times smaller than multi-head attention's. No
biases by default. Everything but the config lives in :class:`~archlab.models.decoder.DecoderLM`,
the base GPT shares.

State dict (per block ``i``, under ``decoder.blocks.{i}.``; the names ``archlab.interop`` converts)::

    attn_norm.weight     [d]                      RMSNorm before attention          (HF input_layernorm)
    attn.in_proj.weight  [(A + 2 G) d_k, d]       rows: W_Q (A heads), W_K (G), W_V (G)  (HF q_proj; k_proj; v_proj)
    attn.in_proj.bias    [(A + 2 G) d_k]          attention_bias=True only
    attn.out_proj.weight [d, A d_k]               W_O                               (HF o_proj; .bias likewise)
    ffn_norm.weight      [d]                      RMSNorm before the FFN            (HF post_attention_layernorm)
    ffn.w_in.weight      [2 d_ff, d]              rows: W (gate), then V (up)       (HF gate_proj; up_proj)
    ffn.w2.weight        [d, d_ff]                W_2                               (HF down_proj)
    ffn.w_in.bias, ffn.w2.bias                    mlp_bias=True only

and ``tok_emb.weight [V, d]`` (HF ``model.embed_tokens``), ``decoder.final_norm.weight [d]``
(``model.norm``), ``lm_head.weight [V, d]`` (the same tensor as ``tok_emb.weight`` when tied). RoPE
pairs feature ``i`` with ``i + d_k / 2`` (Hugging Face's "rotate half" layout).
"""

from __future__ import annotations

import dataclasses

from archlab.config import Config, check_divisible, check_positive, check_probability
from archlab.models.decoder import DecoderConfig, DecoderLM
from archlab.models.registry import register_family, register_preset
from archlab.nn.attention import check_kv_heads
from archlab.nn.backends import check_backend
from archlab.nn.positional import check_rope_width


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig, Config):
    """A Llama-style decoder. The defaults are SmolLM2-135M.

    Args:
        vocab_size: ``V``.
        max_len: the context length (HF ``max_position_embeddings``): a longer sequence is refused.
        d_model: ``d``.
        n_heads: ``A``; ``d_k = d_v = d / A`` (even: RoPE rotates pairs).
        n_kv_heads: ``G``, dividing ``A``: ``A`` multi-head, ``1`` multi-query, between: grouped-query.
        n_layers: ``L``.
        d_ff: the SwiGLU hidden width (HF ``intermediate_size``).
        rope_theta: RoPE's base: ``theta_i = rope_theta^{-2i/d_k}``.
        eps: RMSNorm epsilon (HF ``rms_norm_eps``).
        attention_bias: biases on the q, k, v and output projections.
        mlp_bias: biases on the FFN projections.
        tie_embeddings: the LM head is the token embedding matrix (one Parameter).
        dropout: on the embeddings and each sub-layer's output (training only; 0 in the released models).
        attn_dropout: on the attention weights.
        backend: attention backend (see :func:`archlab.nn.attend`).
    """

    vocab_size: int = 49152
    max_len: int = 8192
    d_model: int = 576
    n_heads: int = 9
    n_kv_heads: int = 3
    n_layers: int = 30
    d_ff: int = 1536
    rope_theta: float = 100000.0
    eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    backend: str = "auto"

    # the family's fixed design (DecoderConfig's questions)
    positional = "rope"
    norm = "rmsnorm"
    norm_first = True
    ffn = "swiglu"

    @property
    def bias(self) -> bool:
        return self.attention_bias

    @property
    def ffn_bias(self) -> bool:
        return self.mlp_bias

    @property
    def context_limit(self) -> int:
        return self.max_len

    def validate(self) -> None:
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff"):
            check_positive(name, getattr(self, name))
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_kv_heads(self.n_heads, self.n_kv_heads)
        check_rope_width(self.positional, self.d_model, self.n_heads)
        check_positive("rope_theta", self.rope_theta)
        check_positive("eps", self.eps)
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        check_backend(self.backend)


class Llama(DecoderLM):
    """Llama-style decoder-only language model; ``input_ids [B, N] -> logits [B, N, V]`` (see :class:`DecoderLM`).

    Initialisation as Hugging Face's ``LlamaForCausalLM``: weights ``N(0, 0.02)``, RMSNorm gains 1.
    """

    config_cls = LlamaConfig
    #: LoRA targets by name: q, k, v, o (:class:`DecoderLM`) and the SwiGLU's gate, up (rows of the fused ``ffn.w_in``)
    #: and down (``ffn.w2``); Hugging Face's ``{q,k,v,o}_proj`` and ``{gate,up,down}_proj``
    lora_names = {**DecoderLM.lora_names, "gate": "*.ffn.w_in:gate", "up": "*.ffn.w_in:up", "down": "*.ffn.w2"}


register_family("llama", LlamaConfig, Llama, "Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention")
register_preset(
    "llama-tiny", "llama",
    LlamaConfig(vocab_size=256, max_len=256, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=176, rope_theta=10000.0),
    "tiny byte-level Llama for tests and demos: 2 layers, d=64, 4 heads, 2 KV heads, 256 ctx",
)  # fmt: skip
register_preset(
    "smollm2-135m", "llama", LlamaConfig(),
    "SmolLM2-135M: 30 layers, d=576, 9 heads, 3 KV heads, d_ff=1536, vocab 49,152, theta 1e5, tied, 8192 ctx",
)  # fmt: skip
register_preset(
    "llama2-7b", "llama",
    LlamaConfig(vocab_size=32000, max_len=4096, d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, d_ff=11008,
                rope_theta=10000.0, tie_embeddings=False),
    "Llama-2-7B shapes (build on the meta device): 32 layers, d=4096, 32 heads, d_ff=11008, 4096 ctx, untied",
)  # fmt: skip
