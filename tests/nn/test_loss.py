"""archlab.nn.loss.linear_cross_entropy against F.cross_entropy on materialised logits (float64)."""

import pytest
import torch
import torch.nn.functional as F

import archlab.nn.loss as loss_module
from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model
from archlab.nn.loss import linear_cross_entropy, release_workspace
from archlab.train.losses import label_smoothed_cross_entropy, token_losses


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


def test_unit_upstream_gradient_is_handed_over_as_is_and_only_once():
    h, w, y = _case()
    ours = linear_cross_entropy(h, w, y)
    ours.backward(retain_graph=True)  # d loss = 1: the computed gradients become .grad without a copy
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())
    g_ref = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(h.grad, g_ref[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(w.grad, g_ref[1], atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="backward twice"):
        ours.backward()


def test_the_logits_buffer_is_kept_grown_and_released():
    release_workspace()
    h, w, y = _case()
    linear_cross_entropy(h, w, y, chunk_size=8)
    first = loss_module._WORKSPACE.buffers[h.dtype]
    assert first.numel() == 8 * 41 and set(loss_module._WORKSPACE.buffers) == {h.dtype}
    linear_cross_entropy(h, w, y, chunk_size=8)
    assert loss_module._WORKSPACE.buffers[h.dtype].data_ptr() == first.data_ptr()  # reused, not allocated again
    for chunk, dtype in ((1000, torch.float64), (1000, torch.float32)):  # grows; another dtype has its own
        hh, ww = h.detach().to(dtype), w.detach().to(dtype)
        ours = linear_cross_entropy(hh, ww, y, chunk_size=chunk)
        ref = F.cross_entropy((hh @ ww.T).flatten(0, 1), y.flatten())
        torch.testing.assert_close(ours, ref, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
        assert loss_module._WORKSPACE.buffers[dtype].numel() == 87 * 41
    # bf16 keeps an fp32 buffer for the softmax and a bf16 twin for the product and dz, both reused
    hb, wb = h.detach().bfloat16(), w.detach().bfloat16()
    linear_cross_entropy(hb, wb, y, chunk_size=1000)
    twin = loss_module._WORKSPACE.buffers[torch.bfloat16]
    linear_cross_entropy(hb, wb, y, chunk_size=1000)
    assert loss_module._WORKSPACE.buffers[torch.bfloat16].data_ptr() == twin.data_ptr() and twin.numel() == 87 * 41
    release_workspace()
    assert loss_module._WORKSPACE.buffers == {}


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
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())  # losses in the thousands: targets far below
    torch.testing.assert_close(loss, ref.detach(), atol=0, rtol=1e-12)


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
    with pytest.raises(ShapeError, match=r"targets holds class 41, outside \[0, V=41\) \(or ignore_index=-100\)"):
        linear_cross_entropy(h, w, y)
    with pytest.raises(ShapeError, match="targets must hold integer class ids, got dtype torch.float64"):
        linear_cross_entropy(h, w, y.clamp_max(40).double())
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


def _gpt_loss(labels):
    model = build_model("gpt-nano", vocab_size=41)
    model.hidden_states = None  # the check comes before the decoder runs: calling it would fail otherwise
    return model.loss(torch.zeros(labels.shape, dtype=torch.long), labels)


def _llama_loss(labels):
    model = build_model("llama-tiny", vocab_size=41)
    model.hidden_states = None
    return model.loss(torch.zeros(labels.shape, dtype=torch.long), labels)


LOSSES_OF_CLASS_IDS = {  # every loss archlab offers on integer targets, with the name of its argument
    "GPT.loss": (_gpt_loss, "labels"),
    "Llama.loss": (_llama_loss, "labels"),
    "linear_cross_entropy": (lambda y: linear_cross_entropy(torch.randn(*y.shape, 12), torch.randn(41, 12), y), "targets"),
    "label_smoothed_cross_entropy": (lambda y: label_smoothed_cross_entropy(torch.randn(*y.shape, 41), y), "target"),
    "token_losses": (lambda y: token_losses(torch.randn(*y.shape, 41), y), "target"),
}


@pytest.mark.parametrize("entry", sorted(LOSSES_OF_CLASS_IDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_every_loss_refuses_non_integer_targets_naming_the_argument_and_dtype(entry, dtype):
    """One shared check (``archlab.nn.inputs.check_class_ids``): never ``gather()``'s own message."""
    loss, name = LOSSES_OF_CLASS_IDS[entry]
    with pytest.raises(ShapeError, match=rf"^{name} must hold integer class ids, got dtype {dtype}$"):
        loss(torch.zeros(2, 5, dtype=dtype))


@pytest.mark.parametrize("entry", sorted(LOSSES_OF_CLASS_IDS))
@pytest.mark.parametrize("bad", [41, -3])
def test_every_loss_refuses_class_ids_outside_the_vocabulary(entry, bad):
    loss, name = LOSSES_OF_CLASS_IDS[entry]
    labels = torch.randint(0, 41, (2, 5))
    labels[0, 0] = -100  # ignored: allowed
    labels[1, 2] = bad
    with pytest.raises(ShapeError, match=rf"^{name} holds class {bad}, outside \[0, V=41\) \(or ignore_index=-100\)$"):
        loss(labels)
