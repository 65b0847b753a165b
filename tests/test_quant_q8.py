"""archlab's Q8_0 kernel (llama.cpp's Q8_0 x Q8_0, archlab.kernels.q8_rows) and its layer (archlab.quant.Q8Linear):
the kernel against the float64 value of its equation, both variants equal to the bit, x rounded as documented, rows
independent of the batch, the layout, the errors, the layer's fallback, quantize(mode / head="q8_0"), GGUF Q8_0
blocks read as they are, and torch.compile."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from archlab import kernels
from archlab.errors import ConfigError, ShapeError
from archlab.hardware import cpu_features, kernel_capability
from archlab.interop.gguf import GGUFFile, load_gguf
from archlab.models.llama import Llama, LlamaConfig
from archlab.quant import DynamicInt8Linear, Int4Linear, Int8Linear, Q8Linear, Q8Weight, quantize, quantize_q8_0
from tests.interop.gguf_files import write_gguf, write_llama_gguf
from tests.test_quant_kernel import built  # noqa: F401  (autouse: the library built, or the module skipped saying why)

U32, U_BF16 = 2.0**-24, 2.0**-8
VARIANTS = [256] + ([512] if kernel_capability() == "AVX512" and cpu_features()["vnni"] else [])



def case(n: int, k: int, m: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = quantize_q8_0(torch.randn(n, k, generator=gen) * 0.05)
    w.scale[0, 0] = 0.0  # a zero block scale
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :32] = 0.0  # an all-zero block of x: d = 0
    return w, x


def reference_and_terms(x: torch.Tensor, w: Q8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The equation in float64, and sum_b |s d dot| (what the float32 error is bounded by)."""
    p, d = kernels.round_rows_q8(x)
    m, k = x.shape
    dots = torch.einsum("mbk,nbk->mnb", p.double().reshape(m, -1, 32), w.q.double().reshape(w.q.shape[0], -1, 32))
    terms = dots * w.scale.double()[None] * d.double()[:, None]
    return terms.sum(-1), terms.abs().sum(-1)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n, k", [(16, 32), (48, 96), (64, 576)])
def test_q8_rows_equal_the_float64_equation_within_float32_rounding(isa, n, k):
    """Each block's integer sum is exact; y adds K/32 terms s d dot, each rounded twice (s d, the FMA): the
    error is at most (K/32 + 2) u sum_b |s d dot|, plus bfloat16's rounding of y where x is bfloat16."""
    for m in (1, 2, 3, 16):
        w, x = case(n, k, m, seed=m)
        packed, scales = kernels.pack_q8(w.q, w.scale)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            ref, terms = reference_and_terms(xd, w)
            y = torch.ops.archlab_kernels.q8_rows(xd, packed, scales, isa)
            assert y.dtype == dtype and y.shape == (m, n)
            tol = (k // 32 + 2) * U32 * terms + (U_BF16 * ref.abs() if dtype == torch.bfloat16 else 0)
            err = (y.double() - ref).abs()
            assert (err <= tol).all(), f"m={m} {dtype}: worst err/tol {(err / tol).max():.3g}"


def test_both_variants_and_any_batch_give_one_result_to_the_bit():
    """AVX512-VNNI and AVX2 compute the same integers and add them in one order; a row's result does not depend on
    the rows beside it (each row rounded alone), so batched decoding equals one row at a time exactly."""
    w, x = case(64, 576, 7, seed=3)
    packed, scales = kernels.pack_q8(w.q, w.scale)
    ys = [torch.ops.archlab_kernels.q8_rows(x, packed, scales, isa) for isa in (256, 512)[: len(VARIANTS)]]
    assert all(torch.equal(ys[0], y) for y in ys)
    alone = torch.cat([kernels.q8_rows(x[i : i + 1], packed, scales) for i in range(7)])
    assert torch.equal(kernels.q8_rows(x, packed, scales), alone)


def test_x_is_rounded_per_block_half_to_even_as_documented():
    """A weight that copies input n to output n (q = 1, s = 1) returns d p: the kernel's rounding of x itself."""
    w = Q8Weight(torch.eye(32, dtype=torch.int8), torch.ones(32, 1))
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -126.49])  # d = 1: ties go to the even level
    y = kernels.q8_rows(x, *kernels.pack_q8(w.q, w.scale))
    assert y[0, :6].tolist() == [127.0, 2.0, -4.0, 0.0, 2.0, -126.0]
    p, d = kernels.round_rows_q8(x)
    assert torch.equal(y, p * d)


