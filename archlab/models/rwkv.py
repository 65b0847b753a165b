r"""RWKV-4 (Peng et al. 2023): an RNN that trains in parallel like a Transformer.

No attention and no position table. Each block mixes over time, then over channels::

    x_0    = LN_0(E[tokens])                            [B, N, d]
    x_l    = x_{l-1} + TimeMix(LN_1(x_{l-1}))           WKV: a decaying weighted average of the past
    x_l    = x_l     + ChannelMix(LN_2(x_l))            squared-ReLU MLP behind a receptance gate
    logits = LN_out(x_L) W_head^T                       [B, N, V]

**Token shift.** A mixer sees the current token ``x_t`` and the previous one ``x_{t-1}`` (zeros before
the first), blended per channel with learned ``mu in [0, 1]^d``: ``lerp_mu = mu * x_t + (1 - mu) * x_{t-1}``.

**Time-mix** (``d_att`` channels; decay ``w = exp(time_decay) > 0``, bonus of the current token
``u = time_first``)::

    k_t = W_k lerp_k,   v_t = W_v lerp_v,   r_t = sigmoid(W_r lerp_r)
    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t})
    out_t = W_o (r_t * wkv_t)

per channel, a softmax-weighted average of the values seen so far, older ones decaying by ``e^{-w}``
a step. **Channel-mix**: ``out_t = sigmoid(W_r lerp_r) * W_v relu(W_k lerp_k)^2`` (``d_ff`` hidden).

**Two modes, one function.** ``parallel`` (training): WKV over chunks of ``T`` tokens, each chunk in
closed form as a masked ``[T, T]`` weighted sum (:func:`wkv_chunked`), chunks linked by the state.
``recurrent`` (decoding): one token at a time (:func:`wkv_step`) with a constant-size state per layer
(:class:`RWKVState`): the last normalised input of each mixer (for the token shift) and the WKV sums
kept as ``(a, b, p)``, numerator ``e^p a`` and denominator ``e^p b``, so no exponential overflows.

Weights and layout follow Hugging Face's ``RwkvForCausalLM`` (converters: :mod:`archlab.interop.rwkv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_positive
from archlab.errors import ConfigError, ShapeError
from archlab.generation import Step, check_logits_to_keep
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.inputs import check_token_ids
from archlab.nn.linear import Linear
from archlab.nn.norm import LayerNorm

MODES = ("parallel", "recurrent")
# Tokens per closed-form block of the parallel WKV. A block does T times the loop's arithmetic in
# N / T sequential steps instead of N, and holds B * T^2 * d_att weights: small blocks pay off.
WKV_CHUNK = 8


@dataclass(frozen=True)
class RWKVConfig(ModelConfig, Config):
    """An RWKV-4 language model; the defaults are RWKV-4 169M (Pile): 12 layers, d=768.

    Args:
        vocab_size: ``V`` (50277: the GPT-NeoX tokenizer of the Pile models).
        d_model: ``d``, the residual stream's width.
        n_layers: blocks ``L``.
        d_att: time-mix width ``d_att`` (HF ``attention_hidden_size``); ``None`` means ``d``.
        d_ff: channel-mix hidden width (HF ``intermediate_size``); ``None`` means ``4 d``.
        context_length: the context the model is trained on. Informational: RWKV has no position
            table, and the recurrent mode runs any length.
        eps: LayerNorm epsilon.
        tie_embeddings: the LM head is the token embedding matrix (RWKV-4 keeps them apart).
    """

    vocab_size: int = 50277
    d_model: int = 768
    n_layers: int = 12
    d_att: int | None = None
    d_ff: int | None = None
    context_length: int = 1024
    eps: float = 1e-5
    tie_embeddings: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "context_length", "eps"):
            check_positive(name, getattr(self, name))
        for name in ("d_att", "d_ff"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))

    @property
    def att_width(self) -> int:
        """``d_att``: ``d_att`` or ``d``."""
        return self.d_model if self.d_att is None else self.d_att

    @property
    def ffn_width(self) -> int:
        """The channel-mix hidden width: ``d_ff`` or ``4 d``."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff


# ================================================================================================
# WKV: the time-mixing operator, written three ways (one step, a loop, chunks in closed form)
# ================================================================================================


