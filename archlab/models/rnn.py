r"""RNN / LSTM / GRU language models (Elman 1990; Hochreiter & Schmidhuber 1997; Cho et al. 2014).

Read top to bottom, the model is::

    x_t    = Dropout(E[w_t])                                   token embedding, [B, N, d_e]
    h_t    = Cell_L(... Cell_1(x_t, h^1_{t-1}) ..., h^L_{t-1})  L stacked cells (rnn | lstm | gru), [B, N, H]
    logits = W_o Dropout(h_t) + b_o                             [B, N, V]; W_o = E when tied (d_e = H)

``h_t`` summarises the whole prefix ``w_1..w_t`` in a fixed width ``H``: no N-gram cut-off (notes, 2.1),
``O(1)`` memory and time per generated token, but training runs sequentially through ``N`` steps, and
gradients through those steps explode or vanish (notes, 2.2). Hence gated cells by default and gradient
clipping: ``RNNConfig.grad_clip`` is the max-norm the trainer clips to (``None`` turns it off).

The stack is PyTorch's fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (``backend="fused"``) or archlab's
written-out :class:`~archlab.nn.recurrent.RecurrentStack` (``backend="explicit"``, for reading and
checking); both have the same parameters, so a ``state_dict`` loads into either.

Incremental decoding: pass ``cache=model.new_cache()``; each call continues from the state the last one
left. :mod:`archlab.generation` drives it (``generate(model, prompt, max_new_tokens=...)``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_positive, check_probability, require
from archlab.errors import ConfigError, ShapeError
from archlab.generation import Step
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.inputs import check_token_ids
from archlab.nn.recurrent import RECURRENT_KINDS, RecurrentCache, build_rnn, run_rnn

RNN_BACKENDS = ("fused", "explicit")


@dataclasses.dataclass(frozen=True)
class RNNConfig(ModelConfig, Config):
    """A recurrent language model. The defaults are Zaremba et al. (2014)'s medium LSTM on Penn Treebank.

    Args:
        kind: the cell, ``rnn`` (tanh Elman) | ``lstm`` | ``gru``.
        vocab_size: ``V``.
        d_embed: ``d_e``, the token embedding width.
        d_hidden: ``H``, the hidden (and LSTM cell) width of every layer.
        n_layers: ``L`` stacked recurrent layers.
        dropout: on the embeddings, between layers and before the output layer (Zaremba's
            non-recurrent dropout; the recurrent connections are not dropped).
        tie_embeddings: the output matrix is the embedding matrix (Press & Wolf 2017); needs ``d_e = H``.
        grad_clip: the recommended max-norm of the whole gradient, read by the trainer
            (``clip_grad_norm_``); ``None`` turns clipping off.
        backend: ``fused`` (PyTorch's cuDNN / C++ layers) | ``explicit`` (archlab's cells, Python loop).
    """

    kind: str = "lstm"
    vocab_size: int = 10000
    d_embed: int = 650
    d_hidden: int = 650
    n_layers: int = 2
    dropout: float = 0.5
    tie_embeddings: bool = False
    grad_clip: float | None = 5.0
    backend: str = "fused"

    def validate(self) -> None:
        check_choice("kind", self.kind, RECURRENT_KINDS)
        for name in ("vocab_size", "d_embed", "d_hidden", "n_layers"):
            check_positive(name, getattr(self, name))
        check_probability("dropout", self.dropout)
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)
        check_choice("backend", self.backend, RNN_BACKENDS)
        require(
            not self.tie_embeddings or self.d_embed == self.d_hidden,
            f"tie_embeddings=True shares one [V, d] matrix between input and output, so d_embed={self.d_embed} "
            f"must equal d_hidden={self.d_hidden}",
        )


class RNNLanguageModel(nn.Module):
    """Recurrent language model; ``input_ids [B, N] -> logits [B, N, V]``.

    Submodules: ``embedding`` (``E``, ``[V, d_e]``), ``rnn`` (the ``L``-layer stack), ``head``
    (``[V, H]`` + bias; its weight is ``embedding.weight`` when tied).
    """

    def __init__(self, config: RNNConfig):
        super().__init__()
        if not isinstance(config, RNNConfig):
            raise ConfigError(f"RNNLanguageModel needs an RNNConfig, got {type(config).__name__}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_embed)
        self.drop = nn.Dropout(c.dropout)
        self.rnn = build_rnn(
            c.kind, c.d_embed, c.d_hidden, num_layers=c.n_layers,
            dropout=c.dropout if c.n_layers > 1 else 0.0, fused=c.backend == "fused",
        )  # fmt: skip
        self.head = nn.Linear(c.d_hidden, c.vocab_size)
        self.reset_parameters()
        if c.tie_embeddings:
            self.head.weight = self.embedding.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding and output weights ``U(-0.1, 0.1)``, output bias 0 (Zaremba et al.); the recurrent
        layers keep PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``."""
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def new_cache(self) -> RecurrentCache:
        """An empty state for incremental decoding: ``h [L, B, H]`` (LSTM: ``(h, c)``) once filled."""
        return RecurrentCache(batch_dim=1)

    def forward(self, input_ids: Tensor, *, cache: RecurrentCache | None = None) -> Tensor:
        """Next-token logits.

        Args:
            input_ids: ``[B, N]`` token ids in ``[0, V)``; with a ``cache``, the tokens after those it has seen.
            cache: from :meth:`new_cache`; the recurrence starts from its state (zeros when empty) and
                the final state is stored back.

        Returns:
            ``logits [B, N, V]``; ``logits[:, i]`` predicts the token after ``input_ids[:, i]``.
        """
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        state = None
        if cache is not None:
            if not isinstance(cache, RecurrentCache):
                raise ShapeError(f"cache must be a RecurrentCache (model.new_cache()), got {type(cache).__name__}")
            held = cache.batch_size()
            if held is not None and held != input_ids.shape[0]:
                raise ShapeError(f"cache holds batch {held} but input_ids has batch {input_ids.shape[0]}")
            state = cache.state
        x = self.drop(self.embedding(input_ids))  # [B, N, d_e]
        h, state = run_rnn(self.rnn, x, state)  # [B, N, H]
        if cache is not None:
            cache.update(state, input_ids.shape[1])
        return self.head(self.drop(h))  # [B, N, V]

    def decoder_step(self, attention_mask: Tensor | None = None) -> Step:
        """A step for :mod:`archlab.generation`: ``(tokens [B, n], cache) -> logits [B, n, V]``.

        Prompts must be unpadded: a recurrence reads every token it is given, padding included, so
        ``attention_mask`` (if given) must be all ones.
        """
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ShapeError(
                "attention_mask marks padding, but an RNN reads every token it is fed (padding would change its "
                "state); generate from prompts of one length, or one prompt at a time"
            )
        return lambda tokens, cache=None: self(tokens, cache=cache)


