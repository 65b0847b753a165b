"""Documents and evaluation sets for the search engine.

A document is ``(id, title, text)``, as in BEIR's ``corpus.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One searchable document: a unique ``id``, a ``title`` (may be empty) and its ``text``."""

    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """What gets embedded and indexed: ``title`` and ``text`` joined by a blank line when both exist."""
        return f"{self.title}\n\n{self.text}" if self.title and self.text else (self.title or self.text)
