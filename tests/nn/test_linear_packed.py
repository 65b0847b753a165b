"""archlab.nn.linear.packed_for_rows: products of 2 rows or more (decoding steps, prefills) on oneDNN-packed weights
equal F.linear, are used only inside the block and only where they apply, and batched generation through them equals
one prompt at a time."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archlab import kernels
from archlab.generation import generate, generate_batch
from archlab.hardware import kernel_capability
from archlab.models.llama import Llama, LlamaConfig
from archlab.nn import linear as linear_module
from archlab.nn.linear import MIN_SPLIT_ELEMENTS, Linear, PackedLinear, linear, packed_for_rows

pytestmark = pytest.mark.skipif(not linear_module.onednn_packing_available(), reason="this torch has no oneDNN")


class Calls(list):
    """oneDNN matmuls on packed copies, by their row count; ``plain``: those on a weight as it is."""

    plain: list[int]


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts oneDNN matmuls on packed weights, by their row count (and on weights as they are: ``.plain``)."""
    calls = Calls()
    calls.plain = []
    real = torch.ops.mkldnn._linear_pointwise

    def watched(x, w, *a):
        packed = any(w is entry[2] for entry in linear_module._ONEDNN_PACKED.values())
        (calls if packed else calls.plain).append(x.shape[0])
        return real(x, w, *a)

    class Ops:  # torch.ops.mkldnn with its matmul watched
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return watched
            return getattr(torch.ops.mkldnn.__class__, name, None) or getattr(real_mkldnn, name)

    real_mkldnn = torch.ops.mkldnn
    monkeypatch.setattr(torch.ops, "mkldnn", Ops())
    return calls


