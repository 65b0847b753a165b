r"""BERT (Devlin et al. 2019): a bidirectional encoder-only Transformer, and the heads built on it.

Encoder-only is the lessons' choice when the output is an understanding of the whole input, not
generated text (card 4: ticket classification; card 5: query/document encoders and the cross-encoder
re-ranker). Every token attends every other token: no causal mask.

Shapes: batch ``B``, sequence length ``N``, width ``d``, heads ``A``, vocabulary ``V``::

    input_ids [B, N], token_type_ids [B, N] (segment A = 0, B = 1), attention_mask [B, N] (1 = real token)
    x_0 = Dropout(LayerNorm(E_tok[input_ids] + E_seg[token_type_ids] + E_pos[0 .. N-1]))   [B, N, d]
    x_l = EncoderBlock_l(x_{l-1})        post-norm: x <- LayerNorm(x + Dropout(Sublayer(x)))
    hidden = x_L                                                                            [B, N, d]
    pooled = tanh(W_p hidden[:, 0] + b_p)           the [CLS] token's vector                [B, d]

Heads, each a module composed on a :class:`BertModel` (``.bert``):

* :class:`BertForPreTraining`: masked-LM logits ``[B, N, V]`` (decoder tied to ``E_tok``) and
  next-sentence logits ``[B, 2]``;
* :class:`BertForSequenceClassification`: ``[CLS] text [SEP]`` -> ``Linear(pooled)`` -> ``[B, n_classes]``
  (card 4);
* :class:`BertCrossEncoder`: ``[CLS] query [SEP] document [SEP]`` -> one relevance logit ``[B]`` (card 5).

Presets: ``bert-base`` (Devlin 2019, 110M), ``bert-mini`` (Turc 2019), ``minilm-l6`` (the shape of
``sentence-transformers/all-MiniLM-L6-v2``). Hugging Face checkpoints load through
:mod:`archlab.interop.bert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import (
    Config,
    check_divisible,
    check_positive,
    check_probability,
    require,
)
from archlab.errors import ConfigError, DataError, ShapeError
from archlab.models.base import AttentionConfig
from archlab.models.registry import register_family, register_model_class, register_preset
from archlab.nn.attention import padding_mask
from archlab.nn.backends import check_backend
from archlab.nn.blocks import Encoder
from archlab.nn.inputs import check_embedding_dtype, check_not_empty, describe
from archlab.nn.norm import LayerNorm
from archlab.nn.positional import LearnedPositionalEncoding

INIT_STD = 0.02  # BERT's initializer_range: N(0, 0.02) for every weight matrix and embedding


# ================================================================================================
# Config
# ================================================================================================


@dataclass(frozen=True)
class BertConfig(AttentionConfig, Config):
    """The shape of a BERT encoder.

    Args:
        vocab_size: ``V``, WordPiece vocabulary size.
        max_len: learned position table size (Hugging Face ``max_position_embeddings``); the
            longest input, ``[CLS]`` and ``[SEP]`` included.
        type_vocab_size: number of segments (2: sentence A and B).
        d_model, n_heads, n_layers, d_ff: ``d``, ``A``, ``L``, FFN hidden width.
        dropout: on the embeddings and each sub-layer's output (``hidden_dropout_prob``).
        attn_dropout: on the attention weights (``attention_probs_dropout_prob``).
        eps: every LayerNorm's epsilon (BERT: 1e-12).
        pad_id: the ``[PAD]`` token; its embedding row starts at zero and gets no gradient.
        backend: attention backend (``auto``, ``math``, ``sdpa``), see :func:`archlab.nn.attend`.
        n_classes: classes of :class:`BertForSequenceClassification` (Hugging Face ``num_labels``).
    """

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    eps: float = 1e-12
    pad_id: int = 0
    backend: str = "auto"
    n_classes: int = 2

    def validate(self) -> None:
        for name in ("vocab_size", "max_len", "type_vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "eps", "n_classes"):
            check_positive(name, getattr(self, name))
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        require(
            0 <= self.pad_id < self.vocab_size, f"pad_id={self.pad_id} must be in [0, vocab_size={self.vocab_size})"
        )
        check_backend(self.backend)


# ================================================================================================
# Input checks (before any computation)
# ================================================================================================


def _check_ids(name: str, ids: Tensor, high: int, high_name: str) -> None:
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ShapeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    check_embedding_dtype(name, ids, "ids")
    if ids.numel() and not ids.is_meta:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= high:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"{name} holds {bad}, outside [0, {high_name}={high})")


def check_bert_inputs(
    config: BertConfig, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None
) -> None:
    """Raise :class:`ShapeError` for anything :meth:`BertModel.forward` cannot run on."""
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and not isinstance(t, Tensor):
            raise ShapeError(f"{name} must be a [B, N] tensor, got {describe(t)}")
    if input_ids.ndim != 2:
        raise ShapeError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
    check_not_empty("input_ids", input_ids)
    b, n = input_ids.shape
    if n == 0:
        raise ShapeError("input_ids has N=0 tokens; BERT needs at least the [CLS] token")
    if n > config.max_len:
        raise ShapeError(
            f"input_ids has N={n} tokens but max_len={config.max_len} (the learned position table); "
            "truncate the input"
        )
    _check_ids("input_ids", input_ids, config.vocab_size, "vocab_size")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and tuple(t.shape) != (b, n):
            raise ShapeError(f"{name} must have the shape of input_ids {(b, n)}, got {tuple(t.shape)}")
    if token_type_ids is not None:
        _check_ids("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ShapeError("attention_mask must hold only 0 (padding) and 1 (real token)")


# ================================================================================================
# The encoder
# ================================================================================================


class BertEmbeddings(nn.Module):
    """``Dropout(LayerNorm(E_tok[ids] + E_seg[types] + E_pos[0..N-1]))``: ``[B, N]`` -> ``[B, N, d]``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)  # E_tok [V, d]
        self.segment = nn.Embedding(config.type_vocab_size, config.d_model)  # E_seg [types, d]
        self.position = LearnedPositionalEncoding(config.max_len, config.d_model)  # E_pos [max_len, d]
        self.norm = LayerNorm(config.d_model, config.eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.word(input_ids) + self.segment(token_type_ids)
        x = self.position.add_to_input(x)
        return self.dropout(self.norm(x))


class BertOutput(NamedTuple):
    """``hidden [B, N, d]`` (every token, last layer) and ``pooled [B, d]`` (``tanh(W_p h_[CLS] + b_p)``)."""

    hidden: Tensor
    pooled: Tensor


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation: weights and embeddings ``N(0, 0.02)``, biases 0, LayerNorm ``(1, 0)``, pad row 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """The BERT encoder with its pooler: ``input_ids [B, N]`` -> :class:`BertOutput` (``[B, N, d]``, ``[B, d]``).

    Post-norm :class:`~archlab.nn.Encoder` blocks with exact (erf) GELU feed-forward layers and
    LayerNorm epsilon ``config.eps``. See the module docstring for the equations.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = Encoder(
            config.n_layers, config.d_model, config.n_heads, config.d_ff,
            dropout=config.dropout, attn_dropout=config.attn_dropout, ffn="gelu", norm="layernorm",
            norm_first=False, eps=config.eps, backend=config.backend,
        )  # fmt: skip
        self.pooler = nn.Linear(config.d_model, config.d_model)  # W_p, b_p
        self.apply(init_bert_weights)

    def forward(
        self, input_ids: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> BertOutput:
        """Encode a batch.

        Args:
            input_ids: ``[B, N]`` token ids in ``[0, V)``, ``N <= max_len``.
            attention_mask: ``[B, N]``, 1 (or True) for real tokens, 0 for padding; padding keys get
                zero attention weight, so real tokens' outputs do not depend on the padding.
                Default: every token is real.
            token_type_ids: ``[B, N]`` segment ids in ``[0, type_vocab_size)``; default all 0.

        Returns:
            :class:`BertOutput`: ``hidden [B, N, d]``, ``pooled [B, d]``.
        """
        check_bert_inputs(self.config, input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None if attention_mask is None else padding_mask(attention_mask)  # [B, 1, 1, N]
        x = self.embeddings(input_ids, token_type_ids)
        hidden = self.encoder(x, mask=mask)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        return BertOutput(hidden, pooled)


# ================================================================================================
# Pre-training heads: masked LM + next-sentence prediction
# ================================================================================================


class MaskedLMHead(nn.Module):
    r"""``logits = LayerNorm(gelu(h W_t + b_t)) E_tok^T + b``: ``[B, N, d]`` -> ``[B, N, V]``.

    The decoder matrix is the word-embedding table ``E_tok [V, d]`` (tied, as in BERT), so the head
    owns only the transform and the output bias ``b [V]``; :meth:`forward` takes ``E_tok``.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)  # W_t, b_t
        self.norm = LayerNorm(config.d_model, config.eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # b

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """``hidden [B, N, d]``, ``word_embeddings [V, d]`` -> logits ``[B, N, V]``."""
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, word_embeddings, self.bias)


