"""GPT: causality, tied head, positional variants with and without a cache, input and config errors,
parameter counts of the presets, and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model, get_config
from archlab.models.gpt import GPT, GPTConfig, positions_from_mask


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=61, max_len=32, d_model=24, n_heads=3, n_layers=2, dropout=0.0, attn_dropout=0.0)
    return GPTConfig(**{**base, **overrides})


def model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    m = GPT(tiny(**overrides)).eval()
    # GPT-2's init keeps activations tiny; larger weights make the comparisons below discriminating
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


POSITIONALS = ["learned", "rope", "alibi", "sinusoidal", "none"]


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------


def test_forward_shape_and_tied_head():
    m = model()
    logits = m(torch.randint(0, 61, (2, 7)))
    assert logits.shape == (2, 7, 61)
    assert m.lm_head.weight is m.tok_emb.weight
    untied = model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    n_tied = sum(p.numel() for p in m.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 61 * 24


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(tiny(d_model=384, n_heads=6, n_layers=6))
    residual_std = 0.02 / math.sqrt(2 * 6)
    for block in m.decoder.blocks:
        assert block.attn.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.ffn.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.in_proj.bias == 0)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_causal_gradient_is_exactly_zero_for_future_positions(positional, backend):
    m = model(positional=positional, backend=backend)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    m.tok_emb.register_forward_hook(keep)
    ids = torch.randint(0, 61, (2, 9))
    t = 4
    m(ids)[:, t].sum().backward()
    grad = captured["x"].grad  # [B, N, d]
    assert torch.all(grad[:, t + 1 :] == 0)
    assert torch.all(grad[:, : t + 1].abs().sum(-1) > 0)


# ---------------------------------------------------------------------------------------------
# cache, padding, positions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", POSITIONALS)
def test_cached_decoding_equals_full_forward(positional):
    m = model(positional=positional)
    ids = torch.randint(0, 61, (2, 12))
    full = m(ids)
    cache = m.new_cache()
    pieces = [m(ids[:, :5], cache=cache)]
    pieces += [m(ids[:, i : i + 1], cache=cache) for i in range(5, 9)]
    pieces.append(m(ids[:, 9:], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positional", POSITIONALS)
def test_left_padded_row_matches_the_row_alone(positional):
    m = model(positional=positional)
    row = torch.randint(0, 61, (1, 6))
    other = torch.randint(0, 61, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1), other])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    logits = m(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0, 3:], m(row)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], m(other)[0], atol=1e-5, rtol=0)
    # and step by step with a cache, the mask growing by one real token each step
    cache = m.new_cache()
    out = [m(batch[:, :5], attention_mask=mask[:, :5], cache=cache)]
    for i in range(5, 9):
        out.append(m(batch[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(out, dim=1)[0, 3:], m(row)[0], atol=1e-5, rtol=0)


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_explicit_position_ids(positional):
    m = model(positional=positional)
    ids = torch.randint(0, 61, (2, 5))
    default = m(ids)
    torch.testing.assert_close(m(ids, position_ids=torch.arange(5)[None]), default, atol=1e-6, rtol=0)
    shifted = m(ids, position_ids=torch.arange(3, 8).expand(2, 5))
    assert not torch.allclose(shifted, default, atol=1e-3)
    # after a cache of 3 positions, new tokens sit at 3..7 by default
    caches = m.new_cache(), m.new_cache()
    for cache in caches:
        m(ids[:, :3], cache=cache)
    explicit = m(ids, cache=caches[1], position_ids=torch.arange(3, 8)[None])
    torch.testing.assert_close(m(ids, cache=caches[0]), explicit, atol=1e-6, rtol=0)


def test_position_ids_rejected_for_relative_encodings():
    m = model(positional="rope")
    with pytest.raises(ConfigError, match="position_ids.*rope"):
        m(torch.randint(0, 61, (1, 4)), position_ids=torch.arange(4)[None])


def test_float64():
    m = model().double()
    ids = torch.randint(0, 61, (2, 6))
    assert m(ids).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# a query/key width apart from d / A (d_k; Vaswani et al. table 3 rows B)
# ---------------------------------------------------------------------------------------------


def test_d_k_unset_is_the_old_model():
    """d_k=None builds the model it always did: d_k = d / A, the same parameters (names, shapes, init) and logits
    as d_k given as d / A; a saved config without the key loads as None; GPT-2's format refuses a set d_k."""
    from archlab.interop.gpt2 import config_to_gpt2

    assert tiny().d_k is None and "d_k" in tiny().to_dict()
    old, explicit = model(seed=3), model(seed=3, d_k=8)  # d / A = 24 / 3
    assert all(block.attn.d_k == block.attn.d_v == 8 for block in old.decoder.blocks)
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in explicit.state_dict().items()}
    ids = torch.randint(0, 61, (2, 9))
    assert torch.equal(old(ids), explicit(ids))
    torch.manual_seed(5)
    fresh = GPT(tiny())
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), GPT(tiny(d_k=8)).state_dict().values()))
    saved = {k: v for k, v in tiny(positional="rope").to_dict().items() if k != "d_k"}  # a checkpoint from before d_k
    assert GPTConfig.from_dict(saved) == tiny(positional="rope")
    with pytest.raises(ConfigError, match="GPT-2 format needs d_k=None, this model has d_k=4"):
        config_to_gpt2(tiny(d_k=4))


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_d_k_sets_the_query_key_width_only(positional):
    """d=24, A=3, d_k=4: W_Q, W_K are [A d_k, d] = [12, 24], W_V stays [A d_v, d] = [24, 24], W_O [d, A d_v];
    the count drops by 2 L (A (d/A - d_k) (d + 1)) (weights and biases of W_Q and W_K); the config's attention
    shape says the same; cached decoding still equals the full forward."""
    m = model(positional=positional, d_k=4)
    for block in m.decoder.blocks:
        attn = block.attn
        assert (attn.d_k, attn.d_v) == (4, 8)
        assert attn.in_proj.weight.shape == (3 * 4 + 3 * 4 + 3 * 8, 24) and attn.out_proj.weight.shape == (24, 24)
    full = sum(p.numel() for p in model(positional=positional).parameters())
    assert sum(p.numel() for p in m.parameters()) == full - 2 * 2 * 3 * (8 - 4) * (24 + 1)
    shape = m.config.attention_shape
    assert (shape.d_k, shape.d_v) == (4, 8) and (tiny().attention_shape.d_k, tiny().attention_shape.d_v) == (8, 8)
    if positional == "rope":
        assert m.pos.d_head == 4  # RoPE rotates the 4-wide queries and keys
    ids = torch.randint(0, 61, (2, 10))
    full_logits = m(ids)
    assert full_logits.shape == (2, 10, 61)
    cache = m.new_cache()
    steps = [m(ids[:, :4], cache=cache)] + [m(ids[:, i : i + 1], cache=cache) for i in range(4, 10)]
    assert cache.blocks[0].self_attn.keys.shape == (2, 3, 10, 4) and cache.blocks[0].self_attn.values.shape[-1] == 8
    torch.testing.assert_close(torch.cat(steps, dim=1), full_logits, atol=1e-5, rtol=0)


