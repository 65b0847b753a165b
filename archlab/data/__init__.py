"""Data: tokenizers, embedded corpora, synthetic tasks, user files and the batch sources training reads.

==================  =====================================================================================
``tokenizers``      byte, character, byte-level BPE (trained with HF ``tokenizers``), WordPiece (MiniLM's)
``corpora``         the interpreter's standard-library source as an LM corpus; train/validation split rules
``synthetic``       copy, reverse, sort, addition and date-normalisation seq2seq tasks
``images``          scikit-learn's 8x8 digits as ``[N, 1, 8, 8]`` tensors
``files``           text, JSONL and CSV files with clear errors
``loaders``         LMWindows, TokenWindows, MLMBatches, Seq2SeqBatches, ClassificationBatches: resumable, shardable
==================  =====================================================================================
"""

from archlab.data.corpora import TextCorpus, encode_texts, python_source, split_documents, split_text, unigram_loss
from archlab.data.files import TextExamples, read_csv, read_jsonl, read_text
from archlab.data.images import digits
from archlab.data.loaders import (
    IGNORE_INDEX,
    BatchSource,
    ClassificationBatches,
    LMWindows,
    MLMBatches,
    Seq2SeqBatches,
    TokenWindows,
)
from archlab.data.synthetic import TASK_NAMES, SyntheticTask
from archlab.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    minilm_wordpiece,
    train_bpe,
)

__all__ = [
    "IGNORE_INDEX", "TASK_NAMES", "BatchSource", "ByteTokenizer", "CharTokenizer", "ClassificationBatches",
    "HFTokenizer", "LMWindows", "MLMBatches", "Seq2SeqBatches", "SyntheticTask", "TextCorpus", "TextExamples",
    "TokenWindows", "Tokenizer", "digits", "encode_texts", "load_tokenizer", "minilm_wordpiece", "python_source",
    "read_csv", "read_jsonl", "read_text", "split_documents", "split_text", "train_bpe", "unigram_loss",
]  # fmt: skip
