"""archlab's float32 kernels (archlab.kernels.f32_rows, cached_attention and its padded sibling, rms_norm) and
where archlab uses them: each against its equation in float64 with a derived float32 bound, both variants (AVX-512,
AVX2) equal to the bit, a row's (and a query's) result independent of the batch, keys outside a row's range never
read, the errors, linear() and PackedLinear taking the kernel only where it applies (no gradient recorded), the
static decoder's one-token attention, attend()'s few causal queries and left-padded steps, a verify pass equal to
one-token steps to the bit, RMSNorm's one-op kernel, the FLOP formulas, and torch.compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from archlab import kernels
from archlab.errors import ConfigError, ShapeError
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
    for m in (1, 2, 3, 4, 5, 9, 13, 16):  # 2-16: the AVX-512 tiles (2 x 6, 3 x 4 past K = 682); AVX2 5-16 groups of 4
        x, w, b = rows_case(m, n, k, seed=m)
        for bias in (b, None):
            y = torch.ops.archlab_kernels.f32_rows(x, w, bias, isa)
            ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
            scale = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert ((y.double() - ref).abs() <= (k / 16 + 6) * U32 * scale).all()


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6, 7, 9, 12, 16])
@pytest.mark.parametrize("n, k", [(257, 400), (3, 48), (1000, 576), (301, 1536), (100, 720)])
def test_f32_rows_variants_equal_to_the_bit_and_rows_independent_of_the_batch(m, n, k):
    """Every (m, n) is summed the same way whichever loop computes it: the one-row stream, an NB x R tile (3 x 5 summing
    chain 0 then chain 1, 2 x 6 both chains at once at 6 rows, 3 x 4 past K = 682; a thread's output rows not a
    multiple of NB leave the last to 1 x R tiles; an odd K / 16 a last block to chain 0), a group of rows, either
    variant."""
    x, w, b = rows_case(m, n, k, seed=3)
    ys = {isa: torch.ops.archlab_kernels.f32_rows(x, w, b, isa) for isa in VARIANTS}
    assert all(torch.equal(y, ys[256]) for y in ys.values())
    for isa in VARIANTS:
        alone = torch.cat([torch.ops.archlab_kernels.f32_rows(x[i : i + 1], w, b, isa) for i in range(m)])
        assert torch.equal(alone, ys[256])
        assert torch.equal(torch.ops.archlab_kernels.f32_rows(x.reshape(1, m, k), w, None, isa)[0],
                           torch.ops.archlab_kernels.f32_rows(x, w, None, isa))  # fmt: skip


def test_f32_rows_errors_name_what_is_wrong():
    x, w, b = rows_case(1, 32, 64)
    with pytest.raises(ShapeError, match=r"with 1\.\.16 rows, got torch.float32 \(17, 64\)"):
        kernels.f32_rows(torch.randn(17, 64), w)
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
    linear(torch.randn(17, 64), w, b)  # 17 rows: not the kernel
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


def test_linear_takes_the_kernel_up_to_kernel_first_rows_then_onednn_copies_where_they_exist(monkeypatch):
    """Up to KERNEL_FIRST_ROWS rows (12 on AVX-512, 10 on AVX2) the kernel even where packed_for_rows made a copy; past
    it the copy (and the kernel again, up to 16 rows, where there is none); kernel_takes_rows says which row counts
    need no copy."""
    from archlab.nn.linear import KERNEL_FIRST_ROWS, Linear, kernel_takes_rows, packed_for_rows

    calls = count_kernel_calls(monkeypatch)
    first = KERNEL_FIRST_ROWS[kernels.f32_kernel()]
    assert first == {512: 12, 256: 10}[kernels.f32_kernel()]
    layer = Linear(64, 4096)
    with torch.no_grad():
        for m in (9, 10, 16):
            linear(torch.randn(m, 64), layer.weight, layer.bias)
        assert calls == [9, 10, 16]
        with packed_for_rows(torch.nn.Sequential(layer), 10) as packed:
            assert packed == (1 if linear_module.onednn_packing_available() else 0)
            for m in (9, 10, 12, 13, 16, 17):
                x = torch.randn(m, 64)
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)
    inside = [m for m in (9, 10, 12, 13, 16) if m <= (first if packed else 16)]
    assert calls == [9, 10, 16] + inside
    assert kernel_takes_rows(first) and not kernel_takes_rows(first + 1) and not kernel_takes_rows(0)


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
def test_cached_attention_equals_sdpa_in_float64_under_the_static_mask(isa, b, a, g, length, d):
    q, k, v = attention_case(b, a, g, length, d, seed=length)
    for position in (0, length // 2, length - 1):
        pos = torch.tensor([position])
        mask = static_mask(pos, length)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=a != g)
        out = torch.ops.archlab_kernels.cached_attention(q, k, v, pos, d**-0.5, isa)
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
        assert torch.equal(torch.ops.archlab_kernels.cached_attention(q, stale_k, stale_v, pos, d**-0.5, isa), out)


@pytest.mark.parametrize("a, g, d", [(8, 2, 80), (9, 3, 64), (10, 2, 48), (6, 1, 16), (4, 2, 32), (4, 4, 64)])
@pytest.mark.parametrize("n", [1, 3])
def test_cached_attention_variants_and_shared_heads_equal_to_the_bit(a, g, d, n):
    """AVX-512 and AVX2 give one result; on AVX-512 the query heads of a group, computed together where D <= 64
    (2-4 at a time; groups of 5 and 6 in chunks; an odd number of 16-lane blocks), each equal the head computed
    alone, to the bit, for one query and for n causal ones; the padded op too, each row from its own start."""
    op, padded = torch.ops.archlab_kernels.cached_attention, torch.ops.archlab_kernels.cached_attention_padded
    _, k, v = attention_case(2, a, g, 50, d, seed=1)
    q = torch.randn(2, a, n, d, generator=torch.Generator().manual_seed(2))
    pos, starts, per = torch.tensor([41]), torch.tensor([5, 0]), a // g
    outs = [op(q, k, v, pos, d**-0.5, isa) for isa in VARIANTS]
    assert all(torch.equal(o, outs[0]) for o in outs)
    shifted = [padded(q, k, v, starts, pos, d**-0.5, isa) for isa in VARIANTS]
    assert all(torch.equal(o, shifted[0]) for o in shifted)
    for isa in VARIANTS:
        def kv(h):
            return k[:, h // per : h // per + 1], v[:, h // per : h // per + 1]

        alone = torch.cat([op(q[:, h : h + 1], *kv(h), pos, d**-0.5, isa) for h in range(a)], dim=1)
        assert torch.equal(alone, outs[0])
        alone = torch.cat([padded(q[:, h : h + 1], *kv(h), starts, pos, d**-0.5, isa) for h in range(a)], dim=1)
        assert torch.equal(alone, shifted[0])


def test_cached_attention_errors():
    q, k, v = attention_case(1, 6, 4, 10, 16)
    with pytest.raises(ShapeError, match="A a multiple of G"):
        kernels.cached_attention(q, k, v, torch.tensor([3]))
    q, k, v = attention_case(1, 4, 2, 10, 24)
    with pytest.raises(ShapeError, match="multiples of 16"):
        kernels.cached_attention(q, k, v, torch.tensor([3]))
    assert not kernels.cached_attention_serves(q, k, v)
    q, k, v = attention_case(1, 4, 2, 10, 32)
    with pytest.raises(ShapeError, match=r"positions\[0\]=10 is outside the cache's 10 positions"):
        kernels.cached_attention(q, k, v, torch.tensor([10]))
    with pytest.raises(ShapeError, match=r"positions\[0\]=2 leaves no key for the first of the 4 queries"):
        kernels.cached_attention(q.expand(1, 4, 4, 32), k, v, torch.tensor([2]))
    with pytest.raises(ShapeError, match="q, k, v must be tensors, got list, Tensor, Tensor"):
        kernels.cached_attention([0.0] * 32, k, v, torch.tensor([5]))
    with pytest.raises(ShapeError, match=r"positions must be an int64 tensor \[1\] on the CPU, got int 5"):
        kernels.cached_attention(q, k, v, 5)
    with pytest.raises(ShapeError, match=r"starts must be int64 \[B\] = \[1\] on the CPU .*, got \[0\]"):
        kernels.cached_attention_padded(q, k, v, [0], torch.tensor([5]))
    op = torch.ops.archlab_kernels.cached_attention  # the op's own checks, past the wrapper's
    with pytest.raises(RuntimeError, match="outside the cache's 10 positions"):
        op(q, k, v, torch.tensor([10]), 0.2, VARIANTS[0])
    with pytest.raises(RuntimeError, match="leaves no key for the first of the 4 queries"):
        op(q.expand(1, 4, 4, 32), k, v, torch.tensor([2]), 0.2, VARIANTS[0])
    assert not kernels.cached_attention_serves(q.double(), k.double(), v.double())
    assert kernels.cached_attention_serves(q, k, v)


def padded_reference(q, k, v, starts, position):
    """The float64 equation: row b's query heads over its keys starts[b]..position (sdpa under that mask)."""
    j = torch.arange(k.shape[2])
    mask = ((j >= starts[:, None]) & (j <= position))[:, None, None, :]  # [B, 1, 1, L]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip


