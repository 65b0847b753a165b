"""archlab's float32 kernels (archlab.kernels.f32_rows, archlab.kernels.one_query_attention) and where archlab uses
them: each against its equation in float64 with a derived float32 bound, both variants (AVX-512, AVX2) equal to the
bit, a row's result independent of the batch, the errors, linear() and PackedLinear taking the kernel only where it
applies (no gradient recorded), the static decoder's one-token attention, and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab import kernels
from archlab.errors import ShapeError
from archlab.hardware import kernel_capability
from archlab.models import build_model
from archlab.nn import linear as linear_module
from archlab.nn.linear import PackedLinear, linear
from archlab.static_decoding import StaticDecoder, static_mask
from tests.test_quant_kernel import built  # noqa: F401  (autouse: the library built, or the module skipped saying why)

U32 = 2.0**-24
VARIANTS = [256] + ([512] if kernel_capability() == "AVX512" else [])


def rows_case(m: int, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n, k", [(1, 16), (7, 48), (64, 384), (300, 1536), (1000, 576)])
def test_f32_rows_equal_the_float64_product_within_float32_rounding(isa, n, k):
    """K/16 blocks in two chains, 4 folds and the bias: each result is a sum of at most K/32 + 6 roundings deep, so
    |y - y64| <= (K/16 + 6) u (|x| |W|^T + |b|)."""
    for m in (1, 2, 3, 4):
        x, w, b = rows_case(m, n, k, seed=m)
        for bias in (b, None):
            y = torch.ops.archlab_kernels.f32_rows(x, w, bias, isa)
            ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
            scale = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert ((y.double() - ref).abs() <= (k / 16 + 6) * U32 * scale).all()


def test_f32_rows_variants_equal_to_the_bit_and_rows_independent_of_the_batch():
    x, w, b = rows_case(4, 257, 400, seed=3)
    ys = {isa: torch.ops.archlab_kernels.f32_rows(x, w, b, isa) for isa in VARIANTS}
    assert all(torch.equal(y, ys[256]) for y in ys.values())
    for m in range(4):
        assert torch.equal(torch.ops.archlab_kernels.f32_rows(x[m : m + 1], w, b, 256)[0], ys[256][m])


def test_f32_rows_errors_name_what_is_wrong():
    x, w, b = rows_case(1, 32, 64)
    with pytest.raises(ShapeError, match=r"with 1\.\.4 rows"):
        kernels.f32_rows(torch.randn(5, 64), w)
    with pytest.raises(ShapeError, match="float32"):
        kernels.f32_rows(x.double(), w)
    with pytest.raises(ShapeError, match="multiple of 16"):
        kernels.f32_rows(torch.randn(1, 40), torch.randn(32, 40))
    with pytest.raises(ShapeError, match="contiguous"):
        kernels.f32_rows(x, torch.randn(64, 32).T)
    with pytest.raises(ShapeError, match=r"bias must be float32 \[N\] = \[32\]"):
        kernels.f32_rows(x, w, torch.randn(31))
    assert torch.equal(kernels.f32_rows(x, w, b), torch.ops.archlab_kernels.f32_rows(x, w, b, kernels.f32_isa()))


def count_kernel_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    op = torch.ops.archlab_kernels.f32_rows

    class Counting:
        def __call__(self, *args):
            calls.append(args[0].numel() // args[0].shape[-1])  # rows
            return op(*args)

    monkeypatch.setattr(torch.ops.archlab_kernels, "f32_rows", Counting(), raising=False)
    return calls


def test_linear_takes_the_kernel_for_few_float32_rows_without_gradients(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    x, w, b = rows_case(3, 96, 64)
    y = linear(x[None], w, b)  # [1, 3, 64]: 3 rows
    assert calls == [3] and y.shape == (1, 3, 96)
    torch.testing.assert_close(y[0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    linear(torch.randn(5, 64), w, b)  # 5 rows: not the kernel
    linear(x.double(), w.double(), b.double())  # float64
    linear(torch.randn(1, 40), torch.randn(96, 40))  # K not a multiple of 16
    linear(x[:1], w.T.contiguous().T, b)  # W not contiguous
    wg = w.clone().requires_grad_()
    y = linear(x[:1], wg, b)  # gradients recorded: the autograd path
    y.sum().backward()
    torch.testing.assert_close(wg.grad, x[:1].expand(96, 64))
    assert calls == [3]
    with torch.no_grad():
        linear(x[:1], wg, b)
    assert calls == [3, 1]


def test_packed_linear_uses_the_kernel_and_makes_no_copy(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    _, w, b = rows_case(1, 4096, 64)
    head = PackedLinear(w, b)
    x = torch.randn(1, 1, 64)
    torch.testing.assert_close(head(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [1] and not head._made  # the [k, d_in, d_out / k] copy was not made


def attention_case(b: int, a: int, g: int, length: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, a, 1, d, generator=gen)
    return q, torch.randn(b, g, length, d, generator=gen) * 2, torch.randn(b, g, length, d, generator=gen)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("b, a, g, length, d", [(1, 6, 6, 40, 64), (2, 9, 3, 33, 64), (1, 4, 1, 17, 16), (3, 8, 2, 20, 48)])
def test_one_query_attention_equals_sdpa_in_float64_under_the_static_mask(isa, b, a, g, length, d):
    q, k, v = attention_case(b, a, g, length, d, seed=length)
    for position in (0, length // 2, length - 1):
        pos = torch.tensor([position])
        mask = static_mask(pos, length)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=a != g)
        out = torch.ops.archlab_kernels.one_query_attention(q, k, v, pos, d**-0.5, isa)
        assert out.shape == (b, a, 1, d)
        # a score is off by at most (D/16 + 7) u S (S: its sum of |products|); a weight then by twice the worst of
        # those plus n + 4 roundings (exp, the sum, the division); the mean of v adds n + 2: times max |v|, with 2x room
        n = position + 1
        heads = torch.arange(a) // (a // g)
        s = (q.double().abs() @ k.double().abs()[:, heads, :n].transpose(-1, -2)).amax() * d**-0.5
        bound = 2 * (2 * (d / 16 + 7) * U32 * s + (2 * n + 8) * U32) * v[:, :, :n].abs().max()
        assert (out.double() - ref).abs().max() <= bound
        stale_k, stale_v = k.clone(), v.clone()
        stale_k[:, :, n:] = float("nan")  # keys past the position are never read
        stale_v[:, :, n:] = float("nan")
        assert torch.equal(torch.ops.archlab_kernels.one_query_attention(q, stale_k, stale_v, pos, d**-0.5, isa), out)


def test_one_query_attention_variants_equal_to_the_bit():
    q, k, v = attention_case(2, 8, 2, 50, 80, seed=1)
    pos = torch.tensor([41])
    outs = [torch.ops.archlab_kernels.one_query_attention(q, k, v, pos, 80**-0.5, isa) for isa in VARIANTS]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_one_query_attention_errors():
    q, k, v = attention_case(1, 6, 4, 10, 16)
    with pytest.raises(ShapeError, match="A a multiple of G"):
        kernels.one_query_attention(q, k, v, torch.tensor([3]))
    q, k, v = attention_case(1, 4, 2, 10, 24)
    with pytest.raises(ShapeError, match="multiples of 16"):
        kernels.one_query_attention(q, k, v, torch.tensor([3]))
    assert not kernels.one_query_attention_serves(q, k, v)
    q, k, v = attention_case(1, 4, 2, 10, 32)
    with pytest.raises(RuntimeError, match="outside the cache's 10 positions"):
        kernels.one_query_attention(q, k, v, torch.tensor([10]))
    assert not kernels.one_query_attention_serves(q.double(), k.double(), v.double())
    assert kernels.one_query_attention_serves(q, k, v)


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-tiny"])
def test_static_decoder_one_token_attention_on_the_kernel_equals_sdpa(preset, monkeypatch):
    """The eager one-token step on the kernel against the same step on sdpa (the kernel switched off)."""
    model = build_model(preset, dropout=0.0, attn_dropout=0.0).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def step_logits():
        decoder = StaticDecoder(model, max_len=12, compile=False)
        cache = decoder.new_cache()
        with torch.inference_mode():
            decoder(tokens[:, :8], cache)
            return decoder(tokens[:, 8:], cache)

    calls: list[int] = []
    op = torch.ops.archlab_kernels.one_query_attention
    monkeypatch.setattr(torch.ops.archlab_kernels, "one_query_attention", lambda *a: calls.append(1) or op(*a),
                        raising=False)  # fmt: skip
    with_kernel = step_logits()
    assert len(calls) == model.config.n_layers
    monkeypatch.setattr(kernels, "one_query_attention_serves", lambda *a: False)
    torch.testing.assert_close(with_kernel, step_logits(), rtol=1e-5, atol=1e-5)


def test_compiled_products_and_attention_equal_eager():
    x, w, b = rows_case(1, 96, 64)
    q, k, v = attention_case(1, 4, 2, 10, 32)
    pos = torch.tensor([6])

    def both(x, w, b, q, k, v, pos):
        attention = torch.ops.archlab_kernels.one_query_attention(q, k, v, pos, 32**-0.5, kernels.f32_kernel())
        return linear(x, w, b), attention  # as archlab.static_decoding calls them

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        for got, want in zip(compiled(x, w, b, q, k, v, pos), both(x, w, b, q, k, v, pos)):
            assert torch.equal(got, want)
    assert linear_module.MAX_SPLIT_ROWS >= kernels.F32_MAX_ROWS
