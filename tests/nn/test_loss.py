"""archlab.nn.loss.linear_cross_entropy against F.cross_entropy on materialised logits (float64)."""

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model
from archlab.nn.loss import linear_cross_entropy


def _case(seed=0, n=(3, 29), d=12, vocab=41):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, n, generator=g)
    return h, w, y


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("chunk", [1, 7, 29, 1000])
def test_equals_cross_entropy_and_its_gradients(eps, chunk):
    h, w, y = _case()
    y[0, :4] = -100  # ignored rows
    y[2, -1] = -100
    ours = linear_cross_entropy(h, w, y, label_smoothing=eps, chunk_size=chunk)
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten(), label_smoothing=eps, ignore_index=-100)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    g_ours = torch.autograd.grad(ours * 2.5, (h, w))
    g_ref = torch.autograd.grad(ref * 2.5, (h, w))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_every_row_ignored_gives_zero_loss_and_gradient():
    h, w, y = _case()
    loss = linear_cross_entropy(h, w, torch.full_like(y, -100))
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert not gh.any() and not gw.any()


def test_extreme_logits_stay_finite():
    h, w, y = _case()
    with torch.no_grad():
        h.mul_(1e3)
    loss = linear_cross_entropy(h, w, y)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (h, w)))


def test_without_grad_only_the_loss_is_computed():
    h, w, y = _case()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=0)


def test_bad_inputs():
    h, w, y = _case()
    with pytest.raises(ShapeError, match="targets must be"):
        linear_cross_entropy(h, w, y[:, :-1])
    with pytest.raises(ShapeError, match=r"weight must be \[V, d=12\]"):
        linear_cross_entropy(h, w[:, :-1], y)
    y[1, 3] = 41
    with pytest.raises(ShapeError, match="targets hold 41, outside"):
        linear_cross_entropy(h, w, y)
    with pytest.raises(ConfigError, match="label_smoothing=1.0"):
        linear_cross_entropy(h, w, y.clamp_max(40), label_smoothing=1.0)


def test_gpt_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=97).double()
    ids = torch.randint(0, 97, (2, 17))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    ours = model.loss(ids, labels, label_smoothing=0.1)
    ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    g_ours = torch.autograd.grad(ours, list(model.parameters()))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ShapeError, match="labels must have the shape"):
        model.loss(ids, labels[:, 1:])


def test_no_rows_gives_zero_loss_and_zero_gradient():
    h = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any()