def padded_bound(q, k, v, starts, position):
    """The static op's bound (above) for each row, over its n_b = position + 1 - starts[b] keys: [B, 1, 1, 1]."""
    b, a, _, d = q.shape
    heads = torch.arange(a) // (a // k.shape[1])
    bounds = []
    for row in range(b):
        r = int(starts[row])
        n = position + 1 - r
        s = (q[row].double().abs() @ k[row].double().abs()[heads, r : position + 1].transpose(-1, -2)).amax() * d**-0.5
        vmax = v[row, :, r : position + 1].abs().max()
        bounds.append(2 * (2 * (d / 16 + 7) * U32 * s + (2 * n + 8) * U32) * vmax)
    return torch.stack(bounds).reshape(b, 1, 1, 1)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("b, a, g, length, d, dv", [(3, 6, 6, 40, 64, 64), (4, 9, 3, 33, 64, 64), (2, 4, 1, 17, 16, 16),
                                                    (3, 8, 2, 20, 48, 80)])  # fmt: skip
def test_cached_attention_padded_equals_the_float64_equation_reading_only_its_keys(isa, b, a, g, length, d, dv):
    """Row b reads its keys starts[b]..p only: NaN keys and values outside that range (the padding before, the
    positions not written after) leave the result unchanged to the bit; a strided view of a larger cache (a KVCache's
    keys) gives the same result as a contiguous copy."""
    gen = torch.Generator().manual_seed(length + b)
    q = torch.randn(b, a, 1, d, generator=gen)
    storage_k = torch.randn(b, g, length + 7, d, generator=gen) * 2
    storage_v = torch.randn(b, g, length + 7, dv, generator=gen)
    k, v = storage_k[:, :, :length], storage_v[:, :, :length]  # views: row and head strides of the storage
    for position in (length - 1, length // 2):
        starts = torch.tensor([0, position, position // 3, position // 2][:b])  # a first row unpadded, one key alone
        pos = torch.tensor([position])
        out = torch.ops.archlab_kernels.cached_attention_padded(q, k, v, starts, pos, d**-0.5, isa)
        assert out.shape == (b, a, 1, dv) and out.is_contiguous()
        ref = padded_reference(q, k, v, starts, position)
        assert ((out.double() - ref).abs() <= padded_bound(q, k, v, starts, position)).all()
        outside = (torch.arange(length) < starts[:, None]) | (torch.arange(length) > position)  # [B, L]
        nan_k = k.masked_fill(outside[:, None, :, None], float("nan"))
        nan_v = v.masked_fill(outside[:, None, :, None], float("nan"))
        assert torch.equal(torch.ops.archlab_kernels.cached_attention_padded(q, nan_k, nan_v, starts, pos,
                                                                                d**-0.5, isa), out)  # fmt: skip
        assert torch.equal(torch.ops.archlab_kernels.cached_attention_padded(q, k.contiguous(), v.contiguous(),
                                                                                starts, pos, d**-0.5, isa), out)


def test_cached_attention_padded_variants_rows_and_the_static_op_agree_to_the_bit():
    """AVX-512 and AVX2 give one result; a row's result is the one it gets alone (no dependence on the batch); with
    every start 0 the padded op is the static op."""
    q, k, v = attention_case(5, 8, 2, 50, 80, seed=2)
    starts, pos = torch.tensor([0, 7, 41, 13, 30]), torch.tensor([41])
    outs = [torch.ops.archlab_kernels.cached_attention_padded(q, k, v, starts, pos, 80**-0.5, isa)
            for isa in VARIANTS]  # fmt: skip
    assert all(torch.equal(o, outs[0]) for o in outs)
    alone = [kernels.cached_attention_padded(q[i : i + 1], k[i : i + 1], v[i : i + 1], starts[i : i + 1], pos)
             for i in range(5)]  # fmt: skip
    assert torch.equal(torch.cat(alone), outs[0])
    zeros = torch.zeros(5, dtype=torch.long)
    for isa in VARIANTS:
        assert torch.equal(torch.ops.archlab_kernels.cached_attention_padded(q, k, v, zeros, pos, 80**-0.5, isa),
                           torch.ops.archlab_kernels.cached_attention(q, k, v, pos, 80**-0.5, isa))  # fmt: skip


def test_cached_attention_padded_errors():
    q, k, v = attention_case(2, 4, 2, 10, 32)
    pos, starts = torch.tensor([9]), torch.tensor([0, 3])
    with pytest.raises(ShapeError, match=r"starts must be int64 \[B\] = \[2\].*torch.int32 \(2,\)"):
        kernels.cached_attention_padded(q, k, v, starts.int(), pos)
    with pytest.raises(ShapeError, match=r"starts must be int64 \[B\] = \[2\].*\(3,\)"):
        kernels.cached_attention_padded(q, k, v, torch.tensor([0, 1, 2]), pos)
    with pytest.raises(ShapeError, match=r"starts\[1\]=8 is outside 0..6"):
        kernels.cached_attention_padded(q, k, v, torch.tensor([0, 8]), torch.tensor([6]))
    with pytest.raises(ShapeError, match=r"starts\[0\]=-1 is outside 0..9"):
        kernels.cached_attention_padded(q, k, v, torch.tensor([-1, 0]), pos)
    with pytest.raises(ShapeError, match=r"positions\[0\]=10 is outside the cache's 10 positions"):
        kernels.cached_attention_padded(q, k, v, starts, torch.tensor([10]))
    with pytest.raises(ShapeError, match=r"positions must be int64 \[1\]"):
        kernels.cached_attention_padded(q, k, v, starts, torch.tensor([9, 9]))
    with pytest.raises(ShapeError, match="multiples of 16"):
        kernels.cached_attention_padded(*attention_case(2, 4, 2, 10, 24), starts, pos)
    op = torch.ops.archlab_kernels.cached_attention_padded  # the op's own checks, past the wrapper's
    with pytest.raises(RuntimeError, match=r"starts\[1\] = 10 is outside 0..9"):
        op(q, k, v, torch.tensor([0, 10]), pos, 0.2, VARIANTS[0])
    with pytest.raises(RuntimeError, match="one start per row"):
        op(q, k, v, torch.tensor([0]), pos, 0.2, VARIANTS[0])
    with pytest.raises(RuntimeError, match="isa"):
        op(q, k, v, starts, pos, 0.2, 7)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n", [2, 5, 9, 16])
def test_n_causal_queries_equal_float64_and_each_query_alone_to_the_bit(isa, n):
    """N queries at positions p - N + 1 .. p (a speculative verify pass): each reads the keys up to its own position
    (the float64 equation under the causal mask, within the one-query bound), and each equals, to the bit, the
    one-query call at its position (a one-token step). The padded op likewise, each row from its own start."""
    b, a, g, length, d, p = 2, 9, 3, 40, 64, 30
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(b, a, n, d, generator=gen)
    k, v = torch.randn(b, g, length, d, generator=gen) * 2, torch.randn(b, g, length, d, generator=gen)
    positions, j = torch.arange(p - n + 1, p + 1), torch.arange(length)
    for starts in (torch.zeros(b, dtype=torch.long), torch.tensor([3, p - n + 1])):  # the last: its first query's key
        padded = any(starts.tolist())
        out = (torch.ops.archlab_kernels.cached_attention_padded(q, k, v, starts, torch.tensor([p]), d**-0.5, isa)
               if padded else torch.ops.archlab_kernels.cached_attention(q, k, v, torch.tensor([p]), d**-0.5, isa))
        assert out.shape == (b, a, n, d)
        mask = (j >= starts[:, None, None]) & (j <= positions[:, None])  # [B, N, L]
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[:, None],
                                             enable_gqa=True)  # fmt: skip
        assert ((out.double() - ref).abs() <= padded_bound(q, k, v, starts, p)).all()
        for i in range(n):
            at = torch.tensor([p - n + 1 + i])
            alone = (torch.ops.archlab_kernels.cached_attention_padded(q[:, :, i : i + 1], k, v, starts, at, d**-0.5,
                                                                       isa)
                     if padded else torch.ops.archlab_kernels.cached_attention(q[:, :, i : i + 1], k, v, at, d**-0.5,
                                                                               isa))  # fmt: skip
            assert torch.equal(out[:, :, i : i + 1], alone), i


def test_attend_takes_the_cached_kernel_for_a_few_causal_queries(monkeypatch):
    """attend() of 1-16 causal queries over a KV cache's keys (a one-token step, a verify pass), unmasked, runs on the
    kernel, close to sdpa's result; one query reads every key, causal or not. sdpa keeps 17 queries, two queries
    not causal, float64, a gradient recorded, a bias, dropout, the math backend."""
    from archlab.nn.attention import attend

    calls: list[int] = []
    op = torch.ops.archlab_kernels.cached_attention
    monkeypatch.setattr(torch.ops.archlab_kernels, "cached_attention", lambda *a: calls.append(a[0].shape[2]) or op(*a),
                        raising=False)  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    k, v = torch.randn(2, 2, 20, 32, generator=gen), torch.randn(2, 2, 20, 32, generator=gen)
    with torch.inference_mode():
        for n, causal in ((1, True), (9, True), (16, True), (1, False)):
            q = torch.randn(2, 4, n, 32, generator=gen)
            out = attend(q, k, v, causal=causal)
            with monkeypatch.context() as off:
                off.setattr(kernels, "cached_attention_serves", lambda *a: False)
                torch.testing.assert_close(out, attend(q, k, v, causal=causal), rtol=1e-5, atol=1e-6)
        assert calls == [1, 9, 16, 1]
        calls.clear()
        q = torch.randn(2, 4, 2, 32, generator=gen)
        attend(torch.randn(2, 4, 17, 32, generator=gen), k, v, causal=True)
        attend(q, k, v)
        attend(q.double(), k.double(), v.double(), causal=True)
        attend(q, k, v, causal=True, bias=torch.zeros(20))
        attend(q, k, v, causal=True, dropout_p=0.5)
        attend(q, k, v, causal=True, backend="math")
    with torch.enable_grad():
        attend(q.clone().requires_grad_(), k.clone(), v.clone(), causal=True)
    assert calls == []


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("n", [9, 12, 16])
def test_a_verify_pass_gives_each_position_the_one_token_steps_logits_to_the_bit(family, n):
    """A pass of n tokens over a KV cache (a speculative verify pass: the float32 products of up to 16 rows and the
    attention on archlab's kernels, every other op row by row) gives each position the logits that one-token steps
    give it, to the bit: why speculative greedy decoding returns plain greedy's tokens, near-ties included."""
    model = kernel_width_model(family)
    g = torch.Generator().manual_seed(8)
    prompt, more = torch.randint(1, 48, (1, 12), generator=g), torch.randint(1, 48, (1, n), generator=g)
    with torch.inference_mode():
        cache = model.new_cache()
        model(prompt, cache=cache)
        verify = model(more, cache=cache)  # [1, n, V]
        cache.crop(12)
        steps = torch.cat([model(more[:, i : i + 1], cache=cache) for i in range(n)], dim=1)
    assert torch.equal(verify, steps)


def count_padded_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The starts of each call of the padded op (through attend)."""
    calls: list[tuple[int, ...]] = []
    op = torch.ops.archlab_kernels.cached_attention_padded
    monkeypatch.setattr(torch.ops.archlab_kernels, "cached_attention_padded",
                        lambda *a: calls.append(tuple(a[3].tolist())) or op(*a), raising=False)  # fmt: skip
    return calls


def test_attend_takes_the_padded_kernel_for_left_padded_steps_only(monkeypatch):
    """attend() of one query a row under a left-padding key mask [B, 1, 1, M] (generate_batch's decoding step) runs
    on the padded kernel, each row from its first real key, close to sdpa's result (float rounding); any other
    call keeps sdpa: a mask with a hole, a row with no key, two queries, float64, a gradient recorded, a bias,
    dropout, a mask broadcast over the batch, the math backend."""
    from archlab.nn.attention import attend, padding_mask

    calls = count_padded_calls(monkeypatch)
    q, k, v = attention_case(3, 6, 2, 12, 32, seed=4)
    real = torch.ones(3, 12, dtype=torch.long)
    real[0, :5], real[2, :11] = 0, 0  # left padding: row 0 from key 5, row 1 from 0, row 2 key 11 alone
    mask = padding_mask(real)
    with torch.inference_mode():
        out = attend(q, k, v, mask=mask, causal=True)
        assert calls == [(5, 0, 11)]
        monkeypatch.setattr(kernels, "cached_attention_serves", lambda *a: False)
        torch.testing.assert_close(out, attend(q, k, v, mask=mask, causal=True), rtol=1e-5, atol=1e-6)
        monkeypatch.undo()
        calls = count_padded_calls(monkeypatch)
        hole = real.clone()
        hole[1, 3] = 0
        empty = real.clone()
        empty[2] = 0
        attend(q, k, v, mask=padding_mask(hole))
        attend(q, k, v, mask=padding_mask(empty))
        q2 = torch.cat([q, q], dim=2)
        attend(q2, k, v, mask=mask, causal=True)
        attend(q.double(), k.double(), v.double(), mask=mask)
        attend(q, k, v, mask=mask, bias=torch.zeros(12))
        attend(q, k, v, mask=mask, dropout_p=0.5)
        attend(q, k, v, mask=mask[:1])
        attend(q, k, v, mask=mask, backend="math")
    with torch.enable_grad():
        attend(q.requires_grad_(), k, v, mask=mask)
    assert calls == []


def kernel_width_model(family: str):
    """A float32 GPT or Llama whose heads the kernel takes (d_k = 16; Llama's 2 key heads for 4 query heads), weights
    N(0, 0.3) so that rows differ and greedy decoding does not repeat one token."""
    from archlab.models.gpt import GPT, GPTConfig
    from archlab.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    if family == "gpt":
        model = GPT(GPTConfig(vocab_size=48, max_len=64, d_model=64, n_heads=4, n_layers=2))
    else:
        model = Llama(LlamaConfig(vocab_size=48, max_len=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=96))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_generate_batch_and_row_batch_steps_take_the_padded_kernel(family, monkeypatch):
    """generate_batch's steps (all rows at once, and 3 rows refilled from waiting prompts: padded, joined, compacted
    caches) run their attention on the padded kernel, each row from its own first key, and every row's tokens are
    those generate() gives its prompt alone (sdpa, no mask), with prompt-lookup drafts verified in the batch too, and
    those of the batch on sdpa (the kernel switched off).
    RowBatch's one-token steps over rows of different lengths take it too (its prefills, each row alone, are
    unmasked), their logits close to sdpa's."""
    from archlab.generation import RowBatch, generate, generate_batch

    model = kernel_width_model(family)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 48, (n,), generator=g).tolist() for n in (5, 2, 7, 4, 6, 3)]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=10)[0, len(p) :].tolist() for p in prompts]
    calls = count_padded_calls(monkeypatch)
    assert generate_batch(model, prompts, max_new_tokens=10) == alone
    assert len(calls) == 2 * 9 and calls[0] == (2, 5, 0, 3, 1, 4)  # 9 one-token steps x 2 layers; row starts
    calls.clear()
    assert generate_batch(model, prompts, max_new_tokens=10, batch_size=3) == alone
    assert calls and any(max(starts) > 0 for starts in calls)
    calls.clear()  # each row verifying its own prompt-lookup drafts: the same tokens, on the kernel
    assert generate_batch(model, prompts, max_new_tokens=10, batch_size=3, draft="lookup") == alone
    assert calls and any(max(starts) > 0 for starts in calls)
    with monkeypatch.context() as off:
        off.setattr(kernels, "cached_attention_serves", lambda *a: False)
        assert generate_batch(model, prompts, max_new_tokens=10, batch_size=3) == alone

    def row_steps() -> list[torch.Tensor]:
        rows = RowBatch(model)
        for key, prompt in enumerate(prompts[:3]):
            rows.prefill(key, prompt)
            rows.join(key)
        return [torch.stack(list(rows.step({k: [alone[k][i]] for k in range(3)}).values())) for i in range(3)]

    calls.clear()
    with_kernel = row_steps()
    # each row's prefill alone is unmasked (generate's prefill), then the 3 steps of the 3 rows (2 layers each)
    assert [len(starts) for starts in calls] == [3] * 2 * 3
    monkeypatch.setattr(kernels, "cached_attention_serves", lambda *a: False)
    torch.testing.assert_close(with_kernel, row_steps(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_row_batch_rows_get_the_logits_they_get_alone_to_the_bit(family):
    """RowBatch prefills each row alone, as generate does, then decodes the rows together on row-independent kernels
    (float32 products of up to KERNEL_FIRST_ROWS rows, the padded attention from each row's first key, RoPE at each
    row's own positions): every logit a row gets, at every step, is the one it gets decoded alone, to the bit, so
    greedy rows equal one-at-a-time generation near-ties included. Rows join a batch of another length (either side
    padded in front), wait, and leave (the positions no row reads dropped), and verify drafts in ragged passes, each
    keeping its own number (the rows that keep fewer moved on)."""
    from archlab.generation import RowBatch, generate

    model = kernel_width_model(family)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 48, (n,), generator=g).tolist() for n in (5, 2, 7, 4, 6, 3)]
    heads: list[torch.Tensor] = []  # every LM-head call's last-position logits, [rows, V]
    hook = model.lm_head.register_forward_hook(lambda module, args, out: heads.append(out[:, -1]))
    alone, tokens = [], []
    try:
        with torch.inference_mode():
            for p in prompts:
                heads.clear()
                tokens.append(generate(model, torch.tensor([p]), max_new_tokens=10)[0, len(p) :].tolist())
                alone.append(torch.cat(heads))  # [10, V]: the prefill's, then each step's
    finally:
        hook.remove()
    assert all(t.shape == (10, 48) for t in alone)

    batch, got = RowBatch(model), {r: [] for r in range(6)}

    def start(r: int, join: bool = True) -> None:
        got[r].append(batch.prefill(r, prompts[r]))
        if join:
            batch.join(r)

    def step() -> None:
        fed = {r: [tokens[r][len(got[r]) - 1]] for r in batch.joined}  # the greedy token its last logits chose
        for r, logits in batch.step(fed).items():
            got[r].append(logits[-1])

    start(1)  # 2 tokens
    step()
    start(4)  # 6 tokens, longer than the batch's 3 positions: the batch is padded in front
    step()
    start(5)  # 3 tokens, shorter: the row is padded in front
    start(3, join=False)  # waits
    step()
    held = batch.length
    batch.remove([4])  # leaves; the others were padded before its first token: those positions are dropped
    assert batch.length < held
    batch.join(3)
    start(0)
    step(), step()

    def verify(drafts: dict[int, list[bool]]) -> None:
        """A speculative round: row r fed its token and a draft for each flag (True: the greedy token alone chose
        next, accepted; False: another, rejected), the rows ragged; each keeps its own number (rewind per row)."""
        fed, kept = {}, {}
        for r in batch.joined:
            i, right = len(got[r]) - 1, drafts.get(r, [])
            fed[r] = [tokens[r][i]] + [tokens[r][i + 1 + j] if ok else (tokens[r][i + 1 + j] + 1) % 48
                                       for j, ok in enumerate(right)]  # fmt: skip
            kept[r] = next((j for j, ok in enumerate(right) if not ok), len(right))
        out = batch.step(fed)
        batch.rewind({r: len(fed[r]) - 1 - kept[r] for r in fed})
        for r, logits in out.items():
            got[r].extend(logits[: 1 + kept[r]])

    verify({5: [True], 3: [False], 0: [True]})  # 8 rows: rows 1 and 0 move on by 1, row 3 by 2
    verify({1: [True], 3: [True]})
    step()
    for r, logits in got.items():
        assert not logits or torch.equal(torch.stack(logits), alone[r][: len(logits)]), f"row {r}"
    assert {r: len(v) for r, v in got.items()} == {0: 7, 1: 10, 2: 0, 3: 7, 4: 3, 5: 8}


