"""The three-architectures lab: the models' sizes, the tasks' rules, each family's target logits (causality:
the decoder families see no future target token, the encoder sees none of the targets), the criterion on
constructed scores, and the quick run (undecided)."""

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.three_architectures import ARCHS, MARGIN, SYMBOLS, TASKS, TaskData, build, judge, target_logits


def test_the_three_models_have_about_the_same_parameters():
    counts = [sum(p.numel() for p in build(arch, 0).parameters()) for arch in ARCHS]
    assert max(counts) / min(counts) < 1.2


def test_the_tasks_rules():
    gen = torch.Generator().manual_seed(0)
    data = TaskData("translation")
    x, y = data.batch(4, gen)
    assert torch.equal(y, data.permutation[x.flip(1)])
    x, y = TaskData("classification").batch(64, gen)
    assert y.shape == (64, 1) and torch.equal(y[:, 0].bool(),
                                              torch.tensor([sum(t < SYMBOLS // 2 for t in r) > 5 for r in x.tolist()]))
    chain = TaskData("generation")
    x, y = chain.batch(32, gen)
    seq = torch.cat([x, y], 1)
    for a, b in zip(seq[:, :-1].flatten().tolist(), seq[:, 1:].flatten().tolist()):
        assert b in chain.successors[a].tolist()
    assert int(seq.max()) < SYMBOLS


@pytest.mark.parametrize("arch", ARCHS)
def test_target_logits_use_only_what_each_family_may_see(arch):
    model = build(arch, 0).eval()
    x, y = TaskData("translation").batch(2, torch.Generator().manual_seed(1))
    changed = y.clone()
    changed[:, -1] = (changed[:, -1] + 1) % SYMBOLS  # the last target token
    with torch.no_grad():
        a, b = target_logits(arch, model, x, y), target_logits(arch, model, x, changed)
    assert a.shape == (2, y.shape[1], model.config.vocab_size)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no family reads the token it predicts
    changed[:, 0] = (changed[:, 0] + 1) % SYMBOLS
    with torch.no_grad():
        c = target_logits(arch, model, x, changed)
    if arch == "encoder-only":  # all targets are masked: the encoder never reads them
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    else:  # teacher forcing: later positions read the first target token
        assert not torch.allclose(a[:, 1:], c[:, 1:])


def test_judge_on_constructed_scores():
    best = {(a, t): 1.0 for a in ARCHS for t in TASKS}
    assert all(judge(best).values())
    worse = dict(best)
    worse["encoder-only", "classification"] = 1.0 + MARGIN + 0.01
    assert judge(worse) == {"classification": False, "generation": True, "translation": True}


def test_quick_run_is_undecided():
    result = run_lab("three-architectures", quick=True).result
    assert result.verdict == "undecided" and "quick run" in result.undecided
    assert [r[0] for r in result.rows] == list(ARCHS) and len(result.columns) == 8
