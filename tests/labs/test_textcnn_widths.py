"""The TextCNN widths lab: its word tokenizer, parameter matching and criterion on constructed accuracies, and
the quick run (undecided: 15 steps)."""

import pytest

from archlab.labs import run_lab
from archlab.labs.textcnn_widths import (
    D_EMBED,
    MULTI,
    UNK,
    build_vocabulary,
    encode,
    head_parameters,
    judge,
    matching_filters,
    words,
)
from archlab.models.textcnn import TextCNN, TextCNNConfig


def test_words_vocabulary_and_encoding():
    assert words("Return a Task_object, 2x.") == ["return", "a", "task_object", "2x"]
    vocabulary = build_vocabulary(["a b b c", "b a d"], min_count=2)
    assert vocabulary == {"b": 2, "a": 3}  # most frequent first; c and d seen once
    assert encode(["b c a a a"], vocabulary, max_words=4) == [[2, UNK, 3, 3]]


def test_matching_filters_balances_the_head():
    base = dict(vocab_size=30, n_classes=6, d_embed=D_EMBED, channels=("non-static",))
    target = head_parameters(TextCNN(TextCNNConfig(**base, kernels=tuple((w, 32) for w in MULTI))))
    for width in MULTI:
        c = matching_filters(target, width, 6)
        got = head_parameters(TextCNN(TextCNNConfig(**base, kernels=((width, c),))))
        assert abs(got - target) <= (D_EMBED * width + 1 + 6) / 2  # nearest: within half a filter


def test_judge_on_constructed_accuracies():
    supported, lead, undecided = judge({"multi": [0.8, 0.82], "w3": [0.78, 0.8], "w4": [0.7, 0.7]})
    assert supported and lead == pytest.approx(2.0) and undecided == ""
    supported, lead, undecided = judge({"multi": [0.7], "w3": [0.75]})
    assert not supported and round(lead, 6) == -5.0 and undecided == ""
    assert "no model learned" in judge({"multi": [0.2], "w3": [0.3]})[2]


def test_quick_run_is_undecided():
    result = run_lab("textcnn-widths", quick=True).result
    assert result.verdict == "undecided" and "no model learned" in result.undecided
    assert len(result.rows) == 1 + len(MULTI)
