"""Transformer blocks and stacks (``archlab/nn/blocks.py``) against hand-written math and against themselves.

* One pre-norm ``EncoderBlock`` equals the deck's six steps written by hand (``layer_norm_equation``,
  multi-head attention head by head with an explicit softmax, residuals, ``max(0, xW1+b1)W2+b2``);
  a post-norm block equals ``LayerNorm(x + Sublayer(x))`` twice, written the same way. float64, 1e-10.
* Cached incremental decoding equals the full causal pass (float32, 1e-5) for every positional
  encoding (sinusoidal, learned, RoPE, ALiBi, none), for an encoder-decoder ``Decoder`` (cross-attention,
  memory padding) and a decoder-only (GPT-style) stack, one token at a time and in chunks of 3, 1, 4;
  ``DecodingCache.reorder`` (beam search) and ``crop`` then continuing equal a fresh pass on the
  reordered / cropped inputs; ``memory=None`` after the first cached step reuses the cached memory.
* ``torch.autograd.gradcheck`` (float64) through multi-head attention with each positional encoding.
* Bad input: unknown names, wrong widths, cross-attention without memory -> archlab errors with
  messages that say what went wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from archlab.errors import ConfigError, ShapeError
from archlab.nn.attention import MultiHeadAttention
from archlab.nn.blocks import BlockCache, Decoder, DecoderBlock, Encoder, EncoderBlock
from archlab.nn.norm import layer_norm_equation
from archlab.nn.positional import POSITIONAL_KINDS, build_positional

F64 = torch.float64
TOL = 1e-10
CACHE_TOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


# ------------------------------------------------------------------------------------------------
# Blocks written out by hand
# ------------------------------------------------------------------------------------------------


def mha_by_hand(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """``Concat(head_1..head_A) W_O``, ``head_a = softmax(Q_a K_a^T / sqrt(d_k)) V_a``, one head at a time."""
    d, heads, d_k = mha.d_model, mha.n_heads, mha.d_k
    W, b = mha.in_proj.weight, mha.in_proj.bias
    outs = []
    for a in range(heads):
        q_rows = slice(a * d_k, (a + 1) * d_k)
        k_rows = slice(d + a * d_k, d + (a + 1) * d_k)
        v_rows = slice(2 * d + a * d_k, 2 * d + (a + 1) * d_k)
        Q = x @ W[q_rows].T + b[q_rows]  # [B, N, d_k]: x W_Q^a
        K = x @ W[k_rows].T + b[k_rows]
        V = x @ W[v_rows].T + b[v_rows]
        scores = Q @ K.transpose(-1, -2) / math.sqrt(d_k)
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        alpha = e / e.sum(-1, keepdim=True)
        outs.append(alpha @ V)
    return torch.cat(outs, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias


def ffn_by_hand(ffn, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x @ ffn.w1.weight.T + ffn.w1.bias, min=0.0) @ ffn.w2.weight.T + ffn.w2.bias


def ln_by_hand(norm, x: torch.Tensor) -> torch.Tensor:
    return layer_norm_equation(x, norm.weight, norm.bias, norm.eps)


def test_pre_norm_block_equals_the_decks_six_steps():
    torch.manual_seed(0)
    block = randomize(EncoderBlock(12, 3, 20, norm_first=True).double(), 1).eval()
    x = torch.randn(2, 5, 12, dtype=F64)
    t1 = ln_by_hand(block.attn_norm, x)  # 1. t1 = LayerNorm(x_i)
    t2 = mha_by_hand(block.attn, t1)  # 2. t2 = MultiHeadAttention(t1_i, t1_1..t1_N)
    t3 = t2 + x  # 3. first residual
    t4 = ln_by_hand(block.ffn_norm, t3)  # 4. t4 = LayerNorm(t3)
    t5 = ffn_by_hand(block.ffn, t4)  # 5. t5 = FFN(t4)
    h = t5 + t3  # 6. second residual
    assert max_err(block(x), h) <= TOL
    # the output is left unnormalised (hence the final norm of a pre-norm stack)
    assert max_err(h.mean(-1), torch.zeros(2, 5, dtype=F64)) > 1e-3


def test_post_norm_block_equals_layernorm_of_residual_sums():
    torch.manual_seed(2)
    block = randomize(EncoderBlock(12, 4, 20).double(), 3).eval()
    x = torch.randn(2, 5, 12, dtype=F64)
    h = ln_by_hand(block.attn_norm, x + mha_by_hand(block.attn, x))
    h = ln_by_hand(block.ffn_norm, h + ffn_by_hand(block.ffn, h))
    assert max_err(block(x), h) <= TOL


def test_pre_norm_stack_adds_one_final_norm():
    torch.manual_seed(4)
    enc = randomize(Encoder(2, 8, 2, 16, norm_first=True).double(), 5).eval()
    x = torch.randn(1, 4, 8, dtype=F64)
    h = enc.blocks[1](enc.blocks[0](x))
    assert max_err(enc(x), ln_by_hand(enc.final_norm, h)) <= TOL
    post = Encoder(2, 8, 2, 16)
    assert isinstance(post.final_norm, torch.nn.Identity)


@pytest.mark.parametrize("norm_first", [False, True])
def test_rmsnorm_swiglu_block_wiring(norm_first):
    """Blocks built from other parts keep the same residual wiring."""
    torch.manual_seed(6)
    block = randomize(EncoderBlock(8, 2, 12, norm="rmsnorm", ffn="swiglu", norm_first=norm_first).double(), 7).eval()
    x = torch.randn(2, 3, 8, dtype=F64)

    def rms(norm, t):
        return norm.weight * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps)

    def swiglu(ffn, t):
        g, v = (t @ ffn.w_in.weight.T + ffn.w_in.bias).chunk(2, dim=-1)
        return (g * torch.sigmoid(g) * v) @ ffn.w2.weight.T + ffn.w2.bias

    if norm_first:
        h = x + mha_by_hand(block.attn, rms(block.attn_norm, x))
        h = h + swiglu(block.ffn, rms(block.ffn_norm, h))
    else:
        h = rms(block.attn_norm, x + mha_by_hand(block.attn, x))
        h = rms(block.ffn_norm, h + swiglu(block.ffn, h))
    assert max_err(block(x), h) <= TOL


# ------------------------------------------------------------------------------------------------
# Cached incremental decoding == the full causal pass
# ------------------------------------------------------------------------------------------------

D, HEADS, D_FF, LAYERS = 16, 4, 32, 2
T, M = 8, 5  # target length, memory length


def make_decoder(kind: str, cross: bool, seed: int = 0, backend: str = "auto"):
    torch.manual_seed(seed)
    dec = Decoder(LAYERS, D, HEADS, D_FF, cross_attention=cross, norm_first=seed % 2 == 1, backend=backend).eval()
    pos = build_positional(kind, d_model=D, n_heads=HEADS, max_len=32).eval()
    return dec, pos


def decoder_inputs(batch: int = 2, seed: int = 100):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, D, generator=gen)
    memory = torch.randn(batch, M, D, generator=gen)
    lengths = torch.tensor([M, 2, 4, 3, 1][:batch])
    memory_mask = (torch.arange(M)[None, :] < lengths[:, None])[:, None, None, :]  # True = real token
    return x, memory, memory_mask


def run(dec, pos, x, memory, memory_mask, cache=None):
    """What a model does: add the input encoding at the cache's offset, then run the stack."""
    offset = 0 if cache is None else cache.length
    h = pos.add_to_input(x, offset=offset)
    if memory is None:
        return dec(h, positional=pos, cache=cache)
    return dec(h, memory, memory_mask=memory_mask, positional=pos, cache=cache)


