"""GGUF Q4_0/Q4_1 blocks loaded as int4 layers as they are (archlab.interop.gguf.load_gguf(quantize="int4")):
the same values as the file's float decoding, and (Q4_1) the same integers as quantizing those floats."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from archlab.interop.gguf import GGUFFile, load_gguf
from archlab.models.llama import Llama, LlamaConfig
from archlab.quant import Int4Linear, Int8Linear, quantize, quantize_int4, quantize_int8
from tests.interop.gguf_files import write_gguf, write_llama_gguf

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
def test_int4_blocks_equal_the_files_float_values(tmp_path, kind):
    """(q - 8) s + z from the blocks, in float64, equals gguf's own float32 decoding within float32 rounding
    (Q4_1's z = m + 8 d is one float32 rounding). For Q4_1 the integers are also those that quantizing the decoded
    floats gives (its min/max rule is archlab's int4 rule), so loading directly loses nothing either way; for Q4_0
    (symmetric, w = d (q - 8)) requantizing would change the values, loading directly does not."""
    x = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    stored = gguf.quants.quantize(x, kind)
    file = GGUFFile(write_gguf(tmp_path / "t.gguf", {"w": (stored, kind)}))
    weight = file.int4_weight("w")
    floats = file.tensors()["w"].double()  # gguf's decoder
    assert weight.q.shape == (32, 128) and weight.group_size == 32
    assert ((weight.dequantize(torch.float64) - floats).abs() <= 2 * EPS32 * floats.abs().amax()).all()
    if kind == Q.Q4_1:
        again = quantize_int4(file.tensors()["w"], 32)
        assert torch.equal(again.q, weight.q)
        assert torch.allclose(again.scale, weight.scale, rtol=4 * EPS32, atol=0)


def test_f32_tensor_has_no_int4_blocks(tmp_path):
    file = GGUFFile(write_gguf(tmp_path / "t.gguf", {"w": (np.ones((16, 32), np.float32), None)}))
    assert file.int4_weight("w") is None


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
def test_int4_llama_from_blocks_equals_quantized_float_llama(tmp_path, kind):
    """load_gguf(quantize="int4") builds every block layer from the file's blocks (Q/K rows unpermuted, q|k|v and
    gate|up stacked) and the head as int8; its logits equal the float model's (same file) with those dequantized
    weights, within a small multiple of float32 error; with Q4_1 also those of quantize(float model, "int4")."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, max_len=32, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=96,
                         rope_theta=5000.0)  # fmt: skip
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, linear_kind=kind)
    direct = load_gguf(path, quantize="int4", compute="float32")  # the exact equation (bfloat16: tests/test_quant.py)
    report = direct.quant_report
    blocks = [r for r in report.layers if r.name.startswith("decoder.blocks.")]
    assert len(blocks) == 8 and all(r.mode == "int4/g32" and "no float round trip" in r.note for r in blocks)
    assert isinstance(direct.decoder.blocks[0].attn.in_proj, Int4Linear) and isinstance(direct.lm_head, Int8Linear)

    floats = load_gguf(path)  # the file's values decoded to float32: the dequantized weights themselves
    head = quantize_int8(floats.lm_head.weight)  # the head direct has: an int8 copy of the float head
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_twin = copy.deepcopy(floats)
        float_twin.lm_head.weight = torch.nn.Parameter(
            head.dequantize(torch.float64).float()
        )
        ref64 = copy.deepcopy(float_twin).double()(ids)
        plain_err = (float_twin(ids).double() - ref64).abs().max()
        bound = 8 * plain_err + 64 * EPS32 * ref64.abs().max()
        assert (direct(ids).double() - ref64).abs().max() <= bound
        if kind == Q.Q4_1:
            requantized = copy.deepcopy(floats)
            quantize(requantized, "int4", compute="float32")
            assert (requantized(ids).double() - ref64).abs().max() <= bound
