"""archlab's Q4 x Q8 kernel (llama.cpp's Q4_0 / Q4_1 x Q8 product, archlab.kernels.q4_rows) and its layer
(archlab.quant.Q4Linear, mode "q4_1"): the kernel against the float64 value of its equation, both variants equal
to the bit, rows independent of the batch, the layout, the errors, the layer's fallback, quantize(mode="q4_1"),
GGUF Q4_0 / Q4_1 blocks read as they are (torch.compile: tests/test_quant_q8.py's compiled step)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from archlab import kernels
from archlab.errors import ConfigError, ShapeError
from archlab.interop.gguf import GGUFFile, load_gguf
from archlab.quant import Int4Weight, Q4Linear, Q8Linear, quantize, quantize_int4
from tests.test_quant_kernel import built  # noqa: F401  (autouse: the library built, or the module skipped saying why)
from tests.test_quant_q8 import VARIANTS, gguf_llama, small_llama

U32, U_BF16 = 2.0**-24, 2.0**-8


def case(n: int, k: int, m: int, seed: int = 0) -> tuple[Int4Weight, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, 32)
    w.scale[0, 0] = 0.0  # a zero block scale
    w.zero[1, :] = 0.0  # a row as Q4_0 stores it (z = 0)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :32] = 0.0  # an all-zero block of x: d = 0
    return w, x


def reference_and_terms(x: torch.Tensor, w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The equation in float64, and the sum over blocks of |s d S| + |z d sum p| (which bounds float32's error)."""
    p, d = kernels.round_rows_q8(x)
    m, k = x.shape
    n = w.q.shape[0]
    pb = p.double().reshape(m, -1, 32)
    dots = torch.einsum("mbk,nbk->mnb", pb, (w.q.double() - 8).reshape(n, -1, 32))  # S [M, N, K/32]
    first = dots * w.scale.double()[None] * d.double()[:, None]
    second = w.zero.double()[None] * (d.double() * pb.sum(-1))[:, None]
    return (first + second).sum(-1), (first.abs() + second.abs()).sum(-1)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n, k", [(16, 32), (48, 96), (64, 576), (32, 1536)])