def test_pack_layout_and_weight_read_back():
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    s = torch.rand(32, 2)
    packed, scales = kernels.pack_q8(q, s)
    assert packed.shape == (32, 64) and scales.shape == (2, 2, 16)
    line = packed.reshape(2, 16, 16, 4)[1, 3]  # tile 1, inputs 12..15: the tile's 16 rows x 4 bytes
    assert torch.equal(line.to(torch.int16) - 128, q[16:32, 12:16].to(torch.int16))
    assert torch.equal(scales[0, 1], s[:16, 1])
    layer = Q8Linear(Q8Weight(q, s))
    assert torch.equal(layer.weight().q, q) and torch.equal(layer.weight().scale, s)


def test_bad_arguments_raise_archlab_errors_before_the_call():
    w, x = case(16, 64, 1)
    packed, scales = kernels.pack_q8(w.q, w.scale)
    with pytest.raises(ShapeError, match="M in 1..16"):
        kernels.q8_rows(x.repeat(17, 1), packed, scales)
    with pytest.raises(ShapeError, match="float32 or bfloat16"):
        kernels.q8_rows(x.half(), packed, scales)
    with pytest.raises(ShapeError, match=r"multiple of 16.*\[24, 64\]"):
        kernels.pack_q8(torch.zeros(24, 64, dtype=torch.int8), torch.ones(24, 2))
    with pytest.raises(ShapeError, match="scales must be"):
        kernels.q8_rows(x, packed, scales[:, :1].contiguous())
    with pytest.raises(ShapeError, match="in_features divisible by 32"):
        quantize_q8_0(torch.ones(16, 40))
    with pytest.raises(RuntimeError, match="isa"):  # the op's own check
        torch.ops.archlab_kernels.q8_rows(x, packed, scales, 7)


def test_quantize_q8_0_gives_back_a_q8_0_matrix_as_it_was():
    w = quantize_q8_0(torch.randn(16, 64))
    again = quantize_q8_0(w.dequantize())
    assert torch.equal(again.q, w.q) and torch.equal(again.scale, w.scale)
    assert w.q.abs().amax(dim=1).eq(127).all()


def test_layer_shapes_dtypes_chunks_and_fallback(monkeypatch):
    """[..., K] in, [..., N] out in x's dtype; more than 16 rows are cut into calls (each row rounded alone, so
    equal to the bit); without the kernel the layer computes the equation with torch's ops, saying so once."""
    w, x = case(32, 96, 40, seed=5)
    layer = Q8Linear(w, bias=torch.randn(32))
    y = layer(x.reshape(4, 10, 96))
    assert y.shape == (4, 10, 32) and layer(x.bfloat16()).dtype == torch.bfloat16
    rows = torch.cat([layer(x[i : i + 1]) for i in range(40)])
    assert torch.equal(y.reshape(40, 32), rows)
    ref, terms = reference_and_terms(x, w)
    monkeypatch.setattr(kernels, "load", lambda: (_ for _ in ()).throw(kernels.KernelUnavailable("test: no build")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        slow = [Q8Linear(w, bias=layer.bias), Q8Linear(w)]
    assert len([s for s in seen if "test: no build" in str(s.message)]) == 1 and slow[0]._isa == 0
    err = (slow[0](x).double() - layer.bias.double() - ref).abs()
    assert (err <= (96 + 2) * U32 * terms + 1e-6).all()


def small_llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=256, max_len=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
                             d_ff=192, rope_theta=10000.0)).eval()  # fmt: skip


