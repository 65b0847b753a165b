"""The n-gram window lab: the recall sequences as specified, the window model's reach (8 tokens), the criterion
on constructed accuracies, and the quick run (undecided: 30 steps)."""

import numpy as np
import pytest
import torch

from archlab.errors import ConfigError
from archlab.labs import run_lab
from archlab.labs.context_window import (
    BEYOND,
    INSIDE,
    KEYS,
    MODELS,
    QUERY,
    SEQ_LEN,
    SOLVED,
    RecallBatches,
    answer_scores,
    build,
    judge,
    recall_batch,
)
from archlab.train.losses import IGNORE_INDEX


def test_recall_sequences():
    batch = recall_batch([0, 5, 20], 64, np.random.default_rng(0))
    ids, labels, answer, gap = batch["input_ids"], batch["labels"], batch["answer"], batch["gap"]
    assert ids.shape == labels.shape == (64, SEQ_LEN)
    for row in range(64):
        a, d = int(answer[row]), int(gap[row])
        assert d in (0, 5, 20)
        assert ids[row, a] == QUERY and int((ids[row] == QUERY).sum()) == 1
        key = int(ids[row, a - d - 1])
        assert 0 <= key < KEYS and int((ids[row] < KEYS).sum()) <= 2  # the key, and its repeat if inside the input
        assert labels[row, a] == key and int((labels[row] != IGNORE_INDEX).sum()) == 1
        if a + 1 < SEQ_LEN:
            assert ids[row, a + 1] == key


def test_batches_are_a_function_of_seed_and_step_and_check_gaps():
    a, b = RecallBatches([1, 10], [1], 8, seed=3), RecallBatches([1, 10], [1], 8, seed=3)
    assert torch.equal(a.batch(5)["input_ids"], b.batch(5)["input_ids"])
    assert not torch.equal(a.batch(5)["input_ids"], a.batch(6)["input_ids"])
    with pytest.raises(ConfigError, match="gap=40"):
        RecallBatches([1, 40], [1], 8)


def test_the_window_model_sees_exactly_8_tokens():
    """Changing the token 8 positions back leaves the fixed-window model's logits as they were; 7 back changes them.
    The recurrent and attention models see all of the prefix."""
    ids = torch.randint(KEYS, QUERY, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    t = SEQ_LEN - 1
    for kind in MODELS:
        model = build(kind, 0).eval()
        with torch.no_grad():
            base = model(ids)[0, t]
            for back, window in ((7, True), (8, False), (20, False)):
                changed = ids.clone()
                changed[0, t - back] = 0
                moved = not torch.allclose(model(changed)[0, t], base)
                assert moved == (window or kind != MODELS[0]), (kind, back)


def test_answer_scores_against_a_perfect_and_a_blind_predictor():
    batch = recall_batch([3], 16, np.random.default_rng(1))

    class Oracle(torch.nn.Module):
        def forward(self, ids):
            return torch.nn.functional.one_hot(batch["labels"].clamp(min=0), QUERY + 1).float() * 50

    accuracy, loss = answer_scores(Oracle(), batch)
    assert accuracy == 1.0 and loss == pytest.approx(0.0, abs=1e-6)
    uniform = lambda ids: torch.zeros(*ids.shape, QUERY + 1)  # noqa: E731
    model = torch.nn.Module()
    model.forward = uniform
    assert answer_scores(model, batch)[1] == pytest.approx(np.log(QUERY + 1))


def test_judge_on_constructed_accuracies():
    solved = {d: 1.0 for d in INSIDE + BEYOND}
    blind = {**{d: 1.0 for d in INSIDE}, **{d: 1 / KEYS for d in BEYOND}}
    assert judge({MODELS[0]: blind, MODELS[1]: solved, MODELS[2]: solved}) == (True, "")
    ok, undecided = judge({MODELS[0]: solved, MODELS[1]: solved, MODELS[2]: solved})
    assert not ok and not undecided  # a window model that recalls beyond its window refutes the claim
    lstm_short = {**solved, BEYOND[-1]: SOLVED - 0.01}
    assert judge({MODELS[0]: blind, MODELS[1]: lstm_short, MODELS[2]: solved}) == (False, "")
    ok, undecided = judge({MODELS[0]: {**blind, INSIDE[0]: 0.5}, MODELS[1]: solved, MODELS[2]: solved})
    assert not ok and "did not learn recall" in undecided


def test_quick_run_is_undecided():
    result = run_lab("ngram-window", quick=True).result
    assert result.verdict == "undecided"
    assert [row[:2] for row in result.rows] == [[m, d] for m in MODELS for d in INSIDE + BEYOND]