def layer(d_in=256, d_out=512, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return Linear(d_in, d_out, bias=bias)


# more rows than archlab's float32 kernel takes first (1-12 on AVX-512, 1-10 on AVX2: tests/test_kernels_f32.py); 300: a
# prompt's prefill
@pytest.mark.parametrize("shape", [(13, 256), (2, 7, 256), (300, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_equals_f_linear(shape, bias, onednn_calls):
    lin = layer(bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad(), packed_for_rows(lin, rows=shape[0]) as n_packed:
        out = lin(x)
    assert n_packed == 1 and onednn_calls == [x.numel() // 256]
    assert out.shape == (*shape[:-1], 512)
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


# past the rows archlab's float32 kernel takes (1-16 without a packed copy), and a K it does not take (K % 16 != 0)
@pytest.mark.parametrize("shape", [(17, 256), (3, 100, 256), (300, 256), (2, 250)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_products_without_a_copy_are_f_linears(shape, bias, onednn_calls):
    """Without a packed copy, an inference product that the float32 kernel does not take is F.linear's, to the bit
    past MAX_SPLIT_ROWS rows: no oneDNN matmul on the weight as it is (its sums err 1.4-2x more than MKL's sgemm,
    which put SmolLM2's logits at 4x HF's error on some prompts), and no weight is copied."""
    lin = layer(d_in=shape[-1], bias=bias)
    x = torch.randn(*shape)
    strided = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)  # x not contiguous
    with torch.no_grad():
        out, out_strided = lin(x), lin(strided)
    assert onednn_calls == [] and onednn_calls.plain == []
    assert id(lin.weight) not in linear_module._ONEDNN_PACKED and out.shape == (*shape[:-1], 512)
    if x.numel() // shape[-1] > linear_module.MAX_SPLIT_ROWS:
        assert torch.equal(out, F.linear(x, lin.weight, lin.bias))
        assert torch.equal(out_strided, F.linear(strided, lin.weight, lin.bias))
    else:  # split over the threads: the same dot products, summed by another kernel
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_strided, F.linear(strided, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_inference_products_err_no_more_than_f_linear():
    """A prefill-shaped float32 product (140 rows of SmolLM2's [576, 1536] down projection) errs against float64 as
    F.linear does: oneDNN's matmul on the weight as it is erred about 1.9x more in the mean (measured 3.8e-7 against
    2.0e-7), which this bound (1.2x) would catch."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(576, 1536, generator=g) / 1536**0.5
    x = torch.randn(140, 1536, generator=g)
    exact = x.double() @ weight.double().T
    with torch.no_grad():
        ours = (linear(x, weight).double() - exact).abs().mean()
    theirs = (F.linear(x, weight).double() - exact).abs().mean()
    assert ours <= 1.2 * theirs, (ours.item(), theirs.item())


def test_bf16_weights_pack_only_when_asked_and_serve_bf16_inputs(onednn_calls):
    """``bf16=True`` packs bfloat16 weights too (the sentence encoder asks on AMX CPUs); the copy serves bfloat16
    inputs only, its product F.linear's up to bf16 rounding. Where oneDNN refuses (kernels capped below AVX-512)
    nothing is packed and the products are F.linear's."""
    lin = layer().to(torch.bfloat16)
    x = torch.randn(300, 256).to(torch.bfloat16)
    with torch.no_grad(), packed_for_rows(lin, rows=300) as n_packed:
        assert n_packed == 0  # not asked
    with torch.no_grad(), packed_for_rows(lin, rows=300, bf16=True) as n_packed:
        out = lin(x)
        lin.float()(torch.randn(6, 256))  # the weight replaced by a float32 one: its copy no longer serves
    packs = kernel_capability() == "AVX512"
    assert n_packed == int(packs) and onednn_calls == ([300] if packs else [])
    want = F.linear(x.float(), lin.weight.bfloat16().float(), lin.bias.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_packed_copies_serve_only_where_they_apply(onednn_calls):
    lin = layer()
    with torch.no_grad(), packed_for_rows(lin, rows=8):
        lin(torch.randn(1, 256))  # one row: archlab's float32 kernel, the split path or F.linear
        lin(torch.randn(3, 256))  # 1-10 rows (1-12 on AVX-512): the float32 kernel first where it runs
        lin(torch.randn(300, 256))  # many rows (a prompt's prefill): packed too
        lin(torch.randn(13, 256, dtype=torch.float64).float().double().float())  # float32: packed
        linear(torch.randn(13, 256, dtype=torch.float64), lin.weight.double())  # another weight: not packed
    served = [300, 13] if kernels.f32_kernel() else [3, 300, 13]  # 3 rows: the kernel where it runs
    assert onednn_calls == served
    x = torch.randn(13, 256, requires_grad=True)
    with packed_for_rows(lin, rows=13):
        lin(x).sum().backward()  # gradients recorded: F.linear
    assert onednn_calls == served and x.grad is not None
    lin(torch.randn(13, 256))  # after the block: the copy is gone
    assert onednn_calls == served and id(lin.weight) not in linear_module._ONEDNN_PACKED
    with torch.no_grad(), packed_for_rows(lin, rows=13):
        lin.weight.mul_(2)  # changed in place: the stale copy is not used
        torch.testing.assert_close(lin(torch.randn(13, 256)).shape, torch.Size([13, 512]))
    assert onednn_calls == served


def test_only_float32_linear_layers_that_compute_through_linear_are_packed():
    small = Linear(8, 8)  # under MIN_SPLIT_ELEMENTS: stays in cache, not packed
    plain = nn.Linear(256, 512)  # torch's own forward (F.linear): a copy would go unused
    double = Linear(256, 512).double()
    big = Linear(256, 512)
    assert big.weight.numel() >= MIN_SPLIT_ELEMENTS
    with packed_for_rows(nn.Sequential(small, plain, double, big), rows=4) as n_packed:
        mine = {id(m.weight) for m in (small, plain, double, big)} & set(linear_module._ONEDNN_PACKED)
        assert n_packed == 1 and mine == {id(big.weight)}  # (other copies held: a loaded sentence encoder's)


def test_packed_lm_head_in_a_decoding_cache(onednn_calls):
    lin = layer(d_out=1024)
    head = PackedLinear(lin.weight, lin.bias)  # a decoding cache's head: few rows beyond the split path
    x = torch.randn(13, 256)
    with torch.no_grad(), packed_for_rows(lin, rows=13):
        out = head(x)
    assert onednn_calls == [13]
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [13, 16])
def test_a_decoding_caches_head_takes_the_onednn_copy_and_makes_its_blocks_only_when_read(rows, onednn_calls):
    """At 2 threads a few-row product (13-16 rows, a batch; up to 12 take archlab's float32 kernel where it runs, 10 on
    AVX2) on the head goes to the weight's oneDNN copy where there is one, as every other layer's, and the head's blocked copy is then never made; a one-row product
    takes archlab's float32 kernel on the weight itself where it runs (no copy either), and otherwise makes the
    blocked copy and runs on it, as one without the oneDNN copy does."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lin = layer(d_out=1024)
        head = PackedLinear(lin.weight, lin.bias)
        x = torch.randn(rows, 256)
        with torch.no_grad(), packed_for_rows(lin, rows=rows):
            out = head(x)
        assert onednn_calls == [rows] and not head._made  # no blocks made
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(head(x[:1]), F.linear(x[:1], lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert onednn_calls == [rows] and head._made == (kernels.f32_kernel() == 0)  # the kernel: no copy
        with torch.no_grad(), mock.patch.object(kernels, "f32_kernel", lambda: 0):  # without archlab's kernel
            torch.testing.assert_close(head(x[:1]), F.linear(x[:1], lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert onednn_calls == [rows] and head._made and head.blocks.shape == (2, 256, 512)  # no oneDNN copy: blocks
    finally:
        torch.set_num_threads(before)


def test_generate_batch_on_packed_weights_equals_one_prompt_at_a_time(onednn_calls):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, max_len=64, d_model=256, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=512,
                         dropout=0.0, attn_dropout=0.0)  # fmt: skip
    m = Llama(config).eval()
    with torch.no_grad():  # peaky next-token distributions: greedy rows far from near-ties
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (5, 1, 8, 3, 6, 2)]
    alone = [generate(m, torch.tensor([p]), max_new_tokens=10)[0, len(p) :].tolist() for p in prompts]
    assert sum(len(set(row)) for row in alone) > 20  # varied rows
    assert not onednn_calls
    assert generate_batch(m, prompts, max_new_tokens=10) == alone
    # where archlab's float32 kernel runs, every decoding step's six rows on it and the prefill's 6 x 8 on F.linear: no
    # copies; without it, copies for both
    assert set(onednn_calls) == (set() if kernels.f32_kernel() else {6 * 8, 6}) and onednn_calls.plain == []


def test_nested_blocks_pack_once_and_the_outer_block_keeps_the_copies(onednn_calls):
    """An inner block (one generation call) reuses an enclosing block's copies: it packs nothing and drops nothing."""
    lin = layer()
    with torch.no_grad(), packed_for_rows(lin, rows=4) as outer:
        copy = linear_module._ONEDNN_PACKED[id(lin.weight)][2]
        with packed_for_rows(lin, rows=4) as inner:
            out = lin(torch.randn(13, 256))
        assert (outer, inner) == (1, 0) and linear_module._ONEDNN_PACKED[id(lin.weight)][2] is copy
        lin(torch.randn(14, 256))  # after the inner block: still packed
    assert onednn_calls == [13, 14] and id(lin.weight) not in linear_module._ONEDNN_PACKED
    assert out.shape == (13, 512)



def test_copies_packed_over_threads_equal_copies_packed_one_by_one(monkeypatch):
    """packed_for_rows spreads the reorders over the torch threads (Python threads, one reorder each at a time):
    every copy holds the weight as a one-by-one reorder does, a product on it is bit-identical, and a weight
    shared by two layers is packed once."""
    import threading

    real = torch.ops.mkldnn._reorder_linear_weight
    ran_on = []

    class Ops:  # torch.ops.mkldnn with its reorder watched
        def __getattr__(self, name):
            if name == "_reorder_linear_weight":
                return lambda w, rows: ran_on.append(threading.current_thread().name) or real(w, rows)
            return getattr(real_mkldnn, name)

    real_mkldnn = torch.ops.mkldnn
    monkeypatch.setattr(torch.ops, "mkldnn", Ops())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layers = [Linear(256, 512), Linear(512, 256), Linear(256, 768, bias=False), Linear(256, 512)]
        layers[3].weight = layers[0].weight  # shared
        model = nn.Sequential(*layers)
        with torch.no_grad(), packed_for_rows(model, rows=6) as n_packed:
            copies = {i: linear_module._ONEDNN_PACKED[id(lin.weight)][2] for i, lin in enumerate(layers[:3])}
        assert n_packed == 3 and len(ran_on) == 3
        assert all(name.startswith("archlab-pack") for name in ran_on)  # not the caller's thread
        with torch.no_grad():
            for i, copy in copies.items():
                w = layers[i].weight
                alone = real(w, 6)
                assert torch.equal(copy.to_dense(), alone.to_dense()) and torch.equal(copy.to_dense(), w)
                x = torch.randn(6, w.shape[1])
                on = [real_mkldnn._linear_pointwise(x, c, None, "none", [], "") for c in (copy, alone)]
                assert torch.equal(on[0], on[1])
    finally:
        torch.set_num_threads(threads)


def test_weights_fingerprint_sees_a_fused_adamw_step_that_version_does_not():
    """PyTorch's fused AdamW updates weights in place without bumping ``_version`` (what retires a packed copy); the
    fingerprint (16 values of each Linear weight) changes, and stays equal while nothing changes."""
    from archlab.nn.linear import weights_fingerprint

    model = nn.Sequential(layer(), nn.ReLU(), layer(512, 256))
    first = weights_fingerprint(model)
    assert first.shape == (32,) and torch.equal(first, weights_fingerprint(model))
    model(torch.randn(3, 256)).sum().backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True).step()  # (on torch 2.13: _version unchanged)
    assert not torch.equal(first, weights_fingerprint(model))