class WKVState(NamedTuple):
    """The WKV sums over the tokens seen, each ``[B, d_att]``: numerator ``e^p a``, denominator ``e^p b``."""

    a: Tensor
    b: Tensor
    p: Tensor


def wkv_initial_state(batch: int, channels: int, *, dtype: torch.dtype, device=None) -> WKVState:
    """Nothing seen yet: ``a = b = 0``, ``p = -inf`` (an empty sum)."""
    zeros = torch.zeros(batch, channels, dtype=dtype, device=device)
    return WKVState(zeros, zeros.clone(), torch.full_like(zeros, -math.inf))


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState) -> tuple[Tensor, WKVState]:
    """One token: ``w, u [d_att]``, ``k, v [B, d_att]`` -> ``wkv_t [B, d_att]`` and the state after it.

    ``wkv_t = (e^p a + e^{u + k} v) / (e^p b + e^{u + k})``, every exponent shifted by their max; then
    the sums decay by ``e^{-w}`` and take the token in, ``e^{p'} a' = e^{p - w} a + e^k v`` (and ``b``
    alike), with ``p' = max(p - w, k)``.
    """
    a, b, p = state
    m = torch.maximum(p, u + k)
    e_past, e_now = torch.exp(p - m), torch.exp(u + k - m)
    out = (e_past * a + e_now * v) / (e_past * b + e_now)
    p_next = torch.maximum(p - w, k)
    e_past, e_now = torch.exp(p - w - p_next), torch.exp(k - p_next)
    return out, WKVState(e_past * a + e_now * v, e_past * b + e_now, p_next)


def wkv_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState | None = None) -> tuple[Tensor, WKVState]:
    """The RNN: :func:`wkv_step` over ``k, v [B, N, d_att]`` in order -> ``wkv [B, N, d_att]``, final state."""
    b, n, c = k.shape
    state = wkv_initial_state(b, c, dtype=k.dtype, device=k.device) if state is None else state
    out = []
    for t in range(n):
        y, state = wkv_step(w, u, k[:, t], v[:, t], state)
        out.append(y)
    return torch.stack(out, dim=1), state


def wkv_chunked(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState | None = None, *, chunk: int = WKV_CHUNK
) -> tuple[Tensor, WKVState]:
    """The same as :func:`wkv_recurrent`, ``chunk`` tokens at a time in closed form.

    Inside a chunk starting at token ``s``, query ``t = s + j`` weighs token ``i`` (chunk index)
    by ``e^{L[j, i]}`` and the state carried in by ``e^{p - j w}``::

        L[j, i] = -(j - 1 - i) w + k_i   (i < j),    u + k_j   (i = j),    -inf   (i > j)
        wkv_j   = (e^{p - j w} a + sum_i e^{L[j, i]} v_i) / (e^{p - j w} b + sum_i e^{L[j, i]})

    with every exponent shifted by its max over ``i`` (a per-channel masked softmax). The state
    after the chunk of ``T`` tokens weighs token ``i`` by ``e^{-(T - 1 - i) w + k_i}`` and the old
    state by ``e^{p - T w}``. Work ``B N T d_att`` and memory ``B T^2 d_att`` per chunk.
    """
    if chunk < 1:
        raise ConfigError(f"chunk={chunk!r} must be >= 1")
    batch, n, c = k.shape
    a, b, p = wkv_initial_state(batch, c, dtype=k.dtype, device=k.device) if state is None else state
    outs = []
    for s in range(0, n, chunk):
        kc, vc = k[:, s : s + chunk], v[:, s : s + chunk]  # [B, T, d_att]
        T = kc.shape[1]
        j = torch.arange(T, device=k.device)
        lag = j[:, None] - 1 - j[None, :]  # [T, T]: j - 1 - i
        past, now = lag >= 0, lag == -1
        L = -lag.clamp(min=0)[..., None].to(k.dtype) * w + kc[:, None]  # [B, T(j), T(i), d_att]
        L = torch.where(now[..., None], u + kc[:, None], L).masked_fill(~(past | now)[..., None], -math.inf)
        L_state = p[:, None] - j[:, None].to(k.dtype) * w  # [B, T, d_att]
        m = torch.maximum(L.amax(dim=2), L_state)
        e, e_state = torch.exp(L - m[:, :, None]), torch.exp(L_state - m)
        num = torch.einsum("bjic,bic->bjc", e, vc) + e_state * a[:, None]
        den = e.sum(dim=2) + e_state * b[:, None]
        outs.append(num / den)
        # carry the state past the chunk
        L_end = -(T - 1 - j)[:, None].to(k.dtype) * w + kc  # [B, T, d_att]
        p_next = torch.maximum(p - T * w, L_end.amax(dim=1))
        e_end, e_old = torch.exp(L_end - p_next[:, None]), torch.exp(p - T * w - p_next)
        a = e_old * a + (e_end * vc).sum(dim=1)
        b = e_old * b + e_end.sum(dim=1)
        p = p_next
    return torch.cat(outs, dim=1), WKVState(a, b, p)


