"""archlab GPT against Hugging Face GPT2LMHeadModel: logits, state dicts, folders both ways.

HF models are built from GPT2Config with random weights (no downloads). A larger
``initializer_range`` than GPT-2's 0.02 makes the logits far from uniform, so a wrong mapping or a
wrong activation cannot hide under tiny activations.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.convert import convert
from archlab.interop.gpt2 import (
    archlab_state_from_gpt2,
    config_from_gpt2,
    config_to_gpt2,
    gpt2_state_from_archlab,
    load_gpt2,
    save_gpt2,
)
from archlab.interop.io import load_model, save_model
from archlab.models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # d=60, A=5: d_k = 12, an odd head count
    "d60-A5-L1": dict(vocab_size=97, n_positions=32, n_embd=60, n_layer=1, n_head=5),
    "d48-A4-L2-inner100": dict(vocab_size=101, n_positions=24, n_embd=48, n_layer=2, n_head=4, n_inner=100),
    "d36-A3-L3-relu": dict(vocab_size=50, n_positions=16, n_embd=36, n_layer=3, n_head=3, activation_function="relu"),
    "d32-A2-L2-eps1e-3-gelu": dict(vocab_size=40, n_positions=20, n_embd=32, n_layer=2, n_head=2,
                                   layer_norm_epsilon=1e-3, activation_function="gelu"),
}  # fmt: skip


def hf_gpt2(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(initializer_range=0.2, bos_token_id=0, eos_token_id=1, **overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()


def archlab_from(hf) -> GPT:
    model = GPT(config_from_gpt2(hf.config.to_dict())).eval()
    model.load_state_dict(archlab_state_from_gpt2(hf.state_dict()))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_float32_and_float64(name):
    hf = hf_gpt2(**CONFIGS[name])
    ours = archlab_from(hf)
    n = CONFIGS[name]["n_positions"]
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (3, n))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.std() > 1.0  # far from uniform
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=0)
        hf.double(), ours.double()
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_logits_match_with_padding(dtype, atol):
    hf = hf_gpt2(**CONFIGS["d60-A5-L1"]).to(dtype)
    ours = archlab_from(hf).to(dtype)
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    # HF's forward takes positions as given (generate derives them the same way); archlab derives them from the mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=atol, rtol=0)


def test_state_dict_round_trip_is_exact():
    hf = hf_gpt2(**CONFIGS["d48-A4-L2-inner100"])
    original = hf.state_dict()
    back = gpt2_state_from_archlab(archlab_state_from_gpt2(original))
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    ours = archlab_from(hf)
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert ours.decoder.blocks[0].attn.in_proj.weight.shape == (3 * 48, 48)  # [A(2 d_k + d_v), d]


def test_save_gpt2_loads_in_hugging_face(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=97, max_len=32, d_model=60, n_heads=5, n_layers=2, d_ff=70)).eval()
    save_gpt2(ours, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)
    # and back: the weights survive the trip bit for bit
    again = load_gpt2(tmp_path / "hf")
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_load_gpt2_from_a_hugging_face_folder(tmp_path):
    hf = hf_gpt2(**CONFIGS["d36-A3-L3-relu"])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_gpt2(tmp_path)
    assert not ours.training and ours.config.ffn == "relu" and ours.config.n_layers == 3
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_gpt2model_keys_and_legacy_buffers_are_accepted(tmp_path):
    """Older GPT-2 checkpoints: no ``transformer.`` prefix, causal-mask buffers ``attn.bias``."""
    hf = hf_gpt2(**CONFIGS["d60-A5-L1"])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(legacy, str(tmp_path / "model.safetensors"))
    ours = load_gpt2(tmp_path)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_foreign_folder_is_rejected(tmp_path):
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    bert = transformers.BertModel(config)
    bert.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointError, match="'bert' model.*not 'gpt2'"):
        load_gpt2(tmp_path)


def test_weights_that_do_not_fit_are_named(tmp_path):
    hf = hf_gpt2(**CONFIGS["d48-A4-L2-inner100"])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.c_proj.weight"] = state["transformer.h.0.attn.c_proj.weight"][:, :40].contiguous()
    state["transformer.h.0.extra"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as info:
        load_gpt2(tmp_path)
    message = str(info.value)
    assert "missing keys: transformer.h.1.mlp.c_fc.bias" in message
    assert "unexpected keys: transformer.h.0.extra" in message
    assert "transformer.h.0.attn.c_proj.weight: checkpoint (48, 40) vs model (48, 48)" in message


def test_untied_head_that_differs_from_wte_is_rejected_when_config_ties(tmp_path):
    hf = hf_gpt2(**CONFIGS["d60-A5-L1"])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_gpt2(tmp_path)


def test_untied_model_round_trips(tmp_path):
    hf = hf_gpt2(**CONFIGS["d60-A5-L1"], tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "a", safe_serialization=True)
    ours = load_gpt2(tmp_path / "a")
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.tok_emb.weight
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    save_gpt2(ours, tmp_path / "b")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "b", local_files_only=True).eval()
    assert torch.equal(again.lm_head.weight, hf.lm_head.weight)


def test_config_conversion_round_trip_and_refusals():
    hf = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=60, n_layer=2, n_head=5, n_inner=70).to_dict()
    config = config_from_gpt2(hf)
    assert (config.d_model, config.n_heads, config.n_layers, config.d_ff, config.ffn) == (60, 5, 2, 70, "gelu_tanh")
    assert config_from_gpt2(config_to_gpt2(config)) == config
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        config_from_gpt2({**hf, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(CheckpointError, match="activation_function='quick_gelu'"):
        config_from_gpt2({**hf, "activation_function": "quick_gelu"})
    with pytest.raises(CheckpointError, match="not divisible"):
        config_from_gpt2({**hf, "n_head": 7})
    with pytest.raises(ConfigError, match="positional='learned'.*'rope'"):
        config_to_gpt2(config.replace(positional="rope"))


def test_convert_both_ways(tmp_path):
    hf = hf_gpt2(**CONFIGS["d60-A5-L1"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert convert(tmp_path / "hf", tmp_path / "archlab") == "gpt2 -> archlab"
    assert "class" in json.loads((tmp_path / "archlab" / "config.json").read_text())
    ours = load_model(tmp_path / "archlab").eval()
    assert convert(tmp_path / "archlab", tmp_path / "hf2") == "archlab -> gpt2"
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2", local_files_only=True).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    rope = GPT(GPTConfig(vocab_size=20, max_len=8, d_model=8, n_heads=2, n_layers=1, positional="rope"))
    save_model(rope, tmp_path / "rope")
    with pytest.raises(ConfigError, match="positional='learned'"):
        convert(tmp_path / "rope", tmp_path / "nope")