def test_d_k_attention_is_softmax_of_narrow_scores_in_float64():
    """A block's attention with d_k=4 < d_v=8, written out from its own projections in float64:
    ``softmax(Q K^T / sqrt(d_k) + causal) V W_O^T + b_O`` per head, against the module's output."""
    attn = model(d_k=4).double().decoder.blocks[0].attn
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    w, b = attn.in_proj.weight, attn.in_proj.bias
    q, k, v = (x @ w.T + b).split([12, 12, 24], dim=-1)
    q, k, v = (t.view(2, 6, 3, -1).transpose(1, 2) for t in (q, k, v))  # [B, A, N, d_k or d_v]
    scores = q @ k.transpose(-2, -1) / math.sqrt(4)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    heads = torch.softmax(scores, dim=-1) @ v  # [B, A, N, d_v]
    expected = heads.transpose(1, 2).reshape(2, 6, 24) @ attn.out_proj.weight.T + attn.out_proj.bias
    for backend in ("math", "sdpa"):
        attn.backend = backend
        torch.testing.assert_close(attn(x, causal=True), expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# bad input: archlab errors before computing
# ---------------------------------------------------------------------------------------------


def test_id_out_of_vocabulary():
    m = model()
    with pytest.raises(ShapeError, match=r"id 61.*vocab_size=61"):
        m(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ShapeError, match=r"id -1.*vocab_size=61"):
        m(torch.tensor([[-1, 2]]))


def test_bad_input_shapes_and_types():
    m = model()
    with pytest.raises(ShapeError, match=r"\[B, N\]"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeError, match="integer"):
        m(torch.zeros(1, 3))
    with pytest.raises(ShapeError, match="B, N >= 1"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"attention_mask must be \[B, M\] = \[1, 3\]"):
        m(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ShapeError, match="only 0"):
        m(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 2, 1]]))
    with pytest.raises(ShapeError, match=r"position_ids must be integer \[B, N\]"):
        m(torch.tensor([[1, 2, 3]]), position_ids=torch.arange(4)[None])
    cache = m.new_cache()
    m(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ShapeError, match="cache holds batch 1"):
        m(torch.tensor([[1], [2]]), cache=cache)


