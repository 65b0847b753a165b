r"""Recurrent sequence-to-sequence models: RNNenc (Cho et al. 2014) versus RNNsearch (Bahdanau et al. 2015).

Both read a source ``x_1..x_N`` and emit target tokens ``y_1..y_M`` with a GRU decoder; they differ in
what the decoder sees of the source (deck: "the information bottleneck").

**RNNenc**, the encoder-decoder: one GRU reads the source; its final state is the fixed context vector
``c``, given to the decoder at *every* step::

    h_j = GRU(E_x x_j, h_{j-1})            c = h_N                                  [B, H_enc]
    s_0 = tanh(W_init c)
    s_i = GRU([E_y y_{i-1}; c], s_{i-1})                                              [B, H_dec]

The whole source, however long, must fit in ``c``.

**RNNsearch**, joint alignment and translation: a bidirectional GRU gives one annotation per source
word, and the decoder searches them afresh at each step::

    h_j    = [->h_j; <-h_j]                                                           [B, N, 2 H_enc]
    s_0    = tanh(W_init <-h_1)
    e_ij   = a(s_{i-1}, h_j)                    alignment score (additive: v_a^T tanh(W_a [s_{i-1}; h_j]))
    alpha_ij = exp(e_ij) / sum_k exp(e_ik)      over the real source tokens only          [B, M, N]
    c_i    = sum_j alpha_ij h_j                                                        [B, 2 H_enc]
    s_i    = GRU([E_y y_{i-1}; c_i], s_{i-1})

The score is any of :mod:`archlab.nn.attention`'s: ``additive`` (Bahdanau), Luong's ``general``
(``s^T W_a h``), ``dot`` (``s^T h``; needs ``H_dec = 2 H_enc``) and ``location`` (``softmax(W_a s)``, at
most ``max_src_len`` source tokens), or ``content`` / ``scaled_dot``.

Both share the output layer, a deep output with maxout (Bahdanau, eq. 4 and appendix A)::

    t~_i   = U_o s_i + V_o E_y y_{i-1} + C_o c_i                                      [B, 2 l]
    t_i    = max(t~_{i,2k-1}, t~_{i,2k}),  k = 1..l                                   maxout, [B, l]
    logits = W_o t_i                                                                  [B, V]

Training is teacher forcing: ``forward(src_ids [B, N], tgt_in [B, M], src_mask) -> logits [B, M, V]`` with
``tgt_in = [bos, y_1, .., y_{M-1}]``. Decoding follows the encoder-decoder protocol of the Transformer:
``memory = encode(src_ids, src_mask)``, then ``decoder_step(memory, src_mask)`` for :mod:`archlab.generation`;
:meth:`greedy` and :meth:`beam` do both. Source padding must be on the right (``src_mask [B, N]``, True =
real token); padded positions change nothing.

The encoders are single GRU layers and the decoder a single GRU cell, as in both papers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_positive, check_probability
from archlab.errors import ConfigError, ShapeError
from archlab.generation import BeamSearchOutput, Step, beam_search, expand_for_beams, generate
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.attention import SCORES, attend, build_score
from archlab.nn.inputs import check_token_ids
from archlab.nn.recurrent import RecurrentCache, build_cell, build_rnn, lengths_from_mask, run_rnn

# scores comparing s and h directly need H_dec = 2 H_enc
SAME_WIDTH_SCORES = ("dot", "scaled_dot", "content")


@dataclasses.dataclass(frozen=True)
class RNNencConfig(ModelConfig, Config):
    """RNNenc (Cho et al. 2014). The defaults are the sizes of Bahdanau et al.'s RNNenc baseline.

    Args:
        vocab_size: ``V``, one vocabulary for source and target (two embedding matrices).
        d_embed: word embedding width (620 in the paper).
        d_encoder: ``H_enc``, the encoder GRU's width (per direction for RNNsearch).
        d_decoder: ``H_dec``, the decoder GRU's width.
        d_maxout: ``l``, the maxout layer's output width (pieces of 2).
        dropout: on the embeddings and on the maxout output (the papers used none).
        grad_clip: the gradient max-norm the trainer clips to (Bahdanau et al.: 1); ``None`` turns it off.
    """

    vocab_size: int = 30000
    d_embed: int = 620
    d_encoder: int = 1000
    d_decoder: int = 1000
    d_maxout: int = 500
    dropout: float = 0.0
    grad_clip: float | None = 1.0

    def validate(self) -> None:
        for name in ("vocab_size", "d_embed", "d_encoder", "d_decoder", "d_maxout"):
            check_positive(name, getattr(self, name))
        check_probability("dropout", self.dropout)
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)


@dataclasses.dataclass(frozen=True)
class RNNsearchConfig(RNNencConfig):
    """RNNsearch (Bahdanau et al. 2015); the defaults are the paper's.

    Args:
        score: the alignment score ``a(s_{i-1}, h_j)``: ``additive`` (Bahdanau) | ``general`` | ``dot`` |
            ``location`` (Luong) | ``content`` | ``scaled_dot``.
        d_attn: the additive score's hidden width (``W_a`` rows, ``v_a`` length; 1000 in the paper).
        max_src_len: the longest source the ``location`` score (one weight row per position) accepts.
    """

    score: str = "additive"
    d_attn: int = 1000
    max_src_len: int = 50

    def validate(self) -> None:
        super().validate()
        check_choice("score", self.score, list(SCORES))
        check_positive("d_attn", self.d_attn)
        check_positive("max_src_len", self.max_src_len)
        if self.score in SAME_WIDTH_SCORES and self.d_decoder != 2 * self.d_encoder:
            raise ConfigError(
                f"score={self.score!r} compares the decoder state s with the annotations h = [->h; <-h] directly, "
                f"so d_decoder={self.d_decoder} must equal 2 * d_encoder = {2 * self.d_encoder}"
            )


class _RNNSeq2Seq(nn.Module):
    """What RNNenc and RNNsearch share: target embedding, the decoder GRU cell, the maxout output, decoding.

    A subclass defines ``encode`` (source -> ``memory``), ``init_state`` (``memory`` -> ``s_0``) and
    ``context`` (``s_{i-1}``, ``memory`` -> ``c_i`` and the attention weights, if any). The decoder
    reads the source only through ``memory``.
    """

    def __init__(self, config: RNNencConfig, d_context: int, d_init: int):
        """``d_context``: the width of ``c_i``; ``d_init``: the width of what ``s_0`` is computed from."""
        super().__init__()
        c = self.config = config
        self.d_context = d_context
        self.src_embed = nn.Embedding(c.vocab_size, c.d_embed)
        self.tgt_embed = nn.Embedding(c.vocab_size, c.d_embed)
        self.drop = nn.Dropout(c.dropout)
        self.init_proj = nn.Linear(d_init, c.d_decoder)  # W_init
        self.cell = build_cell("gru", c.d_embed + d_context, c.d_decoder)
        self.deep_out = nn.Linear(c.d_decoder + c.d_embed + d_context, 2 * c.d_maxout)  # [U_o V_o C_o]
        self.lm_head = nn.Linear(c.d_maxout, c.vocab_size)  # W_o
        with torch.no_grad():  # N(0, 0.1^2) embeddings; everything else keeps PyTorch's default init
            nn.init.normal_(self.src_embed.weight, 0.0, 0.1)
            nn.init.normal_(self.tgt_embed.weight, 0.0, 0.1)

    # -- what each model defines -------------------------------------------------------------------
    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """``src_ids [B, N]`` (+ ``src_mask [B, N]``) -> ``memory [B, N', d_context]``, all the decoder reads."""
        raise NotImplementedError

    def init_state(self, memory: Tensor) -> Tensor:
        """``memory`` -> the decoder's first state ``s_0 [B, H_dec]``."""
        raise NotImplementedError

    def context(self, s_prev: Tensor, memory: Tensor, memory_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``s_{i-1} [B, H_dec]`` -> ``c_i [B, d_context]`` and the weights ``alpha_i [B, N]`` (None: no attention)."""
        raise NotImplementedError

    # -- input checks, before any computation ------------------------------------------------------
    def _check_source(self, src_ids: Tensor, src_mask: Tensor | None) -> Tensor | None:
        """The checks of ``src_ids`` and ``src_mask``; returns the lengths ``[B]`` (None without a mask)."""
        check_token_ids("src_ids", src_ids, self.config.vocab_size)
        if src_mask is None:
            return None
        if not isinstance(src_mask, Tensor) or tuple(src_mask.shape) != tuple(src_ids.shape):
            got = tuple(src_mask.shape) if isinstance(src_mask, Tensor) else type(src_mask).__name__
            raise ShapeError(
                f"src_mask must be [B, N] = {list(src_ids.shape)} like src_ids (True = real token), got {got}"
            )
        return lengths_from_mask(src_mask, "src_mask")

    def _check_memory(self, memory: Tensor, memory_mask: Tensor | None, batch: int | None = None) -> None:
        """``memory [B, N, d_context]`` from :meth:`encode`; ``memory_mask``: the ``src_mask [B, N]`` it was
        encoded with."""
        ok = isinstance(memory, Tensor) and memory.ndim == 3 and memory.shape[-1] == self.d_context
        if not ok or (batch is not None and memory.shape[0] != batch):
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            want = f"[B{'' if batch is None else '=' + str(batch)}, N, {self.d_context}]"
            raise ShapeError(f"memory must be the encoder output {want} (model.encode), got {got}")
        if memory_mask is not None and (not isinstance(memory_mask, Tensor) or memory_mask.shape != memory.shape[:2]):
            got = tuple(memory_mask.shape) if isinstance(memory_mask, Tensor) else type(memory_mask).__name__
            raise ShapeError(f"memory_mask must be the src_mask [B, N] = {list(memory.shape[:2])}, got {got}")

    # -- the decoder -------------------------------------------------------------------------------
    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        *,
        cache: RecurrentCache | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Decoder inputs ``tgt_in [B, M]`` and ``memory`` (from :meth:`encode`) -> ``logits [B, M, V]``.

        ``memory_mask`` is the ``src_mask [B, N]`` (RNNsearch attends its real tokens; RNNenc needs none).
        ``logits[:, i]`` predicts ``y_{i+1}`` after reading ``tgt_in[:, i]``. With a ``cache`` the
        decoder continues from its state ``s`` (``s_0`` when empty) and stores the last one back.
        ``return_attention`` adds the weights ``alpha [B, M, N]`` (``None`` for RNNenc, which has none).
        """
        check_token_ids("tgt_in", tgt_in, self.config.vocab_size)
        self._check_memory(memory, memory_mask, tgt_in.shape[0])
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise ShapeError(f"cache must be a RecurrentCache (model.new_cache()), got {type(cache).__name__}")
        e = self.drop(self.tgt_embed(tgt_in))  # [B, M, d_e]: E_y y_{i-1}
        s = self.init_state(memory) if cache is None or cache.state is None else cache.state  # [B, H_dec]
        states, contexts, weights = [], [], []
        for i in range(tgt_in.shape[1]):
            c_i, alpha_i = self.context(s, memory, memory_mask)  # from s_{i-1}
            s = self.cell(torch.cat([e[:, i], c_i], dim=-1), s)  # s_i
            states.append(s)
            contexts.append(c_i)
            weights.append(alpha_i)
        if cache is not None:
            cache.update(s, tgt_in.shape[1])
        t = self.deep_out(torch.cat([torch.stack(states, 1), e, torch.stack(contexts, 1)], dim=-1))  # [B, M, 2l]
        t = t.unflatten(-1, (self.config.d_maxout, 2)).amax(dim=-1)  # maxout, [B, M, l]
        logits = self.lm_head(self.drop(t))  # [B, M, V]
        if not return_attention:
            return logits
        return logits, None if weights[0] is None else torch.stack(weights, dim=1)

    def forward(
        self, src_ids: Tensor, tgt_in: Tensor, src_mask: Tensor | None = None, *, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Teacher forcing: ``src_ids [B, N]``, ``tgt_in [B, M]``, ``src_mask [B, N]`` -> ``logits [B, M, V]``.

        ``return_attention=True`` also returns the alignment ``alpha [B, M, N]`` (RNNsearch; ``None``
        for RNNenc): row ``i`` is where the decoder looked while reading ``tgt_in[:, i]``.
        """
        check_token_ids("src_ids", src_ids, self.config.vocab_size)  # both inputs checked before the encoder runs
        check_token_ids("tgt_in", tgt_in, self.config.vocab_size)
        if tgt_in.shape[0] != src_ids.shape[0]:
            raise ShapeError(f"src_ids has batch {src_ids.shape[0]} but tgt_in has batch {tgt_in.shape[0]}")
        memory = self.encode(src_ids, src_mask)
        return self.decode(tgt_in, memory, src_mask, return_attention=return_attention)

    # -- decoding ----------------------------------------------------------------------------------
    def new_cache(self) -> RecurrentCache:
        """An empty decoder state (``s [B, H_dec]`` once filled) for :mod:`archlab.generation`."""
        return RecurrentCache(batch_dim=0)

    def decoder_step(self, memory: Tensor, memory_mask: Tensor | None = None) -> Step:
        """The step of :mod:`archlab.generation`: ``(tokens [B, n], cache) -> logits [B, n, V]``.

        ``memory = encode(src_ids, src_mask)`` and ``memory_mask = src_mask``; for beam search expand
        both per beam first (:func:`archlab.generation.expand_for_beams`).
        """
        self._check_memory(memory, memory_mask)

        def step(tokens: Tensor, cache: RecurrentCache | None = None) -> Tensor:
            return self.decode(tokens, memory, memory_mask, cache=cache)

        return step

    def _start(self, src_ids: Tensor, bos_id: int) -> Tensor:
        """The decoder's first input ``[B, 1]``, all ``bos_id``."""
        check_token_ids("src_ids", src_ids, self.config.vocab_size)
        v = self.config.vocab_size
        if not isinstance(bos_id, int) or isinstance(bos_id, bool) or not 0 <= bos_id < v:
            raise ConfigError(f"bos_id={bos_id!r} must be a token id in [0, vocab_size={v})")
        return torch.full((src_ids.shape[0], 1), bos_id, dtype=torch.long, device=src_ids.device)

    @torch.no_grad()
    def greedy(
        self,
        src_ids: Tensor,
        src_mask: Tensor | None = None,
        *,
        bos_id: int,
        max_new_tokens: int,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> Tensor:
        """Greedy decoding: ``y_i = argmax p(y | y_<i, x)``; returns ``[B, 1 + t]`` starting with ``bos_id``.

        A row that emits ``eos_id`` keeps it and is padded with ``pad_id`` (default ``eos_id``) after.
        """
        start = self._start(src_ids, bos_id)
        memory = self.encode(src_ids, src_mask)
        stop = () if eos_id is None else (eos_id,)
        pad = pad_id if pad_id is not None or eos_id is None else eos_id
        return generate(self.decoder_step(memory, src_mask), start, max_new_tokens=max_new_tokens,
                        stop_tokens=stop, pad_id=pad, cache=self.new_cache())  # fmt: skip

    @torch.no_grad()
    def beam(
        self,
        src_ids: Tensor,
        src_mask: Tensor | None = None,
        *,
        bos_id: int,
        beam_size: int,
        max_new_tokens: int,
        eos_id: int | None = None,
        pad_id: int | None = None,
        length_penalty: float = 1.0,
    ) -> BeamSearchOutput:
        """Beam search (:func:`archlab.generation.beam_search`); ``sequences [B, 1 + t]``, ``scores [B]``."""
        if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
            raise ConfigError(f"beam_size={beam_size!r} must be an int >= 1")
        start = self._start(src_ids, bos_id)
        memory = self.encode(src_ids, src_mask)
        mask = None if src_mask is None else expand_for_beams(src_mask, beam_size)
        step = self.decoder_step(expand_for_beams(memory, beam_size), mask)
        return beam_search(step, start, beam_size=beam_size, max_new_tokens=max_new_tokens, eos_id=eos_id,
                           pad_id=pad_id, length_penalty=length_penalty, cache=self.new_cache())  # fmt: skip


class RNNenc(_RNNSeq2Seq):
    """RNNenc (Cho et al. 2014): the source reaches the decoder only as one vector ``c = h_N``.

    ``encode`` returns ``memory = c [B, 1, H_enc]``; the decoder reads it at every step. The source mask
    is accepted like RNNsearch's and not needed: ``c`` already summarises the real tokens only.
    """

    def __init__(self, config: RNNencConfig):
        if type(config) is not RNNencConfig:
            raise ConfigError(f"RNNenc needs an RNNencConfig, got {type(config).__name__}")
        super().__init__(config, d_context=config.d_encoder, d_init=config.d_encoder)
        self.encoder = build_rnn("gru", config.d_embed, config.d_encoder)

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """``src_ids [B, N]`` -> ``c [B, 1, H_enc]``: the encoder's state after the last real token."""
        lengths = self._check_source(src_ids, src_mask)
        _, h_n = run_rnn(self.encoder, self.drop(self.src_embed(src_ids)), lengths=lengths)  # h_n [1, B, H_enc]
        return h_n.transpose(0, 1)

    def _check_memory(self, memory: Tensor, memory_mask: Tensor | None, batch: int | None = None) -> None:
        super()._check_memory(memory, None, batch)
        if memory.shape[1] != 1:
            raise ShapeError(f"RNNenc's memory is the one context vector c, [B, 1, {self.d_context}]; got "
                             f"{tuple(memory.shape)}")  # fmt: skip
        if memory_mask is not None and (not isinstance(memory_mask, Tensor) or memory_mask.ndim != 2
                                        or memory_mask.shape[0] != memory.shape[0]):  # fmt: skip
            got = tuple(memory_mask.shape) if isinstance(memory_mask, Tensor) else type(memory_mask).__name__
            raise ShapeError(f"memory_mask must be the src_mask [B={memory.shape[0]}, N], got {got}")

    def init_state(self, memory: Tensor) -> Tensor:
        """``s_0 = tanh(W_init c)``."""
        return torch.tanh(self.init_proj(memory[:, 0]))

    def context(self, s_prev: Tensor, memory: Tensor, memory_mask: Tensor | None) -> tuple[Tensor, None]:
        """The same ``c`` at every step, whatever ``s_{i-1}``."""
        return memory[:, 0], None


class RNNsearch(_RNNSeq2Seq):
    """RNNsearch (Bahdanau et al. 2015): a bidirectional encoder and a soft search over its annotations.

    ``encode`` returns ``memory = h [B, N, 2 H_enc]``; ``score`` is the alignment model.
    """

    def __init__(self, config: RNNsearchConfig):
        if type(config) is not RNNsearchConfig:
            raise ConfigError(f"RNNsearch needs an RNNsearchConfig, got {type(config).__name__}")
        c = config
        super().__init__(config, d_context=2 * c.d_encoder, d_init=c.d_encoder)
        self.encoder = build_rnn("gru", c.d_embed, c.d_encoder, bidirectional=True)
        self.score = build_score(c.score, **_score_arguments(c))

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """``src_ids [B, N]`` -> the annotations ``h_j = [->h_j; <-h_j]``, ``[B, N, 2 H_enc]``."""
        lengths = self._check_source(src_ids, src_mask)
        if self.config.score == "location" and src_ids.shape[1] > self.config.max_src_len:
            raise ShapeError(
                f"src_ids has N={src_ids.shape[1]} tokens but the location score has one weight row per source "
                f"position, max_src_len={self.config.max_src_len}"
            )
        h, _ = run_rnn(self.encoder, self.drop(self.src_embed(src_ids)), lengths=lengths)
        return h

    def init_state(self, memory: Tensor) -> Tensor:
        """``s_0 = tanh(W_init <-h_1)``: the backward encoder's summary of the whole source."""
        return torch.tanh(self.init_proj(memory[:, 0, self.config.d_encoder :]))

    def context(self, s_prev: Tensor, memory: Tensor, memory_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``alpha_i = softmax_j a(s_{i-1}, h_j)`` over the real tokens, ``c_i = sum_j alpha_ij h_j``.

        Returns ``c_i [B, 2 H_enc]`` and ``alpha_i [B, N]``; one :func:`~archlab.nn.attention.attend` call.
        """
        mask = None if memory_mask is None else memory_mask.bool()[:, None, :]  # [B, 1, N]
        c, alpha = attend(s_prev[:, None, :], memory, memory, mask=mask, score=self.score, return_weights=True)
        return c[:, 0], alpha[:, 0]


def _score_arguments(c: RNNsearchConfig) -> dict:
    """The constructor arguments of each alignment score, for query ``s [H_dec]`` and keys ``h [2 H_enc]``."""
    d_q, d_h = c.d_decoder, 2 * c.d_encoder
    return {
        "additive": dict(d_query=d_q, d_key=d_h, d_attn=c.d_attn),
        "general": dict(d_query=d_q, d_key=d_h),
        "location": dict(d_query=d_q, max_keys=c.max_src_len),
    }.get(c.score, {})


register_family(
    "rnnenc", RNNencConfig, RNNenc,
    "RNN encoder-decoder (Cho et al. 2014): the source squeezed into one fixed context vector c", task="seq2seq",
)  # fmt: skip
register_family(
    "rnnsearch", RNNsearchConfig, RNNsearch,
    "RNNsearch (Bahdanau et al. 2015): bidirectional GRU encoder + attention (additive / Luong scores)",
    task="seq2seq",
)  # fmt: skip
register_preset(
    "rnnenc-50", "rnnenc", RNNencConfig(),
    "Bahdanau et al. 2015's RNNenc baseline sizes: embed 620, GRU 1000, maxout 500, 30k vocab",
)  # fmt: skip
register_preset(
    "rnnsearch-50", "rnnsearch", RNNsearchConfig(),
    "Bahdanau et al. 2015 RNNsearch: embed 620, bi-GRU 2x1000, decoder 1000, additive 1000, maxout 500, 30k vocab",
)  # fmt: skip
_SMALL = dict(vocab_size=64, d_embed=32, d_encoder=64, d_decoder=64, d_maxout=32)
register_preset(
    "rnnenc-small", "rnnenc", RNNencConfig(**_SMALL),
    "small RNNenc for tests and demos: embed 32, GRU 64, maxout 32, vocab 64",
)  # fmt: skip
register_preset(
    "rnnsearch-small", "rnnsearch", RNNsearchConfig(**_SMALL, d_attn=64, max_src_len=64),
    "small RNNsearch for tests and demos: embed 32, bi-GRU 2x64, decoder 64, additive score 64, maxout 32, vocab 64",
)  # fmt: skip
