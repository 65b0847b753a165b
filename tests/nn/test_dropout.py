"""archlab.nn.Dropout: nn.Dropout's behaviour, and no op at all where it does nothing (eval mode, p = 0)."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from archlab.nn import Dropout


def test_eval_and_p_zero_return_the_input_itself_without_an_op():
    x = torch.randn(3, 4)
    drop = Dropout(0.5).eval()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert drop(x) is x
        assert Dropout(0.0).train()(x) is x
    assert not [e.name for e in prof.events() if "dropout" in e.name]


def test_training_drops_as_nn_dropout_does():
    x = torch.ones(2000)
    drop = Dropout(0.25).train()
    assert isinstance(drop, nn.Dropout) and drop.p == 0.25
    torch.manual_seed(0)
    ours = drop(x)
    torch.manual_seed(0)
    theirs = nn.Dropout(0.25).train()(x)
    assert torch.equal(ours, theirs)
    kept = ours != 0
    assert 0.7 < kept.float().mean() < 0.8 and torch.allclose(ours[kept], torch.tensor(1 / 0.75))