class BertPreTrainingOutput(NamedTuple):
    """``mlm_logits [B, N, V]``, ``nsp_logits [B, 2]`` (0 = B follows A, 1 = random), ``hidden [B, N, d]``,
    ``pooled [B, d]``."""

    mlm_logits: Tensor
    nsp_logits: Tensor
    hidden: Tensor
    pooled: Tensor


class BertForPreTraining(nn.Module):
    """BERT with its two pre-training heads: masked LM on every token, next-sentence on ``pooled``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm = MaskedLMHead(config)
        self.nsp = nn.Linear(config.d_model, 2)
        self.mlm.apply(init_bert_weights)
        self.nsp.apply(init_bert_weights)

    def forward(
        self, input_ids: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> BertPreTrainingOutput:
        """``input_ids [B, N]`` (and masks as :meth:`BertModel.forward`) -> :class:`BertPreTrainingOutput`."""
        hidden, pooled = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        mlm_logits = self.mlm(hidden, self.bert.embeddings.word.weight)
        return BertPreTrainingOutput(mlm_logits, self.nsp(pooled), hidden, pooled)


# ================================================================================================
# Fine-tuning heads: sequence classification (card 4) and the cross-encoder re-ranker (card 5)
# ================================================================================================


class BertForSequenceClassification(nn.Module):
    """``[CLS] text [SEP]`` -> ``Linear(Dropout(pooled))`` -> logits ``[B, n_classes]`` (card 4: ticket urgency).

    Args:
        config: the encoder's shape and ``n_classes``.
        n_classes: overrides ``config.n_classes`` (the stored ``self.config`` carries the value used).
        bert: an encoder to put the head on (e.g. loaded pre-trained weights; used as is, not
            copied); it must have ``config``'s shape. Default: a freshly initialised one.
    """

    def __init__(self, config: BertConfig, n_classes: int | None = None, *, bert: BertModel | None = None):
        super().__init__()
        if n_classes is not None and n_classes != config.n_classes:
            check_positive("n_classes", n_classes)
            config = config.replace(n_classes=n_classes)
        if bert is not None and bert.config.replace(n_classes=config.n_classes) != config:
            raise ConfigError(f"bert has config {bert.config} but the head was asked for {config}")
        self.config, self.n_classes = config, config.n_classes
        self.bert = BertModel(config) if bert is None else bert
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, self.n_classes)
        self.classifier.apply(init_bert_weights)

    def forward(
        self, input_ids: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """``input_ids [B, N]`` (masks as :meth:`BertModel.forward`) -> logits ``[B, n_classes]``."""
        pooled = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).pooled
        return self.classifier(self.dropout(pooled))


class PairBatch(NamedTuple):
    """A padded batch of ``[CLS] q [SEP] d [SEP]`` pairs: ``input_ids``, ``token_type_ids``, ``attention_mask``,
    each ``[B, N]``."""

    input_ids: Tensor
    token_type_ids: Tensor
    attention_mask: Tensor


def pair_inputs(
    queries: Sequence[Sequence[int]],
    documents: Sequence[Sequence[int]],
    *,
    cls_id: int,
    sep_id: int,
    pad_id: int = 0,
    max_length: int = 512,
) -> PairBatch:
    """Pack (query, document) token-id lists as BERT sentence pairs, right-padded to the longest.

    Pair ``i`` becomes ``[CLS] q_i [SEP] d_i [SEP]`` with segment ids ``0`` on ``[CLS] q_i [SEP]``
    and ``1`` on ``d_i [SEP]``. A pair longer than ``max_length`` loses the end of its document
    (the query is what the user asked; it is kept whole). Ids are not range-checked here: the
    model does that.

    Raises:
        DataError: different numbers of queries and documents, or a query that does not fit
            ``max_length`` with its three special tokens.
    """
    if len(queries) != len(documents):
        raise DataError(f"got {len(queries)} queries but {len(documents)} documents; they are paired one to one")
    if not queries:
        raise DataError("no pairs to pack: queries and documents are empty")
    check_positive("max_length", max_length)
    rows, types = [], []
    for i, (q, d) in enumerate(zip(queries, documents, strict=True)):
        q, d = list(q), list(d)
        room = max_length - len(q) - 3
        if room < 0:
            raise DataError(
                f"query {i} has {len(q)} tokens; with [CLS] and two [SEP] it needs {len(q) + 3} > "
                f"max_length={max_length}"
            )
        d = d[:room]
        rows.append([cls_id, *q, sep_id, *d, sep_id])
        types.append([0] * (len(q) + 2) + [1] * (len(d) + 1))
    n = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(rows), n), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        token_type_ids[i, : len(t)] = torch.tensor(t)
        attention_mask[i, : len(r)] = 1
    return PairBatch(input_ids, token_type_ids, attention_mask)


class BertCrossEncoder(BertForSequenceClassification):
    """A re-ranker (card 5): ``[CLS] query [SEP] document [SEP]`` -> one relevance logit.

    Query and document attend each other in every layer (unlike a bi-encoder, which embeds them
    apart), which is why it is accurate and why it is run only on the retrieval stage's top hits.
    It is a :class:`BertForSequenceClassification` with one class; train it with
    ``F.binary_cross_entropy_with_logits(scores, relevant)``.

    Args:
        config: the encoder's shape.
        cls_id, sep_id: the ``[CLS]`` and ``[SEP]`` ids of the tokenizer (BERT's WordPiece: 101, 102).
        bert: an encoder to put the head on, as in :class:`BertForSequenceClassification`.
    """

    def __init__(self, config: BertConfig, *, cls_id: int = 101, sep_id: int = 102, bert: BertModel | None = None):
        super().__init__(config, 1, bert=bert)
        for name, value in (("cls_id", cls_id), ("sep_id", sep_id)):
            require(0 <= value < config.vocab_size, f"{name}={value} must be in [0, vocab_size={config.vocab_size})")
        self.cls_id, self.sep_id = cls_id, sep_id

    def score(
        self, input_ids: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Relevance logits ``[B]`` of packed pairs ``input_ids [B, N]`` (see :func:`pair_inputs`)."""
        return self(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).squeeze(-1)

    def score_pairs(
        self, queries: Sequence[Sequence[int]], documents: Sequence[Sequence[int]], *, max_length: int | None = None
    ) -> Tensor:
        """Relevance logits ``[B]`` of (query, document) token-id lists (no special tokens); higher = more relevant."""
        batch = pair_inputs(
            queries, documents, cls_id=self.cls_id, sep_id=self.sep_id, pad_id=self.config.pad_id,
            max_length=self.config.max_len if max_length is None else max_length,
        )  # fmt: skip
        device = self.classifier.weight.device
        return self.score(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            token_type_ids=batch.token_type_ids.to(device),
        )


# ================================================================================================
# Registry
# ================================================================================================

register_family(
    "bert", BertConfig, BertModel, "BERT encoder (bidirectional, post-norm, learned positions) + pooler",
    task="mlm", train_cls=BertForPreTraining,
)
register_model_class(BertForSequenceClassification, BertConfig)  # buildable from its config (n_classes is a field)
register_preset("bert-base", "bert", BertConfig(), "BERT-base uncased (Devlin 2019): L=12, d=768, A=12 (paper: 110M)")
register_preset(
    "bert-mini", "bert", BertConfig(d_model=256, n_heads=4, n_layers=4, d_ff=1024),
    "BERT-mini (Turc 2019): L=4, d=256, A=4, 11M",
)  # fmt: skip
register_preset(
    "minilm-l6", "bert", BertConfig(d_model=384, n_heads=12, n_layers=6, d_ff=1536),
    "the shape of all-MiniLM-L6-v2 (sentence embeddings): L=6, d=384, A=12, 22.7M",
)  # fmt: skip
