"""No quick run gives a verdict its full run contradicts: each lab's ``--quick`` verdict is the full run's, as the
README's table of `make labs` records it, or "undecided" (its models learned too little to judge).

Slow tier: it runs every lab's quick version once more (the fast tier runs each in its own test file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from archlab.labs import VERDICTS, list_labs, run_lab

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(?P<name>[a-z0-9-]+)` \| .+? \| (?P<verdict>\*\*not supported\*\*|supported|undecided) \|", re.M)


def full_verdicts() -> dict[str, str]:
    """``{lab: verdict}`` from the README's table of full-mode results."""
    return {m["name"]: m["verdict"].strip("*") for m in ROW.finditer(README.read_text(encoding="utf-8"))}


def test_the_readme_records_a_full_verdict_for_every_lab():
    recorded = full_verdicts()
    assert sorted(recorded) == sorted(lab.name for lab in list_labs())
    assert set(recorded.values()) <= set(VERDICTS) - {"undecided"}  # a full run decides


@pytest.mark.slow
@pytest.mark.parametrize("name", [lab.name for lab in list_labs()])
def test_the_quick_verdict_is_the_full_one_or_undecided(name):
    quick = run_lab(name, quick=True).result
    assert quick.verdict in (full_verdicts()[name], "undecided"), (name, quick.verdict, quick.finding)
