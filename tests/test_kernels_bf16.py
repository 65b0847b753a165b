"""archlab's bfloat16 decoding path: the bf16_rows kernel against the float64 product with a derived bound, a row's
result independent of the batch, its errors; the attention and RMSNorm kernels on bfloat16 (widened exactly, computed
as in float32, rounded once), both variants alike; linear() taking the kernel only where it applies; and a bf16
model's verify pass equal to its one-token steps, so speculative greedy decoding gives plain greedy's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab import kernels
from archlab.errors import ShapeError
from archlab.nn.linear import Linear, PackedLinear, head_logits, is_logits_head, linear
from tests.test_kernels_f32 import VARIANTS, kernel_width_model
from tests.test_quant_kernel import built  # noqa: F401  (autouse: the library built, or the module skipped saying why)

U32 = 2.0**-24
needs_bf16 = pytest.mark.skipif(not kernels.bf16_kernel(), reason="bf16_rows needs AVX512-BF16 with PyTorch's kernels "
                                "at AVX-512 (this CPU, or its cap, has not)")  # fmt: skip


def bf16_case(m: int, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    return x, w, torch.randn(n, generator=gen).bfloat16()


@needs_bf16
@pytest.mark.parametrize("m", [1, 2, 5, 9, 16])
@pytest.mark.parametrize("n, k", [(1, 32), (7, 96), (300, 576), (100, 1536), (49, 64)])
def test_bf16_rows_equal_the_float64_product_within_its_bound(m, n, k):
    """Each product of two bfloat16 values is exact in float32; the float32 sum of K of them errs at most about
    K u |x| . |w| (u = 2^-24); the result is then rounded to bfloat16 once: half an ulp (8 significant bits), at most
    2^-8 |y|."""
    x, w, b = bf16_case(m, n, k)
    y = kernels.bf16_rows(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    exact = x.double() @ w.double().T + b.double()
    bound = k * U32 * (x.double().abs() @ w.double().abs().T + b.double().abs()) + 2.0**-8 * exact.abs() * 1.01
    assert ((y.double() - exact).abs() <= bound + 1e-30).all()
    # PyTorch's bf16 product rounds the same sums (in another order) once too: at most one bfloat16 ulp apart
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert ((y.double() - F.linear(x, w, b).double()).abs() <= ulp * 1.01).all()


@needs_bf16
@pytest.mark.parametrize("m", [2, 3, 4, 6, 7, 10, 12, 16])
def test_bf16_rows_a_rows_result_does_not_depend_on_the_batch(m):
    """Every (m, n) is summed by the same operations whichever loop computes it (the one-row stream, the tiles, a group
    of rows): a row alone and in a batch of any size give the same bits, with or without a bias."""
    x, w, b = bf16_case(m, 301, 576, seed=m)
    for bias in (b, None):
        together = kernels.bf16_rows(x, w, bias)
        alone = torch.cat([kernels.bf16_rows(x[i : i + 1], w, bias) for i in range(m)])
        assert torch.equal(together, alone)
    three_d = kernels.bf16_rows(x.reshape(1, m, 576), w, b)  # leading dimensions kept, no reshape around the call
    assert three_d.shape == (1, m, 301) and torch.equal(three_d[0], kernels.bf16_rows(x, w, b))


def tie_rows(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [m, 64]``, ``w [128, 64]`` whose products are exact halfway cases: row ``i``'s sum with output ``n`` is
    ``s_i (1 + n/128 + 2^-8)`` (``s_i = ±2^e``), halfway between two bfloat16 values (spacing 2^-7 in [1, 2)), so
    rounding to nearest even goes up for odd ``n`` and down for even ones; one row at ``2^127`` (its last ties round up
    to 2^128: inf), one NaN, one inf, one at ``2^-128`` (float32 subnormal: vdpbf16ps flushes it); row 11
    (from 12 rows) a negative NaN with every payload bit set (bits 0xFFFF), which the plain rounding would turn into
    -0."""
    scales = [2.0**e * (-1) ** e for e in (0, 1, 5, -3, 20, -20, 60)]
    scales += [2.0**127, float("nan"), float("inf"), 2.0**-128]
    scales = (scales * 2)[:m]
    x = torch.zeros(m, 64)
    x[:, 0] = torch.tensor(scales)
    x[:, 1] = torch.tensor(scales) * 2.0**-8
    w = torch.zeros(128, 64)
    w[:, 0] = 1 + torch.arange(128) / 128
    w[:, 1] = 1
    x = x.bfloat16()
    x[11:12, 0] = torch.tensor([-1], dtype=torch.int16).view(torch.bfloat16)
    return x, w.bfloat16()


