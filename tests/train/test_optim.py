"""The optimiser recipe: AdamW, the paper's betas and eps, weight decay on Linear/Conv weights only."""

import torch
from torch import nn

from archlab.models.registry import build_model
from archlab.train.optim import build_optimizer, split_decay


def names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_decay_rule_on_gpt():
    model = build_model("gpt-nano")  # tied LM head
    decay, no_decay = split_decay(model)
    decayed = names(model, decay)
    assert decayed == {n for n, p in model.named_parameters() if n.endswith("proj.weight") or ".w1.weight" in n
                       or ".w2.weight" in n}
    assert "tok_emb.weight" in names(model, no_decay)  # the embedding, which is also the LM head
    assert all(".bias" not in n and "norm" not in n for n in decayed)
    # every trainable parameter exactly once
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert not {id(p) for p in decay} & {id(p) for p in no_decay}


def test_decay_rule_on_conv_and_free_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.cls = nn.Parameter(torch.zeros(1, 1, 4))
            self.emb = nn.Embedding(5, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)

    net = Net()
    decay, no_decay = split_decay(net)
    assert names(net, decay) == {"conv.weight", "head.weight"}
    assert names(net, no_decay) == {"conv.bias", "cls", "emb.weight", "norm.weight", "norm.bias", "head.bias"}


def test_optimizer_defaults_are_the_papers_adam():
    opt = build_optimizer(build_model("gpt-nano"), lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-9 and g["lr"] == 1e-3 for g in opt.param_groups)


def test_fused_adamw_for_plain_tensors():
    from archlab.models import build_model
    from archlab.train.optim import build_optimizer

    optimizer = build_optimizer(build_model("gpt-nano"), lr=1e-3)
    assert optimizer.defaults["fused"] is True