def test_quantize_mode_and_head_q8_0_and_their_errors():
    model = small_llama()
    report = quantize(model, "int4", head="q8_0")
    head = {r.name: r for r in report.layers}["lm_head"]
    assert head.mode == "q8_0" and head.bytes_after == 256 * 64 + 4 * 256 * 2 and "tok_emb.weight" in head.note
    assert isinstance(model.lm_head, Q8Linear)
    every = small_llama()
    assert all(r.mode == "q8_0" for r in quantize(every, "q8_0").layers[:-1])
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(every(ids)).all()
    odd = Llama(LlamaConfig(vocab_size=104, max_len=32, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=192))
    with pytest.raises(ConfigError, match=r"layer 'lm_head' \[104, 64\].*divisible by 16"):
        quantize(odd, "int4", head="q8_0")
    assert type(odd.lm_head) is torch.nn.Linear  # refused before any change



@pytest.mark.parametrize("head", ["q8_0", "int4", "int8"])
def test_a_quantized_lm_head_gives_float32_logits_where_it_computes_in_bfloat16(head):
    """quantize() marks the layer that replaces a ``Linear(head=True)`` (``logits``): computing in bfloat16 it returns
    float32 logits, the model's too; where archlab's kernel computes the head (Q8_0 at any rows, int4 at one row) they
    are the kernel's float32 sums, which rounded give the bfloat16 result to the bit (so they carry more than it);
    PyTorch's kernels' bfloat16 result is widened. The other layers keep their dtype."""
    model = small_llama()
    quantize(model, "int4", head=head)
    marked = [name for name, m in model.named_modules() if getattr(m, "logits", False)]
    assert marked == ["lm_head"]
    model = model.to(torch.bfloat16)
    layer = model.lm_head
    assert head != "q8_0" or layer.scales.dtype == torch.float32  # .to() leaves the kernel's float32 scales
    h = torch.randn(17, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        assert model(torch.randint(0, 256, (2, 7))).dtype == torch.float32
        assert model.decoder.blocks[0].ffn.w2(torch.randn(3, 192).bfloat16()).dtype == torch.bfloat16
        for rows in (h[:1], h):  # one row (a decoding step) and 17 (a prompt: Q8_0 in two kernel calls)
            logits = layer(rows)
            layer.logits = False
            rounded = layer(rows)
            layer.logits = True
            assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
            assert torch.equal(logits.bfloat16(), rounded)
            on_kernel = head == "q8_0" and layer._isa or head == "int4" and layer.kernel == "archlab" and len(rows) == 1
            if on_kernel:
                assert not torch.equal(logits, rounded.float())  # the sums, not the rounded values


def test_gguf_q8_0_blocks_are_read_as_they_are(tmp_path):
    """GGUFFile.q8_weight: d q equals gguf's own float decoding exactly (float16 d times an int8), and quantizing
    those floats again gives the same integers and scales; -128 (outside -127..127) is refused naming the tensor."""
    x = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    stored = gguf.quants.quantize(x, Q.Q8_0)
    bad = stored.copy()
    bad.reshape(-1, 34)[0, 2] = 0x80  # block 0, value 0: -128
    file = GGUFFile(write_gguf(tmp_path / "t.gguf", {"w": (stored, Q.Q8_0), "bad": (bad, Q.Q8_0),
                                                     "f": (x, None)}))  # fmt: skip
    w = file.q8_weight("w")
    assert torch.equal(w.dequantize(), file.tensors()["w"]) and file.q8_weight("f") is None
    again = quantize_q8_0(file.tensors()["w"])
    assert torch.equal(again.q, w.q) and torch.equal(again.scale, w.scale)
    from archlab.errors import CheckpointError

    with pytest.raises(CheckpointError, match="'bad'.*-128"):
        file.q8_weight("bad")


def gguf_llama(tmp_path, vocab: int = 64, tie: bool = True, head_kind=Q.Q8_0, name: str = "tiny.gguf"):
    """A tiny Llama as llama.cpp writes it: block layers Q4_1, the head (the tied embedding) in ``head_kind``."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=vocab, max_len=32, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1,
                              d_ff=128, tie_embeddings=tie))  # fmt: skip
    return write_llama_gguf(tmp_path / name, model, linear_kind=Q.Q4_1, head_kind=head_kind)


@pytest.mark.parametrize("mode, layer", [("int8", Int8Linear), ("int4", Int4Linear),
                                         ("int8-dynamic", DynamicInt8Linear), ("q8_0", Q8Linear)])  # fmt: skip
def test_load_gguf_takes_the_files_q8_0_head_by_default(tmp_path, mode, layer):
    """load_gguf(quantize=any mode): a head the file stores in Q8_0 is a Q8Linear of those blocks as they are (the
    tied embedding's), the same model as head="q8_0"; the report says so in the head's row and, where the head's
    kind is not the mode's, in the summary line. An explicit head= wins; skip= and quantize=None leave it float."""
    path = gguf_llama(tmp_path)
    stored = GGUFFile(path).q8_weight("token_embd.weight")
    model = load_gguf(path, quantize=mode)
    assert isinstance(model.decoder.blocks[0].ffn.w2, layer) and isinstance(model.lm_head, Q8Linear)
    assert torch.equal(model.lm_head.weight().q, stored.q) and torch.equal(model.lm_head.weight().scale, stored.scale)
    report = model.quant_report
    assert report.head.mode == "q8_0" and report.head.note.startswith("given: stored quantized")
    summary = str(report).splitlines()[-1]
    if mode == "q8_0":
        assert "lm_head" not in summary
    else:
        activations = "" if mode == "int8-dynamic" else "int8 activations, "
        assert f" activations); lm_head q8_0 ({activations}stored quantized); their weights" in summary
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), load_gguf(path, quantize=mode, head="q8_0")(ids))
    explicit = load_gguf(path, quantize=mode, head="int8")
    assert isinstance(explicit.lm_head, Int8Linear) and explicit.quant_report.head.mode == "int8"
    assert "given" not in explicit.quant_report.head.note
    for options in ({"head": None}, {"skip": ("lm_head",)}, {"skip": "lm_*"}):
        kept = load_gguf(path, quantize=mode, **options)
        assert type(kept.lm_head) is torch.nn.Linear and kept.quant_report.head.mode == "float"
        assert "; lm_head float; their weights" in str(kept.quant_report)


