"""archlab.nn.linear: the split and packed few-row products equal F.linear, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archlab.nn.linear import MAX_SPLIT_ROWS, MIN_SPLIT_ELEMENTS, Linear, PackedLinear, linear


@pytest.fixture
def threads():
    """Run with a given number of intra-op threads, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def weights(d_out=512, d_in=256, bias=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    return w, (torch.randn(d_out, generator=g, dtype=dtype) if bias else None)


@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("shape", [(256,), (1, 256), (1, 1, 256), (3, 256), (2, 2, 256), (MAX_SPLIT_ROWS + 1, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(threads, n_threads, shape, bias):
    threads(n_threads)
    w, b = weights(bias=bias)
    x = torch.randn(*shape, dtype=torch.float64)
    out = linear(x, w, b)
    assert out.shape == (*shape[:-1], 512)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_linear_takes_the_split_path_only_where_it_applies(threads, monkeypatch):
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(a[1].shape) or real_bmm(*a, **k))
    threads(2)
    w, b = weights()
    linear(torch.randn(1, 256, dtype=torch.float64), w, b)
    assert calls == [(2, 256, 256)]  # two blocks of 256 output features, one per thread
    calls.clear()
    linear(torch.randn(MAX_SPLIT_ROWS + 1, 256, dtype=torch.float64), w, b)  # many rows: one matmul
    linear(torch.randn(1, 256, dtype=torch.float64), w.T.contiguous().T, b)  # not contiguous: no view
    linear(torch.randn(1, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))  # tiny: cached
    linear(torch.randn(1, 256, dtype=torch.float64), torch.randn(511, 256, dtype=torch.float64))  # 511 % 2
    threads(1)
    linear(torch.randn(1, 256, dtype=torch.float64), w, b)
    assert calls == []


def test_linear_gradients_equal_f_linear(threads):
    threads(2)
    w, b = weights()
    x = torch.randn(2, 256, dtype=torch.float64)
    grads = []
    for fn in (linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        (fn(*leaves) ** 2).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_linear_module_is_nn_linear_with_the_same_state(threads):
    threads(2)
    torch.manual_seed(0)
    ours = Linear(256, 512).double()
    torch.manual_seed(0)
    ref = nn.Linear(256, 512).double()
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)  # same initialisation
    x = torch.randn(1, 256, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_linear_module_is_exactly_nn_linear_with_the_split_forward(threads, monkeypatch):
    """Its type is nn.Linear itself (tools that match types see it); its forward is the split product, also
    in a deep copy (rebound to the copy's own weights)."""
    import copy

    import archlab.nn.linear as module

    threads(2)
    layer = Linear(256, 512)
    assert type(layer) is nn.Linear
    calls = []
    monkeypatch.setattr(module, "_blocked_product", lambda *a: calls.append(a) or F.linear(a[0], layer.weight, a[2]))
    layer(torch.randn(1, 256))
    assert len(calls) == 1  # one row: the split path
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
    assert twin.forward.__self__ is twin and torch.equal(twin(torch.randn(5, 256)), twin.bias.expand(5, -1))


@pytest.mark.parametrize("preset", ["gpt-nano", "bert-mini", "llama-tiny"])
def test_torch_dynamic_quantization_quantizes_every_linear_layer(preset):
    """quantize_dynamic(model, {nn.Linear}, qint8) replaces every Linear layer (it matched none while archlab's
    layers were an nn.Linear subclass); the int8 model's outputs stay within 5% of the fp32 ones (int8 weights
    and activations: about 1% here), and a quantized GPT still decodes with its cache."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    from archlab.generation import generate
    from archlab.models import build_model

    torch.manual_seed(0)
    model = build_model(preset).eval()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())  # archlab's and torch's own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        int8 = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert n_linear > 0 and sum(isinstance(m, Int8Linear) for m in int8.modules()) == n_linear
    assert not any(isinstance(m, nn.Linear) for m in int8.modules())
    ids = torch.randint(5, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids), int8(ids)
    want, got = (want, got) if isinstance(want, torch.Tensor) else (want.hidden, got.hidden)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    if preset != "bert-mini":
        assert generate(int8, ids[:1, :4], max_new_tokens=6).shape == (1, 10)


@pytest.mark.parametrize("rows", [1, 3, MAX_SPLIT_ROWS + 2])
@pytest.mark.parametrize("layout", ["contiguous", "column-major"])
def test_packed_equals_f_linear(threads, rows, layout):
    threads(2)
    w, b = weights()
    if layout == "column-major":
        w = w.T.contiguous().T  # the same values, other strides
    packed = PackedLinear(w, b)
    assert packed.blocks.shape == (2, 256, 256) and packed.blocks.is_contiguous()
    x = torch.randn(rows, 256, dtype=torch.float64)
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_packed_follows_in_place_changes_and_keeps_gradients(threads):
    threads(2)
    w, b = weights()
    packed = PackedLinear(w, b)
    x = torch.randn(1, 256, dtype=torch.float64)
    with torch.no_grad():
        w.mul_(2.0)  # the snapshot is stale now: the call must use w itself
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-12, atol=1e-12)

    w2 = w.clone().requires_grad_()
    fresh = PackedLinear(w2)
    fresh(x).sum().backward()  # autograd recording: the product runs on w2, so w2 gets its gradient
    torch.testing.assert_close(w2.grad, x.expand(512, 256), rtol=0, atol=0)


def test_packed_is_not_built_where_it_cannot_be_used(threads):
    threads(1)
    w, b = weights()
    packed = PackedLinear(w, b)
    assert packed.blocks is None
    x = torch.randn(1, 256, dtype=torch.float64)
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=0, atol=0)
    threads(2)  # more threads than it was packed for: F.linear
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=0, atol=0)
    small = torch.randn(64, 48, dtype=torch.float64)  # under MIN_SPLIT_ELEMENTS: one kernel call is cheaper
    assert small.numel() < MIN_SPLIT_ELEMENTS and PackedLinear(small).blocks is None
