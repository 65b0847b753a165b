r"""ELMo: deep contextualised word representations from a bidirectional LSTM language model (Peters et al. 2018).

A static embedding gives "bank" one vector in "bank account" and in "bank of a river" (deck). ELMo
gives each token a vector computed from the whole sentence, by two language models read in opposite
directions over shared token embeddings and a shared (tied) softmax::

    x_t        = E[w_t]                                       token representation, [B, N, d]
    ->h^j_t    = LSTM^j_fwd(->h^{j-1}_t, ->h^j_{t-1})         reads w_1..w_t,   j = 1..L, [B, N, d]
    <-h^j_t    = LSTM^j_bwd(<-h^{j-1}_t, <-h^j_{t+1})         reads w_t..w_N
    p(w_{t+1} | w_1..w_t) = softmax(E ->h^L_t + b)            the softmax is the embedding matrix E (tied)
    p(w_{t-1} | w_t..w_N) = softmax(E <-h^L_t + b)            shared by both directions

(``->h^0 = <-h^0 = x``; layers ``j >= 2`` add their input back, a residual connection, as in ELMo.) The
two are trained jointly (deck)::

    L = - sum_t [ log p(w_t | w_1..w_{t-1}; theta_x, ->theta_LSTM, theta_s)
                + log p(w_t | w_{t+1}..w_N; theta_x, <-theta_LSTM, theta_s) ]

(:meth:`ELMo.compute_loss` averages each direction's sum over its predicted tokens.) Downstream, token
``t`` gets the layers ``R_t = {[x_t; x_t], [->h^j_t; <-h^j_t] : j = 1..L}`` (``[L + 1, B, N, 2d]``) and a
learned scalar mix (:class:`ScalarMix`)::

    ELMo_t = gamma * sum_{j=0..L} s_j R^j_t,     s = softmax(w)

Each LSTM has ``d_cell`` units projected to ``d`` (ELMo: 4096 -> 512, PyTorch's ``proj_size``). The
original ELMo builds ``x_t`` with a character CNN; archlab uses a token embedding instead (no
character CNN), so the input layer is a word embedding and words outside the vocabulary share ``<unk>``.
Padding goes on the right (``attention_mask [B, N]``, 1 = real token).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import Config, check_positive, check_probability, require
from archlab.errors import ConfigError, ShapeError
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.inputs import check_token_ids
from archlab.nn.recurrent import lengths_from_mask


@dataclasses.dataclass(frozen=True)
class ElmoConfig(ModelConfig, Config):
    """An ELMo biLM. The defaults are ELMo's sizes (Peters et al. 2018), with a token embedding for input.

    Args:
        vocab_size: ``V`` (ELMo's softmax covers the 1B Word Benchmark's 793,471 words).
        d_model: ``d``: token embedding, every LSTM layer's output (after projection), the softmax.
        d_cell: LSTM units per layer; ``None`` means ``d`` (no projection). Must be ``>= d``.
        n_layers: ``L`` LSTM layers per direction.
        dropout: on the token embeddings and on every layer's output.
        grad_clip: the gradient max-norm the trainer clips to (ELMo's training code: 10); ``None``: off.
    """

    vocab_size: int = 793471
    d_model: int = 512
    d_cell: int | None = 4096
    n_layers: int = 2
    dropout: float = 0.1
    grad_clip: float | None = 10.0

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers"):
            check_positive(name, getattr(self, name))
        if self.d_cell is not None:
            check_positive("d_cell", self.d_cell)
            require(
                self.d_cell >= self.d_model,
                f"d_cell={self.d_cell} must be >= d_model={self.d_model}: each LSTM's {self.d_cell} units are "
                f"projected down to d_model (use d_cell=None for no projection)",
            )
        check_probability("dropout", self.dropout)
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)

    @property
    def cell_width(self) -> int:
        """The LSTM units per layer: ``d_cell``, or ``d`` when it is None."""
        return self.d_model if self.d_cell is None else self.d_cell


class ScalarMix(nn.Module):
    """``gamma * sum_j s_j R_j`` with ``s = softmax(w)``: a learned, normalised weighting of ``n`` layers.

    ``w`` starts at 0 (equal weights ``1/n``) and ``gamma`` at 1. ``forward(layers [n, ..., D]) -> [..., D]``.
    """

    def __init__(self, n_layers: int):
        super().__init__()
        check_positive("n_layers", n_layers)
        self.w = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    @property
    def weights(self) -> Tensor:
        """``s = softmax(w)``, ``[n]``, summing to 1."""
        return torch.softmax(self.w, dim=0)

    def forward(self, layers: Tensor) -> Tensor:
        if layers.shape[0] != self.w.shape[0]:
            raise ShapeError(f"ScalarMix of {self.w.shape[0]} layers got {layers.shape[0]} ({tuple(layers.shape)})")
        s = self.weights.to(layers.dtype).reshape(-1, *([1] * (layers.ndim - 1)))
        return self.gamma * (s * layers).sum(dim=0)


class BiLMStates(NamedTuple):
    """The biLM's states: ``embeddings [B, N, d]``, and per layer ``forward[j]``, ``backward[j]``, ``[B, N, d]``."""

    embeddings: Tensor
    forward: list[Tensor]
    backward: list[Tensor]


class ElmoEmbeddings(NamedTuple):
    """``layers [L + 1, B, N, 2d]`` (``R_0 = [x; x]``, ``R_j = [->h^j; <-h^j]``); their mix ``mixed [B, N, 2d]``."""

    layers: Tensor
    mixed: Tensor


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first ``lengths[b]`` steps of ``x [B, N, ...]``, padding left in place.

    ``[a, b, c, pad] -> [c, b, a, pad]``: the backward LM then reads every sentence from its last real
    token, and padding stays after the real tokens. Applying it twice gives ``x`` back.
    """
    n = x.shape[1]
    t = torch.arange(n, device=x.device)[None, :]
    lengths = lengths.to(x.device)[:, None]
    index = torch.where(t < lengths, lengths - 1 - t, t)  # [B, N]
    return x.gather(1, index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand_as(x))


class ELMo(nn.Module):
    """The ELMo biLM: ``input_ids [B, N]`` -> :class:`BiLMStates`; :meth:`compute_loss`; :meth:`embed`.

    Submodules: ``embedding`` (``E [V, d]``, also the softmax weight), ``softmax_bias`` (``b [V]``),
    ``forward_lstms`` and ``backward_lstms`` (``L`` one-layer ``nn.LSTM`` each, ``d_cell`` units projected
    to ``d``), ``mix`` (:class:`ScalarMix` over ``L + 1`` layers).
    """

    #: The batch keys :meth:`compute_loss` reads (``attention_mask`` optional): token windows, which
    #: ``archlab train`` builds from a text corpus (``archlab.data.TokenWindows``).
    batch_keys = ("input_ids", "attention_mask")

    def __init__(self, config: ElmoConfig):
        super().__init__()
        if not isinstance(config, ElmoConfig):
            raise ConfigError(f"ELMo needs an ElmoConfig, got {type(config).__name__}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.softmax_bias = nn.Parameter(torch.zeros(c.vocab_size))
        proj = c.d_model if c.cell_width != c.d_model else 0
        self.forward_lstms = nn.ModuleList(self._lstm(proj) for _ in range(c.n_layers))
        self.backward_lstms = nn.ModuleList(self._lstm(proj) for _ in range(c.n_layers))
        self.drop = nn.Dropout(c.dropout)
        self.mix = ScalarMix(c.n_layers + 1)
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, 0.0, 1.0 / math.sqrt(c.d_model))

    def _lstm(self, proj_size: int) -> nn.LSTM:
        return nn.LSTM(self.config.d_model, self.config.cell_width, proj_size=proj_size, batch_first=True)

    def _lengths(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ShapeError(f"attention_mask must be [B, N] = {list(input_ids.shape)} like input_ids, got {got}")
        return lengths_from_mask(attention_mask, "attention_mask")

    @staticmethod
    def _run(lstms: nn.ModuleList, x: Tensor, drop: nn.Module) -> list[Tensor]:
        """One direction's stack over ``x [B, N, d]``; layers ``j >= 2`` are residual. Returns ``L`` outputs."""
        outputs = []
        for j, lstm in enumerate(lstms):
            h, _ = lstm(x)
            h = drop(h)
            x = h if j == 0 else h + x
            outputs.append(x)
        return outputs

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> BiLMStates:
        """``input_ids [B, N]`` (``attention_mask [B, N]``, right padding) -> the biLM's states.

        ``forward[j][:, t]`` depends on tokens ``<= t`` only, ``backward[j][:, t]`` on tokens ``>= t`` only
        (of the same row, real ones). Padded positions hold values that no real position reads.
        """
        lengths = self._lengths(input_ids, attention_mask)
        if lengths is None:
            lengths = torch.full(input_ids.shape[:1], input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.embedding(input_ids))  # [B, N, d]
        fwd = self._run(self.forward_lstms, x, self.drop)  # right padding comes after every real token
        bwd = self._run(self.backward_lstms, reverse_padded(x, lengths), self.drop)
        return BiLMStates(x, fwd, [reverse_padded(h, lengths) for h in bwd])

    def logits(self, h: Tensor) -> Tensor:
        """The shared softmax layer: ``h [..., d] -> h E^T + b``, ``[..., V]``."""
        return F.linear(h, self.embedding.weight, self.softmax_bias)

    def compute_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """The joint biLM loss on ``batch = {"input_ids": [B, N], "attention_mask": [B, N] (optional)}``.

        ``loss = NLL_fwd + NLL_bwd``, each the mean over its predicted tokens of ``-log p``: the forward
        LM predicts ``w_{t+1}`` from ``->h^L_t``, the backward LM ``w_{t-1}`` from ``<-h^L_t``. Metrics:
        both NLLs and their perplexities, and ``tokens`` (``B N``, the input positions: the trainer's tokens/s).
        """
        if not isinstance(batch, dict) or "input_ids" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ShapeError(f"batch must be a dict with 'input_ids' [B, N] (optional: 'attention_mask'), got {got}")
        unknown_keys = set(batch) - set(self.batch_keys)
        if unknown_keys:
            reads = " and ".join(map(repr, self.batch_keys))
            raise ShapeError(f"batch has keys {sorted(unknown_keys)}; ELMo reads {reads}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[1] < 2:
            raise ShapeError(f"input_ids must hold N >= 2 tokens per row (one predicts another), got {list(ids.shape)}")
        states = self(ids, mask)
        real = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:].bool()  # [B, N-1]
        fwd_nll = F.cross_entropy(self.logits(states.forward[-1][:, :-1][real]), ids[:, 1:][real])
        bwd_nll = F.cross_entropy(self.logits(states.backward[-1][:, 1:][real]), ids[:, :-1][real])
        loss = fwd_nll + bwd_nll
        f, b = fwd_nll.item(), bwd_nll.item()
        return loss, {"loss": loss.item(), "forward_nll": f, "backward_nll": b,
                      "forward_ppl": math.exp(min(f, 50.0)), "backward_ppl": math.exp(min(b, 50.0)),
                      "tokens": ids.numel()}  # fmt: skip

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> ElmoEmbeddings:
        """Contextual token vectors: the ``L + 1`` layers ``[L + 1, B, N, 2d]`` and their :class:`ScalarMix`.

        Padded positions are zero.
        """
        states = self(input_ids, attention_mask)
        x = states.embeddings
        contextual = [torch.cat([f, b], dim=-1) for f, b in zip(states.forward, states.backward, strict=True)]
        layers = torch.stack([torch.cat([x, x], dim=-1), *contextual])  # [L + 1, B, N, 2d]
        if attention_mask is not None:
            layers = layers * attention_mask.to(layers.dtype)[None, :, :, None]
        return ElmoEmbeddings(layers, self.mix(layers))


register_family(
    "elmo", ElmoConfig, ELMo,
    "ELMo biLM: forward + backward LSTM LMs, tied softmax, joint loss, scalar mix (token input, no char-CNN)",
    task="custom",
)  # fmt: skip
register_preset(
    "elmo-original", "elmo", ElmoConfig(),
    "ELMo sizes (Peters et al. 2018): 2 layers x 4096 LSTM units projected to 512; token input instead of char-CNN",
)  # fmt: skip
register_preset(
    "elmo-small", "elmo", ElmoConfig(vocab_size=256, d_model=64, d_cell=None, n_layers=2, dropout=0.0),
    "small ELMo for tests and demos: 2 layers, d=64, vocab 256",
)  # fmt: skip