SCHEDULES = {"one-at-a-time": [1] * T, "chunks-3-1-4": [3, 1, 4]}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("cross", [True, False], ids=["enc-dec", "gpt"])
@pytest.mark.parametrize("kind", POSITIONAL_KINDS)
def test_cached_decoding_equals_full_pass(kind, cross, schedule):
    dec, pos = make_decoder(kind, cross, seed=len(kind) + cross)
    x, memory, memory_mask = decoder_inputs()
    if not cross:
        memory = memory_mask = None
    with torch.no_grad():
        full = run(dec, pos, x, memory, memory_mask)
        cache = dec.new_cache()
        outs, start = [], 0
        for n in SCHEDULES[schedule]:
            outs.append(run(dec, pos, x[:, start : start + n], memory, memory_mask, cache))
            start += n
            assert cache.length == start
    assert max_err(torch.cat(outs, dim=1), full) <= CACHE_TOL
    # positions matter for every kind but "none": a shifted pass differs
    if kind != "none":
        with torch.no_grad():
            shifted = run(dec, pos, x[:, 1:], memory, memory_mask)
        assert max_err(shifted, full[:, 1:]) > 1e-3


@pytest.mark.parametrize("kind", ["rope", "alibi"])
def test_cached_decoding_math_backend(kind):
    dec, pos = make_decoder(kind, True, seed=3, backend="math")
    x, memory, memory_mask = decoder_inputs()
    with torch.no_grad():
        full = run(dec, pos, x, memory, memory_mask)
        cache = dec.new_cache()
        steps = [run(dec, pos, x[:, s : s + n], memory, memory_mask, cache) for s, n in ((0, 3), (3, 1), (4, 4))]
    assert max_err(torch.cat(steps, dim=1), full) <= CACHE_TOL


