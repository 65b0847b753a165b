"""archlab.kernels' int4 product (C++, built at first use): both variants against the float64 product of the
dequantized weight, every group size, M in 1..16, the errors, the layer's choice of kernel, and torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch

from archlab import kernels
from archlab.errors import ConfigError, ShapeError
from archlab.hardware import cpu_features
from archlab.quant import GROUP_SIZES, Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_q8_0

assert set(GROUP_SIZES) == {32, 64, 128, 256}  # the cases below cover each

VARIANTS = [256] + ([513] if cpu_features()["avx512_bf16"] else [])
U32, U_BF16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and bfloat16


@pytest.fixture(scope="module", autouse=True)
def built():
    try:
        kernels.load()
    except kernels.KernelUnavailable as e:  # said, not skipped silently: the fallback test below covers it
        pytest.skip(str(e))


def packed_case(n: int, k: int, g: int, m: int, dtype: torch.dtype, seed: int = 0):
    """A random int4 weight [n, k] (groups of g) packed for the kernel, x [m, k] in dtype, and the float64
    reference x W^T with W dequantized from the *stored* scales and zeros (so only the arithmetic differs)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[1, :g] = 0.01  # a constant group (scale 0)
    qw = quantize_int4(w, g)
    packed, sz = kernels.pack_int4(qw.q, qw.scale.to(dtype), qw.zero.to(dtype), g)
    s, z = (t.double().repeat_interleave(g, dim=1) for t in sz.unbind(1))  # [N, K]
    wd = (qw.q.double() - 8) * s + z
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    return x, packed, sz, x.double() @ wd.T, (x.double().abs() @ (151 * s.abs() + z.abs()).T)


