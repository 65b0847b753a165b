"""Tests of ``archlab.nn.efficient``: every memory-saving backend against its reference, written out here.

What is checked against what:

* Backend specs: parsing, defaults, and a ConfigError naming the spec, key, value and what is allowed
  for every kind of mistake; families take specs in their ``backend`` field and reject bad ones.
* Chunked (online softmax) against ``attend(backend="math")``: float64 to 1e-10 and float32 to 1e-5,
  forward and gradients of q, k, v (and of a tensor bias), with causal (N == M and N != M), a padding
  mask and ALiBi, for block sizes that do and do not divide N; ``gradcheck`` with dropout at a fixed
  seed; ALiBi generated per tile (:class:`RelativeBias`) equals the dense table; what backward keeps
  is O(N d), never an N x M tensor.
* Sliding window (causal and two-sided, global tokens by count or by position, N != M) against full
  attention under the band/global mask built here; the keys visited per query block stay within
  ``window + 2 block`` (work O(N w), no N x N); window >= N equals full attention.
* BigBird: the layout's properties (global rows and columns, window, random count, seeded), and
  attention against the masked reference expanded from the layout here.
* Linear (elu + 1) and Performer: causal and non-causal against their quadratic forms; Performer's
  error against softmax attention falls as features grow (fixed seeds); FAVOR+ features estimate
  ``exp(q.k / sqrt(d))``; orthogonality of the random features; redraw in training only.
* Linformer against its formula; with ``E = F = I`` it is full attention; length and causal errors.
* Families: ``build_model("gpt-nano", backend=...)`` equals the default backend's logits (and
  gradients) where the backend is exact; cached decoding with a sliding window; BERT with Linformer.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model
from archlab.models.bert import BertConfig
from archlab.models.gpt import GPTConfig
from archlab.nn import ALiBi, MultiHeadAttention, attend
from archlab.nn.backends import BACKENDS, PARAMS, RelativeBias, check_backend, is_backend, parse_backend
from archlab.nn.efficient import (
    FullPattern,
    LinformerAttention,
    PerformerAttention,
    SlidingPattern,
    _TiledAttention,
    bigbird_attention,
    bigbird_layout,
    chunked_attention,
    elu_feature_map,
    favor_features,
    favor_key_stabiliser,
    kernel_attention,
    linear_attention,
    orthogonal_gaussian,
    sliding_window_attention,
)

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(b=2, a=3, n=37, m=45, d=8, dv=5, *, seed=0, dtype=DT, grad=True):
    g = gen(seed)
    out = [torch.randn(b, a, n, d, generator=g, dtype=dtype), torch.randn(b, a, m, d, generator=g, dtype=dtype),
           torch.randn(b, a, m, dv, generator=g, dtype=dtype)]  # fmt: skip
    return [t.requires_grad_(grad) for t in out]


def grads(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    """Gradients of a loss that weighs every output element differently (so no symmetry hides an error)."""
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return list(torch.autograd.grad((out * w).sum() + (out**2).sum(), inputs))


def max_err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ================================================================================================
# Backend specs
# ================================================================================================


def test_parse_fills_defaults_and_reads_values():
    spec = parse_backend("sliding:window=64, global=2")
    assert spec.kind == "sliding" and spec["window"] == 64 and spec["global"] == 2 and spec["block"] == 256
    assert str(spec) == "sliding:window=64,global=2,block=256"
    assert parse_backend(str(spec)) == spec
    assert parse_backend("chunked")["block"] == PARAMS["chunked"]["block"].default
    assert parse_backend("sdpa").params == ()


def test_backend_names_list_every_kind():
    assert set(BACKENDS) == set(PARAMS)
    assert is_backend("chunked:block=32") and not is_backend("nope") and not is_backend(3)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("chunkd", r"unknown kind 'chunkd' \(did you mean 'chunked'\?\)"),
        ("chunked:blok=64", r"unknown key 'blok' \(did you mean 'block'\?\); known: block"),
        ("chunked:block=0", r"block='0' must be an integer >= 1"),
        ("chunked:block=abc", r"block='abc' must be an integer >= 1"),
        ("chunked:block", r"block='' must be an integer >= 1"),
        ("sliding:global=-1", r"global='-1' must be an integer >= 0"),
        ("performer:redraw=2", r"redraw='2' must be an integer >= 0 and <= 1"),
        ("sdpa:block=4", r"'sdpa' takes no parameters"),
        ("linear:", r"nothing after ':'"),
        ("bigbird:window=4", r"window=4 must be odd"),
        ("chunked:block=8,,", r"unknown key ''"),
    ],
)
def test_bad_specs_raise_config_error_naming_key_value_and_rule(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_backend(spec)


def test_bad_spec_fails_through_check_backend_like_every_family_field():
    with pytest.raises(ConfigError, match=r"did you mean 'sliding'"):
        check_backend("slidng")
    with pytest.raises(ConfigError, match=r"window='x'"):
        check_backend("sliding:window=x")
    with pytest.raises(ConfigError, match=r"backend"):
        check_backend(3)


def test_family_configs_take_specs_and_round_trip_through_json():
    c = GPTConfig(backend="sliding:window=64,global=1")
    assert GPTConfig.from_json(c.to_json()) == c
    assert BertConfig(backend="linformer:rank=16,max_len=512").backend.startswith("linformer")
    with pytest.raises(ConfigError, match=r"block='0'"):
        GPTConfig(backend="chunked:block=0")
    with pytest.raises(ConfigError, match=r"did you mean 'performer'"):
        BertConfig(backend="performr")


# ================================================================================================
# Chunked exact attention
# ================================================================================================


def padding(m: int) -> torch.Tensor:
    """``[2, 1, 1, M]``: row 0 all real, row 1 with its last 9 keys padded."""
    return torch.arange(m)[None, None, None, :] < torch.tensor([m, m - 9])[:, None, None, None]


CASES = {  # attend() keyword arguments, from (generator, N, M)
    "plain": lambda g, n, m: {},
    "causal": lambda g, n, m: {"causal": True},
    "padding": lambda g, n, m: {"mask": padding(m)},
    "mask+bias+causal": lambda g, n, m: {
        "mask": torch.rand(2, 1, n, m, generator=g) > 0.3,
        "bias": torch.randn(3, n, m, generator=g, dtype=DT),
        "causal": True,
    },
    "alibi+causal": lambda g, n, m: {"bias": ALiBi(3).attention_bias(n, m, m - n), "causal": True},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n, m", [(45, 45), (37, 45)])
@pytest.mark.parametrize("block", [1, 7, 16, 64])
def test_chunked_equals_full_attention_float64_forward_and_gradients(case, n, m, block):
    q, k, v = qkv(n=n, m=m)
    kw = CASES[case](gen(1), n, m)
    ref = attend(q, k, v, backend="math", **kw)
    out = chunked_attention(q, k, v, block=block, **kw)
    assert max_err(out, ref) < 1e-10
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert max_err(g_out, g_ref) < 1e-10


@pytest.mark.parametrize("case", ["causal", "padding", "alibi+causal"])
def test_chunked_equals_full_attention_float32(case):
    q, k, v = (t.detach().float().requires_grad_() for t in qkv(n=70, m=70, d=16, dv=16))
    kw = {key: val.float() if isinstance(val, torch.Tensor) and val.is_floating_point() else val
          for key, val in CASES[case](gen(1), 70, 70).items()}  # fmt: skip
    ref = attend(q, k, v, backend="math", **kw)
    out = chunked_attention(q, k, v, block=16, **kw)
    assert out.dtype == torch.float32 and max_err(out, ref) < 1e-5
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert max_err(g_out, g_ref) < 1e-5


def test_chunked_gradient_reaches_a_learned_bias():
    q, k, v = qkv(n=20, m=24)
    bias = torch.randn(3, 1, 24, dtype=DT, requires_grad=True)  # broadcast over queries
    ref = attend(q, k, v, bias=bias, causal=True, backend="math")
    out = chunked_attention(q, k, v, bias=bias, causal=True, block=5)
    (g_ref,) = grads(ref, (bias,))
    (g_out,) = grads(out, (bias,))
    assert g_out.shape == bias.shape and max_err(g_out, g_ref) < 1e-10


def test_chunked_broadcasts_shared_keys_and_values_over_heads():
    q, _, _ = qkv(n=21, m=21)
    g = gen(3)
    k = torch.randn(2, 1, 21, 8, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(2, 1, 21, 5, generator=g, dtype=DT, requires_grad=True)
    ref = attend(q, k, v, causal=True, backend="math")
    out = chunked_attention(q, k, v, causal=True, block=4)
    assert max_err(out, ref) < 1e-10
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert g_out.shape == g_ref.shape and max_err(g_out, g_ref) < 1e-10


def test_chunked_query_with_no_key_gets_zero_output_and_zero_gradient():
    q, k, v = qkv(n=6, m=6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    out = chunked_attention(q, k, v, mask=mask, block=4)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    dq, _, _ = grads(out, (q, k, v))
    assert torch.isfinite(dq).all() and torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))
    assert max_err(out, attend(q, k, v, mask=mask, backend="math")) < 1e-10


def test_gradcheck_tiled_attention_with_dropout_at_a_fixed_seed():
    q, k, v = qkv(b=1, a=2, n=6, m=7, d=3, dv=2)
    bias = torch.randn(2, 6, 7, dtype=DT, requires_grad=True)
    pattern = FullPattern(6, 7, 3, causal=True)

    def f(q, k, v, bias):
        return _TiledAttention.apply(q, k, v, bias, None, pattern, None, 0.5, 0.3, 1234)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    assert torch.equal(f(q, k, v, bias), f(q, k, v, bias))  # the seed fixes the dropout masks
    no_dropout = _TiledAttention.apply(q, k, v, bias, None, pattern, None, 0.5, 0.0, 0)
    assert max_err(f(q, k, v, bias), no_dropout) > 1e-3


def test_chunked_dropout_keeps_the_expectation():
    q, k, v = (t.detach() for t in qkv(b=1, a=1, n=8, m=8))
    exact = chunked_attention(q, k, v, causal=True, block=3)
    torch.manual_seed(0)
    samples = chunked_attention(
        *(t.expand(4000, *t.shape[1:]) for t in (q, k, v)), causal=True, block=3, dropout_p=0.25
    )
    assert max_err(samples.mean(dim=0, keepdim=True), exact) < 0.06  # sampling error ~ 1/sqrt(4000) of the spread
    assert max_err(chunked_attention(q, k, v, causal=True, block=3, dropout_p=0.25), exact) > 1e-3


@pytest.mark.parametrize("offset", [0, 11])
def test_relative_bias_generated_per_tile_equals_the_dense_alibi_table(offset):
    alibi = ALiBi(3)
    lazy = RelativeBias(alibi, 9, 9 + offset, offset, 3)
    assert lazy.shape == (3, 9, 9 + offset)
    dense = alibi.attention_bias(9, 9 + offset, offset)
    assert max_err(lazy.dense(dtype=DT), dense) == 0.0
    cols = torch.tensor([0, 5, 2, 17])[: 2 + offset // 5]
    assert max_err(lazy.tile(torch.arange(3, 7), cols, dtype=DT), dense[:, 3:7][:, :, cols]) == 0.0
    q, k, v = qkv(n=9, m=9 + offset)
    ref = attend(q, k, v, bias=dense, causal=True, backend="math")
    assert max_err(chunked_attention(q, k, v, bias=lazy, causal=True, block=4), ref) < 1e-10
    assert max_err(attend(q, k, v, bias=lazy, causal=True, backend="math"), ref) < 1e-10


def saved_bytes(fn) -> tuple[int, int]:
    """(total bytes, largest element count) of the tensors autograd saves while ``fn()`` runs forward."""
    seen: dict[int, tuple[int, int]] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(b for b, _ in seen.values()), max(c for _, c in seen.values())


def test_chunked_backward_keeps_o_n_d_not_the_score_matrix():
    n, d = 1024, 16
    q, k, v = (torch.randn(1, 2, n, d, requires_grad=True) for _ in range(3))
    total, largest = saved_bytes(lambda: chunked_attention(q, k, v, causal=True, block=128))
    assert largest < n * n  # no [N, M] tensor
    assert total <= 6 * 2 * n * (d + 1) * 4  # q, k, v, out, lse (float32)
    math_total, math_largest = saved_bytes(lambda: attend(q, k, v, causal=True, backend="math"))
    assert math_largest >= 2 * n * n and math_total > 10 * total


# ================================================================================================
# Sliding window + global tokens
# ================================================================================================


def band_reference_mask(n, m, window, globals_, causal):
    p = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    near = ((p - j >= 0) & (p - j < window)) if causal else ((p - j).abs() < window)
    g = torch.zeros(m, dtype=torch.bool)
    g[globals_] = True
    ok = near | g[(p[:, 0])][:, None] | g[None, :]
    return ok & (j <= p) if causal else ok


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 9])
@pytest.mark.parametrize("global_tokens", [0, 2, [5, 30]])
def test_sliding_equals_full_attention_under_the_band_and_global_mask(causal, window, global_tokens):
    n = 50
    q, k, v = qkv(n=n, m=n)
    globals_ = list(range(global_tokens)) if isinstance(global_tokens, int) else global_tokens
    mask = band_reference_mask(n, n, window, globals_, causal)
    ref = attend(q, k, v, mask=mask, backend="math")
    out = sliding_window_attention(q, k, v, window=window, global_tokens=global_tokens, causal=causal, block=8)
    assert max_err(out, ref) < 1e-10
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert max_err(g_out, g_ref) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_pattern_as_a_dense_mask_is_the_band_and_globals(causal):
    pattern = SlidingPattern(30, 40, 4, causal, 5, torch.tensor([0, 33]))
    assert torch.equal(pattern.dense_mask(), band_reference_mask(30, 40, 5, [0, 33], causal))
    assert torch.equal(FullPattern(30, 40, 7, causal).dense_mask(), attention_pattern_reference(30, 40, causal))


def attention_pattern_reference(n, m, causal):
    return (
        torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n) if causal else torch.ones(n, m, dtype=torch.bool)
    )


def test_sliding_with_cache_offset_padding_and_alibi():
    n, m, window = 6, 40, 7
    q, k, v = qkv(n=n, m=m)
    pad = torch.ones(2, 1, 1, m, dtype=torch.bool)
    pad[1, ..., :10] = False
    bias = ALiBi(3).attention_bias(n, m, m - n)
    mask = band_reference_mask(n, m, window, [0], True) & pad
    ref = attend(q, k, v, mask=mask, bias=bias, backend="math")
    out = sliding_window_attention(q, k, v, window=window, global_tokens=1, mask=pad, bias=bias, causal=True, block=4)
    assert max_err(out, ref) < 1e-10


def test_sliding_window_covering_everything_is_full_attention():
    q, k, v = qkv(n=33, m=33)
    for causal in (False, True):
        ref = attend(q, k, v, causal=causal, backend="math")
        assert max_err(sliding_window_attention(q, k, v, window=33, causal=causal, block=8), ref) < 1e-10


def test_sliding_visits_only_the_band_no_n_by_n():
    n, window, block = 4096, 64, 32
    for causal in (True, False):
        pattern = SlidingPattern(n, n, block, causal, window, torch.arange(0))
        visited = [sum(t[1] - t[0] for t in pattern.key_tiles(i0, i1)) for i0, i1 in pattern.query_blocks()]
        assert max(visited) <= 2 * window + 2 * block  # per query block: O(w + block), so O(n w) in all
    with_global = SlidingPattern(n, n, block, True, window, torch.tensor([0, 2000]))
    tiles = with_global.key_tiles(3000, 3032)
    assert sum(len(t) if isinstance(t, torch.Tensor) else t[1] - t[0] for t in tiles) <= window + block + 2


def test_functional_backends_reject_bad_tile_and_chunk_sizes():
    q, k, v = qkv(n=8, m=8)
    with pytest.raises(ConfigError, match=r"block=0 must be an integer >= 1"):
        chunked_attention(q, k, v, block=0)
    with pytest.raises(ConfigError, match=r"chunk=0 must be an integer >= 1"):
        linear_attention(q, k, v, causal=True, chunk=0)
    with pytest.raises(ShapeError, match=r"at least as many keys as queries, got N=8, M=4"):
        chunked_attention(q, k[..., :4, :], v[..., :4, :], causal=True)


def test_sliding_rejects_bad_window_and_global_positions():
    q, k, v = qkv(n=8, m=8)
    with pytest.raises(ConfigError, match="window=0"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ShapeError, match=r"global token positions must be in \[0, M=8\)"):
        sliding_window_attention(q, k, v, window=2, global_tokens=[3, 9])


# ================================================================================================
# BigBird
# ================================================================================================


def test_bigbird_layout_has_global_window_and_seeded_random_blocks():
    nb, w, r, g = 12, 3, 2, 2
    layout = bigbird_layout(nb, window=w, n_random=r, n_global=g, seed=7, causal=False)
    for b, row in enumerate(layout):
        assert row == sorted(set(row))
        if b < g:
            assert row == list(range(nb))  # global query blocks see everything
            continue
        assert set(range(g)) <= set(row)  # every block sees the global ones
        near = {x for x in (b - 1, b, b + 1) if 0 <= x < nb}
        assert near <= set(row)
        assert len(set(row) - near - set(range(g))) == r  # exactly r random blocks
    assert layout == bigbird_layout(nb, window=w, n_random=r, n_global=g, seed=7, causal=False)
    assert layout != bigbird_layout(nb, window=w, n_random=r, n_global=g, seed=8, causal=False)
    causal = bigbird_layout(nb, window=w, n_random=r, n_global=g, seed=7, causal=True)
    assert all(max(row) == b and {b - 2, b - 1, b} & set(range(nb)) <= set(row) for b, row in enumerate(causal))


def layout_mask(layout, n, block):
    mask = torch.zeros(n, n, dtype=torch.bool)
    for b, row in enumerate(layout):
        for kb in row:
            mask[b * block : (b + 1) * block, kb * block : (kb + 1) * block] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [64, 70])
def test_bigbird_equals_its_masked_reference(causal, n):
    block = 8
    q, k, v = qkv(n=n, m=n)
    layout = bigbird_layout(-(-n // block), window=3, n_random=2, n_global=1, seed=3, causal=causal)
    mask = layout_mask(layout, n, block)
    assert not mask.all()  # really sparse
    ref = attend(q, k, v, mask=mask, causal=causal, backend="math")
    out = bigbird_attention(q, k, v, block=block, window=3, n_random=2, n_global=1, seed=3, causal=causal)
    assert max_err(out, ref) < 1e-10
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert max_err(g_out, g_ref) < 1e-10


def test_bigbird_needs_a_sequence_attending_to_itself():
    q, k, v = qkv(n=8, m=16)
    with pytest.raises(ShapeError, match=r"N == M.*N=8.*M=16"):
        bigbird_attention(q, k, v, block=4)


# ================================================================================================
# Kernel attention: elu + 1, Performer
# ================================================================================================


def quadratic_kernel_form(phi_q, phi_k, v, causal, key_mask=None):
    """``(phi_Q phi_K^T o mask) V / rowsum``, the O(N M) form the linear one must equal."""
    a = phi_q @ phi_k.transpose(-2, -1)
    n, m = a.shape[-2:]
    if causal:
        a = a * (torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n))
    if key_mask is not None:
        a = a * key_mask[..., None, :]
    return (a @ v) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("n, m", [(30, 30), (12, 30)])
def test_linear_attention_equals_its_quadratic_form(causal, chunk, n, m):
    q, k, v = qkv(n=n, m=m)
    out = linear_attention(q, k, v, causal=causal, chunk=chunk)
    ref = quadratic_kernel_form(elu_feature_map(q), elu_feature_map(k), v, causal)
    assert max_err(out, ref) < 1e-10
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert max_err(g_out, g_ref) < 1e-10


def test_linear_attention_key_mask_and_refusals():
    q, k, v = qkv(n=10, m=10)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[0, ..., 7:] = False
    out = linear_attention(q, k, v, mask=keep, causal=True, chunk=4)
    ref = quadratic_kernel_form(elu_feature_map(q), elu_feature_map(k), v, True, keep[:, :, 0].to(DT))
    assert max_err(out, ref) < 1e-10
    with pytest.raises(ShapeError, match=r"only key masks \[..., 1, M\]"):
        linear_attention(q, k, v, mask=torch.ones(10, 10, dtype=torch.bool))
    with pytest.raises(ConfigError, match="cannot add a score bias"):
        linear_attention(q, k, v, bias=torch.zeros(10, 10, dtype=DT))
    with pytest.raises(ConfigError, match="no attention weights to drop"):
        linear_attention(q, k, v, dropout_p=0.1)


def test_kernel_attention_with_every_key_masked_gives_zero():
    q, k, v = qkv(n=4, m=4)
    none = torch.zeros(4, dtype=torch.bool)
    out = kernel_attention(q, k, v, phi_q=elu_feature_map, phi_k=elu_feature_map, causal=True, key_mask=none, chunk=2)
    assert torch.equal(out, torch.zeros_like(out))


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = orthogonal_gaussian(40, 16, generator=gen(0)).double()
    block = w[:16] / w[:16].norm(dim=-1, keepdim=True)
    assert max_err(block @ block.T, torch.eye(16, dtype=DT)) < 1e-5
    assert w.shape == (40, 16)


def test_favor_features_estimate_the_softmax_kernel():
    g = gen(0)
    q, k = torch.randn(5, 8, generator=g, dtype=DT) * 0.5, torch.randn(7, 8, generator=g, dtype=DT) * 0.5
    omega = orthogonal_gaussian(50000, 8, generator=gen(10)).double()
    x_q, x_k = q / 8**0.25, k / 8**0.25  # the features without the stabilising max shift
    phi_q = torch.exp(x_q @ omega.T - (x_q**2).sum(-1, keepdim=True) / 2) / math.sqrt(50000)
    phi_k = torch.exp(x_k @ omega.T - (x_k**2).sum(-1, keepdim=True) / 2) / math.sqrt(50000)
    kernel = torch.exp(q @ k.T / math.sqrt(8))
    # unbiased: the mean relative error over the 35 pairs is at the sampling level (a QR without the
    # sign fix, i.e. not uniformly random rotations, gives ~7% here)
    assert ((phi_q @ phi_k.T) / kernel - 1).abs().mean() < 0.02
    # the stabilised features differ only by a per-query and a global factor, which attention cancels
    c_k = favor_key_stabiliser(k, omega, chunk=3)
    assert c_k.shape == (1, 1) and abs(c_k.item() - (k / 8**0.25 @ omega.T).max().item()) < 1e-12
    ratio = (favor_features(q, omega) @ favor_features(k, omega, stabiliser=c_k).T) / (phi_q @ phi_k.T)
    assert max_err(ratio / ratio[:, :1], torch.ones_like(ratio)) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_against_softmax_falls_as_features_grow(causal):
    errors = []
    for features in (8, 32, 128, 512, 2048):
        err = 0.0
        for seed in range(3):
            torch.manual_seed(seed)
            g = gen(100 + seed)
            q, k = (torch.randn(2, 2, 64, 16, generator=g, dtype=DT) * 0.5 for _ in range(2))
            v = torch.randn(2, 2, 64, 16, generator=g, dtype=DT)
            performer = PerformerAttention(16, features).double()
            diff = performer(q, k, v, causal=causal) - attend(q, k, v, causal=causal, backend="math")
            err += diff.pow(2).mean().sqrt().item() / 3
        errors.append(err)
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0] / 5, errors  # ~ 1 / sqrt(features)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_its_quadratic_form_with_the_same_features(causal):
    torch.manual_seed(0)
    performer = PerformerAttention(8, 24, chunk=5).double()
    q, k, v = qkv(n=20, m=26 if causal else 17)
    phi_q = favor_features(q, performer.omega)
    phi_k = favor_features(k, performer.omega, stabiliser=favor_key_stabiliser(k, performer.omega))
    assert max_err(performer(q, k, v, causal=causal), quadratic_kernel_form(phi_q, phi_k, v, causal)) < 1e-10


def test_performer_redraws_features_only_when_asked_and_training():
    torch.manual_seed(0)
    fixed, redraw = PerformerAttention(8, 16), PerformerAttention(8, 16, redraw=True)
    q, k, v = (t.detach().float() for t in qkv(n=5, m=5))
    before_fixed, before_redraw = fixed.omega.clone(), redraw.omega.clone()
    fixed.train()(q, k, v)
    redraw.eval()(q, k, v)
    assert torch.equal(fixed.omega, before_fixed) and torch.equal(redraw.omega, before_redraw)
    redraw.train()(q, k, v)
    assert not torch.equal(redraw.omega, before_redraw)
    assert "omega" in fixed.state_dict()


# ================================================================================================
# Linformer
# ================================================================================================


def test_linformer_computes_its_formula_and_learns_E_and_F():
    torch.manual_seed(0)
    lin = LinformerAttention(rank=6, max_len=50).double()
    q, k, v = qkv(n=20, m=30)
    out = lin(q, k, v)
    e, f = lin.E[:, :30], lin.F[:, :30]
    ref = torch.softmax(q @ (e @ k).transpose(-2, -1) / math.sqrt(8), dim=-1) @ (f @ v)
    assert max_err(out, ref) < 1e-10
    out.sum().backward()
    assert lin.E.grad is not None and lin.E.grad[:, 30:].abs().max() == 0 and lin.E.grad[:, :30].abs().max() > 0


def test_linformer_with_identity_projections_is_full_attention():
    lin = LinformerAttention(rank=12, max_len=12).double()
    with torch.no_grad():
        lin.E.copy_(torch.eye(12))
        lin.F.copy_(torch.eye(12))
    q, k, v = qkv(n=9, m=12)
    assert max_err(lin(q, k, v), attend(q, k, v, backend="math")) < 1e-10


def test_linformer_rejects_long_sequences_causal_and_bias():
    lin = LinformerAttention(rank=4, max_len=16)
    q, k, v = (t.detach().float() for t in qkv(n=20, m=20))
    with pytest.raises(ShapeError, match=r"20 keys but max_len=16"):
        lin(q, k, v)
    q, k, v = (t[..., :8, :] for t in (q, k, v))
    with pytest.raises(ConfigError, match="cannot be causal"):
        lin(q, k, v, causal=True)
    with pytest.raises(ConfigError, match="score bias"):
        lin(q, k, v, bias=torch.zeros(8, 8))


# ================================================================================================
# attend() and the families
# ================================================================================================


def test_attend_dispatches_specs_and_refuses_what_they_cannot_do():
    q, k, v = qkv(n=12, m=12)
    ref = attend(q, k, v, causal=True, backend="math")
    assert max_err(attend(q, k, v, causal=True, backend="chunked:block=5"), ref) < 1e-10
    assert max_err(attend(q, k, v, causal=True, backend="sliding:window=12,block=4"), ref) < 1e-10
    with pytest.raises(ConfigError, match="cannot return weights"):
        attend(q, k, v, backend="chunked", return_weights=True)
    with pytest.raises(ConfigError, match="has its own parameters"):
        attend(q, k, v, backend="linformer")
    with pytest.raises(ConfigError, match=r"backend: unknown value 'flash'; known: auto, bigbird, chunked"):
        attend(q, k, v, backend="flash")


def gpt_pair(backend, **overrides):
    torch.manual_seed(0)
    ref = build_model("gpt-nano", **overrides)
    torch.manual_seed(0)
    other = build_model("gpt-nano", backend=backend, **overrides)
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize(
    "backend, overrides",
    [
        ("chunked", {}),
        ("chunked:block=7", {"positional": "alibi"}),
        ("sliding:window=64,block=16", {"positional": "rope"}),
        ("sliding:window=40", {}),
        ("bigbird:block=8,window=11,random=0,global=0", {}),
    ],
)
def test_gpt_with_an_exact_backend_equals_the_default_logits_and_gradients(backend, overrides):
    ref, other = gpt_pair(backend, **overrides)
    ids = torch.randint(0, 256, (2, 40), generator=gen(0))
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[1, :5] = 0
    out_ref, out = ref(ids, attention_mask=pad), other(ids, attention_mask=pad)
    assert max_err(out, out_ref) < 1e-5
    out_ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), other.parameters(), strict=True):
        assert max_err(p.grad, p_ref.grad) < 1e-5, name


@pytest.mark.parametrize("positional", ["learned", "alibi"])
def test_gpt_sliding_window_really_restricts_and_decodes_with_a_cache(positional):
    ref, narrow = gpt_pair("sliding:window=8,block=4", positional=positional)
    ids = torch.randint(0, 256, (2, 30), generator=gen(1))
    full = narrow(ids)
    assert max_err(full, ref(ids)) > 1e-3  # a window of 8 < 30 tokens changes the logits
    cache = narrow.new_cache()
    stepwise = torch.cat([narrow(ids[:, t : t + 1], cache=cache) for t in range(30)], dim=1)
    assert max_err(stepwise, full) < 1e-5


@pytest.mark.parametrize("backend", ["linear", "performer:features=32", "sliding:window=4,global=2", "bigbird:block=4"])
def test_gpt_runs_with_every_approximate_backend(backend):
    torch.manual_seed(0)
    model = build_model("gpt-nano", backend=backend)
    out = model(torch.randint(0, 256, (2, 24), generator=gen(2)))
    assert out.shape == (2, 24, 256) and torch.isfinite(out).all()
    out.mean().backward()


def test_bert_with_linformer_and_gpt_refusing_it():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, max_len=32, d_model=32, n_heads=4, n_layers=2, d_ff=64, backend="linformer:rank=8,max_len=32"
    )
    bert = build_model(cfg)
    attn = (
        bert.encoder.blocks[0].attn
        if hasattr(bert, "encoder")
        else next(m for m in bert.modules() if isinstance(m, MultiHeadAttention))
    )
    assert isinstance(attn.backend_module, LinformerAttention) and "backend_module.E" in dict(attn.named_parameters())
    ids = torch.randint(1, 100, (2, 20), generator=gen(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    out = bert(ids, attention_mask=mask)
    hidden = out.hidden if hasattr(out, "hidden") else out[0]
    assert torch.isfinite(hidden).all()
    gpt = build_model("gpt-nano", backend="linformer:rank=8,max_len=128")
    with pytest.raises(ConfigError, match="cannot be causal"):
        gpt(torch.zeros(1, 8, dtype=torch.long))


def test_alibi_with_a_kernel_backend_is_refused_clearly():
    model = build_model("gpt-nano", backend="linear", positional="alibi")
    with pytest.raises(ConfigError, match="cannot add a score bias"):
        model(torch.zeros(1, 8, dtype=torch.long))
