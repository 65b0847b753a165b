r"""Synthetic multi-page documents with questions that need more than one page (lesson 8, card 5), made from
material that ships locally: nothing is downloaded.

A document has ``P`` pages (``min_pages <= P <= max_pages``). Every page has text; most have a table and a
figure::

    text    a passage: the first paragraph of a docstring of the standard library (the corpus of
            archlab.data.corpora), cut to at most ``max_words`` words, with sentences mentioning keywords
            ("Notes on the glacier follow.") put between its sentences
    table   header ``[item, col_1, .., col_k]`` and ``table_rows`` rows ``[name, v_1, .., v_k]``, integers
            ``1 <= v <= max_value`` written as text (a page has one with probability TABLE_SHARE)
    image   a scikit-learn 8x8 digit ``[1, image_size, image_size]`` in [0, 1] (upsampled by repetition;
            a page has one with probability IMAGE_SHARE)

The questions, and their answers as class ids (one label set: the integer the answer is)::

    largest  "Which page's table lists the largest price?"        the page number 1..P
    digit    "What digit is shown on the page that mentions the   the digit 0..9
              glacier?"
    count    "How many pages mention the glacier?"                the count 0..P

so a reader needs ``n_answers = answer_classes(max_pages) = max(10, max_pages + 1)`` classes. Answers are
exact: keywords (:data:`KEYWORDS`) never occur in the passages (passages holding one are dropped), the
largest value of the asked column is on one page only, and exactly one page mentions the keyword of a
``digit`` question (and has a figure). :func:`solve` recomputes an answer from the pages alone (the tests hold
every document to it). The answer of each kind is drawn uniformly (the target page, the digit, the count), so a
reader that ignores the document gets about ``1 / P``, ``1 / 10`` and ``1 / (P + 1)`` of them right.

Splits: ``train``, ``valid`` and ``test`` share no passage and no image. Passages split by source file
(archlab.data.corpora's rule with ``valid_percent`` = HELD_OUT_PERCENT, then the held-out files by
``h("test", path)`` parity; a passage text found on two sides is kept only in training); digit images by
scikit-learn's stratified split (``archlab.data.images.digits``), the held-out images alternating between
``valid`` and ``test``. Document ``i`` of a split is a pure function of ``(seed, split, i)`` (drawn from
``random.Random(f"documents:{seed}:{split}:{i}")``), so the stream resumes anywhere and is the same on
every machine running the same Python version (the passages come from its standard library).

Views, for the baselines measured the same way as the reader (:func:`view`): ``full`` (the document),
``single`` (one page shown, the others replaced by a :data:`HIDDEN_PAGE` text; the page shown is drawn from
the document's index) and ``question`` (one page saying :data:`NO_DOCUMENT`: the question alone).

:class:`DocumentBatches` is the batch source of ``archlab train docreader-*``: a global batch ``s`` holds
training documents ``s B .. s B + B - 1``, collated by the reader's :func:`~archlab.models.docreader.collate`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

from archlab.config import Config, check_choice, require
from archlab.data.corpora import _hash, python_source
from archlab.data.images import digits
from archlab.data.loaders import BatchSource, _check_int
from archlab.errors import ConfigError, DataError

QUESTION_KINDS = ("largest", "digit", "count")
SPLITS = ("train", "valid", "test")
VIEWS = ("full", "single", "question")
MAX_PAGES = 50  # the card's longest document
MIN_WORDS = 4  # a passage shorter than this says nothing
HELD_OUT_PERCENT = 20  # passages of this share of the source files are held out (valid + test)
TABLE_SHARE, IMAGE_SHARE = 0.75, 0.75  # the chance that a page (not needed by the question) has one
DIGIT_SIZE = 8  # the scikit-learn digits are 8x8
#: Upper bounds of the generator's sizes: beyond them one document (or documents_fit) takes gigabytes or hours.
MAX_TABLE_ROWS, MAX_IMAGE_SIZE, MAX_VALUE = 1_000, 1_024, 1_000_000
#: The split of scikit-learn's digits that the figures come from (``archlab.data.images.digits``' arguments): training
#: documents draw the training images, validation and test documents the held-out ones. An image encoder pretrained
#: for the reader must see the training images only: ``archlab train vit-tiny --set data.valid_percent=20 --set
#: data.seed=0`` splits them alike (``archlab.models.docreader.check_image_pretraining``).
FIGURE_SPLIT = {"test_fraction": 0.2, "seed": 0}
MAX_MENTIONS = 2  # keywords a page mentions: at most one distractor, and the question's where the answer needs it

#: Topic words the questions ask about; no passage holds one, so a page mentions one only where it is put.
KEYWORDS = (
    "amber", "basalt", "canyon", "cobalt", "eagle", "falcon", "glacier", "harbor", "jasmine", "lantern", "lotus",
    "maple", "meadow", "nectar", "orchid", "piano", "quartz", "raven", "silver", "tiger", "velvet", "violin",
    "walnut", "willow",
)  # fmt: skip
#: How a page mentions a keyword (one sentence each).
MENTIONS = ("Notes on the {} follow.", "This part also concerns the {}.", "See the remarks about the {}.",
            "The {} is described here.")  # fmt: skip
TABLE_COLUMNS = ("price", "weight", "height", "score", "stock", "length")
TABLE_ITEMS = ("bolts", "gears", "ropes", "tiles", "pipes", "wheels", "nails", "boards", "lamps", "hinges")
HIDDEN_PAGE = "This page is hidden."
NO_DOCUMENT = "No document is shown."
QUESTIONS = {
    "largest": "Which page's table lists the largest {}?",
    "digit": "What digit is shown on the page that mentions the {}?",
    "count": "How many pages mention the {}?",
}

_DOCSTRING = re.compile(  # a def or class line, then its docstring
    r'^[ \t]*(?:(?:async[ \t]+)?def|class)[ \t][^\n]*:[ \t]*\n[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.M | re.S
)
_MODULE_DOCSTRING = re.compile(r'\A(?:#[^\n]*\n|\s)*[rRuU]?("""|\'\'\')(.*?)\1', re.S)
_PROSE = re.compile(r"[A-Za-z0-9 ,.;:()'-]+")  # plain sentences: no code, markup or other scripts
_SENTENCE_END = re.compile(r"(?<=[.;:])\s+")


