"""A quantized model saved (archlab.interop.io.save_model) and loaded back (load_model): the same layers, the same
integers and scales, the same logits to the bit, the report kept; the stored form is the integers and scales, not the
CPU's packed layouts, so a file written under one kernel choice loads under another. Broken files: CheckpointError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from archlab.errors import CheckpointError
from archlab.interop.io import QUANT_FILE, QUANT_METADATA, WEIGHTS_FILE, load_model, save_model
from archlab.models.llama import Llama, LlamaConfig
from archlab.quant import int4_kernel_choice, quantize, quantized_layers


def small_llama(**kw) -> Llama:
    """Every layer's K a multiple of 64 and N of 16: each kernel takes it (int4's, int8's nibbles, Q8_0's tiles)."""
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=256, max_len=128, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
                             d_ff=192, rope_theta=10000.0, **kw)).eval()  # fmt: skip


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def same_weights(a, b) -> bool:
    wa, wb = a.quantized_weight(), b.quantized_weight()
    return all(torch.equal(getattr(wa, f), getattr(wb, f)) for f in ("q", "scale", "zero") if hasattr(wa, f))


@pytest.mark.parametrize("mode, head", [("int8", "int8"), ("int4", "q8_0"), ("q8_0", "q8_0"), ("int4", None),
                                        ("int8-dynamic", "int8-dynamic"), ("q4_1", "q8_0"), ("q4_1", "q4_1")])  # fmt: skip
def test_a_quantized_model_loads_back_with_the_same_logits(tmp_path, mode, head):
    model = small_llama()
    smooth = {"calibration": IDS} if mode == "int8-dynamic" else {}
    report = quantize(model, mode, head=head, **smooth)
    save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / QUANT_FILE).is_file()
    loaded = load_model(tmp_path / "m").eval()
    with torch.inference_mode():
        assert torch.equal(loaded(IDS), model(IDS))
    before, after = quantized_layers(model), quantized_layers(loaded)
    assert list(after) == list(before) and all(type(after[n]) is type(before[n]) for n in before)
    assert all(same_weights(before[n], after[n]) and after[n].logits == getattr(before[n], "logits", False)
               for n in before if hasattr(before[n], "logits"))  # fmt: skip
    assert str(loaded.quant_report) == str(report)
    floats = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{n}." for n in before))}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in floats.items())  # embedding, norms: as they were


def test_the_file_holds_integers_and_scales_not_a_cpu_layout_and_loads_under_another_kernel(tmp_path, monkeypatch):
    """int4 and int8 saved with PyTorch's kernels (``ARCHLAB_INT4_KERNEL=aten``: its opaque packing) load on the
    default choice with the same integers and scales, read back exactly from either layout."""
    model = small_llama()
    with int4_kernel_choice("aten"):
        quantize(model, "int4", head="int8")
    save_model(model, tmp_path / "m")
    stored = load_file(str(tmp_path / "m" / QUANT_FILE))
    name = "decoder.blocks.0.attn.in_proj"
    q = quantized_layers(model)[name].quantized_weight().q  # [128, 64] levels 0..15: two a byte in the file
    assert torch.equal(stored[f"{name}.q"], q[:, 0::2] | q[:, 1::2] << 4) and stored["lm_head.q"].dtype == torch.int8
    loaded = load_model(tmp_path / "m").eval()
    before, after = quantized_layers(model), quantized_layers(loaded)
    assert all(same_weights(before[n], after[n]) for n in before)
    with torch.inference_mode():  # the same weights, on another kernel where the CPU has archlab's: within bf16's
        got, want = loaded(IDS), model(IDS)  # rounding of the products
    assert ((got - want).norm() / want.norm()) < 0.02


def saved(folder, mode: str):
    """``small_llama()`` quantized in ``mode`` and saved in ``folder``: the path of its quantized file and its tensors."""
    model = small_llama()
    quantize(model, mode)
    save_model(model, folder)
    return folder / QUANT_FILE, load_file(str(folder / QUANT_FILE))


def test_broken_quantized_files_are_checkpoint_errors(tmp_path):
    quant, tensors = saved(tmp_path / "m", "int8")
    quant.unlink()
    with pytest.raises(CheckpointError, match="quantized.safetensors is missing"):
        load_model(tmp_path / "m")
    del tensors["decoder.blocks.0.ffn.w2.scale"]
    save_file(tensors, str(quant))
    with pytest.raises(CheckpointError, match=r"'decoder.blocks.0.ffn.w2' has no stored 'scale'"):
        load_model(tmp_path / "m")
    tensors["decoder.blocks.0.ffn.w2.scale"] = torch.ones(3)
    save_file(tensors, str(quant))
    with pytest.raises(CheckpointError, match=r"'decoder.blocks.0.ffn.w2' \(int8\) has scales \(3,\) for q "
                                              r"\(64, 192\); it needs \(64,\)"):
        load_model(tmp_path / "m")
    tensors["decoder.blocks.0.ffn.w2.scale"] = torch.ones(64)
    tensors["decoder.blocks.0.ffn.w2.q"] = torch.zeros(64, 96, dtype=torch.int8)
    save_file(tensors, str(quant))
    with pytest.raises(CheckpointError, match=r"'decoder.blocks.0.ffn.w2' \(int8, q \(64, 96\)\) does not fit"):
        load_model(tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    with safe_open(str(weights), "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(weights), metadata={**metadata, QUANT_METADATA: json.dumps({"layers": [{"mode": "int8"}]})})
    with pytest.raises(CheckpointError, match="quantized layers .* are unreadable"):
        load_model(tmp_path / "m")


def test_convert_quantize_writes_a_quantized_archlab_folder(tmp_path, capsys):
    """``archlab convert SRC DST --quantize MODE``: an archlab (or Hugging Face, or .gguf) model written quantized,
    which load_model reads back as quantize() leaves it; a Hugging Face folder from a quantized one is refused."""
    from archlab.cli import main

    save_model(small_llama(), tmp_path / "float")
    assert main(["convert", str(tmp_path / "float"), str(tmp_path / "int4"), "--quantize", "int4"]) == 0
    assert "archlab -> archlab, quantized: 9 of 9 linear layers quantized (int4" in capsys.readouterr().out
    by_hand = small_llama()
    quantize(by_hand, "int4")
    loaded = load_model(tmp_path / "int4").eval()
    with torch.inference_mode():
        assert torch.equal(loaded(IDS), by_hand(IDS))
    assert main(["convert", str(tmp_path / "int4"), str(tmp_path / "hf")]) == 2
    assert "holds a quantized model (int4); a Hugging Face folder holds float weights" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert main(["convert", str(tmp_path / "float"), str(tmp_path / "x"), "--quantize", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_int4_zeros_that_do_not_fit_are_a_checkpoint_error(tmp_path):
    quant, tensors = saved(tmp_path / "m", "int4")
    tensors["decoder.blocks.1.attn.out_proj.zero"] = tensors["decoder.blocks.1.attn.out_proj.zero"][:, :1].clone()
    save_file(tensors, str(quant))
    with pytest.raises(CheckpointError, match=r"'decoder.blocks.1.attn.out_proj' \(int4\) cannot be rebuilt"):
        load_model(tmp_path / "m")