def tolerance(k: int, g: int, terms: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 sums: each output adds at most K products (per lane: K/16; then a scale FMA per group, a reduction
    of 16 lanes, the K/g zero terms and their own sums of x over g) and the error of a float32 sum of n terms is
    at most n u sum|terms| (u = 2^-24). The terms are bounded by sum_k |x_k| (151 |s| + |z|): the AVX512-BF16
    variant multiplies 128 + q <= 143 and takes z - 136 s, the other q <= 15 and z - 8 s. So
    tol = (K + 2 K/g + 16) u terms, plus the rounding of y to bfloat16 (u = 2^-8 of |y|) where x is bfloat16."""
    tol = (k + 2 * k // g + 16) * U32 * terms
    return tol + (U_BF16 * ref.abs() if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("g, k", [(32, 576), (64, 576), (128, 384), (256, 768), (32, 1536)])  # all GROUP_SIZES
def test_int4_rows_equal_the_float64_product_within_float32_rounding(isa, g, k):
    for m in range(1, kernels.MAX_ROWS + 1):
        for dtype in (torch.bfloat16, torch.float32):
            x, packed, sz, ref, terms = packed_case(37, k, g, m, dtype, seed=m)  # N = 37: not a multiple of 4
            y = torch.ops.archlab_kernels.int4_rows(x, packed, sz, g, isa)
            assert y.dtype == dtype and y.shape == (m, 37)
            err = (y.double() - ref).abs()
            tol = tolerance(k, g, terms, ref, dtype)
            assert (err <= tol).all(), f"m={m} {dtype}: worst err/tol {(err / tol).max():.3g}"
            if dtype == torch.float32:  # the bound is a worst case; typical float32 sums land far inside it
                assert (y.double() - ref).norm() / ref.norm() < 1e-5  # measured 3e-7 .. 1.3e-6



@pytest.mark.parametrize("isa", VARIANTS)
def test_float_out_keeps_the_float32_sums_that_the_bfloat16_result_rounds(isa):
    """``float_out`` (an LM head's logits): float32 out of bfloat16 x, within the float32 sums' bound of the float64
    product, and rounded it is the bfloat16 result to the bit, on both variants, for int4_rows and q8_rows."""
    for m in (1, 2, 5, 16):
        x, packed, sz, ref, terms = packed_case(37, 576, 32, m, torch.bfloat16, seed=70 + m)
        y = kernels.int4_rows(x, packed, sz, 32, float_out=True)
        assert y.dtype == torch.float32
        assert (y.double() - ref).abs().le(tolerance(576, 32, terms, ref, torch.float32)).all()
        for variant in {isa, kernels.isa(torch.bfloat16)}:
            y = torch.ops.archlab_kernels.int4_rows(x, packed, sz, 32, variant, True)
            assert torch.equal(y.bfloat16(), torch.ops.archlab_kernels.int4_rows(x, packed, sz, 32, variant))
        q8 = quantize_q8_0(torch.randn(48, 576, generator=torch.Generator().manual_seed(m)) * 0.05)
        q8_packed, scales = kernels.pack_q8(q8.q, q8.scale)
        y = kernels.q8_rows(x, q8_packed, scales, float_out=True)
        assert y.dtype == torch.float32 and torch.equal(y.bfloat16(), kernels.q8_rows(x, q8_packed, scales))
        assert not torch.equal(y, y.bfloat16().float())  # more than 8 bits kept


def test_pack_and_unpack_are_inverse_and_the_layout_is_the_documented_one():
    q = torch.randint(0, 16, (5, 192), dtype=torch.uint8)
    s = torch.rand(5, 6)
    packed, sz = kernels.pack_int4(q, s, s + 1, 32)
    assert packed.shape == (5, 96) and sz.shape == (5, 2, 6) and torch.equal(kernels.unpack_int4(packed), q)
    word = int(packed[0, 0]) | int(packed[0, 1]) << 8  # block 0, word 0: inputs 0, 32, 64, 96
    assert [word >> (4 * i) & 15 for i in range(4)] == [int(q[0, i]) for i in (0, 32, 64, 96)]
    assert int(packed[0, 64]) == int(q[0, 128]) | int(q[0, 160]) << 4  # the 64-input tail: byte j = j | 32 + j


def test_bad_arguments_raise_shape_errors_before_the_call():
    x, packed, sz, ref, _ = packed_case(8, 128, 32, 1, torch.bfloat16)
    assert ((kernels.int4_rows(x, packed, sz, 32).double() - ref).norm() / ref.norm()) < 2**-8  # the checked call
    with pytest.raises(ShapeError, match="M in 1..16"):
        kernels.int4_rows(x.repeat(17, 1), packed, sz, 32)
    with pytest.raises(ShapeError, match="float32 or bfloat16"):
        kernels.int4_rows(x.half(), packed, sz, 32)
    with pytest.raises(ShapeError, match="K a multiple of 64"):
        kernels.int4_rows(torch.zeros(1, 96, dtype=torch.bfloat16), packed[:, :48], sz, 32)
    with pytest.raises(ShapeError, match="group_size"):
        kernels.pack_int4(torch.zeros(8, 128, dtype=torch.uint8), torch.ones(8, 2), torch.ones(8, 2), 48)
    with pytest.raises(ShapeError, match="scales_and_zeros"):
        kernels.int4_rows(x, packed, sz[:, :, :2].contiguous(), 32)
    with pytest.raises(RuntimeError, match="isa"):  # the op's own check
        torch.ops.archlab_kernels.int4_rows(x, packed, sz, 32, 7)


def test_no_compiler_is_an_archlab_error_and_the_layer_falls_back_saying_so_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(kernels.KernelUnavailable, match="could not be built"):
        kernels.build("archlab_int4_rows_nocompiler", str(tmp_path))

    def unavailable():
        raise kernels.KernelUnavailable("archlab's int4 kernel (int4_rows.cpp) could not be built: test")

    monkeypatch.setattr(kernels, "load", unavailable)
    monkeypatch.setenv("ARCHLAB_INT4_KERNEL", "archlab")
    qw = quantize_int4(torch.randn(32, 128), 32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layers = [Int4Linear(qw), Int4Linear(qw)]
    assert [lay.kernel for lay in layers] == ["aten", "aten"]
    assert len([w for w in seen if "could not be built" in str(w.message)]) == 1


@pytest.mark.parametrize("rows", [1, 3, 16, 20])
def test_int4_layer_on_archlab_kernel_equals_the_aten_one(rows, monkeypatch):
    """The same Int4Weight through both products (bfloat16 activations): equal within bfloat16's rounding of y
    and of the aten kernel's own bf16 arithmetic. Up to 16 rows go to archlab's kernel, each row's result the same
    bits as the row alone (so a speculative verify pass or a batch's step gives a row the one-row step's result);
    more rows (a prompt) multiply the weights dequantized to bfloat16 where the AVX512-BF16 variant runs, else take
    the aten kernel's copy, bit for bit the aten layer's result."""
    gen = torch.Generator().manual_seed(1)
    qw = quantize_int4(torch.randn(64, 576, generator=gen) * 0.02, 32)
    layers = {}
    for choice in ("archlab", "aten"):
        monkeypatch.setenv("ARCHLAB_INT4_KERNEL", choice)
        layers[choice] = Int4Linear(qw).to(torch.bfloat16)
        assert layers[choice].kernel == choice
    x = torch.randn(rows, 576, generator=gen)
    ref = x.double() @ qw.dequantize(torch.float64).T
    for layer in layers.values():
        assert ((layer(x).double() - ref).norm() / ref.norm()) < 0.01  # x rounded to bf16: ~2^-9 relative
    assert hasattr(layers["archlab"], "row_packed") and not hasattr(layers["aten"], "row_packed")
    lay = layers["archlab"]
    together = lay(x)
    if rows > 16 and lay._isa == 513:  # a prompt's rows: the weights dequantized to bfloat16, oneDNN's matmul
        w = kernels.int4_dequant(lay.row_packed, lay.row_scales_and_zeros, lay.group_size)
        assert torch.equal(together, torch.nn.functional.linear(x.bfloat16(), w))
    elif rows > 16:
        assert torch.equal(together, layers["aten"](x))
    else:
        assert all(torch.equal(together[i], layers["archlab"](x[i : i + 1])[0]) for i in range(rows))
        assert torch.equal(together, torch.ops.archlab_kernels.int4_rows(
            x.bfloat16(), lay.row_packed, lay.row_scales_and_zeros, lay.group_size, lay._isa, False))  # fmt: skip


@pytest.mark.parametrize("g, k, dtype", [(32, 576, torch.float32), (64, 1536, torch.bfloat16),
                                         (128, 384, torch.float32), (256, 768, torch.bfloat16),
                                         (32, 64, torch.bfloat16)])  # fmt: skip
def test_int4_dequant_is_the_exact_weight_rounded_to_bfloat16(g, k, dtype):
    """``(q - 8) s + z`` computed exactly, rounded to float32 (one FMA) and then to bfloat16, for every group size,
    scales in float32 and bfloat16, K with and without the 64-input tail; refused without AVX512-BF16, saying so."""
    qw = quantize_int4(torch.randn(48, k, generator=torch.Generator().manual_seed(k)) * 0.05, g)
    packed, sz = kernels.pack_int4(qw.q, qw.scale.to(dtype), qw.zero.to(dtype), g)
    if kernels.isa(torch.bfloat16) != 513:
        with pytest.raises(kernels.KernelUnavailable, match="AVX512-BF16"):
            kernels.int4_dequant(packed, sz, g)
        return
    s, z = (t.double().repeat_interleave(g, dim=1) for t in sz.unbind(1))
    assert torch.equal(kernels.int4_dequant(packed, sz, g), ((qw.q.double() - 8) * s + z).float().bfloat16())
    with pytest.raises(ShapeError, match="scales_and_zeros"):
        kernels.int4_dequant(packed, sz[:, :, 1:], g)


def int8_case(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """A random int8 weight [n, k] (both ends and the nibble borders among its levels), its scales in dtype, and
    pack_int8's layout of it."""
    qw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    qw.q[2, :5] = torch.tensor([-127, 127, -1, 0, 1], dtype=torch.int8)
    scale = qw.scale.to(dtype)
    return qw.q, scale, *kernels.pack_int8(qw.q, scale)


def twice(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` as the nibble matrix's ``[M, 2K]``: each 64 inputs, then the same 64 again."""
    m, k = x.shape
    return x.view(m, k // 64, 1, 64).expand(m, k // 64, 2, 64).reshape(m, 2 * k)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("k", [64, 576, 1536])
def test_int8_rows_are_the_int4_product_of_nibbles_that_hold_q_s_exactly(isa, k):
    """pack_int8's nibble matrix dequantizes (float64) to q s exactly, every weight; int8_rows is int4_rows on x with
    each 64 inputs taken twice, to the bit, so within int4_rows' float32 bound of x (q s)^T; a row's result is the
    bits of the row alone."""
    for dtype in (torch.bfloat16, torch.float32):
        q, scale, packed, sz = int8_case(37, k, dtype, seed=k)
        s, z = (t.double().repeat_interleave(kernels.INT8_GROUP, dim=1) for t in sz.unbind(1))  # [N, 2K]
        halves = (kernels.unpack_int4(packed).double() - 8) * s + z  # [N, 2K]: hi terms, then lo, per 64 inputs
        w = halves.view(37, k // 64, 2, 64).sum(2).reshape(37, k)
        assert torch.equal(w, q.double() * scale.double()[:, None])
        for m in (1, 5, 16):
            x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(dtype)
            y = torch.ops.archlab_kernels.int8_rows(x, packed, sz, isa, False)
            assert torch.equal(y, torch.ops.archlab_kernels.int4_rows(twice(x), packed, sz, kernels.INT8_GROUP, isa))
            assert all(torch.equal(y[i], torch.ops.archlab_kernels.int8_rows(x[i : i + 1], packed, sz, isa)[0])
                       for i in range(m))  # fmt: skip
            ref = x.double() @ w.T
            terms = twice(x).double().abs() @ (151 * s.abs() + z.abs()).T
            assert ((y.double() - ref).abs() <= tolerance(2 * k, kernels.INT8_GROUP, terms, ref, dtype)).all()


@pytest.mark.parametrize("k, dtype", [(576, torch.float32), (1536, torch.bfloat16), (64, torch.bfloat16)])
def test_int8_dequant_is_q_s_rounded_once_to_the_scales_dtype(k, dtype):
    """``q s`` in float64 rounded to float32 (exact there for bfloat16 scales), then to bfloat16 where the scales
    are; refused without AVX512-BF16, saying so; bad arguments are ShapeErrors."""
    q, scale, packed, _ = int8_case(48, k, dtype, seed=k)
    if kernels.isa(torch.bfloat16) != 513:
        with pytest.raises(kernels.KernelUnavailable, match="AVX512-BF16"):
            kernels.int8_dequant(packed, scale)
        return
    assert torch.equal(kernels.int8_dequant(packed, scale), (q.double() * scale.double()[:, None]).float().to(dtype))
    with pytest.raises(ShapeError, match=r"scale \[N\]"):
        kernels.int8_dequant(packed, scale[1:])
    with pytest.raises(ShapeError, match="float32 or bfloat16"):
        kernels.int8_dequant(packed, scale.half())


def test_int8_bad_arguments_raise_shape_errors_before_the_call():
    q, scale, packed, sz = int8_case(16, 128, torch.bfloat16)
    x = torch.randn(2, 128).bfloat16()
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    assert ((kernels.int8_rows(x, packed, sz).double() - ref).norm() / ref.norm()) < 2**-8  # the checked call
    with pytest.raises(ShapeError, match="K a multiple of 64"):
        kernels.pack_int8(q[:, :96], scale)
    with pytest.raises(ShapeError, match="scale"):
        kernels.pack_int8(q, scale[:3])
    with pytest.raises(ShapeError, match="packed uint8"):
        kernels.int8_rows(x, packed[:, :64].contiguous(), sz)
    with pytest.raises(ShapeError, match="scales_and_zeros"):
        kernels.int8_rows(x, packed, sz[:, :, 1:].contiguous())
    with pytest.raises(ShapeError, match="M in 1..16"):
        kernels.int8_rows(x.repeat(9, 1), packed, sz)


@pytest.mark.parametrize("rows", [1, 3, 16, 20])
def test_int8_layer_on_archlab_kernel(rows, monkeypatch):
    """Where archlab's kernel serves (forced here), 1-16 bfloat16 rows are int8_rows', each row the bits of the row
    alone; more rows (a prompt) multiply q s dequantized to bfloat16 where the AVX512-BF16 variant runs, else go to
    int8_rows 16 at a time. Within bfloat16's rounding of the float64 product either way; PyTorch's kernels
    (``aten``) give it within the same."""
    monkeypatch.setenv("ARCHLAB_INT4_KERNEL", "archlab")
    q, scale, _, _ = int8_case(64, 576, torch.float32, seed=4)
    from archlab.quant import Int8Weight

    layer = Int8Linear(Int8Weight(q, scale)).to(torch.bfloat16)
    assert (layer.kernel, layer.group_size) == ("archlab", 64)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(5))
    ref = x.double() @ (q.double() * scale.bfloat16().double()[:, None]).T
    together = layer(x)
    assert ((together.double() - ref).norm() / ref.norm()) < 0.01  # x rounded to bf16: ~2^-9 relative
    if rows > 16 and layer._isa == 513:
        w = kernels.int8_dequant(layer.packed, layer.scale)
        assert torch.equal(together, torch.nn.functional.linear(x.bfloat16(), w))
    elif rows > 16:
        assert torch.equal(together, torch.cat([layer(x[:16]), layer(x[16:])]))
    else:
        assert all(torch.equal(together[i], layer(x[i : i + 1])[0]) for i in range(rows))
        assert torch.equal(together, kernels.int8_rows(x.bfloat16(), layer.packed, layer.scales_and_zeros))
    monkeypatch.setenv("ARCHLAB_INT4_KERNEL", "aten")
    aten = Int8Linear(Int8Weight(q, scale)).to(torch.bfloat16)
    assert aten.kernel in ("aten", "int8")
    assert ((aten(x).double() - ref).norm() / ref.norm()) < 0.01


def test_bad_kernel_choice_is_a_config_error(monkeypatch):
    monkeypatch.setenv("ARCHLAB_INT4_KERNEL", "fast")
    with pytest.raises(ConfigError, match="ARCHLAB_INT4_KERNEL"):
        Int4Linear(quantize_int4(torch.randn(16, 64), 32))


def test_compile_keeps_the_op_whole(monkeypatch):
    """fullgraph=True: the op traces through its fake implementation, no graph break."""
    monkeypatch.setenv("ARCHLAB_INT4_KERNEL", "archlab")
    layer = Int4Linear(quantize_int4(torch.randn(48, 128), 32)).to(torch.bfloat16)
    x = torch.randn(1, 128)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
    int8 = Int8Linear(quantize_int8(torch.randn(48, 128))).to(torch.bfloat16)  # int8_rows, and int8_dequant
    for rows in (1, 20):
        torch._dynamo.reset()
        compiled = torch.compile(int8, backend="aot_eager", fullgraph=True)
        x = torch.randn(rows, 128)
        assert torch.equal(compiled(x), int8(x))


def test_the_ninja_package_is_put_on_path_where_no_ninja_is(monkeypatch):
    """torch's extension build runs the ``ninja`` command: outside an activated virtual environment the ``ninja``
    package's binary (an archlab dependency) is not on PATH, so the build puts it there; a ninja already on PATH
    is left as it is."""
    import ninja

    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    kernels._ninja_on_path()
    assert kernels.os.environ["PATH"].split(kernels.os.pathsep)[0] == ninja.BIN_DIR
    monkeypatch.setenv("PATH", "/somewhere")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/somewhere/ninja")
    kernels._ninja_on_path()
    assert kernels.os.environ["PATH"] == "/somewhere"