@needs_bf16
@pytest.mark.parametrize("m", [2, 5, 10, 12, 16])
def test_bf16_rows_tiles_round_as_one_row_does_ties_nan_and_overflow(m):
    """The tiles (2-16 rows) convert 16 sums at once in integer lanes; the one-row stream converts each sum as c10
    does (to nearest even, NaN to 0x7FC0). Exact halfway sums, NaN, inf, a rounding overflow and subnormals must get
    the same bits either way, and the float32 sums rounded by PyTorch where they are numbers."""
    x, w = tie_rows(m)
    bias = torch.full((128,), 2.0**-12).bfloat16()
    for b in (None, bias):
        together = kernels.bf16_rows(x, w, b)
        alone = torch.cat([kernels.bf16_rows(x[i : i + 1], w, b) for i in range(m)])
        assert torch.equal(together.view(torch.int16), alone.view(torch.int16))
        sums = kernels.bf16_rows(x, w, b, float_out=True)
        number = ~sums.isnan()
        assert torch.equal(together[number].view(torch.int16), sums[number].bfloat16().view(torch.int16))
        assert (together[~number].view(torch.int16) == 0x7FC0).all()
    exact = kernels.bf16_rows(x, w, None, float_out=True)[0]
    assert torch.equal(exact, (1 + torch.arange(128) / 128 + 2.0**-8).float())  # the sums are the halfway cases
    rounded = kernels.bf16_rows(x, w, None)[0].float()
    n = torch.arange(128)
    assert torch.equal(rounded, torch.where(n % 2 == 1, 1 + (n + 1) / 128, 1 + n / 128).float())  # ties to even


