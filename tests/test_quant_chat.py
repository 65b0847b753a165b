"""Quantized chat models: load_chat_model(quantize=) and `archlab chat / generate --model ... --quantize`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from archlab.chat import Chat, load_chat_model
from archlab.cli import main
from archlab.errors import ConfigError
from archlab.generation import generate
from archlab.quant import Int4Linear, Int8Linear

sys.path.insert(0, str(Path(__file__).parent / "interop"))
from gguf_files import write_tiny_chat_gguf  # noqa: E402


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """A random tiny chat Llama whose widths the int4 kernel takes (K divisible by 32, N by 16)."""
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    return write_tiny_chat_gguf(tmp_path / "tiny.gguf", d_ff=64)


@pytest.mark.parametrize("mode, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_quantized_chat_model_replies_as_its_greedy_decoding(tiny_gguf, mode, layer, use_cache):
    """Every block layer is quantized (the head int8), the report is kept, and Chat's streamed reply (KV cache,
    the LM head not packed: it is not an nn.Linear) equals greedy decoding of the quantized model."""
    model, tok = load_chat_model(tiny_gguf, quantize=mode, use_cache=use_cache)
    assert isinstance(model.decoder.blocks[1].ffn.w2, layer) and isinstance(model.lm_head, Int8Linear)
    assert len(model.quant_report.quantized) == 9 and model.new_cache().output is None
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    out = generate(model, torch.tensor([ids]), max_new_tokens=8, stop_tokens=[tok.eos_id], pad_id=tok.eos_id)
    expected = out[0, len(ids):].tolist()
    expected = expected[: expected.index(tok.eos_id)] if tok.eos_id in expected else expected
    assert Chat(model, tok, max_new_tokens=8).reply("hello") == tok.decode(expected)


def test_cli_quantize_option(tiny_gguf, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--model", str(tiny_gguf), "--json", "--max-new-tokens", "6", "--quantize", "int4"]) == 0
    out, err = capsys.readouterr()
    assert "9 of 9 linear layers quantized (int4, group_size=32, bfloat16 activations)" in err
    model, tok = load_chat_model(tiny_gguf, quantize="int4")
    assert json.loads(out)["assistant"] == Chat(model, tok, max_new_tokens=6).reply("hello")
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "hi", "--max-new-tokens", "4", "--json",
                 "--quantize", "int8"]) == 0  # fmt: skip
    assert "quantized (int8, bfloat16 activations)" in capsys.readouterr().err
    assert main(["generate", "some-run", "--prompt", "hi", "--quantize", "int8"]) == 2
    assert "--quantize int8 goes with --model" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_gguf), "--quantize", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="quantize='int3'"):
        load_chat_model(tiny_gguf, quantize="int3")
    with pytest.raises(ConfigError, match=r"layer 'lm_head' \[104, 32\]: q8_0 needs out_features divisible by 16"):
        load_chat_model(tiny_gguf, quantize="q8_0")  # q8_0 puts the head on Q8_0 too: this vocabulary is 104


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_files_q8_0_head_is_the_chat_models_head_with_or_without_the_cache(tmp_path, monkeypatch, mode):
    """A GGUF file whose head is stored in Q8_0: the chat model's head is that head as stored (load_gguf's default),
    also through the cache, which holds the floats; the two models answer alike."""
    import gguf

    from archlab.quant import Q8Linear

    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    path = write_tiny_chat_gguf(tmp_path / "q8head.gguf", d_ff=64, head_kind=gguf.GGMLQuantizationType.Q8_0)
    cached, tok = load_chat_model(path, quantize=mode)
    direct, _ = load_chat_model(path, quantize=mode, use_cache=False)
    for model in (cached, direct):
        assert isinstance(model.lm_head, Q8Linear) and model.quant_report.head.note.startswith("given")
        assert "lm_head q8_0" in str(model.quant_report).splitlines()[-1]
    for a, b in zip(vars(cached.lm_head.weight()).values(), vars(direct.lm_head.weight()).values()):
        assert torch.equal(a, b)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)])
    assert torch.equal(generate(cached, ids, max_new_tokens=8), generate(direct, ids, max_new_tokens=8))
    floats = write_tiny_chat_gguf(tmp_path / "f32.gguf", d_ff=64)  # a float head: the int8 head, cached or not
    assert all(isinstance(load_chat_model(floats, quantize=mode, use_cache=c)[0].lm_head, Int8Linear) for c in (True, False))


@pytest.mark.parametrize("use_cache", [True, False])
def test_int8_dynamic_chat_model_is_smoothed_on_the_calibration_text(tiny_gguf, use_cache):
    """quantize="int8-dynamic" smooths every dynamic layer on calibration_ids (unsmoothed layers lose 11.7% on
    SmolLM2): the same layers as quantizing the float model with that calibration by hand."""
    from archlab.quant import DynamicInt8Linear, calibration_ids, quantize

    model, tok = load_chat_model(tiny_gguf, quantize="int8-dynamic", use_cache=use_cache)
    by_hand = load_chat_model(tiny_gguf, precision="fp32")[0].float()
    quantize(by_hand, "int8-dynamic", calibration=calibration_ids(tok))
    layers = dict(model.named_modules())
    dynamic = [(name, m) for name, m in by_hand.named_modules() if isinstance(m, DynamicInt8Linear)]
    assert len(dynamic) == 8  # the head is int8 (quantize's default)
    for name, expected in dynamic:  # smoothed, 1/s folded into the weights before each layer but out_proj (GQA)
        if name.endswith("out_proj"):
            torch.testing.assert_close(layers[name].inv_smooth, expected.inv_smooth)
        else:
            assert layers[name].inv_smooth is None and expected.inv_smooth is None
        assert torch.equal(layers[name].weight().q, expected.weight().q)
        torch.testing.assert_close(layers[name].weight().scale, expected.weight().scale)
    gains = {n: p for n, p in by_hand.named_parameters() if n.endswith("norm.weight")}
    assert len(gains) == 5 and not torch.all(gains["decoder.blocks.0.attn_norm.weight"] == 1)
    for name, gain in gains.items():
        torch.testing.assert_close(model.get_parameter(name), gain)
    reference = load_chat_model(tiny_gguf, precision="fp32")[0].float()
    assert not torch.allclose(model.get_parameter("decoder.blocks.0.attn_norm.weight"),
                              reference.get_parameter("decoder.blocks.0.attn_norm.weight"))  # fmt: skip
    with pytest.raises(ConfigError, match="windows=0"):
        calibration_ids(tok, windows=0)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic", "q8_0", "q4_1"])
def test_a_quantized_model_is_kept_in_the_cache_and_read_back(tmp_path, monkeypatch, mode):
    """The first start quantizes and keeps the model in the cache (its integers and scales, beside the converted
    floats); the next reads it without quantizing (or reading the GGUF file's head): the same layers, report and
    logits to the bit. A copy made by other quantization code (another key) is removed when a new one is kept;
    use_cache=False keeps nothing."""
    import gguf

    import archlab.quant
    from archlab.chat import kept_quantized
    from archlab.interop.pretrained import archlab_folder

    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    path = write_tiny_chat_gguf(tmp_path / "q8head.gguf", d_ff=64, head_kind=gguf.GGMLQuantizationType.Q8_0)
    load_chat_model(path, quantize=mode, use_cache=False)
    assert not (tmp_path / "cache").exists()
    stale = kept_quantized(archlab_folder(path), mode).with_name(f"{mode}-0123456789abcdef")
    other = stale.with_name(f"{'int8-dynamic' if mode == 'int8' else 'int8'}-0123456789abcdef")  # another mode's
    stale.mkdir(parents=True)
    other.mkdir()
    first, tok = load_chat_model(path, quantize=mode)
    kept = kept_quantized(archlab_folder(path), mode)
    assert (kept / "quantized.safetensors").is_file() and not stale.exists() and other.is_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("quantized again: the kept copy was not read")

    monkeypatch.setattr(archlab.quant, "quantize", refuse)
    monkeypatch.setattr("archlab.interop.gguf.GGUFFile", refuse)
    again, tok_again = load_chat_model(path, quantize=mode)
    assert str(again.quant_report) == str(first.quant_report)
    assert [type(m) for m in again.modules()] == [type(m) for m in first.modules()]
    message = [{"role": "user", "content": "hello"}]
    ids = torch.tensor([tok.apply_chat_template(message, add_generation_prompt=True)])
    assert tok_again.apply_chat_template(message, add_generation_prompt=True) == ids[0].tolist()
    with torch.inference_mode():
        assert torch.equal(first(ids), again(ids))
    other = load_chat_model(path, precision="fp32")[0]  # the floats: the converted folder as ever
    assert not archlab.quant.quantized_layers(other)