def answer_classes(max_pages: int) -> int:
    """The answer label set's size for documents of up to ``max_pages`` pages: ``max(10, max_pages + 1)``."""
    return max(10, max_pages + 1)


def mentions(text: str, keyword: str) -> bool:
    """Whether ``text`` holds ``keyword`` as a word (case-insensitive)."""
    return re.search(rf"\b{re.escape(keyword)}\b", text, flags=re.IGNORECASE) is not None


# -- the material --------------------------------------------------------------------------------------------------


def docstring_passages(source: str) -> list[str]:
    """The first paragraphs of the module, class and function docstrings of one Python file that read as plain
    prose: 8 to 60 words of letters, digits and ``,.;:()'-``, ending with a full stop; whitespace collapsed."""
    found = [m.group(2) for m in _DOCSTRING.finditer(source)]
    module = _MODULE_DOCSTRING.match(source)
    if module:
        found.append(module.group(2))
    out = []
    for doc in found:
        para = " ".join(doc.strip().split("\n\n")[0].split())
        if 8 <= len(para.split()) <= 60 and para.endswith(".") and _PROSE.fullmatch(para):
            out.append(para)
    return out


@functools.lru_cache(maxsize=1)
def passages() -> dict[str, tuple[str, ...]]:
    """``{split: passages}`` from the whole standard-library corpus (module docstring): distinct, sorted, none
    holding a keyword, none on two sides. About 0.7 s; cached per process."""
    corpus = python_source(max_bytes=None, valid_percent=HELD_OUT_PERCENT)
    sides: dict[str, set[str]] = {split: set() for split in SPLITS}
    for text in corpus.train_texts:
        sides["train"].update(docstring_passages(text))
    for name, text in zip(corpus.valid_names, corpus.valid_texts, strict=True):
        sides["test" if _hash("test", name) % 2 else "valid"].update(docstring_passages(text))
    sides["valid"] -= sides["train"]
    sides["test"] -= sides["train"] | sides["valid"]
    clean = {split: tuple(sorted(p for p in texts if not any(mentions(p, k) for k in KEYWORDS)))
             for split, texts in sides.items()}  # fmt: skip
    for split, texts in clean.items():
        if len(texts) < 50:
            raise DataError(f"the standard library gave only {len(texts)} {split} passages for documents; "
                            "this Python's library is too small (or unreadable)")  # fmt: skip
    return clean