# ================================================================================================
# The recurrent state of the whole model
# ================================================================================================


class LayerState(NamedTuple):
    """One block's state: the last normalised inputs of its two mixers ``[B, d]`` and its WKV sums."""

    att_shift: Tensor
    ffn_shift: Tensor
    wkv: WKVState


class RWKVState:
    """Every block's :class:`LayerState`: constant size however many tokens were fed (``length``).

    Starts empty (``model.new_cache()``); each forward given the state continues from it and updates
    it in place. ``reorder(index)`` serves beam search (:mod:`archlab.generation`).
    """

    def __init__(self, n_layers: int):
        self.layers: list[LayerState | None] = [None] * n_layers
        self.length = 0

    @property
    def batch_size(self) -> int | None:
        first = self.layers[0] if self.layers else None
        return None if first is None else first.att_shift.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Batch row ``b`` becomes old row ``index[b]`` in every layer."""
        self.layers = [
            None if s is None else LayerState(
                s.att_shift.index_select(0, index), s.ffn_shift.index_select(0, index),
                WKVState(*(t.index_select(0, index) for t in s.wkv)),
            )
            for s in self.layers
        ]  # fmt: skip


# ================================================================================================
# Blocks
# ================================================================================================


def token_shift(x: Tensor, previous: Tensor | None) -> Tensor:
    """``x [B, N, d]`` -> ``[B, N, d]`` holding ``x_{t-1}`` at ``t``: ``previous [B, d]`` (or zeros) at ``t = 0``."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def lerp(x: Tensor, shifted: Tensor, mu: Tensor) -> Tensor:
    """``mu * x_t + (1 - mu) * x_{t-1}``, per channel."""
    return x * mu + shifted * (1 - mu)


class TimeMix(nn.Module):
    """``x [B, N, d] -> [B, N, d]``: token shift, ``k, v, r``, WKV, ``W_o (sigmoid(r) * wkv)``.

    Parameters: ``time_decay [d_att]`` (``w = exp(time_decay)``), ``time_first [d_att]`` (``u``),
    ``mix_k, mix_v, mix_r [d]`` (``mu``), ``key, value, receptance [d_att, d]``, ``output [d, d_att]``.
    """

    def __init__(self, d_model: int, d_att: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.zeros(d_att))
        self.time_first = nn.Parameter(torch.zeros(d_att))
        self.mix_k = nn.Parameter(torch.ones(d_model))
        self.mix_v = nn.Parameter(torch.ones(d_model))
        self.mix_r = nn.Parameter(torch.ones(d_model))
        self.key = Linear(d_model, d_att, bias=False)
        self.value = Linear(d_model, d_att, bias=False)
        self.receptance = Linear(d_model, d_att, bias=False)
        self.output = Linear(d_att, d_model, bias=False)

    def forward(
        self, x: Tensor, previous: Tensor | None, state: WKVState | None, recurrent: bool
    ) -> tuple[Tensor, WKVState]:
        shifted = token_shift(x, previous)
        k = self.key(lerp(x, shifted, self.mix_k))
        v = self.value(lerp(x, shifted, self.mix_v))
        r = torch.sigmoid(self.receptance(lerp(x, shifted, self.mix_r)))
        dtype = torch.promote_types(k.dtype, torch.float32)  # the sums of exponentials in at least float32
        w, u = torch.exp(self.time_decay.to(dtype)), self.time_first.to(dtype)
        wkv = wkv_recurrent if recurrent or x.shape[1] == 1 else wkv_chunked
        y, state = wkv(w, u, k.to(dtype), v.to(dtype), state)
        return self.output(r * y.to(r.dtype)), state