@pytest.mark.parametrize("kind", ["learned", "rope"])
def test_memory_none_after_first_cached_step(kind):
    """Regression: with ``memory=None`` on later steps, cross-attention used to run as *self*-attention
    over the cross cache (silently wrong, and the cross cache grew). Now the cached memory is reused."""
    dec, pos = make_decoder(kind, True, seed=5)
    x, memory, memory_mask = decoder_inputs()
    with torch.no_grad():
        full = run(dec, pos, x, memory, memory_mask)
        cache = dec.new_cache()
        outs = [run(dec, pos, x[:, :2], memory, memory_mask, cache)]
        for t in range(2, T):
            h = pos.add_to_input(x[:, t : t + 1], offset=cache.length)
            outs.append(dec(h, None, memory_mask=memory_mask, positional=pos, cache=cache))
    assert max_err(torch.cat(outs, dim=1), full) <= CACHE_TOL
    assert all(block.cross_attn.length == M for block in cache.blocks)


@pytest.mark.parametrize("cross", [True, False], ids=["enc-dec", "gpt"])
@pytest.mark.parametrize("kind", ["sinusoidal", "rope", "alibi"])
def test_reorder_then_continue_equals_reordered_batch(kind, cross):
    dec, pos = make_decoder(kind, cross, seed=7)
    x, memory, memory_mask = decoder_inputs(batch=3)
    if not cross:
        memory = memory_mask = None
    index = torch.tensor([2, 0, 0, 1])  # beams: drop none, duplicate row 0, grow the batch to 4

    def pick(t):
        return None if t is None else t.index_select(0, index)

    prefix = 4
    with torch.no_grad():
        cache = dec.new_cache()
        run(dec, pos, x[:, :prefix], memory, memory_mask, cache)
        cache.reorder(index)
        steps = [run(dec, pos, pick(x)[:, t : t + 1], pick(memory), pick(memory_mask), cache) for t in range(prefix, T)]
        fresh = run(dec, pos, pick(x), pick(memory), pick(memory_mask))
    assert max_err(torch.cat(steps, dim=1), fresh[:, prefix:]) <= CACHE_TOL
    if cross:  # the cached memory is reordered too: continuing with memory=None works
        with torch.no_grad():
            cache = dec.new_cache()
            run(dec, pos, x[:, :prefix], memory, memory_mask, cache)
            cache.reorder(index)
            h = pos.add_to_input(pick(x)[:, prefix : prefix + 1], offset=prefix)
            out = dec(h, None, memory_mask=pick(memory_mask), positional=pos, cache=cache)
        assert max_err(out, fresh[:, prefix : prefix + 1]) <= CACHE_TOL


@pytest.mark.parametrize("cross", [True, False], ids=["enc-dec", "gpt"])
@pytest.mark.parametrize("kind", ["learned", "rope", "alibi"])
def test_crop_then_continue_equals_fresh_pass(kind, cross):
    dec, pos = make_decoder(kind, cross, seed=9)
    x, memory, memory_mask = decoder_inputs()
    if not cross:
        memory = memory_mask = None
    other = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        cache = dec.new_cache()
        run(dec, pos, x[:, :6], memory, memory_mask, cache)
        cache.crop(3)
        assert cache.length == 3
        continued = run(dec, pos, other, memory, memory_mask, cache)
        fresh = run(dec, pos, torch.cat([x[:, :3], other], dim=1), memory, memory_mask)
    assert cache.length == 7
    assert max_err(continued, fresh[:, 3:]) <= CACHE_TOL
    with pytest.raises(ShapeError, match="crop length=8"):
        cache.crop(8)