@functools.lru_cache(maxsize=1)
def figures() -> dict[str, tuple[Tensor, Tensor]]:
    """``{split: (images [N, 1, 8, 8], labels [N])}``: the digits' training images, and their held-out images
    alternating between ``valid`` (even positions) and ``test`` (odd)."""
    (x_train, y_train), (x_held, y_held) = digits(**FIGURE_SPLIT)
    return {"train": (x_train, y_train), "valid": (x_held[0::2], y_held[0::2]), "test": (x_held[1::2], y_held[1::2])}


@functools.lru_cache(maxsize=len(SPLITS))
def _by_digit(split: str) -> list[list[int]]:
    """``[d]``: the positions of digit ``d``'s images in ``figures()[split]``."""
    labels = figures()[split][1].tolist()
    return [[i for i, y in enumerate(labels) if y == d] for d in range(10)]


# -- the generator ------------------------------------------------------------------------------------------------


def shares_fit(shares: Sequence[Any], kinds: Sequence[str]) -> bool:
    """Whether ``shares`` give one positive integer (not a bool) per kind of question in ``kinds``."""
    return len(shares) == len(kinds) and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in shares)


@dataclasses.dataclass(frozen=True)
class DocumentTask(Config):
    """What the documents look like (module docstring).

    Args:
        min_pages, max_pages: pages per document, uniform in ``[min_pages, max_pages]`` (``max_pages`` <= 50).
        max_words: the passage of a page is cut to at most this many words (the mention sentences come on top).
        table_rows: data rows of a table (the header row comes on top), at most MAX_TABLE_ROWS.
        table_columns: numeric columns of a table (besides the item column), at most len(TABLE_COLUMNS).
        max_value: table values are integers in ``[1, max_value]`` (``max_value`` <= MAX_VALUE).
        image_size: figures are ``[1, image_size, image_size]``: the 8x8 digits repeated ``image_size / 8`` times
            (``image_size`` <= MAX_IMAGE_SIZE).
        questions: the kinds of question asked: ``largest``, ``digit``, ``count``.
        question_shares: empty (the default): the kinds drawn uniformly; else one positive integer per kind of
            ``questions``, its relative share of the documents (``(2, 1, 1)``: half the documents ask the first kind).
    """

    min_pages: int = 2
    max_pages: int = 6
    max_words: int = 14
    table_rows: int = 3
    table_columns: int = 2
    max_value: int = 50
    image_size: int = 8
    questions: tuple[str, ...] = QUESTION_KINDS
    question_shares: tuple[int, ...] = ()

    def validate(self) -> None:
        require(1 <= self.min_pages <= MAX_PAGES, f"min_pages={self.min_pages} must be in 1..{MAX_PAGES}")
        require(self.min_pages <= self.max_pages <= MAX_PAGES,
                f"max_pages={self.max_pages} must be in min_pages={self.min_pages}..{MAX_PAGES} (the card's "
                "longest document)")  # fmt: skip
        require(self.max_words >= MIN_WORDS, f"max_words={self.max_words} must be >= {MIN_WORDS}")
        require(1 <= self.table_rows <= MAX_TABLE_ROWS, f"table_rows={self.table_rows} must be in 1..{MAX_TABLE_ROWS}")
        require(1 <= self.table_columns <= len(TABLE_COLUMNS),
                f"table_columns={self.table_columns} must be in 1..{len(TABLE_COLUMNS)}")  # fmt: skip
        require(2 <= self.max_value <= MAX_VALUE,
                f"max_value={self.max_value} must be in 2..{MAX_VALUE:,} (a unique largest needs two)")  # fmt: skip
        require(DIGIT_SIZE <= self.image_size <= MAX_IMAGE_SIZE and self.image_size % DIGIT_SIZE == 0,
                f"image_size={self.image_size} must be a multiple of {DIGIT_SIZE} (the digits are 8x8) in "
                f"{DIGIT_SIZE}..{MAX_IMAGE_SIZE}")  # fmt: skip
        require(len(self.questions) >= 1, "questions must name at least one kind")
        for kind in self.questions:
            check_choice("questions", kind, QUESTION_KINDS)
        require(len(set(self.questions)) == len(self.questions), f"questions={self.questions} repeats a kind")
        require(not self.question_shares or shares_fit(self.question_shares, self.questions),
                f"question_shares={self.question_shares} must be empty or one positive integer per kind of "
                f"questions={self.questions}")  # fmt: skip

    @property
    def n_answers(self) -> int:
        return answer_classes(self.max_pages)

    # -- documents ----------------------------------------------------------------------------------------------
    def document(self, index: int, *, seed: int = 0, split: str = "train"):
        """Document ``index`` of ``split`` (a pure function of ``(seed, split, index)``)."""
        _check_int("index", index, 0)
        _check_int("seed", seed, 0)
        check_choice("split", split, SPLITS)
        return self._make(random.Random(f"documents:{seed}:{split}:{index}"), split)

    def documents(self, n: int, *, seed: int = 0, split: str = "train", start: int = 0) -> list:
        """Documents ``start .. start + n - 1`` of ``split``."""
        _check_int("n", n, 1)
        _check_int("start", start, 0)
        return [self.document(i, seed=seed, split=split) for i in range(start, start + n)]

    def _make(self, rng: random.Random, split: str):
        from archlab.models.docreader import Document, Page

        texts, (images, _labels), by_digit = passages()[split], figures()[split], _by_digit(split)
        n_pages = rng.randint(self.min_pages, self.max_pages)
        kind = rng.choices(self.questions, self.question_shares)[0] if self.question_shares else rng.choice(
            self.questions)  # fmt: skip
        keyword = rng.choice(KEYWORDS)
        target = rng.randrange(n_pages)  # the page the answer is on (largest, digit)
        has_table = [rng.random() < TABLE_SHARE or (kind == "largest" and p == target) for p in range(n_pages)]
        has_image = [rng.random() < IMAGE_SHARE or (kind == "digit" and p == target) for p in range(n_pages)]

        # who mentions what: the question's keyword on exactly the pages the answer needs, others as distractors
        if kind == "count":
            count = rng.randint(0, n_pages)
            named = set(rng.sample(range(n_pages), count))
        else:
            named = {target} if kind == "digit" else set()
        others = [k for k in KEYWORDS if k != keyword]
        page_mentions = []
        for p in range(n_pages):
            words = rng.sample(others, rng.randint(0, MAX_MENTIONS - 1)) + ([keyword] if p in named else [])
            rng.shuffle(words)
            page_mentions.append(words)

        columns = rng.sample(TABLE_COLUMNS, self.table_columns)
        asked = rng.choice(columns)
        digit = rng.randrange(10)
        pages = []
        for p in range(n_pages):
            text = self._text(rng, texts, page_mentions[p])
            table = self._table(rng, columns) if has_table[p] else None
            image = None
            if has_image[p]:
                wanted = digit if (kind == "digit" and p == target) else rng.randrange(10)
                choices = by_digit[wanted]
                image = self._image(images[choices[rng.randrange(len(choices))]])
            pages.append(Page(text, table, image))

        if kind == "largest":  # one value of the target's table above every value of the column on other pages
            col = 1 + columns.index(asked)
            others_max = max((int(row[col]) for p, page in enumerate(pages) if page.table is not None and p != target
                              for row in page.table[1:]), default=0)  # fmt: skip
            top = rng.randint(others_max + 1, self.max_value)  # the others are <= max_value - 1
            pages[target].table[1 + rng.randrange(self.table_rows)][col] = str(top)
            return Document(pages, QUESTIONS[kind].format(asked), target + 1, f"page {target + 1}", kind)
        if kind == "digit":
            return Document(pages, QUESTIONS[kind].format(keyword), digit, str(digit), kind)
        return Document(pages, QUESTIONS[kind].format(keyword), count, f"{count} page{'s' * (count != 1)}", kind)

    def _text(self, rng: random.Random, texts: Sequence[str], keywords: list[str]) -> str:
        """A passage cut to ``max_words`` words, the mention sentences put at sentence boundaries."""
        words = texts[rng.randrange(len(texts))].split()[: self.max_words]
        sentences = _SENTENCE_END.split(" ".join(words))
        for keyword in keywords:
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(MENTIONS).format(keyword))
        return " ".join(sentences)

    def _table(self, rng: random.Random, columns: list[str]) -> list[list[str]]:
        items = rng.sample(TABLE_ITEMS, self.table_rows) if self.table_rows <= len(TABLE_ITEMS) else [
            f"{TABLE_ITEMS[i % len(TABLE_ITEMS)]} {i // len(TABLE_ITEMS) + 1}" for i in range(self.table_rows)]
        rows = [[item] + [str(rng.randint(1, self.max_value - 1)) for _ in columns] for item in items]
        return [["item", *columns], *rows]

    def _image(self, digit: Tensor) -> Tensor:
        k = self.image_size // DIGIT_SIZE
        return digit.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2).clone()


