r"""The multi-page document reader of lesson 8 card 5 (work in progress: the data contract is fixed, the model
is being filled in).

Inputs: a :class:`Document` is a list of :class:`Page` (text, an optional table, an optional image), a question
and a class answer. :func:`collate` turns documents into a :class:`DocBatch` of padded tensors ``[B, P, ...]``
with a :class:`DocReaderTokenizer`; :class:`DocReader` maps a batch to answer logits ``[B, n_answers]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from archlab.config import Config

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
    index in ``[0, n_answers)`` of a task-specific label set (``answer_text`` spells it, for people)."""

    pages: list[Page]
    question: str
    answer: int
    answer_text: str = ""


# ================================================================================================
# Config (fields fixed when the model lands; see DocReaderConfig in the finished module)
# ================================================================================================


@dataclass(frozen=True)
class DocReaderConfig(Config):
    """The reader's shape (placeholder: the full field list lands with the model)."""

    vocab_size: int = 30522
    max_pages: int = 50
    n_answers: int = 2


# ================================================================================================
# Batches
# ================================================================================================


class DocBatch(NamedTuple):
    """A padded batch of ``B`` documents of up to ``P`` pages (shapes; ``bool`` masks are True on real entries).

    text_ids ``[B, P, N_t]`` (``[CLS] text [SEP]`` per page), text_mask ``[B, P, N_t]``;
    table_ids ``[B, P, N_c]`` (``[ROW_i] cell [SEP] cell [SEP] ...`` per page), table_mask ``[B, P, N_c]``,
    table_rows ``[B, P, N_c]`` and table_cols ``[B, P, N_c]`` (row 0 = header; column 0 = the row marker);
    images ``[B, P, C, H, W]``, image_mask ``[B, P]``; page_mask ``[B, P]``;
    question_ids ``[B, N_q]``, question_mask ``[B, N_q]``; answers ``[B]`` (long).
    """

    text_ids: Tensor
    text_mask: Tensor
    table_ids: Tensor
    table_mask: Tensor
    table_rows: Tensor
    table_cols: Tensor
    images: Tensor
    image_mask: Tensor
    page_mask: Tensor
    question_ids: Tensor
    question_mask: Tensor
    answers: Tensor


class DocReaderTokenizer:
    """Text to ids for the reader: an archlab tokenizer (default: all-MiniLM-L6-v2's WordPiece, shipped offline)
    and the reader's structure tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, the row marker ``[ROW_i]``)."""

    def __init__(self, base=None):
        raise NotImplementedError("DocReaderTokenizer lands with the model")


def collate(docs: list[Document], config: DocReaderConfig, tokenizer: DocReaderTokenizer) -> DocBatch:
    """Documents -> a padded :class:`DocBatch` (checks: pages <= ``max_pages``, image size, empty pages, ragged
    tables; :class:`~archlab.errors.DataError` naming the document and page)."""
    raise NotImplementedError("collate lands with the model")


class DocReader(nn.Module):
    """``DocBatch`` -> answer logits ``[B, n_answers]``."""

    def __init__(self, config: DocReaderConfig):
        super().__init__()
        self.config = config

    def forward(self, batch: DocBatch) -> Tensor:
        raise NotImplementedError("DocReader.forward lands with the model")