def test_padded_flop_formula_counts_the_keys_read():
    """torch's FLOP counter (archlab.analysis counts with it): 2 A (D + Dv) sum_b n_b, n_b = p + 1 - starts[b]."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = attention_case(3, 6, 2, 12, 32)
    starts, pos = torch.tensor([5, 0, 11]), torch.tensor([11])
    with FlopCounterMode(display=False) as counter:
        kernels.cached_attention_padded(q, k, v, starts, pos)
    assert counter.get_total_flops() == 2 * 6 * (32 + 32) * (7 + 12 + 1)


def test_flop_counter_counts_the_kernels_in_a_fresh_process():
    """torch's FlopCounterMode copies the table of FLOP formulas when it is made, and the library registers its ops'
    formulas when it loads: in a fresh process whose first kernel use comes inside the counter, kernels.flop_counter()
    (the labs' counter) still counts the kernel's product, 2 M N K."""
    code = ("import torch; from archlab import kernels; from archlab.nn.linear import linear\n"
            "x, w = torch.randn(3, 64), torch.randn(32, 64)\n"
            "with torch.no_grad(), kernels.flop_counter(display=False) as counter:\n"
            "    linear(x, w)\n"
            "print(counter.get_total_flops())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split()[-1] == str(2 * 3 * 32 * 64)


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-tiny"])
def test_static_decoder_one_token_attention_on_the_kernel_equals_sdpa(preset, monkeypatch):
    """The eager 8-token prefill and one-token step on the kernel (up to CACHED_MAX_QUERIES queries of a static cache
    take it: each layer twice) against the same on sdpa (the kernel switched off)."""
    model = build_model(preset, dropout=0.0, attn_dropout=0.0).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def step_logits():
        decoder = StaticDecoder(model, max_len=12, compile=False)
        cache = decoder.new_cache()
        with torch.inference_mode():
            decoder(tokens[:, :8], cache)
            return decoder(tokens[:, 8:], cache)

    calls: list[int] = []
    op = torch.ops.archlab_kernels.cached_attention
    monkeypatch.setattr(torch.ops.archlab_kernels, "cached_attention", lambda *a: calls.append(1) or op(*a),
                        raising=False)  # fmt: skip
    with_kernel = step_logits()
    assert len(calls) == 2 * model.config.n_layers
    monkeypatch.setattr(kernels, "cached_attention_serves", lambda *a: False)
    torch.testing.assert_close(with_kernel, step_logits(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("rows, d", [(1, 16), (9, 48), (3, 576), (144, 576), (2, 1536)])
def test_rms_norm_equals_the_float64_equation_and_is_one_result_for_any_rows(isa, rows, d):
    """The sum of squares (positive terms, d/32 + 6 roundings deep), the mean, eps, the root and its inverse, then two
    products: each output within (d/16 + 12) u of the float64 equation's, relatively. Both variants give one result
    to the bit, a row's result is the one it gets alone, and the rows may span at::parallel_for's chunks (144 x 576)."""
    gen = torch.Generator().manual_seed(rows + d)
    x = torch.randn(rows, d, generator=gen) * torch.logspace(-3, 3, rows)[:, None]  # rows of very different sizes
    g = torch.randn(d, generator=gen)
    y = torch.ops.archlab_kernels.rms_norm(x, g, 1e-6, isa)
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * g.double()
    assert y.shape == x.shape and ((y.double() - ref).abs() <= (d / 16 + 12) * U32 * ref.abs()).all()
    assert torch.equal(y, torch.ops.archlab_kernels.rms_norm(x, g, 1e-6, VARIANTS[0]))
    alone = torch.cat([torch.ops.archlab_kernels.rms_norm(x[i : i + 1], g, 1e-6, isa) for i in range(rows)])
    assert torch.equal(alone, y)
    assert torch.equal(torch.ops.archlab_kernels.rms_norm(x.reshape(1, rows, d).transpose(0, 1), g, 1e-6, isa)[:, 0], y)


def test_rms_norm_errors_and_where_rmsnorm_takes_it(monkeypatch):
    """The wrapper's ShapeError names what it takes; RMSNorm runs the kernel in float32 inference only (not with a
    gradient recorded, not in float64, not at a width the kernel does not take), close to F.rms_norm."""
    from archlab.nn.norm import RMSNorm

    with pytest.raises(ShapeError, match=r"d a positive multiple of 16; got x torch.float32 \(2, 24\)"):
        kernels.rms_norm(torch.randn(2, 24), torch.randn(24), 1e-6)
    with pytest.raises(ShapeError, match=r"weight torch.float32 \(32,\)"):
        kernels.rms_norm(torch.randn(2, 48), torch.randn(32), 1e-6)
    with pytest.raises(ShapeError, match="x and weight must be tensors, got list and Tensor"):
        kernels.rms_norm([1.0] * 16, torch.randn(16), 1e-6)
    for eps in (-1e-6, float("nan"), float("inf"), "1e-6", True):
        with pytest.raises(ConfigError, match=r"eps=.*must be a finite number >= 0"):
            kernels.rms_norm(torch.randn(2, 16), torch.randn(16), eps)
    with pytest.raises(RuntimeError, match="positive multiple of 16"):
        torch.ops.archlab_kernels.rms_norm(torch.randn(2, 24), torch.randn(24), 1e-6, VARIANTS[0])
    calls: list[int] = []
    op = torch.ops.archlab_kernels.rms_norm
    monkeypatch.setattr(torch.ops.archlab_kernels, "rms_norm", lambda *a: calls.append(1) or op(*a), raising=False)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        out = norm(x)
        assert calls == [1]
        torch.testing.assert_close(out, F.rms_norm(x, (64,), norm.weight, norm.eps), rtol=1e-6, atol=1e-6)
        norm.double()(x.double())
        RMSNorm(24)(torch.randn(2, 24))
    norm.float()(x)  # a gradient recorded (the weight's)
    assert calls == [1]


def test_compiled_products_and_attention_equal_eager(monkeypatch):
    """One row and 12 (a compiled batch's step: the kernel takes up to 16 rows in a graph) through linear(), and the
    attention ops, traced as static_decoding traces them: the eager results to the bit, the products the kernel's."""
    x, w, b = rows_case(1, 96, 64)
    x12 = rows_case(12, 96, 64, seed=1)[0]
    q, k, v = attention_case(2, 4, 2, 10, 32)
    pos, starts = torch.tensor([6]), torch.tensor([2, 0])

    def both(x, x12, w, b, q, k, v, pos, starts):
        attention = torch.ops.archlab_kernels.cached_attention(q, k, v, pos, 32**-0.5, kernels.f32_kernel())
        padded = torch.ops.archlab_kernels.cached_attention_padded(q, k, v, starts, pos, 32**-0.5,
                                                                      kernels.f32_kernel())  # fmt: skip
        # as archlab.static_decoding calls them (and the padded op)
        return linear(x, w, b), linear(x12, w, b), attention, padded

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    args = (x, x12, w, b, q, k, v, pos, starts)
    with torch.inference_mode():
        traced = compiled(*args)
        calls = count_kernel_calls(monkeypatch)  # (after tracing: the counter is not an op torch.compile can trace)
        for got, want in zip(traced, both(*args), strict=True):
            assert torch.equal(got, want)
    assert calls == [1, 12]  # the eager products: the kernel's