# -- checking and hiding ------------------------------------------------------------------------------------------


def solve(document, digit_of: Callable[[Tensor], int]) -> int:
    """The answer of ``document``'s question recomputed from its pages alone (``digit_of`` reads a figure); a
    DataError when the pages do not fix one answer (no table lists the column, two pages share the largest
    value, the keyword is on no page or on several, or that page has no figure)."""
    question, pages = document.question, document.pages
    for kind, template in QUESTIONS.items():
        found = re.fullmatch(re.escape(template).replace(r"\{\}", "(\\w+)"), question)
        if found:
            word = found.group(1)
            break
    else:
        raise DataError(f"question {question!r} is none of the generator's: {', '.join(QUESTIONS.values())}")
    if kind == "count":
        return sum(mentions(page.text, word) for page in pages)
    if kind == "digit":
        named = [p for p, page in enumerate(pages) if mentions(page.text, word)]
        if len(named) != 1 or pages[named[0]].image is None:
            raise DataError(f"{question!r}: pages {[p + 1 for p in named]} mention {word!r}; one with a figure needed")
        return digit_of(pages[named[0]].image)
    best = {p: max(int(row[page.table[0].index(word)]) for row in page.table[1:])
            for p, page in enumerate(pages) if page.table is not None and word in page.table[0]}  # fmt: skip
    top = [p for p, v in best.items() if v == max(best.values(), default=None)]
    if len(top) != 1:
        raise DataError(f"{question!r}: pages {[p + 1 for p in top]} list the largest {word}; one page needed")
    return top[0] + 1