class ChannelMix(nn.Module):
    """``x [B, N, d] -> [B, N, d]``: ``sigmoid(W_r lerp_r) * W_v relu(W_k lerp_k)^2``.

    Parameters: ``mix_k, mix_r [d]``, ``key [d_ff, d]``, ``receptance [d, d]``, ``value [d, d_ff]``.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.mix_k = nn.Parameter(torch.ones(d_model))
        self.mix_r = nn.Parameter(torch.ones(d_model))
        self.key = Linear(d_model, d_ff, bias=False)
        self.receptance = Linear(d_model, d_model, bias=False)
        self.value = Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor, previous: Tensor | None) -> Tensor:
        shifted = token_shift(x, previous)
        k = torch.square(torch.relu(self.key(lerp(x, shifted, self.mix_k))))
        return torch.sigmoid(self.receptance(lerp(x, shifted, self.mix_r))) * self.value(k)


class RWKVBlock(nn.Module):
    """``x <- x + TimeMix(LN_1(x))``, ``x <- x + ChannelMix(LN_2(x))``; ``[B, N, d] -> [B, N, d]``."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        c = config
        self.att_norm = LayerNorm(c.d_model, c.eps)
        self.time_mix = TimeMix(c.d_model, c.att_width)
        self.ffn_norm = LayerNorm(c.d_model, c.eps)
        self.channel_mix = ChannelMix(c.d_model, c.ffn_width)

    def forward(self, x: Tensor, state: LayerState | None, recurrent: bool) -> tuple[Tensor, LayerState]:
        h = self.att_norm(x)
        att, wkv = self.time_mix(h, None if state is None else state.att_shift, None if state is None else state.wkv,
                                 recurrent)  # fmt: skip
        x = x + att
        g = self.ffn_norm(x)
        x = x + self.channel_mix(g, None if state is None else state.ffn_shift)
        # copies, not views: a view of the last token would keep the whole [B, N, d] alive in the state
        return x, LayerState(h[:, -1].clone(), g[:, -1].clone(), wkv)


# ================================================================================================
# The language model
# ================================================================================================




