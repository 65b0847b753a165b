"""archlab Llama against Hugging Face LlamaForCausalLM: logits, generation, state dicts, folders both ways.

HF models are built from a ``LlamaConfig`` with random weights (no downloads). A larger
``initializer_range`` than Llama's 0.02 and random RMSNorm gains (HF initialises them to 1) make the
logits far from uniform and let a swapped norm or projection show.

In float64 the reference is HF's architecture computed in float64 throughout: HF's ``LlamaRMSNorm``
casts its input to float32 and ``LlamaRotaryEmbedding`` computes the angles in float32, whatever the
model's dtype, so the ``exact_float64`` fixture replaces those two forwards by the same equations
without the casts (1e-10 could not hold otherwise: their float32 rounding is ~1e-7).
"""

from __future__ import annotations

import pytest
import torch

from archlab.errors import CheckpointError
from archlab.generation import generate
from archlab.interop.convert import convert
from archlab.interop.io import load_model, save_model, write_hf_folder
from archlab.interop.llama import (
    archlab_state_from_llama,
    config_from_llama,
    config_to_llama,
    llama_state_from_archlab,
    load_llama,
    save_llama,
)
from archlab.models.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

VOCAB, HEADS = 97, 6
BASE = dict(
    vocab_size=VOCAB, hidden_size=48, num_attention_heads=HEADS, num_hidden_layers=2, intermediate_size=80,
    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0, initializer_range=0.2,
    bos_token_id=0, eos_token_id=1, pad_token_id=2,
)  # fmt: skip
# n_kv_heads in {1 (multi-query), 3 (grouped), 6 (multi-head)}, tied and untied, biases on one
CASES = {
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "gqa3-untied": dict(num_key_value_heads=3, tie_word_embeddings=False),
    "gqa3-tied-biases": dict(num_key_value_heads=3, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mha-untied": dict(num_key_value_heads=HEADS, tie_word_embeddings=False),
    "mha-tied": dict(num_key_value_heads=HEADS, tie_word_embeddings=True),
}


def hf_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return hf


def archlab_from(hf) -> Llama:
    config = config_from_llama(hf.config.to_dict())
    model = Llama(config).eval()
    model.load_state_dict(archlab_state_from_llama(hf.state_dict(), config))
    return model


@pytest.fixture
def exact_float64(monkeypatch):
    """HF's RMSNorm and RoPE without their float32 casts (see the module docstring)."""

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = position_ids[..., None].double() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotary)


