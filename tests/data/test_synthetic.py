"""Synthetic seq2seq tasks: each pair checked by an independent computation; deterministic; disjoint splits."""

import datetime
import itertools
import re

import pytest

from archlab.data import synthetic
from archlab.data.synthetic import DATE_FORMATS, TASK_NAMES, SyntheticTask, in_validation, ordinal
from archlab.errors import ConfigError, DataError

N = 2000


def test_copy_reverse_sort():
    for name in ("copy", "reverse", "sort"):
        task = SyntheticTask(name, min_length=3, max_length=12)
        pairs = task.pairs(N, seed=1)
        lengths = {len(s) for s, _ in pairs}
        assert lengths == set(range(3, 13))  # every length of the knob occurs, no other
        for source, target in pairs:
            assert re.fullmatch("[a-z]+", source)
            if name == "copy":
                assert target == source
            elif name == "reverse":
                assert target[::-1] == source  # reverse of reverse
            else:
                assert sorted(source) == list(target) and all(a <= b for a, b in itertools.pairwise(target))


def test_addition_checked_by_integer_arithmetic():
    task = SyntheticTask("addition", min_length=1, max_length=6)
    digits = set()
    for source, target in task.pairs(N, seed=2):
        a, b = source.split("+")
        assert int(a) + int(b) == int(target)
        for operand in (a, b, target):
            assert operand == str(int(operand))  # no leading zeros
        digits |= {len(a), len(b)}
    assert digits == set(range(1, 7))


def _parse(source: str) -> datetime.date:
    """Read a dates-task source back with datetime.strptime, one pattern per format."""
    if m := re.fullmatch(r"(\d+)(st|nd|rd|th) of (\w+ \d{4})", source):
        assert ordinal(int(m[1])) == m[1] + m[2]
        return datetime.datetime.strptime(f"{m[1]} {m[3]}", "%d %B %Y").date()
    for fmt in ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%A, %d %B %Y", "%Y/%m/%d"):
        try:
            parsed = datetime.datetime.strptime(source, fmt).date()
        except ValueError:
            continue
        if fmt.startswith("%A"):
            assert parsed.strftime("%A") == source.split(",")[0]  # the written weekday is the real one
        return parsed
    raise AssertionError(f"unparsable date source {source!r}")


def test_dates_parse_back_to_the_target():
    pairs = SyntheticTask("dates").pairs(N, seed=3)
    seen_formats = set()
    for source, target in pairs:
        day = datetime.date.fromisoformat(target)
        assert _parse(source) == day
        assert datetime.date(1900, 1, 1) <= day <= datetime.date(2099, 12, 31)
        seen_formats |= {name for name, write in DATE_FORMATS.items() if write(day) == source}
    assert seen_formats == set(DATE_FORMATS)
    assert DATE_FORMATS["ordinal"](datetime.date(1999, 3, 3)) == "3rd of March 1999"
    assert [ordinal(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]  # fmt: skip


def test_deterministic_and_disjoint_splits():
    for name in TASK_NAMES:
        task = SyntheticTask(name, max_length=4)
        train = task.pairs(500, seed=7)
        assert train == task.pairs(500, seed=7)
        assert train != task.pairs(500, seed=8)
        valid = task.pairs(100, seed=7, split="valid")
        assert all(in_validation(s) for s, _ in valid) and not any(in_validation(s) for s, _ in train)
        assert not {s for s, _ in train} & {s for s, _ in valid}


def test_alphabet_and_tokenizer_cover_every_pair():
    for name in TASK_NAMES:
        task = SyntheticTask(name)
        tok = task.tokenizer()
        assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id] == [0, 1, 2, 3]
        for source, target in task.pairs(1000, seed=0) + task.pairs(200, split="valid"):
            for text in (source, target):
                ids = tok.encode(text)
                assert tok.unk_id not in ids and tok.decode(ids) == text


def test_config_round_trip_and_errors(monkeypatch):
    task = SyntheticTask("reverse", min_length=2, max_length=5)
    assert SyntheticTask.from_json(task.to_json()) == task
    with pytest.raises(ConfigError, match=r"unknown value 'revers' \(did you mean 'reverse'\?\)"):
        SyntheticTask("revers")
    with pytest.raises(ConfigError, match="max_length=2 must be >= min_length=3"):
        SyntheticTask("copy", min_length=3, max_length=2)
    with pytest.raises(ConfigError, match="min_length=0 must be > 0"):
        SyntheticTask("copy", min_length=0)
    with pytest.raises(ConfigError, match="n=0 must be a positive integer"):
        task.pairs(0)
    with pytest.raises(ConfigError, match="unknown value 'test'"):
        task.pairs(5, split="test")
    monkeypatch.setattr(synthetic, "in_validation", lambda source: False)  # a space with no validation source
    with pytest.raises(DataError, match="too few distinct sources for a valid split"):
        task.pairs(5, split="valid")