class RWKV(nn.Module):
    """RWKV-4 language model; ``input_ids [B, N] -> logits [B, N, V]``.

    Submodules: ``tok_emb`` (``[V, d]``), ``emb_norm`` (``LN_0``), ``blocks`` (``L`` :class:`RWKVBlock`),
    ``final_norm`` (``LN_out``), ``lm_head`` (``[V, d]``).
    """

    def __init__(self, config: RWKVConfig):
        super().__init__()
        if not isinstance(config, RWKVConfig):
            raise ConfigError(f"RWKV needs an RWKVConfig, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.emb_norm = LayerNorm(c.d_model, c.eps)
        self.blocks = nn.ModuleList(RWKVBlock(c) for _ in range(c.n_layers))
        self.final_norm = LayerNorm(c.d_model, c.eps)
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, head=True)  # float32 logits from bf16 (head_logits)
        self.reset_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-4's init. With ``l`` the layer, ``L`` layers, ``c = channel / d``, ``h = channel / (d_att - 1)``::

            time-mix:      mu_k = c^(1 - l/L),  mu_v = mu_k + 0.3 l/(L-1),  mu_r = c^(0.5 (1 - l/L))
            channel-mix:   mu_k = mu_r = c^(1 - l/L)
            time_decay = -5 + 8 h^(0.7 + 1.3 l/(L-1))     from w = e^-5 (long memory) to w = e^3 (short)
            time_first = log 0.3 + 0.5 ((channel + 1) mod 3 - 1)

        The embedding starts tiny (``U(-1e-4, 1e-4)``; ``LN_0`` rescales it), the projections that
        write into the residual stream (``W_o``, channel-mix ``W_v``) at zero, so every block starts
        as the identity; other matrices ``N(0, 1 / d_in)``, the head ``N(0, 0.25 / d)``.
        """
        c = self.config
        d, d_att, n = c.d_model, c.att_width, c.n_layers
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, module.in_features**-0.5)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.uniform_(self.tok_emb.weight, -1e-4, 1e-4)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.5 * d**-0.5)
        channel = torch.arange(d, dtype=torch.float64) / d
        h = torch.arange(d_att, dtype=torch.float64) / max(d_att - 1, 1)
        zigzag = ((torch.arange(d_att) + 1) % 3 - 1).double()
        for layer, block in enumerate(self.blocks):
            rising = layer / (n - 1) if n > 1 else 0.0  # 0 -> 1 over the layers
            falling = 1.0 - layer / n  # 1 -> 1/L
            tm, cm = block.time_mix, block.channel_mix
            tm.mix_k.copy_(channel**falling)
            tm.mix_v.copy_(channel**falling + 0.3 * rising)
            tm.mix_r.copy_(channel ** (0.5 * falling))
            tm.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * rising))
            tm.time_first.copy_(math.log(0.3) + 0.5 * zigzag)
            cm.mix_k.copy_(channel**falling)
            cm.mix_r.copy_(channel**falling)
            nn.init.zeros_(tm.output.weight)
            nn.init.zeros_(cm.value.weight)

    def new_cache(self) -> RWKVState:
        """An empty recurrent state (the ``cache`` of :mod:`archlab.generation`)."""
        return RWKVState(self.config.n_layers)

    def _check_inputs(self, input_ids: Tensor, state: RWKVState | None, mode: str) -> None:
        c = self.config
        check_choice("mode", mode, MODES)
        check_token_ids("input_ids", input_ids, c.vocab_size)
        b = input_ids.shape[0]
        if state is not None:
            if not isinstance(state, RWKVState) or len(state.layers) != c.n_layers:
                raise ShapeError(f"state must be an RWKVState of this model's {c.n_layers} layers (model.new_cache())")
            if state.batch_size is not None and state.batch_size != b:
                raise ShapeError(f"state holds batch {state.batch_size} but input_ids has batch {b}")

    def forward(
        self,
        input_ids: Tensor,
        *,
        state: RWKVState | None = None,
        mode: str = "parallel",
        logits_to_keep: int | None = None,
    ) -> Tensor:
        """Next-token logits.

        Args:
            input_ids: ``[B, N]`` token ids in ``[0, V)``; with a ``state``, the tokens after those it has seen.
            state: an :class:`RWKVState` (``new_cache()``) to continue from; updated in place.
            mode: ``parallel`` (chunked closed-form WKV) or ``recurrent`` (one token at a time). The
                same function: they agree to rounding.
            logits_to_keep: ``k``: the LM head reads only the last ``k`` positions (generation: 1).
                ``None``: every position.

        Returns:
            ``logits [B, N, V]`` (``[B, min(k, N), V]`` with ``logits_to_keep``); ``logits[:, i]``
            predicts the token after ``input_ids[:, i]``.
        """
        self._check_inputs(input_ids, state, mode)
        check_logits_to_keep(logits_to_keep)
        x = self.emb_norm(self.tok_emb(input_ids))  # [B, N, d]
        for i, block in enumerate(self.blocks):
            x, layer_state = block(x, None if state is None else state.layers[i], mode == "recurrent")
            if state is not None:
                state.layers[i] = layer_state
        if state is not None:
            state.length += input_ids.shape[1]
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]  # [B, k, d]
        return self.lm_head(self.final_norm(x))

    def decoder_step(self, attention_mask: Tensor | None = None, *, logits_to_keep: int | None = None) -> Step:
        """A step for :mod:`archlab.generation`: ``(tokens [B, n], state) -> logits [B, n, V]``.

        RWKV has no attention mask: a padding token would enter the recurrent state. So
        ``attention_mask`` must be all ones (prompts of equal length), or absent. ``logits_to_keep``: as
        in :meth:`forward`, for every call of the step.
        """
        check_logits_to_keep(logits_to_keep)
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ConfigError(
                "RWKV cannot skip padding (every token enters its recurrent state): generate from prompts of equal "
                "length without padding, or one prompt at a time"
            )
        return lambda tokens, cache=None: self(tokens, state=cache, logits_to_keep=logits_to_keep)


register_family("rwkv", RWKVConfig, RWKV, "RWKV-4: attention-free RNN language model, parallel (chunked) training mode")
register_preset(
    "rwkv-169m", "rwkv", RWKVConfig(),
    "RWKV-4 169M (Pile) shape: 12 layers, d=768, d_ff=3072, GPT-NeoX vocabulary 50277, 169.3M params",
)  # fmt: skip
register_preset(
    "rwkv-tiny", "rwkv", RWKVConfig(vocab_size=256, d_model=64, n_layers=2, context_length=128),
    "tiny byte-level RWKV-4 for tests and demos: 2 layers, d=64, d_ff=256",
)  # fmt: skip