def padded_batch(seed: int = 1, n: int = 12):
    """``ids [3, n]`` and a mask with left padding in two rows (the batched-generation layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = BASE["pad_token_id"]
    return ids, mask


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_float32_and_float64_with_padding(name, exact_float64):
    hf = hf_llama(**CASES[name])
    ours = archlab_from(hf)
    assert ours.config.n_kv_heads == CASES[name]["num_key_value_heads"]
    assert ours.decoder.blocks[0].attn.n_kv_heads == CASES[name]["num_key_value_heads"]
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        assert ref[real].std() > 1.0  # far from uniform
        torch.testing.assert_close(ours(ids, attention_mask=mask)[real], ref[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids[1:2]), hf(ids[1:2]).logits, atol=1e-5, rtol=0)  # no mask
        hf.double(), ours.double()
        ref = hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask)[real], ref[real], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["mqa-tied", "gqa3-untied"])
def test_greedy_generation_equals_hugging_face(name, exact_float64):
    hf = hf_llama(**CASES[name]).double()
    ours = archlab_from(hf).double()
    ids, mask = padded_batch(seed=2, n=8)
    hf.generation_config.eos_token_id = None  # no stop token on either side: 12 new tokens in every row
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert ref.shape == (3, 8 + 12)
    for use_cache in (True, False):
        got = generate(ours, ids, attention_mask=mask, max_new_tokens=12, use_cache=use_cache)
        assert torch.equal(got, ref), use_cache


def test_state_dict_round_trips_are_exact():
    hf = hf_llama(**CASES["gqa3-tied-biases"])
    original = hf.state_dict()
    config = config_from_llama(hf.config.to_dict())
    ours = archlab_state_from_llama(original, config)
    back = llama_state_from_archlab(ours, config)
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    again = archlab_state_from_llama(back, config)
    assert set(again) == set(ours) and all(torch.equal(again[k], v) for k, v in ours.items())
    # in_proj rows: A d_k queries, then G d_k keys and G d_k values
    assert ours["decoder.blocks.0.attn.in_proj.weight"].shape == ((HEADS + 2 * 3) * 8, 48)
    assert config_from_llama(config_to_llama(config)) == config


def test_save_llama_loads_in_hugging_face_and_back(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_len=64, d_model=48, n_heads=6, n_kv_heads=2, n_layers=2, d_ff=70,
                         rope_theta=300.0, tie_embeddings=True)  # fmt: skip
    ours = Llama(config).eval()
    save_llama(ours, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.rope_parameters["rope_theta"] == 300.0
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)
    again = load_llama(tmp_path / "hf")
    assert again.config == config
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_convert_hugging_face_llama_folders_both_ways(tmp_path):
    hf = hf_llama(**CASES["gqa3-untied"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert convert(tmp_path / "hf", tmp_path / "ours") == "llama -> archlab"
    ours = load_model(tmp_path / "ours")
    assert isinstance(ours, Llama) and not ours.config.tie_embeddings
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    save_model(ours, tmp_path / "ours2")
    assert convert(tmp_path / "ours2", tmp_path / "hf2") == "archlab -> llama"
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2", local_files_only=True)
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_unsupported_or_foreign_configs_are_refused(tmp_path):
    good = config_to_llama(LlamaConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=40))
    with pytest.raises(CheckpointError, match="'gpt2'.*not 'llama'"):
        config_from_llama({**good, "model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="rope_type='linear'"):
        config_from_llama({**good, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(CheckpointError, match="head_dim=16"):
        config_from_llama({**good, "head_dim": 16})
    with pytest.raises(CheckpointError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        config_from_llama({**good, "num_key_value_heads": 3})
    hf = hf_llama(**CASES["mqa-tied"])
    state = hf.state_dict()
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="missing keys: model.layers.1.self_attn.k_proj.weight"):
        archlab_state_from_llama(state, config_from_llama(hf.config.to_dict()))


def test_a_tied_config_with_a_head_that_differs_is_refused(tmp_path):
    hf = hf_llama(**CASES["mqa-tied"])
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    write_hf_folder(tmp_path, hf.config.to_dict(), state)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_llama(tmp_path)


class _ReferenceLoRA(torch.nn.Module):
    """LoRA as the paper writes it on one separate Hugging Face projection: ``W x + b + s B A x``."""

    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a.detach().clone(), b.detach().clone(), scaling

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.a.T) @ self.b.T


@pytest.mark.parametrize("name", ["gqa3-untied", "mqa-tied", "gqa3-tied-biases"])
def test_lora_on_q_and_v_equals_hf_layout_lora_on_q_proj_and_v_proj(name, exact_float64):
    """LoRA targets "q" and "v" on archlab's fused in_proj = one adapter each on HF's separate q_proj and v_proj
    (k_proj left alone), in float64; the adapters' B random so the update is not zero."""
    from archlab.nn.lora import apply_lora, lora_layers

    hf = hf_llama(**CASES[name]).double()
    ours, plain = archlab_from(hf).double(), archlab_from(hf).double()
    apply_lora(ours, ["q", "v"], r=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    q_rows = HEADS * ours.config.d_head
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            adapter = lora_layers(ours)[f"decoder.blocks.{i}.attn.in_proj"]
            assert list(adapter.blocks) == ["q", "v"]
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g, dtype=torch.float64))
            a_q, a_v = adapter.lora_A[:4], adapter.lora_A[4:]
            b_q, b_v = adapter.lora_B[:q_rows], adapter.lora_B[q_rows:]
            attn = layer.self_attn
            attn.q_proj = _ReferenceLoRA(attn.q_proj, a_q, b_q, adapter.scaling)
            attn.v_proj = _ReferenceLoRA(attn.v_proj, a_v, b_v, adapter.scaling)
        ids, mask = padded_batch()
        real = mask.bool()
        ref = hf(ids, attention_mask=mask).logits
        # without the adapters the logits differ: the update is really there
        assert (plain(ids, attention_mask=mask)[real] - ref[real]).abs().max() > 1e-3
        torch.testing.assert_close(ours(ids, attention_mask=mask)[real], ref[real], atol=1e-10, rtol=0)
