r"""The data of a run: :class:`DataConfig` names it, :func:`build_data` makes the tokenizer and batch sources.

===============  ==============================================================  ===========================
task             ``data.source``                                                 batches (``archlab.data``)
===============  ==============================================================  ===========================
lm, mlm          ``stdlib`` (default): the interpreter's standard-library         ``LMWindows`` /
                 source (``max_bytes`` of it); or a ``.txt`` file, or
                 ``.jsonl`` / ``.csv`` documents (``text_field``)                 ``MLMBatches`` of
                                                                                  ``seq_len`` tokens
seq2seq          a synthetic task: ``dates`` (default), ``reverse``, ``copy``,    ``Seq2SeqBatches``
                 ``sort``, ``addition`` (``n_train`` / ``n_valid`` pairs,
                 lengths ``min_length..max_length``); or ``.jsonl`` / ``.csv``
                 pairs (``source_field``, ``target_field``)
classification   ``digits`` (default): scikit-learn's 8x8 images; or ``.jsonl``  ``ClassificationBatches``
                 / ``.csv`` texts with labels (``text_field``, ``label_field``)
custom           as lm, for a model whose ``compute_loss`` reads token windows     :class:`TokenWindows` of
                 (its class's ``batch_keys`` are :data:`TOKEN_WINDOW_KEYS`:      ``seq_len`` tokens
                 ELMo's biLM)
                 ``documents`` (default), for a model that reads the document     ``DocumentBatches``: the
                 reader's batches (``batch_keys`` = :data:`DOCUMENT_KEYS`): new   fields of the reader's
                 generated documents every step (``archlab.data.documents``),     ``DocBatch``
                 ``min_length..max_length`` pages, ``n_valid`` for validation
===============  ==============================================================  ===========================

Tokenizer (``data.tokenizer``): ``bpe`` (byte-level BPE of ``vocab_size`` tokens, trained on the training
split), ``byte``, ``char`` (the training split's characters; a synthetic task's own alphabet), or a path to
a ``tokenizer.json`` (or its folder). ``auto`` is ``char`` for seq2seq and ``bpe`` otherwise; images have
none. ``seq_len`` ``None`` is the model's context (``max_len``, else ``context_length``, else
``segment_len``, else :data:`DEFAULT_SEQ_LEN`).

Validation splits: the stdlib by file and a ``.txt`` file by its last lines (``archlab.data.corpora``),
records by a hash of their text (of the source, for pairs), so no text is on both sides; synthetic tasks
by a hash of the source (``archlab.data.synthetic``); digits stratified. ``valid_percent`` sets the share.

A ``custom`` model trains on ``model.compute_loss(batch)`` (``archlab.models.registry.TASKS``); archlab can
build its batches only when the model class says which keys that reads (``batch_keys``) and they are keys
a source here makes. Two sources fit: token windows, for ``batch_keys = TOKEN_WINDOW_KEYS``, and the
generated documents, for ``batch_keys = DOCUMENT_KEYS`` (the document reader). Any other custom model is
refused by :func:`resolve_data`, naming its family, before any work.

What the data decides in the model (:meth:`RunData.model_overrides`): ``vocab_size`` and ``pad_id`` follow
the tokenizer, ``n_classes`` the labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archlab.config import Config, check_choice, check_positive, require
from archlab.data import (
    TASK_NAMES,
    BatchSource,
    ByteTokenizer,
    CharTokenizer,
    ClassificationBatches,
    LMWindows,
    MLMBatches,
    Seq2SeqBatches,
    SyntheticTask,
    Tokenizer,
    TokenWindows,
    digits,
    encode_texts,
    load_tokenizer,
    python_source,
    read_csv,
    read_jsonl,
    read_text,
    split_documents,
    split_text,
    train_bpe,
    unigram_loss,
)
from archlab.data.corpora import is_validation
from archlab.data.tokenizers import check_bpe_vocab_size
from archlab.errors import ConfigError, DataError, unknown
from archlab.models.docreader import DocBatch
from archlab.models.registry import family_of

TOKENIZER_KINDS = ("bpe", "byte", "char")
#: the kinds made from the run's text (a run saves them as ``tokenizer.json``; ``byte`` is the same for every text)
TRAINED_TOKENIZERS = ("bpe", "char")
FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
DEFAULT_SEQ_LEN = 128  # for a model without a context length of its own (RNNs, WaveNet)

#: What each kind of source is, for messages.
SOURCE_KINDS = {
    "corpus": "the standard-library source corpus",
    "synthetic": "a synthetic sequence-to-sequence task",
    "images": "the 8x8 digits images",
    "text": "a text file",
    "records": "a JSONL/CSV file",
    "documents": "the generated multi-page documents",
}
#: The kinds of source each task trains on, and its default source.
TASK_SOURCES = {
    "lm": ("corpus", "text", "records"),
    "mlm": ("corpus", "text", "records"),
    "seq2seq": ("synthetic", "records"),
    "classification": ("images", "records"),
    "custom": ("corpus", "text", "records", "documents"),  # what the model reads: see CUSTOM_SOURCES
}
DEFAULT_SOURCE = {"lm": "stdlib", "mlm": "stdlib", "seq2seq": "dates", "classification": "digits", "custom": "stdlib"}
#: The batch keys of :class:`TokenWindows`: a ``custom`` model whose class declares exactly these as its
#: ``batch_keys`` (what its ``compute_loss`` reads) trains on them.
TOKEN_WINDOW_KEYS = ("input_ids", "attention_mask")
#: The batch keys of :class:`~archlab.data.documents.DocumentBatches`: the document reader's ``DocBatch`` fields.
DOCUMENT_KEYS = DocBatch._fields
#: The custom batches archlab builds: a model's ``batch_keys`` -> the kinds of source that make them.
CUSTOM_SOURCES = {TOKEN_WINDOW_KEYS: ("corpus", "text", "records"), DOCUMENT_KEYS: ("documents",)}
_TASK_WORDS = {
    "lm": "stdlib or a .txt/.jsonl/.csv text file",
    "mlm": "stdlib or a .txt/.jsonl/.csv text file",
    "custom": "stdlib or a .txt/.jsonl/.csv text file, cut into token windows",
    "seq2seq": f"a synthetic task ({', '.join(TASK_NAMES)}) or a .jsonl/.csv file of source/target pairs",
    "classification": "digits or a .jsonl/.csv file of labelled texts",
}


def source_kind(source: str) -> str:
    """``stdlib`` -> corpus, a task name -> synthetic, ``digits`` -> images, ``*.txt`` -> text, ``*.jsonl|csv`` -> records."""
    if source == "stdlib":
        return "corpus"
    if source in TASK_NAMES:
        return "synthetic"
    if source == "digits":
        return "images"
    if source == "documents":
        return "documents"
    suffix = Path(source).suffix.lower()
    if suffix == ".txt":
        return "text"
    if suffix in (".jsonl", ".csv"):
        return "records"
    names = ("auto", "stdlib", "digits", "documents", *TASK_NAMES)
    raise ConfigError(f"source: {unknown('value', source, names)}; or a path to a {'/'.join(FILE_SUFFIXES)} file")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Which data a run trains on (see the module docstring).

    Args:
        source: ``auto`` (the task's default), ``stdlib``, ``digits``, a synthetic task name, or a file path.
        tokenizer: ``auto | bpe | byte | char`` or a path to a ``tokenizer.json``.
        vocab_size: the BPE vocabulary to train (the model's ``vocab_size`` follows the tokenizer).
        max_bytes: cap on the stdlib corpus (``None``: all of it, about 12 MB); keeps tokenising quick.
        n_train, n_valid: synthetic pairs in each split (``documents``: n_valid validation documents; training
            documents are new at every step).
        min_length, max_length: a synthetic task's length knob (``dates`` ignores it); pages per document for
            ``documents``.
        questions: ``documents`` only: the kinds of question asked (``largest``, ``digit``, ``count``; ``None``:
            all three, drawn uniformly). One kind is how the recipes that learn train (``archlab.labs.docreader``:
            mixed, the tiny reader learns the count only).
        question_shares: ``documents`` only: empty (default) draws the kinds uniformly; else one positive integer
            per kind of ``questions`` (all three when null), its relative share of the training documents
            (``[2, 1, 1]``: half ask the largest value, as ``archlab.labs.docreader.MIXED_RECIPE`` trains);
            validation documents ask every kind alike.
        seq_len: tokens per LM/MLM/token-window row, or the longest text of text classification; ``None``: the
            model's context.
        text_field, label_field, source_field, target_field: the JSONL fields / CSV columns to read.
        valid_percent: the share of the data held out for validation (not for synthetic tasks: a tenth).
        seed: the batch order and the synthetic pairs (the model's initialisation follows ``train.seed``).
    """

    source: str = "auto"
    tokenizer: str = "auto"
    vocab_size: int = 4096
    max_bytes: int | None = 2_000_000
    n_train: int = 20_000
    n_valid: int = 1000
    min_length: int = 1
    max_length: int = 8
    questions: tuple[str, ...] | None = None
    question_shares: tuple[int, ...] = ()
    seq_len: int | None = None
    text_field: str = "text"
    label_field: str = "label"
    source_field: str = "source"
    target_field: str = "target"
    valid_percent: int = 10
    seed: int = 0

    def validate(self) -> None:
        if self.source != "auto":
            source_kind(self.source)
        tok = self.tokenizer
        if tok not in ("auto", *TOKENIZER_KINDS) and not (tok.endswith(".json") or Path(tok).is_dir()):
            raise ConfigError(
                f"tokenizer: {unknown('value', tok, ('auto', *TOKENIZER_KINDS))}; or a path to a tokenizer.json"
            )
        for name in ("vocab_size", "n_train", "n_valid", "min_length", "max_length"):
            check_positive(name, getattr(self, name))
        check_bpe_vocab_size("vocab_size", self.vocab_size)  # before the corpus is read (the trainer would abort)
        require(self.max_length >= self.min_length, f"max_length={self.max_length} must be >= min_length={self.min_length}")
        for name in ("max_bytes", "seq_len"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.questions is not None:
            from archlab.data.documents import QUESTION_KINDS

            require(len(self.questions) >= 1, f"data.questions={list(self.questions)} must name at least one kind of "
                    f"{list(QUESTION_KINDS)}, or be null (all)")  # fmt: skip
            for kind in self.questions:
                check_choice("data.questions", kind, QUESTION_KINDS)
            require(len(set(self.questions)) == len(self.questions), f"data.questions={list(self.questions)} repeats "
                    "a kind")  # fmt: skip
        if self.question_shares:
            from archlab.data.documents import QUESTION_KINDS, shares_fit

            kinds = self.questions or QUESTION_KINDS
            require(shares_fit(self.question_shares, kinds), f"data.question_shares={list(self.question_shares)} must "
                    f"be one positive integer per kind of question asked ({list(kinds)}), or empty")  # fmt: skip
        require(1 <= self.valid_percent <= 99, f"valid_percent={self.valid_percent!r} must be in 1..99")
        require(self.seed >= 0, f"seed={self.seed!r} must be >= 0")


def resolve_data(data: DataConfig, task: str, model_config: Config, who: str) -> DataConfig:
    """``data`` with ``auto`` source and tokenizer and a ``None`` seq_len chosen for ``task``; a source the task
    cannot train on raises ConfigError naming ``who`` (e.g. ``"preset vit-tiny (family vit)"``)."""
    if task not in TASK_SOURCES:
        raise ConfigError(
            f"{who} trains with task {task!r}, which `archlab train` does not feed; it trains "
            f"{', '.join(TASK_SOURCES)} models (use archlab.train.Trainer with your own batches)"
        )
    kinds = check_custom_batches(model_config, who) if task == "custom" else TASK_SOURCES[task]
    source = data.source
    if source == "auto":
        source = "documents" if kinds == ("documents",) else DEFAULT_SOURCE[task]
    kind = source_kind(source)
    if kind not in kinds:
        words = "the generated documents (source 'documents')" if kinds == ("documents",) else _TASK_WORDS[task]
        raise ConfigError(
            f"data.source={source!r} ({SOURCE_KINDS[kind]}) does not fit {who}, which trains on task {task!r}: "
            f"its data is {words}"
        )
    reads_tokens = model_config.inputs == "tokens"
    if kind == "images" and reads_tokens:
        raise ConfigError(f"data.source={source!r}: {who} reads token ids, not images; give it a .jsonl/.csv file of "
                          "labelled texts")  # fmt: skip
    if kind == "records" and task == "classification" and not reads_tokens:
        raise ConfigError(f"data.source={source!r}: {who} reads images or feature vectors, not text; use digits, or "
                          "a model of tokens (textcnn, gmlp-classifier) for texts")  # fmt: skip
    tokenizer = data.tokenizer
    if kind == "images":
        require(tokenizer == "auto", f"data.tokenizer={tokenizer!r}: the digits are images, they take no tokenizer")
    elif kind == "documents":
        require(tokenizer == "auto", f"data.tokenizer={tokenizer!r}: documents are read with the reader's own "
                "tokenizer (archlab.models.docreader.DocReaderTokenizer); leave it at 'auto'")  # fmt: skip
        require(data.max_length <= model_config.max_pages, f"data.max_length={data.max_length} pages: {who} reads "
                f"documents of at most max_pages={model_config.max_pages} pages; set data.max_length <= "
                f"{model_config.max_pages}")  # fmt: skip
    elif tokenizer == "auto":
        tokenizer = "char" if task == "seq2seq" else "bpe"
    require(not data.question_shares or kind == "documents", f"data.question_shares="
            f"{list(data.question_shares)} weights kinds of question of the generated documents; data.source="
            f"{source!r} has none (leave it empty)")  # fmt: skip
    require(data.questions is None or kind == "documents", f"data.questions={list(data.questions or ())} asks kinds "
            f"of question of the generated documents; data.source={source!r} has none (leave it null)")  # fmt: skip
    seq_len = data.seq_len
    if seq_len is None and kind not in ("synthetic", "images", "documents") and task != "seq2seq":
        seq_len = model_config.context_length or DEFAULT_SEQ_LEN  # what the family declares (archlab.models.base)
    if task == "custom" and kind != "documents":
        require(seq_len >= 2, f"data.seq_len={seq_len}: a token window needs >= 2 tokens (one predicts another)")
    return data.replace(source=source, tokenizer=tokenizer, seq_len=seq_len)


def check_custom_batches(model_config: Config, who: str) -> tuple[str, ...]:
    """The kinds of source that make the batches of the ``custom`` model of ``model_config`` (its class's
    ``batch_keys``: :data:`CUSTOM_SOURCES`); ConfigError naming ``who`` for a model whose batches archlab cannot
    build."""
    family = family_of(model_config)
    model_cls = family.train_cls or family.model_cls
    keys = getattr(model_cls, "batch_keys", None)
    for known, kinds in CUSTOM_SOURCES.items():
        if keys is not None and set(keys) == set(known):
            return kinds
    reads = "declares no batch_keys" if keys is None else f"reads batch keys {sorted(keys)}"
    raise ConfigError(
        f"{who} trains with task 'custom' (model.compute_loss(batch)) and {model_cls.__name__} {reads}; "
        f"`archlab train` builds custom batches only for a model with batch_keys = {TOKEN_WINDOW_KEYS} "
        "(token windows, as ELMo) or the document reader's; train it with archlab.train.Trainer and your own batches"
    )


@dataclass
class RunData:
    """A run's data, built: the tokenizer (None for images), the training batch source, the validation
    batches (``valid()`` yields them anew each time), what they are (``describe``), the label names of a
    classification file, and for LM the unigram baseline (nats per validation token)."""

    tokenizer: Tokenizer | None
    train: BatchSource
    valid: Callable[[], Iterable[dict]]
    describe: str
    classes: tuple[str, ...] | None = None
    unigram: float | None = None

    def model_overrides(self, model_config: Config) -> dict[str, Any]:
        """The model fields the data decides: ``vocab_size``, ``pad_id`` (tokenizer), ``n_classes`` (labels)."""
        fields = type(model_config).field_names()
        out: dict[str, Any] = {}
        if self.tokenizer is not None:
            if "vocab_size" in fields:
                out["vocab_size"] = self.tokenizer.vocab_size
            if "pad_id" in fields and self.tokenizer.pad_id is not None:
                out["pad_id"] = self.tokenizer.pad_id
        if self.classes is not None and "n_classes" in fields:
            out["n_classes"] = len(self.classes)
        return out


def build_data(
    data: DataConfig, task: str, model_config: Config, *, batch_size: int, tokenizer: Tokenizer | None = None,
    rank: int = 0, world_size: int = 1,
) -> RunData:  # fmt: skip
    """The tokenizer and batch sources of a resolved ``data`` (:func:`resolve_data`) for ``task``.

    ``batch_size`` is the global micro-batch (all ranks); ``tokenizer`` reuses a saved one instead of
    making it (a resumed or evaluated run must see the ids it was trained on).
    """
    shard = dict(batch_size=batch_size, seed=data.seed, rank=rank, world_size=world_size)
    kind = source_kind(data.source)
    if kind == "images":
        return _digits(data, model_config, shard)
    if kind == "documents":
        return _documents(data, model_config, shard)
    if kind == "synthetic" or task == "seq2seq":
        return _pairs(data, kind, tokenizer, shard)
    if task == "classification":
        return _labelled_texts(data, model_config, tokenizer, shard)
    return _corpus(data, task, kind, tokenizer, shard)


# -- the builders, one per kind of data ----------------------------------------------------------------------


def make_tokenizer(data: DataConfig, texts: Iterable[str]) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names, trained on (or read off) ``texts`` where it needs them."""
    if data.tokenizer == "bpe":
        return train_bpe(texts, data.vocab_size)
    if data.tokenizer == "byte":
        return ByteTokenizer()
    if data.tokenizer == "char":
        return CharTokenizer.from_text(texts)
    return load_tokenizer(data.tokenizer)


def _read_records(path: str, field: str, label_field: str | None = None):
    read = read_jsonl if Path(path).suffix.lower() == ".jsonl" else read_csv
    return read(path, field, label_field)


def _check_split(source: str, n_train: int, n_valid: int, percent: int) -> None:
    if not n_valid or not n_train:
        side = "validation" if not n_valid else "training"
        raise DataError(f"{source}: no record fell into the {side} split (valid_percent={percent}); add records "
                        "or change data.valid_percent")  # fmt: skip


def _corpus(data: DataConfig, task: str, kind: str, tokenizer: Tokenizer | None, shard: dict) -> RunData:
    if kind == "corpus":
        corpus = python_source(max_bytes=data.max_bytes, valid_percent=data.valid_percent)
        what = f"stdlib source ({corpus.n_bytes / 1e6:.1f} MB, {len(corpus.train_names)} + {len(corpus.valid_names)} files)"
    elif kind == "text":
        corpus = split_text(read_text(data.source), data.valid_percent, name=Path(data.source).name)
        what = f"{data.source}, {corpus.n_bytes / 1e6:.2f} MB"
    else:
        texts = _read_records(data.source, data.text_field).texts
        corpus = split_documents({f"{i:09d}": t for i, t in enumerate(texts)}, data.valid_percent)
        _check_split(data.source, len(corpus.train_texts), len(corpus.valid_texts), data.valid_percent)
        what = f"{data.source}, {len(texts)} documents"
    tok = tokenizer if tokenizer is not None else make_tokenizer(data, corpus.train_texts)
    train_ids, valid_ids = encode_texts(corpus.train_texts, tok), encode_texts(corpus.valid_texts, tok)
    try:
        if task == "mlm":
            source = MLMBatches(train_ids, tok, seq_len=data.seq_len, valid=valid_ids, **shard)
        elif task == "custom":  # resolve_data let through only models that read token windows
            source = TokenWindows(train_ids, seq_len=data.seq_len, valid=valid_ids, **shard)
        else:
            source = LMWindows(train_ids, seq_len=data.seq_len, valid=valid_ids, **shard)
    except DataError as e:  # e.g. a text too short for one row: name the data, its token counts and the setting
        raise DataError(f"{what}: {len(train_ids):,} training / {len(valid_ids):,} validation tokens ({tok.kind} "
                        f"tokenizer), rows of data.seq_len={data.seq_len}: {e}") from None  # fmt: skip
    describe = (f"{what}: {len(train_ids):,} training / {len(valid_ids):,} validation tokens, "
                f"{tok.kind} tokenizer V={tok.vocab_size}, rows of {data.seq_len}")  # fmt: skip
    unigram = unigram_loss(train_ids, valid_ids, tok.vocab_size) if task in ("lm", "custom") else None
    return RunData(tok, source, source.eval_batches, describe, unigram=unigram)


def _pairs(data: DataConfig, kind: str, tokenizer: Tokenizer | None, shard: dict) -> RunData:
    if kind == "synthetic":
        task = SyntheticTask(name=data.source, min_length=data.min_length, max_length=data.max_length)
        train = task.pairs(data.n_train, seed=data.seed, split="train")
        valid = task.pairs(data.n_valid, seed=data.seed, split="valid")
        what = f"synthetic task {data.source!r}: {len(train):,} training / {len(valid):,} validation pairs"
        if tokenizer is None and data.tokenizer == "char":
            tokenizer = task.tokenizer()  # the task's whole alphabet, not only the characters its pairs happen to use
    else:
        sources = _read_records(data.source, data.source_field).texts
        targets = _read_records(data.source, data.target_field).texts
        pairs = list(zip(sources, targets, strict=True))
        valid = [p for p in pairs if is_validation(p[0], data.valid_percent)]
        train = [p for p in pairs if not is_validation(p[0], data.valid_percent)]
        _check_split(data.source, len(train), len(valid), data.valid_percent)
        what = f"{data.source}: {len(train):,} training / {len(valid):,} validation pairs"
    tok = tokenizer if tokenizer is not None else make_tokenizer(data, [s + t for s, t in train])
    source = Seq2SeqBatches.from_text(train, tok, valid=valid, **shard)
    return RunData(tok, source, source.eval_batches, f"{what}, {tok.kind} tokenizer V={tok.vocab_size}")


def _labelled_texts(data: DataConfig, model_config: Config, tokenizer: Tokenizer | None, shard: dict) -> RunData:
    # a TextCNN needs a whole window of its widest kernel in every row: short texts are padded to it (as Kim does)
    shortest = getattr(model_config, "max_width", 1)
    require(data.seq_len >= shortest, f"data.seq_len={data.seq_len} is shorter than the widest kernel of the model "
            f"({shortest} tokens, [CLS] and [SEP] included); set data.seq_len >= {shortest}")  # fmt: skip
    records = _read_records(data.source, data.text_field, data.label_field)
    if len(records.classes) < 2:  # a one-class model has nothing to learn: loss 0 and 100% accuracy from the start
        raise DataError(f"{data.source}: every record has the label {records.classes[0]!r} (field "
                        f"{data.label_field!r}); classification needs at least 2 classes")  # fmt: skip
    rows = list(zip(records.texts, records.labels, strict=True))
    valid = [r for r in rows if is_validation(r[0], data.valid_percent)]
    train = [r for r in rows if not is_validation(r[0], data.valid_percent)]
    _check_split(data.source, len(train), len(valid), data.valid_percent)
    tok = tokenizer if tokenizer is not None else make_tokenizer(data, [t for t, _ in train])
    source = ClassificationBatches.from_text(
        [t for t, _ in train], [y for _, y in train], tok, max_length=data.seq_len,
        valid=([t for t, _ in valid], [y for _, y in valid]), min_length=shortest, **shard,
    )  # fmt: skip
    describe = (f"{data.source}: {len(train):,} training / {len(valid):,} validation texts, "
                f"{len(records.classes)} classes, {tok.kind} tokenizer V={tok.vocab_size}")  # fmt: skip
    return RunData(tok, source, source.eval_batches, describe, classes=records.classes)


def _digits(data: DataConfig, model_config: Config, shard: dict) -> RunData:
    (x_train, y_train), (x_valid, y_valid) = digits(test_fraction=data.valid_percent / 100, seed=data.seed)
    if model_config.inputs == "features":  # a model of feature vectors (MLP) reads the 64 pixels in a row
        x_train, x_valid = x_train.flatten(1), x_valid.flatten(1)
    source = ClassificationBatches(x_train, y_train, valid=(x_valid, y_valid), **shard)
    describe = f"digits: {len(y_train)} training / {len(y_valid)} validation images of {list(x_train.shape[1:])}"
    return RunData(None, source, source.eval_batches, describe, classes=tuple(str(d) for d in range(10)))


def _documents(data: DataConfig, model_config: Config, shard: dict) -> RunData:
    """Generated documents (``archlab.data.documents``) collated for the reader of ``model_config``; ConfigError
    when its sizes cannot hold them (page table, answer classes, image channels, or tokens: a cut text could
    lose the sentence a question is about)."""
    from archlab.data.documents import DocumentBatches, DocumentTask, documents_fit
    from archlab.models.docreader import DocReaderTokenizer, collate

    questions = {} if data.questions is None else {"questions": data.questions}
    questions["question_shares"] = tuple(data.question_shares)
    task = DocumentTask(min_pages=data.min_length, max_pages=data.max_length, image_size=model_config.image_size,
                        **questions)  # fmt: skip
    tokenizer = DocReaderTokenizer()
    documents_fit(task, model_config, tokenizer)
    source = DocumentBatches(task, lambda docs: collate(docs, model_config, tokenizer)._asdict(), n_valid=data.n_valid,
                             **shard)  # fmt: skip
    describe = (f"generated documents of {task.min_pages}..{task.max_pages} pages ({', '.join(task.questions)} "
                f"questions, {task.n_answers} answer classes): new training documents every step, "
                f"{data.n_valid} validation documents")  # fmt: skip
    return RunData(None, source, source.eval_batches, describe)