def test_too_long_for_the_learned_table():
    m = model()  # max_len=32
    with pytest.raises(ShapeError, match=r"position 32 .*max_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    cache = m.new_cache()
    m(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    m(torch.zeros(1, 2, dtype=torch.long), cache=cache)  # positions 30, 31: fine
    with pytest.raises(ShapeError, match="max_len=32"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match="max_len=32"):
        m(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[31, 32]]))
    # left padding does not count: 40 columns, 30 real tokens
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, :10] = 0
    assert m(torch.zeros(1, 40, dtype=torch.long), attention_mask=mask).shape == (1, 40, 61)
    # relative encodings have no table to run past
    assert model(positional="rope")(torch.zeros(1, 40, dtype=torch.long)).shape == (1, 40, 61)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=50, n_heads=3), "d_model=50 is not divisible by n_heads=3"),
        (dict(positional="rope", d_model=30, n_heads=2), "d_k.*even"),
        (dict(positional="rop"), "did you mean 'rope'"),
        (dict(ffn="gelu_new"), "unknown value 'gelu_new'"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(vocab_size=0), "vocab_size=0 must be >= 2"),
        (dict(n_layers=2.5), "n_layers=2.5 must be an integer"),
        (dict(d_ff=64.0), "d_ff=64.0 must be an integer or null"),
        (dict(d_ff=0), "d_ff=0 must be > 0"),
        (dict(d_k=0), "d_k=0 must be > 0"),
        (dict(d_k=4.0), "d_k=4.0 must be an integer or null"),
        (dict(positional="rope", d_k=5), "d_k must be even; got d_k=5"),
        (dict(backend="flash"), "unknown value 'flash'"),
        (dict(tie_embeddings="yes"), "tie_embeddings='yes' must be true or false"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_config_json_round_trip_and_unknown_key():
    c = tiny(positional="alibi", d_ff=40)
    assert GPTConfig.from_json(c.to_json()) == c
    assert c.ffn_width == 40 and tiny().ffn_width == 96
    with pytest.raises(ConfigError, match="did you mean 'n_heads'"):
        GPTConfig.from_dict({"n_head": 4})


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------


def gpt_param_formula(c: GPTConfig) -> int:
    """Count by hand: embeddings, L blocks (attention 4d^2 + 4d, FFN 2 d d_ff + d_ff + d, two LNs 4d), final LN."""
    d, f = c.d_model, c.ffn_width
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.max_len * d + c.n_layers * block + 2 * d + head


def count_on_meta(config: GPTConfig) -> int:
    with torch.device("meta"):
        m = GPT(config)
    return sum(p.numel() for p in m.parameters())


def test_gpt2_small_has_124m_parameters():
    assert count_on_meta(get_config("gpt2-small")) == 124_439_808


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-mini", "gpt-nano"])
def test_preset_parameter_counts(name):
    config = get_config(name)
    assert count_on_meta(config) == gpt_param_formula(config)


def test_gpt2_medium_count_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    c = get_config("gpt2-medium")
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads))
    assert sum(p.numel() for p in hf.parameters()) == count_on_meta(c) == 354_823_168


def test_registry_builds_gpt():
    m = build_model("gpt-nano", n_layers=1)
    assert isinstance(m, GPT) and len(m.decoder.blocks) == 1


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    m = GPT(tiny())
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])
    data = pattern.repeat(3)[None].expand(4, -1)  # [4, 42]
    inputs, targets = data[:, :-1][:, :31], data[:, 1:][:, :31]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)

    def loss_fn():
        return F.cross_entropy(m(inputs).reshape(-1, 61), targets.reshape(-1))

    first = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert math.isclose(first, math.log(61), rel_tol=0.05)  # GPT-2 init: near-uniform predictions
    assert loss_fn().item() < 0.25 * first
