"""archlab RWKV against Hugging Face RwkvForCausalLM: logits (parallel and token by token with state),
state dicts, configs and folders both ways.

HF models are built from RwkvConfig with random weights (no downloads), then every parameter is
redrawn: HF's init sets time_first to ones and the embeddings near zero, which would let a wrong
mapping hide. HF's CPU WKV is a loop over tokens; archlab's parallel mode is chunked, so float32
results agree to rounding (1e-5). In float64 HF still casts the keys to float32 inside its WKV
(``key[:, t].float()``), which bounds the agreement near 1e-7; archlab's own float64 modes agree
to 1e-12 (tests/models/test_rwkv.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.convert import convert
from archlab.interop.io import load_model, save_model
from archlab.interop.rwkv import (
    archlab_state_from_rwkv,
    config_from_rwkv,
    config_to_rwkv,
    load_rwkv,
    rwkv_state_from_archlab,
    save_rwkv,
)
from archlab.models.rwkv import RWKV, RWKVConfig

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "d16-L3-att12-ff40": dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, attention_hidden_size=12,
                              intermediate_size=40),
    "d32-L2": dict(vocab_size=61, hidden_size=32, num_hidden_layers=2),
    "d24-L4-ff64": dict(vocab_size=40, hidden_size=24, num_hidden_layers=4, intermediate_size=64),
}  # fmt: skip


def hf_rwkv(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(context_length=64, rescale_every=0, **overrides)
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(**settings)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("time_decay", "time_first")):
                p.normal_(0.0, 1.0)
            elif "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif "embeddings" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
            else:  # LayerNorms
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return hf


def archlab_from(hf) -> RWKV:
    model = RWKV(config_from_rwkv(hf.config.to_dict())).eval()
    model.load_state_dict(archlab_state_from_rwkv(hf.state_dict()))
    return model


def assert_as_close_as_hf(ours32: torch.Tensor, hf32: torch.Tensor, hf64: torch.Tensor, what: str) -> None:
    """archlab's float32 result is as close to HF's float64 one as HF's own float32 result is: within twice
    HF's float32 error, plus one float32 epsilon of the largest value (HF's float64 run casts its keys to
    float32). The fast-path-vs-fp64 criterion: the bound follows each CPU's rounding, not one machine's."""
    assert hf64.dtype == torch.float64 and ours32.dtype == hf32.dtype == torch.float32, what
    hf_error = (hf32.double() - hf64).abs().max()
    our_error = (ours32.double() - hf64).abs().max()
    bound = 2 * hf_error + torch.finfo(torch.float32).eps * hf64.abs().max()
    assert our_error <= bound, f"{what}: archlab float32 error {our_error:.2e} > {bound:.2e} (HF float32: {hf_error:.2e})"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_float32_and_float64(name):
    hf = hf_rwkv(**CONFIGS[name])
    ours = archlab_from(hf)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (3, 50))
    with torch.no_grad():
        hf32 = hf(ids, use_cache=False).logits
        assert hf32.std() > 1.0  # far from uniform
        parallel, recurrent = ours(ids), ours(ids, mode="recurrent")
        hf.double(), ours.double()
        hf64 = hf(ids, use_cache=False).logits
        assert_as_close_as_hf(parallel, hf32, hf64, "parallel")
        assert_as_close_as_hf(recurrent, hf32, hf64, "recurrent")
        torch.testing.assert_close(ours(ids), hf64, atol=2e-6, rtol=0)


def stateful_run(hf, ours, ids):
    """Both models fed a 7-token prompt at once, then one token at a time, each carrying its state. Per
    model: the logits of every step [B, n, V] and the last layer's token-shift states [B, d]."""
    with torch.no_grad():
        hf_state, state, hf_logits, logits = None, ours.new_cache(), [], []
        for s, e in [(0, 7)] + [(t, t + 1) for t in range(7, ids.shape[1])]:
            out = hf(ids[:, s:e], state=hf_state, use_cache=True)
            hf_state = out.state
            hf_logits.append(out.logits)
            logits.append(ours(ids[:, s:e], state=state))
    last = state.layers[-1]  # HF's state layout: [B, d, L] per component (ffn shift, att shift, a, b, p)
    return (
        {"logits": torch.cat(hf_logits, 1), "att_shift": hf_state[1][:, :, -1], "ffn_shift": hf_state[0][:, :, -1]},
        {"logits": torch.cat(logits, 1), "att_shift": last.att_shift, "ffn_shift": last.ffn_shift},
    )