def test_q4_rows_equal_the_float64_equation_within_float32_rounding(isa, n, k):
    """Each block's integer sum is exact; y adds 2 K/32 terms by FMA (s d, d sum p each rounded once): the error is
    at most (2 K/32 + 2) u times the terms' absolute sum, plus bfloat16's rounding of y where x is bfloat16."""
    for m in (1, 2, 3, 16):
        w, x = case(n, k, m, seed=m)
        packed, sz = kernels.pack_q4(w.q, w.scale, w.zero)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            ref, terms = reference_and_terms(xd, w)
            y = torch.ops.archlab_kernels.q4_rows(xd, packed, sz, isa)
            assert y.dtype == dtype and y.shape == (m, n)
            tol = (2 * k // 32 + 2) * U32 * terms + (U_BF16 * ref.abs() if dtype == torch.bfloat16 else 0)
            err = (y.double() - ref).abs()
            assert (err <= tol).all(), f"m={m} {dtype}: worst err/tol {(err / tol).max():.3g}"


def test_both_variants_and_any_batch_give_one_result_to_the_bit():
    """AVX512-VNNI and AVX2 compute the same integers and add them in one order; a row's result does not depend on
    the rows beside it, so batched decoding and speculative verify passes equal one row at a time exactly."""
    w, x = case(64, 576, 7, seed=3)
    packed, sz = kernels.pack_q4(w.q, w.scale, w.zero)
    for float_out in (False, True):
        ys = [torch.ops.archlab_kernels.q4_rows(x, packed, sz, isa, float_out) for isa in VARIANTS]
        assert all(torch.equal(ys[0], y) for y in ys)
    alone = torch.cat([kernels.q4_rows(x[i : i + 1], packed, sz) for i in range(7)])
    assert torch.equal(kernels.q4_rows(x, packed, sz), alone)
    xb = x.bfloat16()
    wide = kernels.q4_rows(xb, packed, sz, float_out=True)
    assert wide.dtype == torch.float32 and torch.equal(wide.bfloat16(), kernels.q4_rows(xb, packed, sz))


def test_the_integer_sum_has_no_overflow_at_the_extremes():
    """Every q = 15 against p = 127 (and q = 0 against -127): the AVX2 variant's int16 pair sums reach 30,480, within
    int16; the result is the exact value where every quantity is a small power of two."""
    k = 64
    for level, sign in ((15, 1.0), (0, -1.0)):
        w = Int4Weight(torch.full((16, k), level, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2), 32)
        x = torch.full((1, k), sign * 127.0)  # d = 1, p = +-127
        packed, sz = kernels.pack_q4(w.q, w.scale, w.zero)
        for isa in VARIANTS:
            y = torch.ops.archlab_kernels.q4_rows(x, packed, sz, isa)
            assert torch.equal(y, torch.full((1, 16), k * (level - 8) * sign * 127.0))


def test_pack_layout_and_read_back():
    w, _ = case(32, 64, 1)
    packed, sz = kernels.pack_q4(w.q, w.scale, w.zero)
    assert packed.shape == (32, 32) and sz.shape == (2, 2, 2, 16)
    line = packed.reshape(2, 8, 16, 4)[1, 5]  # tile 1, inputs 40..47: the tile's 16 rows x 4 bytes
    assert torch.equal(line & 15, w.q[16:32, 40:44]) and torch.equal(line >> 4, w.q[16:32, 44:48])
    assert torch.equal(sz[0, 1, 0], w.scale[:16, 1]) and torch.equal(sz[1, 0, 1], w.zero[16:, 0])
    q, s, z = kernels.unpack_q4(packed, sz)
    assert torch.equal(q, w.q) and torch.equal(s, w.scale) and torch.equal(z, w.zero)
    got = Q4Linear(w).quantized_weight()
    assert got.group_size == 32 and all(torch.equal(getattr(got, f), getattr(w, f)) for f in ("q", "scale", "zero"))


def test_bad_arguments_raise_archlab_errors_before_the_call():
    w, x = case(16, 64, 1)
    packed, sz = kernels.pack_q4(w.q, w.scale, w.zero)
    with pytest.raises(ShapeError, match="M in 1..16"):
        kernels.q4_rows(x.repeat(17, 1), packed, sz)
    with pytest.raises(ShapeError, match="float32 or bfloat16"):
        kernels.q4_rows(x.half(), packed, sz)
    with pytest.raises(ShapeError, match=r"multiple of 16.*\[24, 64\]"):
        kernels.pack_q4(torch.zeros(24, 64, dtype=torch.uint8), torch.ones(24, 2), torch.ones(24, 2))
    with pytest.raises(ShapeError, match=r"scale and zero must be \[N, K/32\] = \[16, 2\]"):
        kernels.pack_q4(w.q, w.scale, w.zero[:, :1])
    with pytest.raises(ShapeError, match="scales_and_zeros must be"):
        kernels.q4_rows(x, packed, sz[:, :1].contiguous())
    with pytest.raises(ShapeError, match="packed must be uint8"):
        kernels.q4_rows(x[:, :32], packed, sz)
    with pytest.raises(ConfigError, match="groups of 32, got group_size=64"):
        Q4Linear(quantize_int4(torch.randn(16, 128), 64))
    with pytest.raises(RuntimeError, match="isa"):  # the op's own check
        torch.ops.archlab_kernels.q4_rows(x, packed, sz, 7)


def test_layer_shapes_dtypes_chunks_and_fallback(monkeypatch):
    """[..., K] in, [..., N] out in x's dtype; more than 16 rows are cut into calls (each row rounded alone, so equal
    to the bit); without the kernel the layer computes the equation with torch's ops, saying so once."""
    w, x = case(32, 96, 40, seed=5)
    layer = Q4Linear(w, bias=torch.randn(32))
    y = layer(x.reshape(4, 10, 96))
    assert y.shape == (4, 10, 32) and layer(x.bfloat16()).dtype == torch.bfloat16
    assert copy.deepcopy(layer).to(torch.bfloat16).scales_and_zeros.dtype == torch.float32  # the kernel's stay
    rows = torch.cat([layer(x[i : i + 1]) for i in range(40)])
    assert torch.equal(y.reshape(40, 32), rows)
    ref, terms = reference_and_terms(x, w)
    assert ((y.reshape(40, 32).double() - layer.bias.double() - ref).abs() <= 8 * U32 * terms + 1e-6).all()
    monkeypatch.setattr(kernels, "load", lambda: (_ for _ in ()).throw(kernels.KernelUnavailable("test: no build, q4")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        slow = [Q4Linear(w, bias=layer.bias), Q4Linear(w)]
    assert len([s for s in seen if "test: no build, q4" in str(s.message)]) == 1 and slow[0]._isa == 0
    err = (slow[0](x).double() - layer.bias.double() - ref).abs()
    assert (err <= (96 + 2) * U32 * terms + 1e-6).all()


def test_quantize_mode_q4_1_its_report_and_errors():
    """Every block layer a Q4Linear of Q4_1's rule (int4's min/max levels in groups of 32), the head as asked;
    the report names the mode and its int8 activations; a layer the tiles cannot take is refused naming it."""
    model = small_llama()
    float_w = model.decoder.blocks[0].ffn.w2.weight.detach().clone()
    report = quantize(model, "q4_1", head="q8_0")
    assert {r.mode for r in report.layers} == {"q4_1", "q8_0"} and isinstance(model.lm_head, Q8Linear)
    assert "(q4_1, int8 activations)" in str(report).splitlines()[-1]
    layer = model.decoder.blocks[0].ffn.w2
    want = quantize_int4(float_w, 32)
    assert isinstance(layer, Q4Linear) and torch.equal(layer.quantized_weight().q, want.q)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    from archlab.models.llama import Llama, LlamaConfig

    odd = Llama(LlamaConfig(vocab_size=104, max_len=32, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=192))
    with pytest.raises(ConfigError, match=r"layer 'lm_head' \[104, 64\]: q4_1 needs.*divisible by 16"):
        quantize(odd, "q4_1", head="q4_1")
    assert type(odd.lm_head) is torch.nn.Linear  # refused before any change
    with pytest.raises(ConfigError, match="group_size=64: q4_1's blocks are 32 inputs"):
        quantize(small_llama(), "q4_1", group_size=64)
    with pytest.raises(ConfigError, match=r"weights\['decoder.blocks.0.ffn.w2'\] is int4"):
        quantize(small_llama(), "q4_1", weights={"decoder.blocks.0.ffn.w2": quantize_int4(float_w, 64)})


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q4_0])
def test_load_gguf_q4_1_reads_the_files_blocks_as_they_are(tmp_path, kind):
    """load_gguf(quantize="q4_1"): each block layer holds the file's Q4_0 / Q4_1 levels, scales and zeros exactly
    (GGUFFile.int4_weight, the rows of Q and K unpermuted as for int4), the head its Q8_0 blocks; its logits are the
    equation's on those weights."""
    from archlab.models.llama import Llama, LlamaConfig
    from tests.interop.gguf_files import write_llama_gguf

    torch.manual_seed(0)
    source = Llama(LlamaConfig(vocab_size=64, max_len=32, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=128))
    path = write_llama_gguf(tmp_path / "t.gguf", source, linear_kind=kind, head_kind=Q.Q8_0)
    model = load_gguf(path, quantize="q4_1")
    int4 = load_gguf(path, quantize="int4", compute="float32")  # the same levels in PyTorch's / archlab's layout
    w2 = model.decoder.blocks[0].ffn.w2
    assert isinstance(w2, Q4Linear) and isinstance(model.lm_head, Q8Linear)
    file_w = GGUFFile(path).int4_weight("blk.0.ffn_down.weight")
    got = w2.quantized_weight()
    assert all(torch.equal(getattr(got, f), getattr(file_w, f)) for f in ("q", "scale", "zero"))
    if kind == Q.Q4_0:
        assert torch.equal(got.zero, torch.zeros_like(got.zero))
    for name, layer in model.named_modules():
        if isinstance(layer, Q4Linear):
            theirs = int4.get_submodule(name).quantized_weight()
            assert torch.equal(layer.quantized_weight().q, theirs.q)
    assert model.quant_report.head.note.startswith("given: stored quantized")


def test_gguf_test_model_default_head(tmp_path):
    """The q4_1 mode of a file whose head is Q8_0: load_gguf's default head is that Q8_0, as for every mode."""
    model = load_gguf(gguf_llama(tmp_path), quantize="q4_1")
    assert isinstance(model.decoder.blocks[0].attn.out_proj, Q4Linear) and isinstance(model.lm_head, Q8Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_x_is_rounded_as_round_rows_q8_rounds_it(dtype):
    """A weight that copies input n to output n (q - 8 = 1 on the diagonal, 0 elsewhere; s = 1, z = 0) returns d p:
    the kernel's vectorized rounding of x, equal to archlab.kernels.round_rows_q8 to the bit, ties to even and
    blocks of zeros included, for 1 and 16 rows."""
    k = 256
    q = torch.full((k, k), 8, dtype=torch.uint8)
    q.fill_diagonal_(9)
    w = Int4Weight(q, torch.ones(k, k // 32), torch.zeros(k, k // 32), 32)
    packed, sz = kernels.pack_q4(w.q, w.scale, w.zero)
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(16, k, generator=gen) * torch.logspace(-3, 3, 16)[:, None]).to(dtype)
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -126.49]).to(dtype)  # d = 1: ties go to the even level
    x[1, 32:64] = 0.0
    p, d = kernels.round_rows_q8(x)
    want = (p * d.repeat_interleave(32, dim=1)).to(dtype)
    for rows in (x[:1], x):
        for isa in VARIANTS:
            assert torch.equal(torch.ops.archlab_kernels.q4_rows(rows, packed, sz, isa), want[: len(rows)])
