"""RWKV-4: WKV against its equation, parallel == recurrent (whole sequences, token by token, with a
state), constant-size state, generation with the state as cache, init, errors, presets, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.generation import beam_search, generate
from archlab.models import build_model, get_config
from archlab.models.rwkv import (
    RWKV,
    RWKVConfig,
    RWKVState,
    wkv_chunked,
    wkv_initial_state,
    wkv_recurrent,
)


def wkv_equation(w, u, k, v):
    """The paper's formula summed term by term (float64, no stabilisation): k, v [B, N, C] -> [B, N, C]."""
    out = torch.empty_like(k)
    for t in range(k.shape[1]):
        num, den = torch.exp(u + k[:, t]) * v[:, t], torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + weight * v[:, i], den + weight
        out[:, t] = num / den
    return out


def wkv_inputs(seed=0, b=2, n=23, c=5, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(c, generator=g, dtype=dtype) * 2  # decays e^{-w} in (e^-2, 1)
    u = torch.randn(c, generator=g, dtype=dtype)
    k = torch.randn(b, n, c, generator=g, dtype=dtype) * scale
    v = torch.randn(b, n, c, generator=g, dtype=dtype)
    return w, u, k, v


def tiny(**overrides) -> RWKVConfig:
    return RWKVConfig(**{**dict(vocab_size=53, d_model=24, n_layers=3, d_att=20, d_ff=40), **overrides})


def model(seed=0, dtype=torch.float32, **overrides) -> RWKV:
    """A model whose every parameter is random (RWKV's own init zeroes the residual branches, which
    would make the comparisons below trivially true)."""
    torch.manual_seed(seed)
    m = RWKV(tiny(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("time_decay", "time_first")):
                p.normal_(0.0, 1.0)
            elif ".mix_" in name:
                p.uniform_(0.0, 1.0)
            elif p.ndim == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return m


# ------------------------------------------------------------------------------------------------
# WKV: the operator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 23, 64])
def test_wkv_chunked_and_recurrent_equal_the_equation(chunk):
    w, u, k, v = wkv_inputs()
    expected = wkv_equation(w, u, k, v)
    torch.testing.assert_close(wkv_chunked(w, u, k, v, chunk=chunk)[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(wkv_recurrent(w, u, k, v)[0], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("split", [1, 7, 16])
def test_wkv_state_continues_a_sequence(split):
    """Run a prefix, keep the state, run the rest from it: the same as the whole sequence at once,
    and the chunked and the recurrent forms leave the same state."""
    w, u, k, v = wkv_inputs(n=30)
    expected = wkv_equation(w, u, k, v)
    _, state_c = wkv_chunked(w, u, k[:, :split], v[:, :split], chunk=4)
    _, state_r = wkv_recurrent(w, u, k[:, :split], v[:, :split])
    for a, b in zip(state_c, state_r):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    rest_c, _ = wkv_chunked(w, u, k[:, split:], v[:, split:], state_c, chunk=5)
    rest_r, _ = wkv_recurrent(w, u, k[:, split:], v[:, split:], state_r)
    torch.testing.assert_close(rest_c, expected[:, split:], atol=1e-12, rtol=0)
    torch.testing.assert_close(rest_r, expected[:, split:], atol=1e-12, rtol=0)


def test_wkv_gradients_of_chunked_equal_recurrent():
    w, u, k, v = (t.requires_grad_() for t in wkv_inputs(n=19))
    torch.manual_seed(1)
    probe = torch.randn(2, 19, 5, dtype=torch.float64)
    grads = []
    for fn in (lambda: wkv_chunked(w, u, k, v, chunk=4)[0], lambda: wkv_recurrent(w, u, k, v)[0]):
        grads.append(torch.autograd.grad((fn() * probe).sum(), (w, u, k, v)))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_wkv_does_not_overflow_with_large_keys():
    """e^k overflows float32 past k = 88; the (a, b, p) form never exponentiates more than a difference."""
    w, u, k, v = wkv_inputs(scale=60.0)  # keys up to ~200
    assert k.abs().max() > 120
    expected = wkv_equation(w, u, k, v)  # float64 holds e^200
    for fn in (lambda *a: wkv_chunked(*a, chunk=8)[0], lambda *a: wkv_recurrent(*a)[0]):
        got = fn(*(t.float() for t in (w, u, k, v)))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_wkv_initial_state_is_an_empty_sum():
    a, b, p = wkv_initial_state(3, 4, dtype=torch.float32)
    assert torch.equal(a, torch.zeros(3, 4)) and torch.equal(b, torch.zeros(3, 4))
    assert torch.all(p == -math.inf)


def test_wkv_chunk_must_be_positive():
    with pytest.raises(ConfigError, match="chunk=0"):
        wkv_chunked(*wkv_inputs(), chunk=0)


# ------------------------------------------------------------------------------------------------
# The model: parallel == recurrent
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_parallel_equals_recurrent_over_a_sequence(dtype, atol):
    m = model(dtype=dtype)
    ids = torch.randint(0, 53, (3, 41))
    with torch.no_grad():
        parallel = m(ids)
        assert parallel.std() > 0.5  # far from uniform: a wrong mixer could not hide
        torch.testing.assert_close(m(ids, mode="recurrent"), parallel, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_token_by_token_with_state_equals_parallel(dtype, atol):
    m = model(dtype=dtype)
    ids = torch.randint(0, 53, (2, 30))
    with torch.no_grad():
        parallel = m(ids)
        state = m.new_cache()
        one_by_one = torch.cat([m(ids[:, t : t + 1], state=state) for t in range(30)], dim=1)
        torch.testing.assert_close(one_by_one, parallel, atol=atol, rtol=0)
        assert state.length == 30
        # uneven pieces, each run in parallel mode from the state the previous left
        state = m.new_cache()
        pieces = [m(ids[:, s:e], state=state) for s, e in [(0, 3), (3, 4), (4, 21), (21, 30)]]
        torch.testing.assert_close(torch.cat(pieces, dim=1), parallel, atol=atol, rtol=0)


def test_gradients_of_parallel_equal_recurrent():
    m = model(dtype=torch.float64)
    ids = torch.randint(0, 53, (2, 20))
    grads = []
    for mode in ("parallel", "recurrent"):
        m.zero_grad()
        F.cross_entropy(m(ids, mode=mode)[:, :-1].reshape(-1, 53), ids[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "time_" in n)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=1e-8, msg=name)


def test_state_has_constant_size():
    m = model()
    with torch.no_grad():
        short, long = m.new_cache(), m.new_cache()
        m(torch.randint(0, 53, (2, 1)), state=short)
        m(torch.randint(0, 53, (2, 200)), state=long)
    shapes = lambda s: [tuple(t.shape) for layer in s.layers for t in (layer.att_shift, layer.ffn_shift, *layer.wkv)]
    assert shapes(short) == shapes(long) == [(2, 24), (2, 24), (2, 20), (2, 20), (2, 20)] * 3


def test_causal_later_tokens_do_not_change_earlier_logits():
    m = model()
    ids = torch.randint(0, 53, (1, 25))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 53
    with torch.no_grad():
        a, b = m(ids), m(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


# ------------------------------------------------------------------------------------------------
# Generation: the state is the cache
# ------------------------------------------------------------------------------------------------


def test_generate_with_state_equals_recomputing_the_prefix():
    m = model()
    prompt = torch.randint(0, 53, (2, 5))
    cached = generate(m, prompt, max_new_tokens=12)
    uncached = generate(m, prompt, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    sampled = generate(m, prompt, max_new_tokens=8, do_sample=True, seed=3)
    assert torch.equal(sampled, generate(m, prompt, max_new_tokens=8, do_sample=True, seed=3, use_cache=False))


def test_beam_search_reorders_the_state():
    m = model()
    prompt = torch.randint(0, 53, (2, 4))
    cached = beam_search(m, prompt, beam_size=3, max_new_tokens=6)
    uncached = beam_search(m, prompt, beam_size=3, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-5, rtol=0)


def test_state_reorder_moves_rows():
    m = model()
    state = m.new_cache()
    with torch.no_grad():
        m(torch.randint(0, 53, (3, 6)), state=state)
    before = [t.clone() for t in state.layers[1].wkv]
    state.reorder(torch.tensor([2, 0, 0]))
    for old, new in zip(before, state.layers[1].wkv):
        assert torch.equal(new, old[[2, 0, 0]])


def test_padding_is_refused_for_generation():
    m = model()
    prompt = torch.randint(0, 53, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ConfigError, match="cannot skip padding"):
        generate(m, prompt, max_new_tokens=2, attention_mask=mask)
    assert generate(m, prompt, max_new_tokens=2, attention_mask=torch.ones_like(prompt)).shape == (2, 6)


# ------------------------------------------------------------------------------------------------
# Init, presets, errors
# ------------------------------------------------------------------------------------------------


def test_init_residual_branches_start_at_zero_and_decays_span_the_paper_range():
    torch.manual_seed(0)
    m = RWKV(tiny(n_layers=4, d_att=24))
    for block in m.blocks:
        assert torch.all(block.time_mix.output.weight == 0) and torch.all(block.channel_mix.value.weight == 0)
    decay0, decay3 = m.blocks[0].time_mix.time_decay, m.blocks[3].time_mix.time_decay
    assert decay0[0].item() == pytest.approx(-5.0) and decay0[-1].item() == pytest.approx(3.0)
    assert torch.all(decay0[1:] > decay0[:-1])  # channel by channel: long memory (w = e^-5) to short (w = e^3)
    assert torch.all(decay3[1:-1] < decay0[1:-1])  # deeper layers bend the curve
    first = m.blocks[0].time_mix.time_first[:3].tolist()  # log 0.3 + 0.5 * zigzag (0, 1, -1)
    assert first == pytest.approx([math.log(0.3), math.log(0.3) + 0.5, math.log(0.3) - 0.5])
    assert m.tok_emb.weight.abs().max() <= 1e-4
    # every block is the identity at the start: logits = head(LN_out(LN_0(E[ids])))
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        direct = m.lm_head(m.final_norm(m.emb_norm(m.tok_emb(ids))))
        torch.testing.assert_close(m(ids), direct, atol=0, rtol=0)


def test_169m_preset_has_the_rwkv4_pile_shape():
    config = get_config("rwkv-169m")
    assert (config.vocab_size, config.d_model, config.n_layers, config.ffn_width) == (50277, 768, 12, 3072)
    with torch.device("meta"):
        m = build_model("rwkv-169m")
    # the parameter count of transformers' RwkvForCausalLM at rwkv-4-169m-pile's config
    assert sum(p.numel() for p in m.parameters()) == 169_342_464


def test_config_json_round_trip_and_tied_head():
    config = tiny(tie_embeddings=True)
    assert RWKVConfig.from_json(config.to_json()) == config
    m = RWKV(config)
    assert m.lm_head.weight is m.tok_emb.weight


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=0), "d_model=0 must be > 0"),
        (dict(n_layers=-1), "n_layers=-1 must be > 0"),
        (dict(d_att=0), "d_att=0 must be > 0"),
        (dict(d_ff=-4), "d_ff=-4 must be > 0"),
        (dict(vocab_size=10.5), "vocab_size=10.5 must be an integer"),
        (dict(eps=0.0), "eps=0.0 must be finite and > 0"),
        (dict(d_modle=8), "did you mean 'd_model'"),
    ],
)
def test_bad_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny().replace(**overrides)


def test_bad_inputs():
    m = model()
    with pytest.raises(ShapeError, match="id 53, outside the vocabulary"):
        m(torch.tensor([[1, 53]]))
    with pytest.raises(ShapeError, match="id -1"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ShapeError, match="integer token ids"):
        m(torch.zeros(1, 3))
    with pytest.raises(ShapeError, match=r"\[B, N\]"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="mode"):
        m(torch.zeros(1, 3, dtype=torch.long), mode="rnn")
    state = m.new_cache()
    m(torch.zeros(2, 3, dtype=torch.long), state=state)
    with pytest.raises(ShapeError, match="state holds batch 2"):
        m(torch.zeros(3, 1, dtype=torch.long), state=state)
    with pytest.raises(ShapeError, match="RWKVState of this model's 3 layers"):
        m(torch.zeros(2, 1, dtype=torch.long), state=RWKVState(2))
    with pytest.raises(ConfigError, match="needs an RWKVConfig"):
        RWKV(get_config("gpt-nano"))


def test_tiny_preset_trains():
    torch.manual_seed(0)
    m = build_model("rwkv-tiny").train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    # a repeating byte pattern: learnable in a few steps
    data = torch.tensor([list(range(10, 26)) * 3] * 4)  # [4, 48]
    losses = []
    for _ in range(15):
        logits = m(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_logits_to_keep_is_the_last_positions_and_generation_uses_it():
    m = model().double()
    ids = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        full = m(ids)
        state = m.new_cache()
        m(ids[:, :3], state=state)
        kept = m(ids[:, 3:], state=state, logits_to_keep=2)
    torch.testing.assert_close(kept, full[:, -2:], rtol=0, atol=1e-10)
    step = m.decoder_step(logits_to_keep=1)
    with torch.no_grad():
        assert step(ids, m.new_cache()).shape == (2, 1, 53)
    with pytest.raises(ConfigError, match="logits_to_keep=0 must be an int >= 1"):
        m(ids, logits_to_keep=0)