def view(document, how: str, index: int = 0):
    """``document`` as a baseline sees it (module docstring): ``full`` (as it is), ``single`` (page
    ``h(index) mod P`` shown, the others replaced by :data:`HIDDEN_PAGE`) or ``question`` (one page saying
    :data:`NO_DOCUMENT`). The question, answer and kind stay."""
    from archlab.models.docreader import Page

    check_choice("view", how, VIEWS)
    if how == "full":
        return document
    if how == "question":
        return dataclasses.replace(document, pages=[Page(NO_DOCUMENT)])
    shown = _hash("shown", str(index)) % len(document.pages)
    pages = [page if p == shown else Page(HIDDEN_PAGE) for p, page in enumerate(document.pages)]
    return dataclasses.replace(document, pages=pages)


# -- batches ------------------------------------------------------------------------------------------------------


class DocumentBatches(BatchSource):
    """Batches of generated documents (module docstring): global batch ``s`` holds training documents
    ``s B .. s B + B - 1``, shown as ``view`` sees them; ``collate`` turns a list of documents into a dict of
    tensors ``[B, ...]`` (the reader's :func:`~archlab.models.docreader.collate` as ``._asdict()``). The global
    batch is collated whole and each rank takes its rows, so every rank's tensors have the same padded shapes.

    ``eval_batches()``: the first ``n_valid`` documents of ``valid_split``, in global batches (collated once),
    every kind asked alike (the task's ``question_shares`` weight the training documents only).
    """

    def __init__(self, task: DocumentTask, collate: Callable[[list], dict[str, Tensor]], *, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, n_valid: int = 256, valid_split: str = "valid",
                 view: str = "full") -> None:  # fmt: skip
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        if not isinstance(task, DocumentTask):
            raise ConfigError(f"task must be a DocumentTask, got {type(task).__name__}")
        _check_int("n_valid", n_valid, 1)
        check_choice("valid_split", valid_split, SPLITS)
        check_choice("view", view, VIEWS)
        self.task, self.collate, self.n_valid, self.valid_split, self.view = task, collate, n_valid, valid_split, view
        self._valid: list[dict[str, Tensor]] | None = None

    def documents(self, step: int) -> list:
        """The documents of global batch ``step``, as the view shows them."""
        first = step * self.batch_size
        return [view(self.task.document(i, seed=self.seed, split="train"), self.view, i)
                for i in range(first, first + self.batch_size)]  # fmt: skip

    def batch(self, step: int) -> dict[str, Tensor]:
        whole = self.collate(self.documents(step))
        b = self.local_batch_size
        return {k: v[self.rank * b : (self.rank + 1) * b] for k, v in whole.items()}

    def eval_batches(self) -> Iterator[dict[str, Tensor]]:
        if self._valid is None:
            task = self.task.replace(question_shares=())  # the shares weight training only
            docs = [view(task.document(i, seed=self.seed, split=self.valid_split), self.view, i)
                    for i in range(self.n_valid)]  # fmt: skip
            self._valid = [self.collate(docs[i : i + self.batch_size]) for i in range(0, self.n_valid, self.batch_size)]
        yield from self._valid

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "view": self.view}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("view") != self.view:
            raise DataError(f"data state has view={state.get('view')!r} but this DocumentBatches has "
                            f"view={self.view!r}; resume with the same data settings")  # fmt: skip
        super().load_state_dict(state)