def test_bf16_rows_errors_name_what_is_wrong(monkeypatch):
    x, w, b = bf16_case(2, 32, 64)
    with pytest.raises(ShapeError, match=r"x must be bfloat16 \[\.\.\., K\] with 1\.\.16 rows, got torch.float32"):
        kernels.bf16_rows(x.float(), w, b)
    with pytest.raises(ShapeError, match=r"with 1\.\.16 rows, got torch.bfloat16 \(17, 64\)"):
        kernels.bf16_rows(torch.zeros(17, 64, dtype=torch.bfloat16), w, b)
    with pytest.raises(ShapeError, match=r"weight must be bfloat16 \[N, K\] = \[N, 48\] with K a positive multiple "
                                         r"of 32, got torch.bfloat16 \(32, 48\)"):  # fmt: skip
        kernels.bf16_rows(torch.zeros(2, 48, dtype=torch.bfloat16), torch.zeros(32, 48, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match="weight must be contiguous"):
        kernels.bf16_rows(x, w.T.contiguous().T, b)
    with pytest.raises(ShapeError, match=r"bias must be bfloat16 \[N\] = \[32\], got torch.float32"):
        kernels.bf16_rows(x, w, b.float())
    monkeypatch.setattr(kernels, "kernel_capability", lambda: "AVX2")  # a CPU capped (or built) below AVX-512
    with pytest.raises(kernels.KernelUnavailable, match="needs AVX512-BF16 with PyTorch's CPU kernels at AVX-512; "
                                                        "this CPU runs them at AVX2"):  # fmt: skip
        kernels.bf16_rows(x, w, b)


def count_bf16_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    op = torch.ops.archlab_kernels.bf16_rows
    monkeypatch.setattr(torch.ops.archlab_kernels, "bf16_rows",
                        lambda x, *a: calls.append(x.numel() // x.shape[-1]) or op(x, *a), raising=False)  # fmt: skip
    return calls


def test_linear_takes_the_bf16_kernel_for_few_rows_without_gradients_where_it_runs(monkeypatch):
    """1-16 bfloat16 rows, no gradient recorded, K a multiple of 32: the kernel's, where the CPU computes bfloat16;
    every other case (and every case on a CPU without AVX512-BF16) PyTorch's, the same result within rounding."""
    calls = count_bf16_calls(monkeypatch)
    x, w, b = bf16_case(3, 96, 64)
    with torch.no_grad():
        y = linear(x[None], w, b)
        head = PackedLinear(w, b)(x[:1])  # the decoding cache's LM head reads the weight in place too
        linear(torch.zeros(17, 64, dtype=torch.bfloat16), w, b)  # 17 rows
        linear(torch.zeros(1, 48, dtype=torch.bfloat16), torch.zeros(96, 48, dtype=torch.bfloat16))  # K = 48
        linear(x.float(), w.float(), b.float())  # float32: the float32 kernel's, not this one
    wg = w.clone().requires_grad_()
    linear(x[:1], wg, b).float().sum().backward()  # a gradient recorded
    assert calls == ([3, 1] if kernels.bf16_kernel() else [])
    torch.testing.assert_close(y[0], F.linear(x, w, b), rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(head, F.linear(x[:1], w, b), rtol=2**-7, atol=2**-7)
    assert wg.grad is not None and wg.grad.shape == w.shape


@pytest.mark.parametrize("isa", VARIANTS)
def test_rms_norm_in_bfloat16_is_the_float32_kernels_result_rounded_once(isa):
    """bfloat16 x and weight widen exactly as they are read, so the kernel's bf16 result is its float32 result on the
    widened values, rounded once (to the bit, both variants), as PyTorch's rms_norm rounds (within one ulp of it)."""
    gen = torch.Generator().manual_seed(3)
    for rows, d in [(1, 576), (9, 64), (144, 576)]:
        x = (3 * torch.randn(rows, d, generator=gen)).bfloat16()
        g = (torch.rand(d, generator=gen) + 0.5).bfloat16()
        y = torch.ops.archlab_kernels.rms_norm(x, g, 1e-5, isa)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, torch.ops.archlab_kernels.rms_norm(x.float(), g.float(), 1e-5, isa).bfloat16())
        assert torch.equal(y, torch.ops.archlab_kernels.rms_norm(x, g, 1e-5, VARIANTS[0]))
        torch_y = F.rms_norm(x, (d,), g, 1e-5)
        ulp = 2.0 ** (torch.floor(torch.log2(torch_y.double().abs().clamp_min(1e-30))) - 7)
        assert ((y.double() - torch_y.double()).abs() <= ulp * 1.01).all()
    with pytest.raises(ShapeError, match=r"both float32 or both bfloat16.*got x torch.bfloat16 \(2, 64\) on cpu, "
                                         r"weight torch.float32"):  # fmt: skip
        kernels.rms_norm(torch.zeros(2, 64, dtype=torch.bfloat16), torch.ones(64), 1e-6)


@pytest.mark.parametrize("isa", VARIANTS)
def test_cached_attention_in_bfloat16_is_the_float32_kernels_result_rounded_once(isa):
    """q, k, v in bfloat16 (a bf16 model's KV cache, read in place): the float32 kernel's result on the widened
    values rounded once, to the bit, for the static and the padded op, each query independent of the others."""
    gen = torch.Generator().manual_seed(5)
    b, a, g, n, length, d = 2, 9, 3, 4, 40, 64
    q, k, v = (torch.randn(b, heads, size, d, generator=gen).bfloat16()
               for heads, size in ((a, n), (g, length), (g, length)))  # fmt: skip
    last = torch.tensor([length - 1])
    ops = torch.ops.archlab_kernels
    out = ops.cached_attention(q, k, v, last, d**-0.5, isa)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ops.cached_attention(q.float(), k.float(), v.float(), last, d**-0.5, isa).bfloat16())
    alone = torch.cat([ops.cached_attention(q[:, :, i : i + 1], k, v, torch.tensor([length - n + i]), d**-0.5, isa)
                       for i in range(n)], dim=2)  # fmt: skip
    assert torch.equal(out, alone)
    starts = torch.tensor([0, 7])
    padded = ops.cached_attention_padded(q, k, v, starts, last, d**-0.5, isa)
    widened = ops.cached_attention_padded(q.float(), k.float(), v.float(), starts, last, d**-0.5, isa)
    assert torch.equal(padded, widened.bfloat16())
    assert torch.equal(padded, ops.cached_attention_padded(q, k, v, starts, last, d**-0.5, VARIANTS[0]))
    with pytest.raises(ShapeError, match=r"all float32 or all bfloat16.*got q torch.bfloat16 .* k torch.float32"):
        kernels.cached_attention(q, k.float(), v, last)


@needs_bf16
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_bf16_verify_pass_gives_each_position_the_one_token_steps_logits_and_speculation_greedys_tokens(family):
    """In bfloat16 the products (bf16_rows), the attention and the norms compute each row alike whatever the pass's
    width, so a 9-token pass over the cache gives each position its one-token steps' logits to the bit, and
    speculative greedy decoding returns plain greedy's tokens even where bfloat16 makes near-ties common."""
    from archlab.generation import generate
    from archlab.speculative import PromptLookup, speculative_generate

    model = kernel_width_model(family).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(8)
    prompt, more = torch.randint(1, 48, (1, 12), generator=gen), torch.randint(1, 48, (1, 9), generator=gen)
    with torch.inference_mode():
        cache = model.new_cache()
        model(prompt, cache=cache)
        verify = model(more, cache=cache)
        cache.crop(12)
        steps = torch.cat([model(more[:, i : i + 1], cache=cache) for i in range(9)], dim=1)
        assert verify.dtype == torch.float32 and torch.equal(verify, steps)  # the LM head's float32 logits
        repetitive = torch.cat([prompt, prompt, prompt[:, :4]], dim=1)  # n-grams to draft from
        plain = generate(model, repetitive, max_new_tokens=24)
        fast = speculative_generate(model, repetitive, max_new_tokens=24, draft=PromptLookup(), draft_tokens=8)
    assert torch.equal(fast.sequences, plain)
    assert fast.stats.drafted > 0


@needs_bf16
@pytest.mark.parametrize("m", [1, 3, 9, 16])
def test_bf16_rows_float_out_is_the_sum_the_bfloat16_result_rounds(m):
    """``float_out``: float32, within the float32 sum's bound of the float64 product (no rounding to 8 bits), rounding
    to exactly the bfloat16 result, and a row's values independent of the batch."""
    x, w, b = bf16_case(m, 301, 576, seed=40 + m)
    y = kernels.bf16_rows(x, w, b, float_out=True)
    assert y.dtype == torch.float32 and y.shape == (m, 301)
    assert torch.equal(y.bfloat16(), kernels.bf16_rows(x, w, b))
    exact = x.double() @ w.double().T + b.double()
    assert ((y.double() - exact).abs() <= 576 * U32 * (x.double().abs() @ w.double().abs().T + b.double().abs()) * 1.01
            + 1e-30).all()  # fmt: skip
    assert torch.equal(torch.cat([kernels.bf16_rows(x[i : i + 1], w, b, float_out=True) for i in range(m)]), y)


def test_head_logits_are_float32_from_bfloat16_and_keep_float32_and_float64():
    """Every path of head_logits: bfloat16 in, float32 out; with the kernel every row's logits are its one-row
    logits however many rows come (past 16, 16 at a time), without it linear's rounded result widened; float32 and
    float64 activations keep their dtype and values (linear's)."""
    x, w, b = bf16_case(37, 64, 96, seed=3)
    with torch.no_grad():
        many = head_logits(x.reshape(1, 37, 96), w, b)[0]  # 37 rows: past the kernel's 16, leading dimensions kept
        alone = torch.cat([head_logits(x[i : i + 1], w, b) for i in range(37)])
    assert many.dtype == alone.dtype == torch.float32
    assert torch.equal(many, alone if kernels.bf16_kernel() else linear(x, w, b).float())
    for dtype in (torch.float32, torch.float64):
        got = head_logits(x.to(dtype), w.to(dtype), b.to(dtype))
        assert got.dtype == dtype and torch.equal(got, linear(x.to(dtype), w.to(dtype), b.to(dtype)))


@needs_bf16
def test_an_lm_heads_close_logits_do_not_tie_in_bfloat16():
    """Two tokens 0.03 apart near 25 (bfloat16 steps by 0.125 there): rounded to bfloat16 both are 25.25 and argmax
    takes the first; the head's float32 logits keep the second ahead, on the one-row kernel and in a cache's packed
    head, as SmolLM2's "The" (25.325) and "L" (25.243) after "What is the capital of France?"."""
    w = torch.full((2, 32), 0.75)
    w[:, 30] = 2.5
    w[0, 31], w[1, 31] = 0.28125, 0.3125  # sums 25.28125 and 25.3125, every value and product exact in bfloat16
    w, x = w.bfloat16(), torch.ones(1, 32, dtype=torch.bfloat16)
    assert linear(x, w).tolist() == [[25.25, 25.25]]
    head = Linear(32, 2, bias=False, head=True).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(w)
    assert is_logits_head(head) and not is_logits_head(Linear(32, 2))
    with torch.no_grad():  # as decoding runs (a product autograd records keeps F.linear, rounded)
        for logits in (head_logits(x, w), head(x), PackedLinear(w, head=True)(x)):
            assert logits.dtype == torch.float32 and logits.tolist() == [[25.28125, 25.3125]]
            assert int(logits.argmax()) == 1


def small_lm(family: str) -> tuple[torch.nn.Module, tuple]:
    """A small model of each family with an LM head, and the arguments of one forward pass."""
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    if family == "rwkv":
        from archlab.models.rwkv import RWKV, RWKVConfig

        return RWKV(RWKVConfig(vocab_size=32, d_model=32, n_layers=2, d_att=32, d_ff=64)), (ids,)
    if family == "transformer-xl":
        from archlab.models.transformer_xl import TransformerXL, TransformerXLConfig

        return TransformerXL(TransformerXLConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=64)), (ids,)
    if family == "transformer":
        from archlab.models.transformer import EncoderDecoderTransformer, TransformerConfig

        config = TransformerConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=16)
        return EncoderDecoderTransformer(config), (ids, ids)
    return kernel_width_model(family), (ids,)


@pytest.mark.parametrize("family", ["gpt", "llama", "rwkv", "transformer-xl", "transformer"])
def test_every_lm_familys_head_gives_float32_logits_in_bfloat16(family):
    """The decoder-only families, RWKV, Transformer-XL and the encoder-decoder Transformer all build their LM head
    with ``Linear(head=True)``: in bfloat16 their logits come out float32 (:func:`head_logits`), not rounded to 8
    bits; float32 models keep float32."""
    model, args = small_lm(family)
    assert is_logits_head(model.lm_head)
    with torch.no_grad():
        logits = model.eval().to(torch.bfloat16)(*args)
    logits = logits.logits if hasattr(logits, "logits") else logits
    assert logits.dtype == torch.float32 and logits.shape[-1] == model.lm_head.out_features and logits.isfinite().all()
