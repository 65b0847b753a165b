"""The gMLP-vs-attention lab: its classification task, parameter matching, held-out LM loss against an explicit
float64 cross-entropy, its criterion on constructed numbers, and the quick run (undecided: 30 steps)."""

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError
from archlab.labs import run_lab
from archlab.labs.gmlp import CLS, LETTERS, SEP, copy_or_edit, judge, lm_loss, matching_ffn, parameters
from archlab.models.gmlp import GMLP, GMLPConfig


def test_copy_or_edit_pairs():
    x, y = copy_or_edit(200, 5, seed=3)
    assert x.shape == (200, 12) and int(y.sum()) == 100
    assert (x[:, 0] == CLS).all() and (x[:, 6] == SEP).all() and int(x[:, 1:6].max()) < LETTERS
    differences = (x[:, 1:6] != x[:, 7:]).sum(1)
    assert (differences[y == 1] == 0).all() and (differences[y == 0] == 1).all()
    assert torch.equal(copy_or_edit(200, 5, seed=3)[0], x)  # seeded
    with pytest.raises(ConfigError, match="length"):
        copy_or_edit(10, 0, seed=0)


def test_matching_ffn_finds_the_nearest_even_width():
    def build(f):
        return GMLP(GMLPConfig(vocab_size=50, max_len=16, d_model=16, d_ffn=f, n_layers=2))

    target = parameters(build(90)) + 7  # between two even widths, nearer 90
    f = matching_ffn(target, build)
    assert f % 2 == 0
    gaps = {g: abs(parameters(build(g)) - target) for g in (f - 2, f, f + 2)}
    assert gaps[f] == min(gaps.values()) and f == 90


def test_lm_loss_is_the_cross_entropy_in_float64():
    torch.manual_seed(0)
    model = GMLP(GMLPConfig(vocab_size=20, max_len=8, d_model=8, d_ffn=16, n_layers=1)).double().train()
    inputs, labels = torch.randint(0, 20, (3, 8)), torch.randint(0, 20, (3, 8))
    got = lm_loss(model, inputs, labels)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    want = -(logits.log_softmax(-1).gather(-1, labels[..., None])).mean().item()
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item(), rel=1e-12)


def test_judge_needs_both_tasks():
    assert judge({"Transformer": 2.0, "gMLP": 2.08}, {"Transformer": 0.9, "gMLP": 0.88})[0] is True
    assert judge({"Transformer": 2.0, "gMLP": 2.12}, {"Transformer": 0.9, "gMLP": 0.95})[0] is False  # loss +6%
    supported, excess, gap = judge({"Transformer": 2.0, "gMLP": 1.9}, {"Transformer": 0.9, "gMLP": 0.85})
    assert supported is False and excess == pytest.approx(-0.05) and gap == pytest.approx(5.0)


def test_quick_run_is_undecided():
    result = run_lab("gmlp-vs-attention", quick=True).result
    assert result.verdict == "undecided" and "learned too little" in result.undecided
    assert [row[0] for row in result.rows] == ["Transformer", "gMLP"]
    assert abs(result.rows[1][1] / result.rows[0][1] - 1) < 0.01  # parameters matched within 1%
