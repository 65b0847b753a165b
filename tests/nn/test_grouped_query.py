"""Grouped-query attention: K/V with ``G`` heads, each read by ``A / G`` query heads.

The reference is the equation per query head ``h``, in float64: ``softmax(q_h k_g^T / sqrt(d_k)) v_g`` with
``g = h // (A / G)``; every backend is also checked against itself on K/V repeated to ``A`` heads (the
approximate backends compute no exact softmax, but grouping must not change what they compute).
"""

from __future__ import annotations

import math

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.nn import KVCache
from archlab.nn.attention import MultiHeadAttention, attend, kv_groups, repeat_kv
from archlab.nn.positional import ALiBi, RotaryPositionalEncoding

B, A, N, D = 2, 6, 9, 4
EXACT = ["math", "sdpa", "auto", "chunked:block=4", "sliding:window=64,block=4", "bigbird:block=3,window=1,random=0,global=3"]
APPROXIMATE = ["sliding:window=3,block=4", "linear:chunk=4"]


def qkv(g: int, *, n: int = N, m: int = N, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, A, n, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, g, m, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, g, m, D, generator=gen, dtype=torch.float64)
    return q, k, v


def reference(q, k, v, *, causal: bool, key_mask=None):
    """The equation, one query head at a time: query head h reads K/V head h // (A / G)."""
    group = q.shape[1] // k.shape[1]
    n, m = q.shape[-2], k.shape[-2]
    allowed = torch.ones(n, m, dtype=torch.bool)
    if causal:
        allowed = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        ok = allowed if key_mask is None else allowed & key_mask[b][None, :]
        for h in range(q.shape[1]):
            scores = q[b, h] @ k[b, h // group].T / math.sqrt(q.shape[-1])
            weights = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
            out[b, h] = weights @ v[b, h // group]
    return out


@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_equal_the_equation_per_head(backend, g):
    q, k, v = qkv(g)
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[0, :3] = False  # left padding of one row
    mask = None if backend.startswith("bigbird") else key_mask[:, None, None, :]
    want = reference(q, k, v, causal=True, key_mask=None if mask is None else key_mask)
    got = attend(q, k, v, causal=True, mask=mask, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, attend(q, repeat_kv(k, A // g), repeat_kv(v, A // g), causal=True, mask=mask,
                                           backend=backend), atol=1e-12, rtol=0)  # fmt: skip


@pytest.mark.parametrize("backend", APPROXIMATE)
def test_approximate_backends_equal_themselves_with_repeated_kv(backend):
    q, k, v = qkv(3)
    got = attend(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(got, attend(q, repeat_kv(k, 2), repeat_kv(v, 2), causal=True, backend=backend),
                               atol=1e-12, rtol=0)  # fmt: skip


def test_cached_queries_against_longer_grouped_keys():
    q, k, v = qkv(2, n=3, m=N)  # 3 new queries after 6 cached positions (bottom-right causal)
    for backend in ("math", "sdpa", "chunked:block=2"):
        torch.testing.assert_close(attend(q, k, v, causal=True, backend=backend), reference(q, k, v, causal=True),
                                   atol=1e-12, rtol=0)  # fmt: skip


def test_repeat_kv_and_groups():
    k = torch.arange(2 * 3 * 1 * 1.0).view(2, 3, 1, 1)
    assert repeat_kv(k, 2)[0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]  # head g serves query heads 2g, 2g + 1
    q = torch.zeros(2, 6, 4, 1)
    assert kv_groups(q, k, k) == 2 and kv_groups(q, q, q) == 1
    assert kv_groups(q, k[:, :1], k[:, :1]) == 6  # multi-query
    assert kv_groups(q[0], k[0], k[0]) == 1  # no head axis: plain broadcasting


def test_kv_heads_that_do_not_divide_the_query_heads_are_refused():
    q, k, v = qkv(4)
    with pytest.raises(ShapeError, match="do not broadcast"):
        attend(q, k, v)
    with pytest.raises(ConfigError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        MultiHeadAttention(24, 6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="n_kv_heads=0"):
        MultiHeadAttention(24, 6, n_kv_heads=0)


def grouped_and_repeated(g: int, backend: str, *, bias: bool = True):
    """A grouped MultiHeadAttention and a multi-head one whose K/V rows are the grouped heads repeated."""
    torch.manual_seed(0)
    d = A * D
    grouped = MultiHeadAttention(d, A, n_kv_heads=g, bias=bias, backend=backend).double().eval()
    full = MultiHeadAttention(d, A, bias=bias, backend=backend).double().eval()
    state = grouped.state_dict()
    for name in ("in_proj.weight", "in_proj.bias") if bias else ("in_proj.weight",):
        t = state[name]
        q, k, v = t.split([A * D, g * D, g * D])
        rep = [x.unflatten(0, (g, D)).repeat_interleave(A // g, dim=0).flatten(0, 1) for x in (k, v)]
        state[name] = torch.cat([q, *rep])
    full.load_state_dict(state)  # Linformer's E, F and Performer's features come along
    return grouped, full


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize(
    "backend", ["auto", "math", "chunked:block=4", "sliding:window=4,block=4", "linear", "performer:features=16"]
)
def test_multihead_attention_with_g_kv_heads_equals_repeated_heads(backend, g):
    grouped, full = grouped_and_repeated(g, backend)
    assert grouped.in_proj.weight.shape == ((A + 2 * g) * D, A * D)
    x = torch.randn(B, N, A * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for positional in (None, RotaryPositionalEncoding(D), ALiBi(A)) if not backend.startswith(("linear", "perf")) else (None,):
        torch.testing.assert_close(grouped(x, causal=True, positional=positional), full(x, causal=True, positional=positional),
                                   atol=1e-12, rtol=0)  # fmt: skip


def test_linformer_with_grouped_kv():
    grouped, full = grouped_and_repeated(2, "linformer:rank=5,max_len=16")
    x = torch.randn(B, N, A * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grouped(x), full(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("g", [1, 2, A])
def test_cache_holds_only_the_kv_heads_and_cached_equals_uncached(g):
    grouped, _ = grouped_and_repeated(g, "auto")
    rope = RotaryPositionalEncoding(D)
    x = torch.randn(B, N, A * D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole = grouped(x, causal=True, positional=rope)
    cache = KVCache()
    steps = [grouped(x[:, :4], causal=True, positional=rope, cache=cache)]
    steps += [grouped(x[:, i : i + 1], causal=True, positional=rope, cache=cache) for i in range(4, N)]
    assert cache.keys.shape == (B, g, N, D) and cache.values.shape == (B, g, N, D)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-12, rtol=0)


def test_cross_attention_with_grouped_kv():
    grouped, full = grouped_and_repeated(3, "auto")
    x = torch.randn(B, 4, A * D, dtype=torch.float64)
    memory = torch.randn(B, 7, A * D, dtype=torch.float64)
    torch.testing.assert_close(grouped(x, memory), full(x, memory), atol=1e-12, rtol=0)
    cache = KVCache()
    grouped(x, memory, cache=cache)
    assert cache.keys.shape == (B, 3, 7, D)


@pytest.mark.parametrize("d_v", [None, 6])
@pytest.mark.parametrize("g", [1, 2, A])
def test_self_attention_projection_is_the_row_blocks_of_in_proj(g, d_v):
    """Self-attention's q, k, v (one product, viewed as heads and split; q and k rotated in one pass) equal
    ``x W_Q^T``, ``x W_K^T``, ``x W_V^T`` from the row blocks of ``in_proj`` taken apart, heads each, rotated
    by RoPE's :meth:`transform_qk`; also with ``d_v != d_k`` (no shared head view) and without RoPE."""
    torch.manual_seed(3)
    attn = MultiHeadAttention(A * D, A, n_kv_heads=g, d_v=d_v, bias=True).double()
    dv = D if d_v is None else d_v
    x = torch.randn(B, N, A * D, dtype=torch.float64)
    w, b = attn.in_proj.weight, attn.in_proj.bias
    rows = [A * D, g * D, g * dv]
    parts = [(x @ wi.T + bi).unflatten(-1, (-1, width)).transpose(1, 2)
             for wi, bi, width in zip(w.split(rows), b.split(rows), (D, D, dv))]  # fmt: skip
    rope = RotaryPositionalEncoding(D)
    for positional in (None, rope):
        q, k, v = attn._project_qkv(x, positional, offset=5)
        want_q, want_k = (parts[0], parts[1]) if positional is None else rope.transform_qk(parts[0], parts[1], 5)
        assert (q.shape, k.shape, v.shape) == ((B, A, N, D), (B, g, N, D), (B, g, N, dv))
        for got, want in ((q, want_q), (k, want_k), (v, parts[2])):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