def documents_fit(task: DocumentTask, config, tokenizer) -> None:
    """ConfigError unless a reader of ``config`` (a DocReaderConfig) with ``tokenizer`` (a DocReaderTokenizer)
    reads every document of ``task`` whole: its page table, answer classes and image shape hold them, and no
    page text, table or question can be cut (a cut text may lose the sentence the question is about). The token
    counts are bounds over everything the generator can write: every passage of every split cut to ``max_words``
    plus MAX_MENTIONS of the longest mention sentence; tables of the longest cells; every question."""
    need = [(config.max_pages >= task.max_pages, f"max_pages={config.max_pages} < {task.max_pages} pages"),
            (config.n_answers >= task.n_answers, f"n_answers={config.n_answers} < {task.n_answers} answer classes"),
            (config.n_channels == 1, f"n_channels={config.n_channels}: the figures are grey (1 channel)"),
            (config.image_size == task.image_size, f"image_size={config.image_size} != the figures' {task.image_size}")]
    unlimited = 1 << 30

    def inner(text: str) -> int:  # tokens of a text without [CLS] and [SEP]
        return len(tokenizer.text(text, unlimited)) - 2

    words = max(inner(" ".join(p.split()[: task.max_words])) for pool in passages().values() for p in pool)
    mention = max(inner(m.format(k)) for m in MENTIONS for k in KEYWORDS)
    text = 2 + words + MAX_MENTIONS * mention
    question = 2 + max(inner(q.format(w)) for q in QUESTIONS.values() for w in KEYWORDS + TABLE_COLUMNS)
    cells = [*TABLE_ITEMS, *TABLE_COLUMNS, "item", *map(str, range(1, task.max_value + 1))]
    table = (task.table_rows + 1) * (1 + (task.table_columns + 1) * (1 + max(map(inner, cells))))
    header = ["item", *TABLE_COLUMNS[: task.table_columns]]
    ids, rows, cols, _ = tokenizer.table([header] * (task.table_rows + 1), table)
    need += [(text <= config.max_text_len, f"max_text_len={config.max_text_len} < {text} tokens of a page's text"),
             (question <= config.max_question_len,
              f"max_question_len={config.max_question_len} < {question} tokens of a question"),
             (table <= config.max_table_len, f"max_table_len={config.max_table_len} < {table} tokens of a table"),
             (max(rows) < config.max_table_rows, f"max_table_rows={config.max_table_rows} < {max(rows) + 1} rows"),
             (max(cols) < config.max_table_cols,
              f"max_table_cols={config.max_table_cols} < {max(cols) + 1} columns (with the row marker's)")]  # fmt: skip
    short = [why for ok, why in need if not ok]
    if short:
        raise ConfigError(f"the reader cannot read these documents whole: {'; '.join(short)} (documents of "
                          f"{task.min_pages}..{task.max_pages} pages, {task.max_words} words of passage, "
                          f"{task.table_rows} x {task.table_columns} tables)")  # fmt: skip
