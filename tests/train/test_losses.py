"""Label-smoothed cross-entropy against its definition and against F.cross_entropy, in float64."""

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.train.losses import label_smoothed_cross_entropy, token_losses

TIGHT = dict(rtol=1e-12, atol=1e-12)


def example(seed=0, shape=(3, 5), V=11, ignored=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, V, shape, generator=g)
    target.view(-1)[torch.randperm(target.numel(), generator=g)[:ignored]] = -100
    return logits, target


def by_definition(logits, target, eps):
    """-sum_v q_v log p_v, q = (1 - eps) onehot(y) + eps / V, averaged over non-ignored targets."""
    V = logits.shape[-1]
    keep = target != -100
    q = (1 - eps) * F.one_hot(target[keep], V).double() + eps / V
    return -(q * logits[keep].log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_equals_definition_and_torch_cross_entropy(eps):
    logits, target = example()
    got = label_smoothed_cross_entropy(logits, target, eps)
    torch.testing.assert_close(got, by_definition(logits, target, eps), **TIGHT)
    torch_ce = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), label_smoothing=eps, ignore_index=-100)
    torch.testing.assert_close(got, torch_ce, **TIGHT)


def test_gradient_equals_torch_cross_entropy_gradient():
    logits, target = example(seed=1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    label_smoothed_cross_entropy(a, target, 0.1).backward()
    F.cross_entropy(b.reshape(-1, 11), target.reshape(-1), label_smoothing=0.1).backward()
    torch.testing.assert_close(a.grad, b.grad, **TIGHT)
    assert (a.grad[target == -100] == 0).all()  # ignored positions get no gradient


def test_reductions():
    logits, target = example(seed=2)
    per = label_smoothed_cross_entropy(logits, target, 0.1, reduction="none")
    assert per.shape == target.shape and (per[target == -100] == 0).all()
    torch_per = F.cross_entropy(logits.permute(0, 2, 1), target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(per, torch_per, **TIGHT)
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, target, 0.1, reduction="sum"), per.sum(), **TIGHT)


def test_masked_logits_stay_finite_and_equal_the_restricted_vocabulary():
    logits, target = example(seed=3)
    target = target.where(target < 0, target % 7)  # targets among the 7 allowed classes
    masked = logits.clone()
    masked[..., 7:] = float("-inf")
    masked.requires_grad_()
    loss = label_smoothed_cross_entropy(masked, target, 0.1)
    # torch's smoothing puts eps/V on impossible classes: inf. Ours spreads eps over the allowed 7.
    assert torch.isinf(F.cross_entropy(masked.detach().reshape(-1, 11), target.reshape(-1), label_smoothing=0.1))
    restricted = F.cross_entropy(logits[..., :7].reshape(-1, 7), target.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, restricted, **TIGHT)
    loss.backward()
    assert torch.isfinite(masked.grad).all() and (masked.grad[..., 7:] == 0).all()


def test_rows_masked_per_position_like_a_causal_mask():
    """Different allowed sets per row (row i may predict classes 0..i) give each row its own K."""
    V = 6
    logits = torch.randn(V, V, dtype=torch.float64)
    logits = logits.masked_fill(torch.ones(V, V).triu(1).bool(), float("-inf"))
    target = torch.arange(V)
    per = label_smoothed_cross_entropy(logits, target, 0.2, reduction="none")
    for i in range(V):
        want = F.cross_entropy(logits[i : i + 1, : i + 1], target[i : i + 1], label_smoothing=0.2)
        torch.testing.assert_close(per[i], want, **TIGHT)


def test_ignored_rows_of_minus_inf_give_no_nan():
    logits = torch.randn(4, 5, dtype=torch.float64)
    logits[1] = float("-inf")
    logits.requires_grad_()
    target = torch.tensor([2, -100, 0, 4])
    loss = label_smoothed_cross_entropy(logits, target, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    keep = target != -100
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.detach()[keep], target[keep], label_smoothing=0.1), **TIGHT
    )


def test_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = label_smoothed_cross_entropy(logits, torch.full((2, 3), -100), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_impossible_target_is_infinite():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert torch.isinf(label_smoothed_cross_entropy(logits, torch.tensor([1]), 0.1))


def test_token_losses_nll_is_plain_cross_entropy():
    logits, target = example(seed=4)
    out = token_losses(logits, target, 0.1)
    keep = target != -100
    torch.testing.assert_close(out.nll[keep], F.cross_entropy(logits[keep], target[keep], reduction="none"), **TIGHT)
    assert torch.equal(out.keep, keep)


def test_bad_inputs_raise_before_computing():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ShapeError, match=r"target \(2, 4\) must have the shape of logits \(2, 3, 5\)"):
        label_smoothed_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="target must hold integer class ids, got dtype torch.float32"):
        label_smoothed_cross_entropy(logits, torch.zeros(2, 3))
    with pytest.raises(ShapeError, match=r"class 5, outside \[0, V=5\)"):
        label_smoothed_cross_entropy(logits, torch.full((2, 3), 5))
    with pytest.raises(ShapeError, match="class -3"):
        label_smoothed_cross_entropy(logits, torch.full((2, 3), -3))
    with pytest.raises(ConfigError, match=r"eps=1.0 must be in \[0, 1\)"):
        label_smoothed_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), 1.0)
    with pytest.raises(ConfigError, match="reduction='avg'"):
        label_smoothed_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), reduction="avg")
