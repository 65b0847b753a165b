r"""Synthetic sequence-to-sequence tasks: (source, target) string pairs, generated from a seed.

=========  ==========================  ===========================  =====================================
task       source                      target                       length knob ``[min_length, max_length]``
=========  ==========================  ===========================  =====================================
copy       ``"qbzk"``                  ``"qbzk"``                   letters in the source
reverse    ``"qbzk"``                  ``"kzbq"``                   letters in the source
sort       ``"qbzk"``                  ``"bkqz"``                   letters in the source
addition   ``"407+38"``                ``"445"``                    digits of each operand
dates      ``"3rd of March 1999"``     ``"1999-03-03"``             none (lengths are set by the formats)
=========  ==========================  ===========================  =====================================

Letters are ``a..z``; operands have no leading zeros. Dates are uniform over 1900-01-01..2099-12-31 and
written in one of six unambiguous formats (no day/month-order guessing; the weekday, when written, is right)::

    3rd of March 1999   March 3, 1999   3 March 1999   Mar 3, 1999   Wednesday, 3 March 1999   1999/03/03

Train/validation split: a pair belongs to validation iff ``int(sha1("valid:" + source)[:8], 16) % 10 == 0``
(a tenth of all sources), so the two splits never share a source. Pairs are drawn by rejection from
``random.Random(f"{name}:{seed}:{split}")``: the same task, seed and split give the same list anywhere.

Every task's characters are listed in :meth:`SyntheticTask.alphabet`; :meth:`SyntheticTask.tokenizer` is the
:class:`~archlab.data.tokenizers.CharTokenizer` over them (``<pad> <s> </s> <unk> <mask>`` = 0..4).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import random
import string

from archlab.config import Config, check_choice, check_positive, require
from archlab.data.tokenizers import CharTokenizer
from archlab.errors import ConfigError, DataError

TASK_NAMES = ("copy", "reverse", "sort", "addition", "dates")
SPLITS = ("train", "valid")
LETTERS = string.ascii_lowercase
FIRST_DATE, LAST_DATE = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
VALID_BUCKETS = 10  # one source in VALID_BUCKETS is validation


def ordinal(day: int) -> str:
    """``1 -> "1st"``, ``2 -> "2nd"``, ``3 -> "3rd"``, ``11 -> "11th"``, ``22 -> "22nd"``."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


DATE_FORMATS = {  # name -> writer; every one names the month or puts the year first, so none is ambiguous
    "ordinal": lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    "month_day": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "day_month": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "short_month": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    "weekday": lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
    "year_first": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
}


def in_validation(source: str) -> bool:
    """The split rule: ``int(sha1("valid:" + source)[:8], 16) % 10 == 0``."""
    return int(hashlib.sha1(f"valid:{source}".encode()).hexdigest()[:8], 16) % VALID_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class SyntheticTask(Config):
    """One synthetic task (see the module docstring for what each produces).

    Args:
        name: ``copy | reverse | sort | addition | dates``.
        min_length, max_length: the length knob (letters, or operand digits for addition); lengths are
            uniform in ``[min_length, max_length]``. Ignored by ``dates``.
    """

    name: str = "copy"
    min_length: int = 1
    max_length: int = 8

    def validate(self) -> None:
        check_choice("name", self.name, TASK_NAMES)
        check_positive("min_length", self.min_length)
        require(
            self.max_length >= self.min_length, f"max_length={self.max_length} must be >= min_length={self.min_length}"
        )

    # -- one example -------------------------------------------------------------------------------
    def example(self, rng: random.Random) -> tuple[str, str]:
        """One ``(source, target)`` pair drawn with ``rng`` (no split applied)."""
        if self.name == "dates":
            day = FIRST_DATE + datetime.timedelta(days=rng.randrange((LAST_DATE - FIRST_DATE).days + 1))
            write = DATE_FORMATS[rng.choice(list(DATE_FORMATS))]
            return write(day), day.isoformat()
        if self.name == "addition":
            a, b = (self._number(rng) for _ in range(2))
            return f"{a}+{b}", str(a + b)
        letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(self.min_length, self.max_length)))
        target = {"copy": letters, "reverse": letters[::-1], "sort": "".join(sorted(letters))}[self.name]
        return letters, target

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_length, self.max_length)
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    # -- datasets -------------------------------------------------------------------------------------
    def pairs(self, n: int, *, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
        """``n`` pairs of ``split`` (``train`` or ``valid``; disjoint sources), deterministic in ``seed``.

        Sources may repeat within a split when the task's space of sources is small.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} must be a positive integer")
        check_choice("split", split, SPLITS)
        want_valid = split == "valid"
        rng = random.Random(f"{self.name}:{seed}:{split}")
        out: list[tuple[str, str]] = []
        tries = 0
        while len(out) < n:
            source, target = self.example(rng)
            if in_validation(source) == want_valid:
                out.append((source, target))
            tries += 1
            if tries > 1000 + 100 * n:
                raise DataError(
                    f"task {self.name!r} with lengths {self.min_length}..{self.max_length} has too few "
                    f"distinct sources for a {split} split of {n} pairs; raise max_length"
                )
        return out

    def alphabet(self) -> str:
        """Every character a source or target of this task can hold, sorted."""
        if self.name == "dates":
            year_2000 = [
                datetime.date(2000, 1, 1) + datetime.timedelta(days=i) for i in range(366)
            ]  # all months, days, weekdays
            chars = {c for d in year_2000 for write in DATE_FORMATS.values() for c in write(d)}
            return "".join(sorted(chars | set(string.digits) | {"-"}))
        if self.name == "addition":
            return string.digits + "+"
        return LETTERS

    def tokenizer(self) -> CharTokenizer:
        """The character tokenizer of :meth:`alphabet` (no ``<unk>`` ever needed for this task's data)."""
        return CharTokenizer(self.alphabet())