def test_token_by_token_with_state_matches_hf_state():
    """Logits of every step and the last layer's token-shift states: float32 as close to HF's float64 run as
    HF's own float32 run is (:func:`assert_as_close_as_hf`)."""
    # Batch 1 and d_att = d: HF's stateful mode (transformers 5.23) sizes the WKV state by hidden_size,
    # and with one new token it broadcasts a [B, d] shift against [B, 1, d], which is right only for B = 1.
    hf = hf_rwkv(**CONFIGS["d24-L4-ff64"])
    ours = archlab_from(hf)
    ids = torch.randint(0, 40, (1, 20))
    hf32, ours32 = stateful_run(hf, ours, ids)
    hf64, _ = stateful_run(copy.deepcopy(hf).double(), copy.deepcopy(ours).double(), ids)
    for name, reference in hf64.items():
        assert_as_close_as_hf(ours32[name], hf32[name], reference, name)


def test_hf_rescaling_changes_the_function_only_through_layernorm_epsilon():
    """HF halves the hidden state every ``rescale_every`` layers at inference (a float16 guard). It is
    the same function up to LayerNorm's epsilon, so archlab (which does not rescale) stays close."""
    hf = hf_rwkv(**CONFIGS["d24-L4-ff64"])
    hf.config.rescale_every = 2
    ours = archlab_from(hf)  # before HF's first eval forward rescales its weights in place
    ids = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert hf.rwkv.layers_are_rescaled
        torch.testing.assert_close(ours(ids), ref, atol=1e-3, rtol=0)


def test_state_dicts_round_trip_exactly():
    hf = hf_rwkv(**CONFIGS["d16-L3-att12-ff40"])
    hf_state = hf.state_dict()
    ours = archlab_state_from_rwkv(hf_state)
    assert set(ours) == set(RWKV(config_from_rwkv(hf.config.to_dict())).state_dict())
    back = rwkv_state_from_archlab(ours)
    assert set(back) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key
        assert back[key].shape == value.shape
    # RwkvModel checkpoints (no "rwkv." prefix) convert too
    bare = {k.removeprefix("rwkv."): v for k, v in hf_state.items()}
    assert set(archlab_state_from_rwkv(bare)) == set(ours)


def test_configs_convert_both_ways():
    hf = hf_rwkv(**CONFIGS["d16-L3-att12-ff40"]).config.to_dict()
    config = config_from_rwkv(hf)
    assert (config.vocab_size, config.d_model, config.n_layers, config.d_att, config.d_ff) == (50, 16, 3, 12, 40)
    again = config_from_rwkv(config_to_rwkv(config))
    assert again == config
    default = config_from_rwkv(transformers.RwkvConfig(hidden_size=32, num_hidden_layers=2).to_dict())
    assert default.d_att is None and default.d_ff is None and default.ffn_width == 128
    with pytest.raises(CheckpointError, match="not 'rwkv'"):
        config_from_rwkv({"model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="layer_norm_epsilon=0.001"):
        config_from_rwkv({**hf, "layer_norm_epsilon": 1e-3})
    with pytest.raises(ConfigError, match="eps=1e-05"):
        config_to_rwkv(RWKVConfig(eps=1e-6))


def test_folders_both_ways_and_archlab_convert(tmp_path):
    hf = hf_rwkv(**CONFIGS["d32-L2"])
    ids = torch.randint(0, 61, (2, 18))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    hf.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "pytorch_model.bin").exists()
    ours = load_rwkv(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=0)

    save_rwkv(ours, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rescale_every"] == 0
    again = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, ref, atol=1e-5, rtol=0)

    assert convert(tmp_path / "hf", tmp_path / "archlab") == "rwkv -> archlab"
    assert isinstance(load_model(tmp_path / "archlab"), RWKV)
    assert convert(tmp_path / "archlab", tmp_path / "hf2") == "archlab -> rwkv"
    with torch.no_grad():
        torch.testing.assert_close(load_rwkv(tmp_path / "hf2")(ids), ref, atol=1e-5, rtol=0)


def test_tied_head_folder(tmp_path):
    torch.manual_seed(0)
    ours = RWKV(RWKVConfig(vocab_size=30, d_model=16, n_layers=2, tie_embeddings=True)).eval()
    save_rwkv(ours, tmp_path / "tied")
    hf = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "tied").eval()
    assert hf.head.weight.data_ptr() == hf.rwkv.embeddings.weight.data_ptr()
    back = load_rwkv(tmp_path / "tied")
    assert back.lm_head.weight is back.tok_emb.weight
    ids = torch.randint(0, 30, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf(ids, use_cache=False).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids), ours(ids), atol=0, rtol=0)


def test_foreign_or_broken_folders(tmp_path):
    ours = RWKV(RWKVConfig(vocab_size=30, d_model=16, n_layers=2))
    save_model(ours, tmp_path / "archlab")
    with pytest.raises(CheckpointError, match="archlab folder"):
        load_rwkv(tmp_path / "archlab")
    save_rwkv(ours, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing keys: rwkv.blocks.2"):
        load_rwkv(tmp_path / "hf")
    with pytest.raises(ConfigError, match="needs an archlab RWKV"):
        save_rwkv(torch.nn.Linear(2, 2), tmp_path / "x")
