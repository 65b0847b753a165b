"""The pre-norm final-LayerNorm lab: the two models differ only in the final norm, the measurements against
their definitions, the criterion on constructed losses, and the quick run (undecided: 20 steps)."""

import pytest
import torch
from torch import nn

from archlab.labs import run_lab
from archlab.labs.prenorm import LAYERS, LOSS_MARGIN, VARIANTS, build, judge, measure, rms
from archlab.nn.norm import LayerNorm


def test_the_two_models_differ_only_in_the_final_norm():
    with_norm, without = build(True, 0), build(False, 0)
    assert isinstance(with_norm.decoder.final_norm, LayerNorm) and isinstance(without.decoder.final_norm, nn.Identity)
    others = {k: v for k, v in with_norm.state_dict().items() if not k.startswith("decoder.final_norm")}
    assert others.keys() == without.state_dict().keys()
    for k, v in others.items():
        assert torch.equal(v, without.state_dict()[k]), k


def test_rms():
    assert rms(torch.tensor([3.0, -3.0, 3.0, -3.0])) == pytest.approx(3.0)
    assert rms(torch.zeros(5)) == 0.0


def test_measure_against_the_definitions():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    for final_norm in (True, False):
        model = build(final_norm, 0)
        m = measure(model, ids, labels)
        assert len(m["stream"]) == LAYERS
        with torch.no_grad():
            h = model.hidden_states(ids)
            logits = model(ids)
        assert m["head_in"] == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-6)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
        assert m["loss"] == pytest.approx(loss, rel=1e-6)
        assert m["logit_std"] == pytest.approx(logits.std(-1).mean().item(), rel=1e-6)
        if final_norm:  # LayerNorm with gain 1 and offset 0 gives every token RMS ~1
            assert m["head_in"] == pytest.approx(1.0, abs=0.01)
        else:  # the head reads the last block's output as it is
            assert m["head_in"] == pytest.approx(m["stream"][-1], rel=1e-6)


def test_judge_on_constructed_losses():
    ok, gaps = judge({VARIANTS[0]: [1.5, 1.6], VARIANTS[1]: [1.5 + LOSS_MARGIN + 0.01, 1.7]})
    assert ok and gaps == pytest.approx([LOSS_MARGIN + 0.01, 0.1])
    assert not judge({VARIANTS[0]: [1.5, 1.6], VARIANTS[1]: [1.6, 1.6]})[0]


def test_quick_run_is_undecided():
    result = run_lab("prenorm-final-norm", quick=True).result
    assert result.verdict == "undecided" and "learned too little" in result.undecided
    assert [row[:2] for row in result.rows] == [[v, w] for v in VARIANTS for w in ("init", "after 20 steps")]
