r"""TextCNN (Kim 2014): parallel n-gram convolutions over word embeddings, max-over-time pooling, a classifier.

Read top to bottom, for ``input_ids [B, N]``::

    X = [E_1[w]; ...; E_D[w]]                  D embedding channels of width d, stacked: [B, D d, N]
    for each kernel (width h, channels c):     (the deck: width 2 x 4 channels beside width 4 x 5 channels)
        C_h = relu(conv_h(X))                  c filters over windows of h words, [B, c, N - h + 1]
        m_h = max_t C_h[:, :, t]               max-over-time pooling, [B, c]
    z = [m_h1; m_h2; ...]                      [B, sum c]  (4 + 5 = 9 in the deck's example)
    logits = dropout(z) W + b                  [B, classes]

Two meanings of "channel" meet here. The deck counts the embedding's ``d`` dimensions as the input
channels of the 1-D convolution ("6D embeddings": ``d = 6``). Kim's *multichannel* model has ``D``
embedding tables, each a channel: a ``static`` one is a frozen copy (never trained) and a ``non-static``
one is fine-tuned (a static table's weight has ``requires_grad=False``; ``model.requires_grad_()`` would
unfreeze it); both start from the same vectors (Kim: word2vec; here the random init or
:meth:`TextCNN.load_vectors`), and each filter spans all of them (the conv's input is ``D d`` wide,
which is Kim's "applied to both channels and the results added"). Kim's variants: CNN-rand
``("non-static",)`` from random vectors, CNN-static ``("static",)``, CNN-non-static ``("non-static",)`` and
CNN-multichannel ``("static", "non-static")``, the last three loaded with pretrained vectors.

Every kernel needs a window, so ``N >=`` the widest kernel (else ``ShapeError``); pad short sentences,
as Kim does. A batch of sentences of different lengths can pass ``attention_mask`` (1 = real token):
windows that cover padding are then left out of the max, so each row pools as it would alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import Config, check_choice, check_positive, check_probability, require
from archlab.errors import ConfigError, ShapeError
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.inputs import check_embedding_dtype, check_not_empty

EMBEDDING_CHANNELS = ("static", "non-static")


@dataclasses.dataclass(frozen=True)
class TextCNNConfig(ModelConfig, Config):
    """A TextCNN sentence classifier.

    Args:
        vocab_size: ``V``.
        n_classes: ``C``.
        d_embed: ``d``, the width of each embedding channel.
        channels: one entry per embedding channel: ``static`` (frozen copy) or ``non-static`` (fine-tuned).
        kernels: ``((width h, filters c), ...)``, the parallel convolutions.
        dropout: on the pooled features before the classifier (Kim: 0.5).
    """

    vocab_size: int = 20000
    n_classes: int = 2
    d_embed: int = 300
    channels: tuple[str, ...] = ("static", "non-static")
    kernels: tuple[tuple[int, int], ...] = ((3, 100), (4, 100), (5, 100))
    dropout: float = 0.5

    def validate(self) -> None:
        for name in ("vocab_size", "n_classes", "d_embed"):
            check_positive(name, getattr(self, name))
        require(len(self.channels) >= 1, "channels=() must name at least one embedding channel (static or non-static)")
        for i, kind in enumerate(self.channels):
            check_choice(f"channels[{i}]", kind, EMBEDDING_CHANNELS)
        require(len(self.kernels) >= 1, "kernels=() must hold at least one (width, channels) pair")
        for i, (width, filters) in enumerate(self.kernels):
            require(width > 0 and filters > 0, f"kernels[{i}]=({width}, {filters}): width and channels must be > 0")
        check_probability("dropout", self.dropout)

    @property
    def max_width(self) -> int:
        """The widest kernel: the shortest sequence the model accepts."""
        return max(width for width, _ in self.kernels)

    @property
    def n_features(self) -> int:
        """Length of the pooled vector ``z``: the sum of the kernels' channels."""
        return sum(filters for _, filters in self.kernels)


