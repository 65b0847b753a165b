"""The errors archlab raises.

Every error a user can cause is an :class:`ArchlabError`, raised *before* any computation, with a
message that names the parameter, the value it got and what is allowed. The children also derive from
the built-in exception a Python user would expect (``ValueError`` for bad values), so ``except
ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ArchlabError(Exception):
    """Base class of every error archlab raises on purpose."""


class ConfigError(ArchlabError, ValueError):
    """A configuration value or combination of values is not allowed."""


class ShapeError(ArchlabError, ValueError):
    """A tensor has the wrong shape, dtype or value range for the operation asked."""


class CheckpointError(ArchlabError):
    """A checkpoint or weights folder is missing, corrupt, or of another architecture."""


class DataError(ArchlabError, ValueError):
    """Input data (files, corpora, token ids) cannot be used as asked."""


class TrainingError(ArchlabError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is left as it was."""


def closest(name: str, choices: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for ``name`` among ``choices``, or ``""`` if none is close."""
    choices = list(choices)
    by_lower = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name: ``unknown preset 'gpt2-smal' (did you mean 'gpt2-small'?); known: ...``."""
    choices = sorted(choices)
    return f"unknown {kind} {name!r}{closest(name, choices)}; known: {', '.join(choices)}"