def test_cached_decoder_block_alone():
    """A single ``DecoderBlock`` with a ``BlockCache``, GPT-style, one token at a time."""
    torch.manual_seed(12)
    block = DecoderBlock(D, HEADS, D_FF, cross_attention=False).eval()
    rope = build_positional("rope", d_model=D, n_heads=HEADS)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        full = block(x, positional=rope)
        cache = BlockCache()
        steps = torch.cat([block(x[:, t : t + 1], positional=rope, cache=cache) for t in range(5)], dim=1)
    assert max_err(steps, full) <= CACHE_TOL
    assert not hasattr(block, "cross_attn")


# ------------------------------------------------------------------------------------------------
# gradcheck through attention with each positional encoding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rope", "alibi", "sinusoidal", "learned"])
def test_gradcheck_attention_with_positional(kind):
    torch.manual_seed(13)
    mha = MultiHeadAttention(8, 2).double()  # default backend
    pos = build_positional(kind, d_model=8, n_heads=2, max_len=6).double()
    x = torch.randn(1, 3, 8, dtype=F64, requires_grad=True)

    def f(inp):
        return mha(pos.add_to_input(inp, offset=3), causal=True, positional=pos)

    assert gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    if kind == "learned":  # and into the learned table itself
        table = pos.embedding.weight.detach().clone().requires_grad_(True)

        class AddPos(torch.nn.Module):  # functional_call runs forward(): route it to add_to_input
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, inp, offset):
                return self.inner.add_to_input(inp, offset)

        wrapper = AddPos(pos)

        def g(inp, weight):
            h = torch.func.functional_call(wrapper, {"inner.embedding.weight": weight}, (inp, 3))
            return mha(h, causal=True)

        assert gradcheck(g, (x, table), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_cross_attention_without_memory_is_a_shape_error():
    block = DecoderBlock(8, 2, 16)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ShapeError, match=r"memory=None.*cross-attention"):
        block(x)
    with pytest.raises(ShapeError, match=r"memory=None.*cross-attention"):
        block(x, cache=BlockCache())  # an empty cache holds no memory either
    dec = Decoder(2, 8, 2, 16)
    with pytest.raises(ShapeError, match="memory=None"):
        dec(x)


@pytest.mark.parametrize(
    ("kwargs", "suggestion"),
    [({"norm": "layrnorm"}, "layernorm"), ({"norm": "rms_norm"}, "rmsnorm"), ({"ffn": "swiglue"}, "swiglu"), ({"ffn": "gelu-tanh"}, "gelu_tanh")],
)
@pytest.mark.parametrize("cls", [EncoderBlock, DecoderBlock, Encoder])
def test_unknown_block_parts_suggest_the_closest(cls, kwargs, suggestion):
    args = (1, 8, 2, 16) if cls is Encoder else (8, 2, 16)
    with pytest.raises(ConfigError) as info:
        cls(*args, **kwargs)
    message = str(info.value)
    (value,) = kwargs.values()
    assert repr(value) in message
    assert f"did you mean {suggestion!r}" in message


@pytest.mark.parametrize("norm_first", [False, True])
def test_wrong_input_width_is_a_shape_error(norm_first):
    block = EncoderBlock(8, 2, 16, norm_first=norm_first)
    with pytest.raises(ShapeError) as info:
        block(torch.randn(1, 3, 6))
    assert "8" in str(info.value) and "6" in str(info.value)
    dec = DecoderBlock(8, 2, 16, norm_first=norm_first)
    with pytest.raises(ShapeError, match="memory"):
        dec(torch.randn(1, 3, 8), torch.randn(1, 4, 6))


def test_bad_block_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="d_model=10 is not divisible by n_heads=4"):
        EncoderBlock(10, 4, 16)
    with pytest.raises(ConfigError, match="d_ff=0"):
        DecoderBlock(8, 2, 0)
    with pytest.raises(ConfigError, match="n_layers=0"):
        Encoder(0, 8, 2, 16)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        Decoder(1, 8, 2, 16, dropout=1.5)
