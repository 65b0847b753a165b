"""Documents and evaluation sets for the search engine.

A document is ``(id, title, text)``, as in BEIR's ``corpus.jsonl``. :func:`load_corpus` reads

- a BEIR folder: ``corpus.jsonl`` (one ``{"_id", "title", "text"}`` object per line; ``title`` may be
  absent), ``queries.jsonl`` (``{"_id", "text"}``) and ``qrels/<split>.tsv`` (a header
  ``query-id  corpus-id  score``, then one judgment per line, tab-separated);
- a ``.jsonl`` file in the same form as ``corpus.jsonl`` (``id`` is accepted for ``_id``);
- a ``.txt`` file: one document per paragraph (paragraphs are separated by blank lines), id ``<stem>:<n>``;
- a folder of ``.txt`` files (and no ``corpus.jsonl``): one document per file, id its relative path, title its stem;
- ``"builtin"``: the standard library's docstrings (:func:`builtin_corpus`).

Every line or record that cannot be used raises :class:`~archlab.errors.DataError` naming the file and
line: an empty corpus, a duplicate ``_id``, a missing or non-string field, malformed JSON.

The built-in corpus and its evaluation set
------------------------------------------
The documents are the docstrings of this interpreter's standard library (modules, public classes,
public functions and methods of the modules in :data:`STDLIB_MODULES`), read from the source files with
``ast`` (nothing is imported or run), in a fixed order: a few thousand entries written by others, that
ship with every Python. Title: the qualified name (``json.dumps``); text: the cleaned docstring.
Docstrings shorter than :data:`MIN_DOC_CHARS` and repeated texts (the second of two equal docstrings) are
left out. The result depends only on the Python version (it is part of the fingerprint).

The evaluation set: for about one object in three (chosen by a hash of its name, so the choice is
stable) whose summary sentence has at least 5 words, is unique in the corpus, and whose docstring has
at least 20 more words, the summary sentence becomes a query and is *removed from that document*; the
document (the rest of its docstring) is the one relevant answer (score 1). So a query never occurs
verbatim in the corpus: retrieval must match a one-line description to the longer explanation that
follows it, with the vocabulary only partly shared (the summary "Serialize obj to a JSON formatted str"
against the rest of ``json.dumps``'s docstring). It measures known-item retrieval of a described API
object, an easier task than a real literature search (one relevant document, an author who writes the
summary and the body alike), and BM25 is a strong baseline on it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from archlab.errors import DataError

BUILTIN = "builtin"
MIN_DOC_CHARS = 40
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs", "collections",
    "colorsys", "concurrent", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "json", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "netrc",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "xml", "zipfile",
    "zipimport", "zoneinfo",
)  # fmt: skip
EVAL_FRACTION = 3  # one object in EVAL_FRACTION (by name hash) is a candidate query
MIN_SUMMARY_WORDS = 5
MIN_BODY_WORDS = 20


@dataclass(frozen=True)
class Document:
    """One searchable document: a unique ``id``, a ``title`` (may be empty) and its ``text``."""

    id: str
    title: str
    text: str

    def __post_init__(self) -> None:
        for name in ("id", "title", "text"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"Document {name}={value!r} must be a str, got {type(value).__name__}")

    @property
    def full_text(self) -> str:
        """What gets embedded and indexed: ``title`` and ``text`` joined by a blank line when both exist."""
        return f"{self.title}\n\n{self.text}" if self.title and self.text else (self.title or self.text)


class Corpus:
    """An ordered list of documents with unique ids; ``corpus[i]`` is the ``i``-th document.

    ``fingerprint`` (16 hex digits) changes with any id, title or text, and with the order.
    """

    def __init__(self, docs: Iterable[Document], source: str = "<memory>"):
        if isinstance(docs, str | bytes | dict) or not isinstance(docs, Iterable):
            raise DataError(f"a corpus is made of a list of Document, got {type(docs).__name__}")
        self.docs = list(docs)
        self.source = source
        if not self.docs:
            raise DataError(f"corpus {source} is empty: it holds no documents")
        self._row: dict[str, int] = {}
        for i, doc in enumerate(self.docs):
            if not isinstance(doc, Document):
                raise DataError(f"corpus {source}: document {i} is a {type(doc).__name__}, not an "
                                "archlab.search.Document(id, title, text)")  # fmt: skip
            if doc.id in self._row:
                raise DataError(f"corpus {source}: duplicate document id {doc.id!r} (documents {self._row[doc.id]} "
                                f"and {i}); ids must be unique")  # fmt: skip
            self._row[doc.id] = i

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Document:
        return self.docs[i]

    def __iter__(self) -> Iterator[Document]:
        return iter(self.docs)

    def row(self, doc_id: str) -> int:
        """The position of the document with id ``doc_id``."""
        try:
            return self._row[doc_id]
        except KeyError:
            raise DataError(f"corpus {self.source} has no document with id {doc_id!r}") from None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.docs)


def fingerprint(docs: Iterable[Document], start: str = "") -> str:
    """A 16-hex-digit digest of the documents in order; ``start`` chains on an earlier fingerprint (appends)."""
    h = hashlib.sha256(start.encode())
    for doc in docs:
        for part in (doc.id, doc.title, doc.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class EvalSet:
    """Queries and relevance judgments: ``queries[qid] = text``; ``qrels[qid][doc_id] = grade`` (> 0 relevant)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    def check(self, corpus: Corpus) -> None:
        """DataError unless every judged query exists and every judged document is in ``corpus``."""
        for qid, judged in self.qrels.items():
            if qid not in self.queries:
                raise DataError(f"qrels judge query {qid!r}, which is not among the {len(self.queries)} queries")
            for doc_id in judged:
                corpus.row(doc_id)
        if not any(any(g > 0 for g in j.values()) for j in self.qrels.values()):
            raise DataError("the qrels judge no document relevant (score > 0): nothing to evaluate")


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; DataError naming the file when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file."""
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _field(record: dict, names: tuple[str, ...], where: str, *, required: bool = True) -> str:
    for name in names:
        if name in record:
            value = record[name]
            if isinstance(value, int | float) and not isinstance(value, bool) and name in ("_id", "id"):
                return str(value)  # numeric ids are common in BEIR files
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise DataError(f"{where}: missing field {names[0]!r}" + (f" (or {names[1]!r})" if len(names) > 1 else ""))
    return ""


def _jsonl_corpus(path: Path) -> Corpus:
    docs, seen = [], {}
    for number, record in _jsonl_records(path):
        where = f"{path}:{number}"
        doc = Document(_field(record, ("_id", "id"), where), _field(record, ("title",), where, required=False),
                       _field(record, ("text",), where))  # fmt: skip
        if doc.id in seen:
            raise DataError(f"{where}: duplicate _id {doc.id!r} (first on line {seen[doc.id]})")
        seen[doc.id] = number
        docs.append(doc)
    if not docs:
        raise DataError(f"corpus {path} is empty: it holds no documents")
    return Corpus(docs, str(path))


def _text_file_docs(path: Path) -> list[Document]:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", _read_text(path))]
    return [Document(f"{path.stem}:{i}", "", p) for i, p in enumerate((p for p in paragraphs if p), 1)]


def load_corpus(source: str | Path = BUILTIN) -> Corpus:
    """Documents from a BEIR folder, a ``.jsonl`` or ``.txt`` file, a folder of ``.txt`` files, or ``"builtin"``."""
    if str(source) == BUILTIN:
        return builtin_corpus()
    path = Path(source)
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return _jsonl_corpus(path / "corpus.jsonl")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path} holds neither corpus.jsonl (BEIR layout) nor .txt files")
        docs = []
        for f in files:
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            docs.append(Document(f.relative_to(path).as_posix(), f.stem, text))
        return Corpus(docs, str(path))
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_corpus(path)
        if path.suffix == ".txt":
            return Corpus(_text_file_docs(path), str(path))
        raise DataError(f"corpus file {path} must end in .jsonl or .txt (or give a BEIR folder), got {path.suffix!r}")
    raise DataError(f"corpus {str(source)!r} is neither {BUILTIN!r} nor an existing file or folder")


def load_queries(path: str | Path) -> dict[str, str]:
    """``{query id: text}`` from a BEIR ``queries.jsonl`` (``_id``, ``text``) or a ``.tsv`` (``id<TAB>text``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries file {path} does not exist")
    queries: dict[str, str] = {}
    if path.suffix == ".tsv":
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            qid, tab, text = line.partition("\t")
            if not tab:
                raise DataError(f"{path}:{number}: expected 'query-id<TAB>text', got {line[:60]!r}")
            if qid in queries:
                raise DataError(f"{path}:{number}: duplicate query id {qid!r}")
            queries[qid] = text
    else:
        for number, record in _jsonl_records(path):
            where = f"{path}:{number}"
            qid = _field(record, ("_id", "id"), where)
            if qid in queries:
                raise DataError(f"{where}: duplicate query id {qid!r}")
            queries[qid] = _field(record, ("text",), where)
    if not queries:
        raise DataError(f"queries file {path} is empty")
    return queries


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``{query id: {doc id: grade}}`` from a BEIR qrels file (a header line, then ``qid<TAB>docid<TAB>score``).

    TREC qrels (``qid 0 docid grade``, whitespace-separated, no header) are read too.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"qrels file {path} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or (number == 1 and parts[:1] == ["query-id"]):
            continue
        if len(parts) == 4:  # TREC: qid iteration docid grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DataError(f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {line[:80]!r}")
        qid, doc_id, grade = (p.strip() for p in parts)
        try:
            qrels.setdefault(qid, {})[doc_id] = int(float(grade))
        except ValueError:
            raise DataError(f"{path}:{number}: score {grade!r} is not a number") from None
    if not qrels:
        raise DataError(f"qrels file {path} holds no judgments")
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> tuple[Corpus, EvalSet]:
    """A BEIR dataset folder: its corpus and the ``split`` queries judged in ``qrels/<split>.tsv``."""
    folder = Path(folder)
    corpus = load_corpus(folder)
    qrels = load_qrels(folder / "qrels" / f"{split}.tsv")
    queries = load_queries(folder / "queries.jsonl")
    evalset = EvalSet({q: queries[q] for q in qrels if q in queries}, qrels)
    evalset.check(corpus)
    return corpus, evalset


# ------------------------------------------------------------------------------------------------
# the built-in corpus: the standard library's docstrings
# ------------------------------------------------------------------------------------------------
def _stdlib_files() -> Iterator[tuple[str, Path]]:
    """``(module name, source file)`` for the modules of :data:`STDLIB_MODULES`, packages walked in sorted order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_MODULES:
        single = lib / f"{name}.py"
        if single.is_file():
            yield name, single
        elif (lib / name).is_dir():
            for f in sorted((lib / name).rglob("*.py")):
                rel = f.relative_to(lib).with_suffix("").parts
                if any(p.startswith("_") and p != "__init__" or p in ("test", "tests") for p in rel):
                    continue
                yield ".".join(rel[:-1] if rel[-1] == "__init__" else rel), f


def _docstrings(module: str, path: Path) -> Iterator[tuple[str, str]]:
    """``(qualified name, cleaned docstring)`` of a module, its public classes, functions and methods."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return
    if doc := ast.get_docstring(tree):
        yield module, doc

    def walk(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
        for node in body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                name = f"{prefix}.{node.name}"
                if doc := ast.get_docstring(node):
                    yield name, doc
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, name)

    yield from walk(tree.body, module)


def _split_summary(doc: str) -> tuple[str, str]:
    """``(first sentence, the rest)`` of a docstring; the first sentence ends at ``.``/``!``/``?`` + space or a blank line."""
    first, _, rest = doc.partition("\n\n")
    first = " ".join(first.split())
    match = re.search(r"(?<=[.!?])\s", first)
    summary, tail = (first[: match.start()], first[match.end() :]) if match else (first, "")
    return summary, (tail + "\n\n" + rest).strip() if tail else rest.strip()


@lru_cache(maxsize=1)
def _builtin() -> tuple[Corpus, EvalSet]:
    entries: list[tuple[str, str]] = []
    seen_text: set[str] = set()
    for module, path in _stdlib_files():
        for name, doc in _docstrings(module, path):
            doc = inspect.cleandoc(doc)
            if len(doc) >= MIN_DOC_CHARS and doc not in seen_text:
                seen_text.add(doc)
                entries.append((name, doc))
    names = [n for n, _ in entries]
    # A name defined twice (e.g. under `if sys.platform`) keeps its first docstring.
    first_of = {}
    for i, n in enumerate(names):
        first_of.setdefault(n, i)
    entries = [e for i, e in enumerate(entries) if first_of[e[0]] == i]

    split = {name: _split_summary(doc) for name, doc in entries}
    summary_count: dict[str, int] = {}
    for summary, _ in split.values():
        key = summary.lower()
        summary_count[key] = summary_count.get(key, 0) + 1
    docs, queries, qrels = [], {}, {}
    for name, doc in entries:
        summary, body = split[name]
        chosen = (
            int(hashlib.sha256(name.encode()).hexdigest(), 16) % EVAL_FRACTION == 0
            and len(summary.split()) >= MIN_SUMMARY_WORDS
            and summary_count[summary.lower()] == 1
            and len(body.split()) >= MIN_BODY_WORDS
        )
        if chosen:
            qid = f"q:{name}"
            queries[qid], qrels[qid] = summary, {name: 1}
            doc = body
        docs.append(Document(name, name, doc))
    version = ".".join(map(str, sys.version_info[:2]))
    return Corpus(docs, f"{BUILTIN} (Python {version} standard library docstrings)"), EvalSet(queries, qrels)


def builtin_corpus() -> Corpus:
    """The standard library's docstrings as documents (see the module docstring for what is included)."""
    return _builtin()[0]


def builtin_evalset() -> EvalSet:
    """The built-in queries (held-out summary sentences) and their one relevant document each."""
    corpus, evalset = _builtin()
    return EvalSet(dict(evalset.queries), {q: dict(j) for q, j in evalset.qrels.items()})


__all__ = [
    "BUILTIN", "Corpus", "Document", "EvalSet", "builtin_corpus", "builtin_evalset", "fingerprint", "load_beir",
    "load_corpus", "load_qrels", "load_queries",
]  # fmt: skip
