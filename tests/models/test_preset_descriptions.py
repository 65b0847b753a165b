"""Preset descriptions say what the preset is: a parameter count in one agrees with the count computed from its
config (at the precision it is written), unless it is a paper's figure (``paper: 65M``) or part of a model's name
(``Llama-2-7B``, ``SmolLM2-135M``); ``archlab presets`` says what ``train`` changes."""

from __future__ import annotations

import re

import pytest

from archlab.analysis.params import count_parameters
from archlab.cli import build_on_meta, main
from archlab.models import list_presets

UNITS = {"K": 1e3, "M": 1e6, "B": 1e9}
#: "110M", "1.56B", "~86.6M", "0.27M parameters"; not "-7B" (a name), "37k vocab" (lower case: not a count).
COUNT = re.compile(r"(?<![\w.-])~?(\d+(?:\.\d+)?)([KMB])\b")
PAPER = re.compile(r"paper: [^)]*")


def stated_counts(description: str) -> list[str]:
    """The parameter counts a description states as the preset's own (a paper's figures left out)."""
    return [m.group(0) for m in COUNT.finditer(PAPER.sub("", description))]


def agrees(stated: str, computed: int) -> bool:
    """``stated`` (e.g. ``"1.56B"``) is ``computed`` rounded to the digits written."""
    number, unit = COUNT.fullmatch(stated).groups()
    digits = len(number.partition(".")[2])
    return round(computed / UNITS[unit], digits) == float(number)


def test_the_rule_catches_a_wrong_count():
    assert stated_counts("BERT-base: L=12, 110M") == ["110M"] and not agrees("110M", 109_482_240)
    assert agrees("109M", 109_482_240) and agrees("0.27M", 270_410) and agrees("~86.6M", 86_567_656)
    assert stated_counts("shared 37k vocab (paper: 65M params)") == []
    assert stated_counts("Llama-2-7B shapes, SmolLM2-135M") == []


@pytest.mark.parametrize("preset", list_presets(), ids=lambda p: p.name)
def test_no_description_states_a_count_the_config_does_not_have(preset):
    _, model = build_on_meta(preset.name, {})
    computed = count_parameters(model).total
    wrong = [s for s in stated_counts(preset.description) if not agrees(s, computed)]
    assert not wrong, f"{preset.name}: description says {wrong}, the config has {computed:,} parameters"


def test_gpt_nano_says_what_it_is_and_what_train_changes(capsys):
    nano = next(p for p in list_presets() if p.name == "gpt-nano")
    assert nano.config.vocab_size == 256 and "byte vocabulary (256)" in nano.description
    assert "`archlab train` sets the vocabulary from its tokenizer" in nano.description
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "`archlab train` gives a model its tokenizer's vocabulary (text: a BPE of data.vocab_size=4096" in out
