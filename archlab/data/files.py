r"""User data from files: plain text, JSON Lines and CSV.

Every reader checks its input before returning and raises :class:`~archlab.errors.DataError` naming the
file (and the line, for JSONL and CSV) for: a missing file, a folder, a file that is not UTF-8, an empty
file, a line that is not a JSON object, a missing field or column (the closest name suggested), a text
that is not a string, a label that is not a string or an integer.

Labels become class ids: ``classes`` is the sorted list of distinct label values (numerically when every
label is an integer, e.g. ``1, 2, 10``), and a label's id is its index there.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from archlab.errors import DataError, closest


@dataclass(frozen=True)
class TextExamples:
    """Texts with optional labels: ``labels[i]`` is the index of example i's class in ``classes``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None


def _read(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder, expected a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise DataError(f"{path} is empty")
    return path, text


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file (refused if missing or empty)."""
    return _read(path)[1]


def _label_ids(raw: list[str | int], where: list[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    for value, at in zip(raw, where):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{at}: label {value!r} must be a string or an integer")
    names = {str(v) for v in raw}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = tuple(sorted(names, key=int) if numeric else sorted(names))
    index = {c: i for i, c in enumerate(classes)}
    return tuple(index[str(v)] for v in raw), classes


def _missing(kind: str, name: str, at: str, present: list[str]) -> DataError:
    return DataError(f"{at}: no {kind} {name!r}{closest(name, present)}; {kind}s: {', '.join(present) or '(none)'}")


def read_jsonl(path: str | Path, field: str = "text", label_field: str | None = None) -> TextExamples:
    """One JSON object per line; ``field`` holds the text, ``label_field`` (optional) the label.

    Blank lines are skipped; line numbers in errors count from 1.
    """
    path, content = _read(path)
    texts, raw_labels, where = [], [], []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(record).__name__}")
        for name in (field, label_field):
            if name is not None and name not in record:
                raise _missing("field", name, at, list(record))
        if not isinstance(record[field], str):
            raise DataError(f"{at}: field {field!r} is {type(record[field]).__name__}, expected a string")
        texts.append(record[field])
        if label_field is not None:
            raw_labels.append(record[label_field])
            where.append(at)
    if label_field is None:
        return TextExamples(tuple(texts))
    return TextExamples(tuple(texts), *_label_ids(raw_labels, where))


def read_csv(path: str | Path, text_column: str = "text", label_column: str | None = None) -> TextExamples:
    """A CSV file with a header row; ``text_column`` holds the text, ``label_column`` (optional) the label.

    Quoted fields may span lines; line numbers in errors are the row's last physical line.
    """
    path, content = _read(path)
    reader = csv.reader(content.splitlines(keepends=True))
    try:
        header = next(reader)
    except csv.Error as e:
        raise DataError(f"{path}:1: not valid CSV ({e})") from None
    for name in (text_column, label_column):
        if name is not None and name not in header:
            raise _missing("column", name, f"{path}:1", header)
    text_at = header.index(text_column)
    label_at = None if label_column is None else header.index(label_column)
    texts, raw_labels, where = [], [], []
    try:
        for row in reader:
            at = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{at}: {len(row)} fields, the header has {len(header)}")
            texts.append(row[text_at])
            if label_at is not None:
                raw_labels.append(row[label_at])
                where.append(at)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if not texts:
        raise DataError(f"{path} has a header but no rows")
    if label_at is None:
        return TextExamples(tuple(texts))
    return TextExamples(tuple(texts), *_label_ids(raw_labels, where))