register_family(
    "rnn", RNNConfig, RNNLanguageModel,
    "recurrent language model: Elman RNN, LSTM or GRU layers (fused or written out), optional tied embeddings",
    task="lm",
)  # fmt: skip
register_preset(
    "lstm-lm-zaremba-medium", "rnn", RNNConfig(),
    "Zaremba et al. 2014 medium PTB LSTM: 2 layers, 650 units, dropout 0.5, 10k vocab, clip 5",
)  # fmt: skip
_SMALL = dict(vocab_size=256, d_embed=128, d_hidden=128, n_layers=2, dropout=0.1, tie_embeddings=True, grad_clip=1.0)
register_preset(
    "lstm-lm-small", "rnn", RNNConfig(kind="lstm", **_SMALL),
    "small byte-level LSTM LM: 2 layers, 128 units, tied embeddings, clip 1",
)  # fmt: skip
register_preset(
    "gru-lm-small", "rnn", RNNConfig(kind="gru", **_SMALL),
    "small byte-level GRU LM: 2 layers, 128 units, tied embeddings, clip 1",
)  # fmt: skip
register_preset(
    "rnn-lm-small", "rnn", RNNConfig(kind="rnn", **_SMALL),
    "small byte-level Elman (tanh) RNN LM: 2 layers, 128 units, tied embeddings, clip 1",
)  # fmt: skip
