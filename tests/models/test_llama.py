"""The Llama family: config checks, presets against the parameter formula, cached decoding, padding, context
limit, the fused loss; built on the decoder base GPT shares (Hugging Face parity: tests/parity/test_hf_llama.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.generation import generate
from archlab.models import build_model, get_config
from archlab.models.decoder import DecoderLM
from archlab.models.llama import Llama, LlamaConfig
from archlab.nn.norm import RMSNorm

V = 61


def tiny(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=V, max_len=32, d_model=24, n_heads=6, n_kv_heads=2, n_layers=2, d_ff=40, rope_theta=50.0)
    return LlamaConfig(**{**settings, **overrides})


def model(**overrides) -> Llama:
    torch.manual_seed(0)
    m = Llama(tiny(**overrides)).double().eval()
    with torch.no_grad():  # norm gains away from 1, so a wrong norm shows
        for module in m.modules():
            if isinstance(module, RMSNorm):
                module.weight.normal_(1.0, 0.3)
    return m


def llama_param_formula(c: LlamaConfig) -> int:
    """``V d (1 + untied) + L (d (A + 2 G) d_k + A d_k d + 3 d d_ff + 2 d) + d`` (+ biases)."""
    d, d_k, a, g = c.d_model, c.d_head, c.n_heads, c.n_kv_heads
    attn = d * (a + 2 * g) * d_k + a * d_k * d + (((a + 2 * g) * d_k + d) if c.attention_bias else 0)
    ffn = 3 * d * c.d_ff + ((2 * c.d_ff + d) if c.mlp_bias else 0)
    return c.vocab_size * d * (1 if c.tie_embeddings else 2) + c.n_layers * (attn + ffn + 2 * d) + d


def count_on_meta(config) -> int:
    with torch.device("meta"):
        m = build_model(config)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["llama-tiny", "smollm2-135m", "llama2-7b"])
def test_preset_parameter_counts(name):
    config = get_config(name)
    assert count_on_meta(config) == llama_param_formula(config)


def test_published_sizes():
    assert count_on_meta(get_config("smollm2-135m")) == 134_515_008  # SmolLM2-135M's 134.5M
    assert count_on_meta(get_config("llama2-7b")) == 6_738_415_616  # Llama-2-7B's 6.74B
    c = get_config("smollm2-135m")
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert (c.rope_theta, c.eps, c.tie_embeddings, c.max_len) == (100000.0, 1e-5, True, 8192)


def test_the_block_is_rmsnorm_swiglu_rope_with_grouped_kv():
    m = build_model("llama-tiny")
    assert isinstance(m, DecoderLM) and isinstance(m.decoder.final_norm, RMSNorm)
    block = m.decoder.blocks[0]
    assert isinstance(block.attn_norm, RMSNorm) and block.ffn.gate == "swiglu" and block.attn.n_kv_heads == 2
    assert block.attn.in_proj.bias is None and block.ffn.w_in.bias is None
    assert m.pos.base == 10000.0 and m.lm_head.weight is m.tok_emb.weight
    biased = Llama(tiny(attention_bias=True, mlp_bias=False, tie_embeddings=False))
    assert biased.decoder.blocks[0].attn.out_proj.bias is not None and biased.decoder.blocks[0].ffn.w2.bias is None
    assert biased.lm_head.weight is not biased.tok_emb.weight


@pytest.mark.parametrize("n_kv_heads", [1, 2, 6])
def test_cached_decoding_equals_full_forward(n_kv_heads):
    m = model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, V, (2, 12))
    full = m(ids)
    cache = m.new_cache()
    pieces = [m(ids[:, :5], cache=cache)]
    pieces += [m(ids[:, i : i + 1], cache=cache) for i in range(5, 9)]
    pieces.append(m(ids[:, 9:], cache=cache))
    assert cache.blocks[0].self_attn.keys.shape == (2, n_kv_heads, 12, 4)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=0)
    assert torch.equal(generate(m, ids[:, :4], max_new_tokens=6), generate(m, ids[:, :4], max_new_tokens=6, use_cache=False))


def test_left_padded_row_matches_the_row_alone():
    m = model()
    row, other = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1), other])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    logits = m(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0, 3:], m(row)[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(logits[1], m(other)[0], atol=1e-10, rtol=0)


def test_fused_loss_equals_cross_entropy_of_the_logits():
    m = model(tie_embeddings=False)
    ids = torch.randint(0, V, (2, 10))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    want = F.cross_entropy(m(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(m(ids, labels=labels), want, atol=1e-12, rtol=0)


def test_the_context_limit_is_enforced():
    m = model()
    m(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"position 32 is past the context of max_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    cache = m.new_cache()
    m(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match=r"position 32 is past the context of max_len=32"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ConfigError, match="position_ids are used only by absolute encodings"):
        m(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(3)[None])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_kv_heads=4), "n_heads=6 is not divisible by n_kv_heads=4"),
        (dict(n_kv_heads=0), "n_kv_heads=0"),
        (dict(d_model=18, n_heads=6), r"d_k = d_model / n_heads must be even.*d_k=3"),
        (dict(d_model=25), "d_model=25 is not divisible by n_heads=6"),
        (dict(rope_theta=0.0), "rope_theta=0.0"),
        (dict(d_ff=0), "d_ff=0"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_config_json_round_trip_and_wrong_config_class():
    c = tiny(attention_bias=True)
    assert LlamaConfig.from_json(c.to_json()) == c
    with pytest.raises(ConfigError, match="Llama needs a LlamaConfig, got GPTConfig"):
        Llama(get_config("gpt-nano"))


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    m = Llama(tiny())
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])
    data = pattern.repeat(3)[None].expand(4, -1)
    inputs, labels = data[:, :31], data[:, 1:32]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m(inputs, labels=labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss = m(inputs, labels=labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