def test_load_gguf_head_default_elsewhere_is_default_head(tmp_path):
    """The default head is DEFAULT_HEAD (int8) where the file's head is not Q8_0 (head="q8_0" then quantizes its
    floats) and where the vocabulary is no multiple of 16 (the kernel's tiles; head="q8_0" is then refused naming
    the layer); an untied Q8_0 output.weight is read as stored; without quantize= the model is float."""
    floats = load_gguf(gguf_llama(tmp_path, head_kind=None, name="f32.gguf"), quantize="int4")
    assert isinstance(floats.lm_head, Int8Linear) and floats.quant_report.head.mode == "int8"
    assert "; lm_head int8; their weights" in str(floats.quant_report)
    q8_head = load_gguf(gguf_llama(tmp_path, head_kind=None, name="f32.gguf"), quantize="int4", head="q8_0")
    assert isinstance(q8_head.lm_head, Q8Linear) and "given" not in q8_head.quant_report.head.note  # from the floats
    untied = gguf_llama(tmp_path, tie=False, name="untied.gguf")
    assert isinstance(load_gguf(untied, quantize="int4").lm_head, Q8Linear)
    odd = gguf_llama(tmp_path, vocab=104, name="odd.gguf")
    assert GGUFFile(odd).q8_weight("token_embd.weight") is not None
    assert isinstance(load_gguf(odd, quantize="int4").lm_head, Int8Linear)
    with pytest.raises(ConfigError, match=r"layer 'lm_head' \[104, 64\].*divisible by 16"):
        load_gguf(odd, quantize="int4", head="q8_0")
    plain = load_gguf(gguf_llama(tmp_path, name="plain.gguf"))
    assert type(plain.lm_head) is torch.nn.Linear and not hasattr(plain, "quant_report")


@pytest.mark.parametrize("mode", ["int4", "q4_1"])
def test_compiled_step_keeps_the_op_and_equals_eager(mode):
    """The Q8_0 head (and q4_1's Q4 layers) traced through their fake implementations: the compiled step's tokens
    are eager's."""
    from archlab.generation import generate
    from archlab.static_decoding import StaticDecoder

    model = small_llama()
    quantize(model, mode, head="q8_0")
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager = generate(model, prompt, max_new_tokens=6)
        compiled = generate(StaticDecoder(model, max_len=11, compile=True), prompt, max_new_tokens=6)
    assert torch.equal(eager, compiled)