class TextCNN(nn.Module):
    """``input_ids [B, N] -> logits [B, C]``.

    Submodules: ``embeddings`` (one ``nn.Embedding [V, d]`` per channel; static ones frozen),
    ``convs`` (one ``nn.Conv1d(D d, c, h)`` per kernel), ``classifier`` (``sum c -> C``).
    """

    def __init__(self, config: TextCNNConfig):
        super().__init__()
        if not isinstance(config, TextCNNConfig):
            raise ConfigError(f"TextCNN needs a TextCNNConfig, got {type(config).__name__}")
        self.config = c = config
        self.embeddings = nn.ModuleList(nn.Embedding(c.vocab_size, c.d_embed) for _ in c.channels)
        self.convs = nn.ModuleList(nn.Conv1d(len(c.channels) * c.d_embed, filters, width) for width, filters in c.kernels)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.n_features, c.n_classes)
        self.load_vectors(self.embeddings[0].weight.detach().clone())  # all channels start from the same vectors

    @torch.no_grad()
    def load_vectors(self, vectors: Tensor) -> None:
        """Copy word vectors ``[V, d]`` (e.g. word2vec) into every embedding channel; static ones stay frozen."""
        c = self.config
        if not isinstance(vectors, Tensor) or tuple(vectors.shape) != (c.vocab_size, c.d_embed):
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ShapeError(f"vectors must be [vocab_size, d_embed] = [{c.vocab_size}, {c.d_embed}], got {shape}")
        for embedding, kind in zip(self.embeddings, c.channels):
            embedding.weight.copy_(vectors)
            embedding.weight.requires_grad_(kind == "non-static")

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ShapeError(f"input_ids must be a [B, N] tensor of token ids, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ShapeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        check_embedding_dtype("input_ids", input_ids)
        check_not_empty("input_ids", input_ids)
        b, n = input_ids.shape
        if n < c.max_width:
            raise ShapeError(
                f"kernel width {c.max_width} is wider than the sequence N={n}: every kernel needs a window, so pad "
                f"the input to at least {c.max_width} tokens (kernels={c.kernels})"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= c.vocab_size:
            raise ShapeError(f"input_ids holds id {low if low < 0 else high}, outside [0, vocab_size={c.vocab_size})")
        if attention_mask is None:
            return
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, n):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ShapeError(f"attention_mask must be [B, N] = [{b}, {n}] like input_ids, got {shape}")
        if attention_mask.dtype != torch.bool and not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ShapeError("attention_mask must hold only 0 (padding) and 1 (real token)")
        windows = attention_mask.bool().unfold(1, c.max_width, 1).all(-1).any(-1)  # [B]: a whole widest window?
        if not windows.all():
            row = int((~windows).nonzero()[0])
            raise ShapeError(
                f"row {row} has no {c.max_width} consecutive real tokens (attention_mask): kernel width {c.max_width} "
                f"needs a window of real tokens in every row"
            )

    # -- the forward pass, step by step ------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """``[B, N]`` -> ``X [B, D d, N]``: the channels' embeddings stacked along the conv's input channels."""
        self._check_inputs(input_ids)
        return torch.cat([embedding(input_ids) for embedding in self.embeddings], dim=-1).transpose(1, 2)

    def feature_maps(self, input_ids: Tensor) -> list[Tensor]:
        """``relu(conv_h(X))`` per kernel: ``[B, c, N - h + 1]``."""
        x = self.embed(input_ids)
        return [F.relu(conv(x)) for conv in self.convs]

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Max-over-time of every feature map, concatenated: ``z [B, sum c]``.

        With ``attention_mask [B, N]`` (1 = real token, 0 = padding) a window that covers padding is left
        out of the max, so a padded row pools exactly as the row alone.
        """
        self._check_inputs(input_ids, attention_mask)
        pooled = []
        for (width, _), fmap in zip(self.config.kernels, self.feature_maps(input_ids)):
            if attention_mask is not None:
                real = attention_mask.bool().unfold(1, width, 1).all(-1)  # [B, N - h + 1]: window all real
                fmap = fmap.masked_fill(~real[:, None, :], float("-inf"))
            pooled.append(fmap.amax(dim=-1))
        return torch.cat(pooled, dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids [B, N]`` (``N >=`` the widest kernel), optional padding mask ``[B, N]`` -> ``logits [B, C]``."""
        return self.classifier(self.dropout(self.pooled(input_ids, attention_mask)))


register_family(
    "textcnn", TextCNNConfig, TextCNN, "TextCNN (Kim 2014): parallel n-gram convolutions, max-over-time pooling",
    task="classification",
)  # fmt: skip
register_preset(
    "textcnn-kim", "textcnn", TextCNNConfig(),
    "Kim 2014 CNN-multichannel: static + non-static 300-d embeddings, widths 3, 4, 5 x 100 filters, dropout 0.5",
)  # fmt: skip
register_preset(
    "textcnn-deck", "textcnn",
    TextCNNConfig(vocab_size=1000, d_embed=6, channels=("non-static",), kernels=((2, 4), (4, 5)), dropout=0.0),
    "the deck's example: 6-d embeddings, a width-2 kernel with 4 channels beside a width-4 kernel with 5 (z of 9)",
)  # fmt: skip
