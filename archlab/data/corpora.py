r"""Embedded text corpora: nothing is downloaded.

The default language-modelling corpus is the running interpreter's own standard-library source (the
"generate Python code" task of lesson 4, card 4)::

    files     every *.py under sysconfig's "stdlib" path, sorted by relative path, minus folders named
              test, tests, idle_test, site-packages, dist-packages; unreadable or non-UTF-8 files skipped
    cap       max_bytes: files are taken in the order of h("order", path) while they fit the budget
              (a spread over the whole library, not its first letters)
    split     a file is validation iff h("valid", path) mod 100 < valid_percent, else training
              (by file, so no function appears in both; stable: changing the cap never moves a file
              from one side to the other)

with ``h(salt, path) = int(sha1(salt + ":" + relative POSIX path)[:8], 16)``. The corpus therefore depends
on the Python version (3.11.7: 731 files, 12.1 MB) and is the same on every machine running that version.

Tokenising is fast enough to need no cache (byte-level BPE through ``tokenizers`` on 2 cores: 0.8 to 2 s
for 4 MB, depending on load; see ``benchmarks/data_pipeline.py``). :func:`encode_texts` joins documents with ``</s>``
into one compact id array, the input of :class:`archlab.data.loaders.LMWindows`.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archlab.data.tokenizers import Tokenizer
from archlab.errors import ConfigError, DataError

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class TextCorpus:
    """Documents split into training and validation; ``*_names`` say where each text came from."""

    train_texts: tuple[str, ...]
    valid_texts: tuple[str, ...]
    train_names: tuple[str, ...]
    valid_names: tuple[str, ...]

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.train_texts + self.valid_texts)


def _hash(salt: str, name: str) -> int:
    return int(hashlib.sha1(f"{salt}:{name}".encode()).hexdigest()[:8], 16)


def _check_percent(valid_percent: int) -> None:
    if isinstance(valid_percent, bool) or not isinstance(valid_percent, int) or not 0 < valid_percent < 100:
        raise ConfigError(f"valid_percent={valid_percent!r} must be an integer in 1..99")


def is_validation(name: str, valid_percent: int) -> bool:
    """The split rule: ``h("valid", name) mod 100 < valid_percent``."""
    return _hash("valid", name) % 100 < valid_percent


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Every ``*.py`` under ``root`` (default: the stdlib) outside EXCLUDED_DIRS, sorted by relative path."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise DataError(f"source folder {root} does not exist")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]  # never descend into them
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def python_source(max_bytes: int | None = None, valid_percent: int = 5, root: str | Path | None = None) -> TextCorpus:
    """The standard-library source as a corpus (rules in the module docstring); ``max_bytes=None``: all of it."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ConfigError(f"max_bytes={max_bytes!r} must be a positive integer or None (no cap)")
    _check_percent(valid_percent)
    root = stdlib_root() if root is None else Path(root)
    files = {p.relative_to(root).as_posix(): p for p in stdlib_files(root)}
    budget = math.inf if max_bytes is None else max_bytes
    chosen: dict[str, str] = {}
    for name in sorted(files, key=lambda n: (_hash("order", n), n)):
        try:
            size = files[name].stat().st_size
            if size == 0 or size > budget:
                continue
            text = files[name].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or not UTF-8: skipped
        chosen[name] = text
        budget -= size
    corpus = split_documents(chosen, valid_percent)
    if not corpus.train_texts or not corpus.valid_texts:
        raise DataError(
            f"python_source(max_bytes={max_bytes}) selected {len(chosen)} files under {root}: too few for "
            f"both a training and a validation split; raise max_bytes"
        )
    return corpus


def split_documents(documents: dict[str, str], valid_percent: int = 5) -> TextCorpus:
    """Split named documents by the rule :func:`is_validation`; each side is sorted by name."""
    _check_percent(valid_percent)
    names = sorted(documents)
    valid = [n for n in names if is_validation(n, valid_percent)]
    train = [n for n in names if not is_validation(n, valid_percent)]
    return TextCorpus(
        tuple(documents[n] for n in train), tuple(documents[n] for n in valid), tuple(train), tuple(valid)
    )


def split_text(text: str, valid_percent: int = 5, name: str = "text") -> TextCorpus:
    """One long text: its last ``valid_percent`` % of lines (at least one) are validation, the rest training.

    Blank (whitespace-only) lines are not records, as in :func:`~archlab.data.files.read_jsonl`: they do not
    count towards either share, and those after the last line of text are dropped, so a file ending in blank
    lines still validates on text. Blank lines inside the text stay where they are.
    """
    _check_percent(valid_percent)
    lines = text.splitlines(keepends=True)
    content = [i for i, line in enumerate(lines) if line.strip()]
    if len(content) < 2:
        raise DataError(f"{name} has {len(content)} non-blank line(s); a train/validation split by lines needs "
                        "at least 2")  # fmt: skip
    lines = lines[: content[-1] + 1]  # trailing blank lines hold no text
    n_valid = max(1, len(content) * valid_percent // 100)
    cut = content[-n_valid]  # the first validation line of text; blank lines before it stay in training
    return TextCorpus(("".join(lines[:cut]),), ("".join(lines[cut:]),), (f"{name}[:{cut}]",), (f"{name}[{cut}:]",))


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype holding ids ``< vocab_size``: uint16 up to 65536, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def encode_texts(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """All ``texts`` tokenised into one flat id array ``[n_tokens]``, each text followed by ``</s>``
    (when the tokenizer has one), in :func:`id_dtype` of its vocabulary."""
    if not texts:
        raise DataError("no texts to encode")
    eos = tokenizer.eos_id
    parts = []
    for ids in tokenizer.encode_batch(list(texts)):
        parts.append(np.asarray(ids, dtype=np.int64))
        if eos is not None:
            parts.append(np.array([eos], dtype=np.int64))
    return np.concatenate(parts).astype(id_dtype(tokenizer.vocab_size))


def unigram_loss(train_ids: np.ndarray, valid_ids: np.ndarray, vocab_size: int) -> float:
    r"""The unigram baseline in nats per token: ``-mean_t log p(x_t)`` over ``valid_ids`` with
    ``p(v) = (count_train(v) + 1) / (n_train + V)`` (add-one smoothing, so unseen ids stay finite).

    A language model that learned nothing beyond token frequencies reaches this loss.
    """
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    if counts.shape[0] > vocab_size:
        raise DataError(f"train_ids hold ids up to {counts.shape[0] - 1}, beyond vocab_size={vocab_size}")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    valid_ids = np.asarray(valid_ids, dtype=np.int64)
    if valid_ids.size == 0:
        raise DataError("valid_ids is empty")
    if valid_ids.min() < 0 or valid_ids.max() >= vocab_size:
        raise DataError(f"valid_ids hold ids outside [0, {vocab_size})")
    return float(-log_p[valid_ids].mean())
