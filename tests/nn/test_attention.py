"""Unit tests of ``archlab.nn.attention`` against formulas written out here, the lessons' claims, and itself.

What is checked against what:

* float32 ``math`` and ``sdpa`` backends against a float64 reference: the fused path's error must be
  within 4x (plus a 1e-7 floor) of the plain float32 path's own error (flash-attention's test pattern).
* Each alignment score of the deck (content, additive, location, general, dot, scaled dot), directly
  and via ``build_score``, against its formula evaluated pair by pair in plain Python loops, for one
  decoder state ``[B, d] -> [B, M]`` and for a batch of queries ``[B, N, d] -> [B, N, M]``.
* Attention weights: rows sum to 1, masked keys get exactly 0, a query with no visible key gets a
  zero output (not NaN) and finite gradients, in both backends; dropout keeps the expectation.
* The cards' scaling claim: with unit-variance q, k the scaled scores have variance ~1 and unscaled ones
  ~d_k, and unscaled softmax is nearly one-hot at large d_k.
* Multi-head attention with d_k, d_v set apart from d / A: parameter shapes of the cards, and the output
  against ``Concat(head_1..head_A) W_O`` computed head by head here.
* ``KVCache`` (chunked appends, growth, crop, reorder) and ``MultiHeadAttention`` decoding with a cache
  against the full causal pass; cross-attention computes the memory's K/V once.
* ``torch.autograd.gradcheck`` in float64 through ``attend`` with every score (score parameters
  included) and through ``MultiHeadAttention``.
* Bad input raises ``ConfigError`` / ``ShapeError`` naming the offending values, before computing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from archlab.errors import ArchlabError, ConfigError, ShapeError
from archlab.nn import (
    AdditiveScore,
    ContentScore,
    DotScore,
    GeneralScore,
    KVCache,
    LocationScore,
    MultiHeadAttention,
    ScaledDotScore,
    attend,
    build_score,
    causal_mask,
    masked_softmax,
    padding_mask,
)

DT = torch.float64
TOL = 1e-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, dtype=DT, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


# ================================================================================================
# float32: the fused backend's error is within a small multiple of the plain path's own error
# ================================================================================================


@pytest.mark.parametrize("case", ["none", "causal", "mask", "bias"])
def test_float32_sdpa_error_within_small_multiple_of_math_error(case):
    g = gen(0)
    b, a, n, m, d = 2, 4, 48, 64, 32
    q, k = randn(b, a, n, d, g=g, scale=2.0), randn(b, a, m, d, g=g, scale=2.0)
    v = randn(b, a, m, d, g=g)
    kw = {
        "none": {},
        "causal": {"causal": True},
        "mask": {"mask": torch.rand(b, 1, n, m, generator=g) > 0.3},
        "bias": {"bias": randn(a, n, m, g=g)},
    }[case]
    kw32 = {key: val.float() if torch.is_tensor(val) and val.is_floating_point() else val for key, val in kw.items()}
    ref = attend(q, k, v, backend="math", **kw)  # float64 reference
    q32, k32, v32 = q.float(), k.float(), v.float()
    math32 = attend(q32, k32, v32, backend="math", **kw32)
    sdpa32 = attend(q32, k32, v32, backend="sdpa", **kw32)
    assert math32.dtype == sdpa32.dtype == torch.float32
    err_math = max_err(math32.double(), ref)
    err_sdpa = max_err(sdpa32.double(), ref)
    assert err_math > 0.0  # float32 really rounds; otherwise the bound below means nothing
    assert err_sdpa <= 4 * err_math + 1e-7
    assert max_err(sdpa32.double(), math32.double()) <= 5 * err_math + 1e-7


# ================================================================================================
# Alignment scores: each against its deck formula, evaluated pair by pair
# ================================================================================================

B, N, M, DQ, DH, DATT = 2, 3, 4, 5, 6, 7


def cosine(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (s @ h) / (torch.sqrt(s @ s) * torch.sqrt(h @ h))


def pairwise(formula, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """scores[b, t, i] = formula(s[b, t], h[b, i]), or [b, i] for a single state s [B, d]."""
    single = s.ndim == 2
    s3 = s[:, None] if single else s
    out = torch.empty(s3.shape[0], s3.shape[1], h.shape[1], dtype=s.dtype)
    for b in range(s3.shape[0]):
        for t in range(s3.shape[1]):
            for i in range(h.shape[1]):
                out[b, t, i] = formula(s3[b, t], h[b, i])
    return out[:, 0] if single else out


def make_score(name: str, seed: int = 0):
    """(module, formula(s_t, h_i), query width, key width) with the module's parameters in float64."""
    torch.manual_seed(seed)
    if name == "content":
        return ContentScore(), cosine, DH, DH
    if name == "content_beta":
        return ContentScore(beta=2.5), lambda s, h: 2.5 * cosine(s, h), DH, DH
    if name == "additive":
        mod = AdditiveScore(DQ, DH, DATT).to(DT)
        W_a = torch.cat([mod.W_s.weight, mod.W_h.weight], dim=1).detach()  # [d_attn, d_q + d_h]
        v_a = mod.v_a.weight.detach()[0]  # [d_attn]
        assert W_a.shape == (DATT, DQ + DH)
        return mod, lambda s, h: v_a @ torch.tanh(W_a @ torch.cat([s, h])), DQ, DH
    if name == "location":
        # alpha_t = softmax(W_a s_t): key i scores row i of W_a s_t, whatever it holds (see location_reference)
        return LocationScore(DQ, max_keys=M + 2).to(DT), None, DQ, DH
    if name == "general":
        mod = GeneralScore(DQ, DH).to(DT)
        W_a = mod.W_a.weight.detach()  # [d_q, d_h]
        assert W_a.shape == (DQ, DH)
        return mod, lambda s, h: s @ W_a @ h, DQ, DH
    if name == "dot":
        return DotScore(), lambda s, h: s @ h, DH, DH
    if name == "scaled_dot":
        return ScaledDotScore(), lambda s, h: (s @ h) / math.sqrt(h.shape[0]), DH, DH
    raise AssertionError(name)


def location_reference(mod: LocationScore, s: torch.Tensor, m: int) -> torch.Tensor:
    """(W_a s_t)_i for i < m, written as explicit sums."""
    W = mod.W_a.weight.detach()
    single = s.ndim == 2
    s3 = s[:, None] if single else s
    out = torch.empty(s3.shape[0], s3.shape[1], m, dtype=s.dtype)
    for b in range(s3.shape[0]):
        for t in range(s3.shape[1]):
            for i in range(m):
                out[b, t, i] = sum(W[i, j] * s3[b, t, j] for j in range(W.shape[1]))
    return out[:, 0] if single else out


SCORE_NAMES = ["content", "content_beta", "additive", "location", "general", "dot", "scaled_dot"]


@pytest.mark.parametrize("single", [True, False], ids=["single_query", "batched"])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_score_matches_formula(name, single):
    mod, formula, dq, dh = make_score(name)
    g = gen(1)
    s = randn(B, dq, g=g) if single else randn(B, N, dq, g=g)
    h = randn(B, M, dh, g=g)
    got = mod(s, h)
    assert got.shape == ((B, M) if single else (B, N, M))
    ref = location_reference(mod, s, M) if name == "location" else pairwise(formula, s, h)
    assert max_err(got, ref) <= TOL


def test_location_score_ignores_key_content_and_gives_softmax_of_W_a_s():
    mod, _, dq, dh = make_score("location")
    g = gen(2)
    s = randn(B, N, dq, g=g)
    h1, h2 = randn(B, M + 2, dh, g=g), randn(B, M + 2, dh, g=g)
    assert torch.equal(mod(s, h1), mod(s, h2))
    # alpha_t = softmax(W_a s_t) when all max_keys positions are present
    _, weights = attend(s, h1, h1, score=mod, return_weights=True)
    ref = torch.softmax(location_reference(mod, s, M + 2), dim=-1)
    assert max_err(weights, ref) <= TOL


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("content", {"beta": 2.5}),
        ("additive", {"d_query": DQ, "d_key": DH, "d_attn": DATT}),
        ("location", {"d_query": DQ, "max_keys": M + 2}),
        ("general", {"d_query": DQ, "d_key": DH}),
        ("dot", {}),
        ("scaled_dot", {}),
    ],
)
def test_build_score_builds_the_same_function(name, kwargs):
    key = "content_beta" if name == "content" else name
    direct, formula, dq, dh = make_score(key)
    built = build_score(name, **kwargs).to(DT)
    assert type(built) is type(direct)
    built.load_state_dict(direct.state_dict())
    g = gen(3)
    s, h = randn(B, N, dq, g=g), randn(B, M, dh, g=g)
    ref = location_reference(direct, s, M) if name == "location" else pairwise(formula, s, h)
    assert max_err(built(s, h), ref) <= TOL


def test_build_score_unknown_name_suggests_closest():
    with pytest.raises(ConfigError, match=r"'additve'.*did you mean 'additive'"):
        build_score("additve")


def test_build_score_names_the_arguments_a_score_takes():
    # a missing or unknown argument was a bare TypeError from the class's __init__
    takes = r"score='additive' takes \['d_query', 'd_key', 'd_attn'\]"
    with pytest.raises(ConfigError, match=takes + r".*missing \['d_attn'\]"):
        build_score("additive", d_query=4, d_key=4)
    with pytest.raises(ConfigError, match=r"score='location' takes \['d_query', 'max_keys'\].*unknown \['d_key'\]"):
        build_score("location", d_query=4, d_key=4, max_keys=3)
    with pytest.raises(ConfigError, match=r"score='dot' takes no arguments.*unknown \['d_query'\]"):
        build_score("dot", d_query=4)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_dot_and_scaled_dot_scores_equal_attend_scales(backend):
    g = gen(4)
    q, k, v = randn(2, 3, 4, 8, g=g), randn(2, 3, 5, 8, g=g), randn(2, 3, 5, 6, g=g)
    assert max_err(attend(q, k, v, score=DotScore()), attend(q, k, v, scale=1.0, backend=backend)) <= TOL
    assert max_err(attend(q, k, v, score=ScaledDotScore()), attend(q, k, v, backend=backend)) <= TOL


@pytest.mark.parametrize("name", ["additive", "general", "location"])
def test_attend_with_score_of_other_widths_is_softmax_of_formula_times_v(name):
    """RNNsearch: decoder states s_t (width d_q) attend encoder states h_i (width d_h != d_q); v = h."""
    mod, formula, dq, dh = make_score(name)
    assert dq != dh
    g = gen(5)
    s, h = randn(B, N, dq, g=g), randn(B, M, dh, g=g)
    out, w = attend(s, h, h, score=mod, return_weights=True)
    assert out.shape == (B, N, dh) and w.shape == (B, N, M)
    scores = location_reference(mod, s, M) if name == "location" else pairwise(formula, s, h)
    alpha = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)  # the deck's alpha_i
    assert max_err(w, alpha) <= TOL
    assert max_err(out, torch.einsum("bnm,bmd->bnd", alpha, h)) <= TOL


# ================================================================================================
# Weights, masks, empty rows, dropout
# ================================================================================================


def test_weights_rows_sum_to_one_and_masked_keys_get_exact_zero():
    g = gen(6)
    q, k, v = randn(2, 3, 5, 4, g=g), randn(2, 3, 7, 4, g=g), randn(2, 3, 7, 4, g=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.5
    mask[..., 0] = True
    bias = randn(3, 5, 7, g=g)
    for kwargs in ({}, {"mask": mask}, {"mask": mask, "bias": bias}, {"causal": True}):
        _, w = attend(q, k, v, return_weights=True, **kwargs)
        assert w.shape == (2, 3, 5, 7)
        assert max_err(w.sum(-1), torch.ones(2, 3, 5, dtype=DT)) <= TOL
        assert (w >= 0).all()
        allowed = kwargs.get("mask", torch.ones(5, 7, dtype=torch.bool))
        if kwargs.get("causal"):
            allowed = allowed & causal_mask(5, 7)
        blocked = ~allowed.expand_as(w)
        assert blocked.any() == bool(kwargs)
        assert (w[blocked] == 0).all()  # exactly zero, not just small
        assert (w[~blocked] > 0).all()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_query_with_every_key_masked_gets_zero_output_and_finite_grads(backend):
    g = gen(7)
    q = randn(2, 2, 4, 5, g=g).requires_grad_()
    k = randn(2, 2, 6, 5, g=g).requires_grad_()
    v = randn(2, 2, 6, 3, g=g).requires_grad_()
    mask = torch.rand(2, 1, 4, 6, generator=g) > 0.3
    mask[..., 0] = True
    mask[0, 0, 2] = False  # query 2 of batch row 0 sees nothing, in every head
    mask[1, 0, :, :] = False  # batch row 1 sees nothing at all
    bias = randn(4, 6, g=g)
    for kwargs in ({"mask": mask}, {"mask": mask, "bias": bias}):
        out = attend(q, k, v, backend=backend, **kwargs)
        assert torch.isfinite(out).all()
        assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()
        assert (out[0, :, [0, 1, 3]].abs().sum(-1) > 0).all()
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(gr).all() for gr in grads)
        assert (grads[0][1] == 0).all()  # nothing reaches a query that sees no key


class _CountMaskedFill(torch.overrides.TorchFunctionMode):
    """Counts ``masked_fill`` calls (function or method) while active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "masked_fill":
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_sdpa_padding_mask_with_a_key_for_every_query_skips_the_zeroing_and_equals_math():
    """A padded encoder batch ([CLS] always real): every query has a key, so the sdpa path leaves the kernel's
    output as it is (no masked_fill, whose copy cost the bf16 encoder 3 passes) and equals the math form; one
    empty row in the batch brings the zeroing back."""
    g = gen(11)
    q, k, v = (randn(3, 4, 7, 8, g=g) for _ in range(3))
    real = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    mask = padding_mask(real)  # [B, 1, 1, M]
    with _CountMaskedFill() as counted:
        out = attend(q, k, v, mask=mask, backend="sdpa")
    assert counted.calls == 0
    assert max_err(out, attend(q, k, v, mask=mask, backend="math")) <= TOL
    real[1] = 0  # batch row 1 has no real token: its queries see nothing
    with _CountMaskedFill() as counted:
        out = attend(q, k, v, mask=padding_mask(real), backend="sdpa")
    assert counted.calls == 1 and (out[1] == 0).all() and torch.isfinite(out).all()
    assert max_err(out[[0, 2]], attend(q, k, v, mask=padding_mask(real), backend="math")[[0, 2]]) <= TOL


def test_a_mask_passed_to_every_layer_is_prepared_once_and_gives_sdpas_own_output(monkeypatch):
    """The layers of a decoder get one padding mask: its float form for sdpa and the key check are made at the first
    call and reused while the mask given equals it (one changed in place, in inference mode too, is prepared again;
    an equal mask object is not), where no gradient is recorded. The output is bit-for-bit sdpa's own on the boolean
    mask (float32, grouped K/V of a decoding step)."""
    import torch.nn.functional as F

    from archlab.nn import attention

    made = []
    prepare = attention._prepare
    monkeypatch.setattr(attention, "_prepare", lambda mask, dtype: made.append(1) or prepare(mask, dtype))
    g = gen(12)
    q = randn(4, 6, 1, 8, g=g, dtype=torch.float32)
    k, v = (randn(4, 2, 9, 8, g=g, dtype=torch.float32) for _ in range(2))
    real = torch.ones(4, 9, dtype=torch.long)
    real[1, :3], real[3, :5] = 0, 0
    mask = padding_mask(real)  # [B, 1, 1, M]
    own = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    attend(q, k, v, mask=mask, backend="sdpa")  # autograd may record (grad mode): not prepared
    assert not made
    with torch.no_grad():  # decoding
        outs = [attend(q, k, v, mask=mask, backend="sdpa") for _ in range(3)]  # three layers
        assert len(made) == 1 and all(torch.equal(out, own) for out in outs)
        mask[2, ..., :4] = False  # changed in place: prepared again
        assert torch.equal(attend(q, k, v, mask=mask, backend="sdpa"),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))  # fmt: skip
        assert len(made) == 2
        attend(q, k, v, mask=mask.clone(), backend="sdpa")  # another object, equal: reused
        assert len(made) == 2
    with torch.inference_mode():  # no version counter: the contents decide
        frozen = padding_mask(real)
        attend(q, k, v, mask=frozen, backend="sdpa")
        frozen[0, ..., :2] = False
        assert torch.equal(attend(q, k, v, mask=frozen, backend="sdpa"),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=frozen, enable_gqa=True))  # fmt: skip
    assert len(made) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_left_padded_causal_prefill_attends_each_row_as_it_is_alone(dtype):
    """A left-padded batch's causal prefill (more queries than the decoding kernel takes) gives each row, to the bit,
    the attention of its own tokens alone (the padding's queries: zero), so a batch's rows start as their prompts
    alone (the masked sdpa call it replaces rounded bfloat16 rows otherwise at AVX-512; row 2's 15 tokens alone take
    archlab's kernel, which sdpa rounds otherwise in every dtype). Both equal the equation in float64."""
    g = gen(13)
    q = randn(3, 4, 40, 16, g=g).to(dtype)
    k, v = (randn(3, 2, 40, 16, g=g).to(dtype) for _ in range(2))
    starts = [0, 7, 25]
    real = torch.stack([torch.arange(40) >= s for s in starts]).long()
    with torch.no_grad():
        out = attend(q, k, v, mask=padding_mask(real), causal=True)
        for b, s in enumerate(starts):
            alone = attend(q[b : b + 1, :, s:], k[b : b + 1, :, s:], v[b : b + 1, :, s:], causal=True)
            assert torch.equal(out[b : b + 1, :, s:], alone)
            assert (out[b, :, :s] == 0).all()
        if dtype == torch.float64:
            assert max_err(out, attend(q, k, v, mask=padding_mask(real), causal=True, backend="math")) <= TOL


def test_fully_masked_row_has_zero_weights():
    g = gen(8)
    q, k, v = randn(1, 3, 4, g=g), randn(1, 5, 4, g=g), randn(1, 5, 4, g=g)
    mask = torch.ones(1, 3, 5, dtype=torch.bool)
    mask[0, 1] = False
    out, w = attend(q, k, v, mask=mask, return_weights=True)
    assert (w[0, 1] == 0).all() and (out[0, 1] == 0).all()
    assert max_err(w[0, [0, 2]].sum(-1), torch.ones(2, dtype=DT)) <= TOL
    assert torch.equal(masked_softmax(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 3))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("mask_dims", [1, 2, 3])
def test_low_rank_masks_broadcast_like_full_masks(backend, mask_dims):
    """A key mask [M] (or [N, M], [1, N, M]) is the same as its broadcast [B, A, N, M], all-False included."""
    g = gen(9)
    q, k, v = randn(2, 2, 3, 4, g=g), randn(2, 2, 5, 4, g=g), randn(2, 2, 5, 4, g=g)
    for key_mask in (torch.tensor([True, False, True, True, False]), torch.zeros(5, dtype=torch.bool)):
        small = key_mask.expand(*(3,) * (mask_dims - 1), 5) if mask_dims > 1 else key_mask
        small = small[:1] if mask_dims == 3 else small
        full = key_mask.expand(2, 2, 3, 5)
        out = attend(q, k, v, mask=small, backend=backend)
        assert max_err(out, attend(q, k, v, mask=full, backend="math")) <= TOL
    bias1d = randn(5, g=g)
    out = attend(q, k, v, bias=bias1d, backend=backend)
    assert max_err(out, attend(q, k, v, bias=bias1d.expand(2, 2, 3, 5), backend="math")) <= TOL


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_dropout_on_weights_is_unbiased_and_active(backend):
    """E[dropout(w) V] = w V: averaged over many independent copies, the dropped output approaches the clean one."""
    g = gen(10)
    q, k, v = randn(1, 1, 2, 4, g=g), randn(1, 1, 6, 4, g=g), randn(1, 1, 6, 3, g=g)
    clean = attend(q, k, v, backend="math")
    copies = 20000
    torch.manual_seed(0)
    dropped = attend(q.expand(copies, -1, -1, -1), k, v, dropout_p=0.5, backend=backend)
    assert (dropped - clean).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5  # dropout does act
    # per-copy std is O(|v|); the mean over 20000 copies has std ~ 1/sqrt(20000) ~ 0.007
    assert max_err(dropped.mean(0, keepdim=True), clean) < 0.05


def equation(q, k, v, mask=None, causal=False):
    """``softmax(q k^T / sqrt(d_k), masked) v`` in float64, written out; a query with no visible key gets 0."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool) if mask is None else mask
    if causal:
        allowed = allowed & causal_mask(q.shape[-2], k.shape[-2])
    allowed = allowed.expand_as(scores)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    return weights @ v


@pytest.mark.parametrize("m", [5, 8, 15, 16, 40])  # below, at and above one SIMD vector of keys (8 or 16 floats)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("kind", ["plain", "causal", "mask"])
def test_backends_propagate_nan_like_the_equation(m, where, kind):
    """One NaN in q, k or v gives NaN exactly where the equation does, in every exact backend.

    torch's CPU flash kernel (sdpa) used to return zeros for a query whose scores are all NaN when
    M < 16 and no mask is given (see ``_CPU_FLASH_VECTOR_KEYS`` in archlab.nn.attention)."""
    g = gen(11)
    n = m if kind == "causal" else 4
    q, k, v = (randn(2, 3, rows, 8, g=g, dtype=torch.float32) for rows in (n, m, m))
    {"q": q, "k": k, "v": v}[where][0, 1, 2 if where == "q" else 0, 3] = float("nan")  # query 2 or key 0
    mask = None
    if kind == "mask":
        mask = torch.rand(2, 1, n, m, generator=g) > 0.3
        mask[..., 0] = True  # (a NaN in a key the mask hides: math ignores it, sdpa adds the mask to it: NaN)
        mask[1, 0, 1] = False  # a query that sees no key: 0, not NaN, whatever the inputs hold
    kwargs = {"mask": mask, "causal": kind == "causal"}
    expected = equation(q, k, v, **kwargs)
    assert expected.isnan().any() and not expected.isnan().all()
    for backend in ("math", "sdpa", "chunked", "chunked:block=4", "auto"):
        out = attend(q, k, v, backend=backend, **kwargs)
        assert torch.equal(out.isnan(), expected.isnan()), backend
        fin = ~expected.isnan()
        torch.testing.assert_close(out[fin].double(), expected[fin], rtol=1e-5, atol=1e-5, msg=backend)


def test_causal_mask_is_bottom_right_aligned():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # 2 new queries after 3 cached keys: query i sees keys j <= i + 3
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    with pytest.raises(ShapeError, match=r"n_keys=2 < n_queries=3"):
        causal_mask(3, 2)


def test_padding_mask_converts_real_token_mask_to_key_mask():
    real = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pm = padding_mask(real)
    assert pm.shape == (2, 1, 1, 3) and pm.dtype == torch.bool
    assert torch.equal(pm[:, 0, 0], real.bool())
    with pytest.raises(ShapeError, match=r"\[B, M\].*\(2, 1, 3\)"):
        padding_mask(real[:, None])


# ================================================================================================
# The cards' scaling claim
# ================================================================================================


@pytest.mark.parametrize("d_k", [16, 64, 256])
def test_scaled_scores_have_unit_variance_unscaled_have_variance_d_k(d_k):
    g = gen(d_k)
    q = torch.randn(8, 64, d_k, generator=g)  # 8 x 64 x 64 = 32768 scores, unit-variance entries
    k = torch.randn(8, 64, d_k, generator=g)
    var_scaled = ScaledDotScore()(q, k).var().item()
    var_unscaled = DotScore()(q, k).var().item()
    assert abs(var_scaled - 1.0) < 0.15
    assert abs(var_unscaled / d_k - 1.0) < 0.15


def test_unscaled_softmax_is_nearly_one_hot_at_large_d_k():
    g = gen(11)
    d_k, m = 256, 32
    q, k = torch.randn(16, 32, d_k, generator=g), torch.randn(16, m, d_k, generator=g)
    v = torch.randn(16, m, 4, generator=g)
    _, w_unscaled = attend(q, k, v, scale=1.0, return_weights=True)
    _, w_scaled = attend(q, k, v, return_weights=True)  # default 1/sqrt(d_k)
    peak_unscaled = w_unscaled.amax(-1).mean().item()
    peak_scaled = w_scaled.amax(-1).mean().item()
    assert peak_unscaled > 0.9
    assert peak_scaled < 0.5
    # and the scaled weights are spread: their entropy is a sizeable part of log(M)
    entropy = -(w_scaled * w_scaled.clamp_min(1e-30).log()).sum(-1).mean().item()
    assert entropy > 0.5 * math.log(m)


# ================================================================================================
# MultiHeadAttention: card shapes with d_k, d_v set apart; head-by-head reference
# ================================================================================================


def test_mha_independent_d_k_d_v_has_card_shapes_and_matches_head_by_head_formula():
    d, heads, d_k, d_v = 12, 3, 5, 7
    torch.manual_seed(0)
    mha = MultiHeadAttention(d, heads, d_k=d_k, d_v=d_v).to(DT)
    assert (mha.d_k, mha.d_v) == (d_k, d_v)
    W = mha.in_proj.weight.detach()
    bias = mha.in_proj.bias.detach()
    assert W.shape == (heads * (2 * d_k + d_v), d)
    # W_Q^i, W_K^i in R^{d x d_k}, W_V^i in R^{d x d_v}, W_O in R^{A d_v x d}
    W_Q = [W[i * d_k : (i + 1) * d_k].T for i in range(heads)]
    W_K = [W[heads * d_k + i * d_k : heads * d_k + (i + 1) * d_k].T for i in range(heads)]
    W_V = [W[2 * heads * d_k + i * d_v : 2 * heads * d_k + (i + 1) * d_v].T for i in range(heads)]
    b_Q = [bias[i * d_k : (i + 1) * d_k] for i in range(heads)]
    b_K = [bias[heads * d_k + i * d_k : heads * d_k + (i + 1) * d_k] for i in range(heads)]
    b_V = [bias[2 * heads * d_k + i * d_v : 2 * heads * d_k + (i + 1) * d_v] for i in range(heads)]
    W_O = mha.out_proj.weight.detach().T
    assert all(w.shape == (d, d_k) for w in W_Q + W_K) and all(w.shape == (d, d_v) for w in W_V)
    assert W_O.shape == (heads * d_v, d)

    g = gen(12)
    x, mem = randn(2, 4, d, g=g), randn(2, 6, d, g=g)
    for memory in (None, mem):
        src = x if memory is None else memory
        heads_out = []
        for i in range(heads):
            Q, K, V = x @ W_Q[i] + b_Q[i], src @ W_K[i] + b_K[i], src @ W_V[i] + b_V[i]
            alpha = torch.softmax(Q @ K.transpose(-2, -1) / math.sqrt(d_k), dim=-1)
            heads_out.append(alpha @ V)
        ref = torch.cat(heads_out, dim=-1) @ W_O + mha.out_proj.bias.detach()
        for backend in ("math", "sdpa"):
            mha.backend = backend
            out = mha(x, memory)
            assert out.shape == (2, 4, d)
            assert max_err(out, ref) <= TOL


def test_mha_default_widths_are_d_over_A():
    mha = MultiHeadAttention(16, 4)
    assert (mha.d_k, mha.d_v) == (4, 4)
    assert mha.in_proj.weight.shape == (3 * 16, 16) and mha.out_proj.weight.shape == (16, 16)


def test_mha_weights_shape_and_sdpa_refuses_weights():
    mha = MultiHeadAttention(8, 2, backend="sdpa").to(DT)
    x = randn(2, 3, 8, g=gen(13))
    with pytest.raises(ConfigError, match="sdpa"):
        mha(x, return_weights=True)
    mha.backend = "auto"
    out, w = mha(x, return_weights=True)
    assert out.shape == (2, 3, 8) and w.shape == (2, 2, 3, 3)


def test_mha_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, dropout=0.5).to(DT)
    x = randn(2, 5, 8, g=gen(14))
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha.eval()(x))


# ================================================================================================
# KV cache
# ================================================================================================


def kv_chunks(lengths, b=2, a=3, d_k=4, d_v=5, seed=15):
    g = gen(seed)
    return [(randn(b, a, n, d_k, g=g), randn(b, a, n, d_v, g=g)) for n in lengths]


def test_kvcache_chunked_appends_equal_one_append_and_grow_past_capacity():
    chunks = kv_chunks([3, 1, 7, 2, 9, 1, 12])  # 35 positions: past the first capacity of 16 and 32
    all_k = torch.cat([c[0] for c in chunks], dim=-2)
    all_v = torch.cat([c[1] for c in chunks], dim=-2)
    cache = KVCache()
    assert len(cache) == 0 and cache.keys is None and cache.values is None
    seen = 0
    for k, v in chunks:
        keys, values = cache.append(k, v)
        seen += k.shape[-2]
        assert len(cache) == cache.length == seen
        assert torch.equal(keys, all_k[..., :seen, :]) and torch.equal(values, all_v[..., :seen, :])
    once = KVCache()
    once.append(all_k, all_v)
    assert torch.equal(once.keys, cache.keys) and torch.equal(once.values, cache.values)


def test_kvcache_crop_then_append_overwrites_the_tail():
    (k1, v1), (k2, v2) = kv_chunks([6, 2], seed=16)
    cache = KVCache()
    cache.append(k1, v1)
    cache.crop(4)
    assert len(cache) == 4 and torch.equal(cache.keys, k1[..., :4, :])
    keys, values = cache.append(k2, v2)
    assert torch.equal(keys, torch.cat([k1[..., :4, :], k2], dim=-2))
    assert torch.equal(values, torch.cat([v1[..., :4, :], v2], dim=-2))
    cache.crop(0)
    assert len(cache) == 0
    with pytest.raises(ShapeError, match=r"crop length=1 must be in \[0, 0\]"):
        cache.crop(1)


def test_kvcache_reorder_selects_batch_rows():
    (k1, v1), (k2, v2) = kv_chunks([3, 2], b=3, seed=17)
    cache = KVCache()
    cache.append(k1, v1)
    index = torch.tensor([2, 0, 1])
    cache.reorder(index)
    assert torch.equal(cache.keys, k1[index]) and torch.equal(cache.values, v1[index])
    # beam expansion: 3 rows -> 4 rows, then appends continue with the new batch
    grow = torch.tensor([0, 0, 1, 2])
    cache.reorder(grow)
    k3, v3 = kv_chunks([2], b=4, seed=18)[0]
    keys, values = cache.append(k3, v3)
    assert torch.equal(keys, torch.cat([k1[index][grow], k3], dim=-2))
    assert torch.equal(values, torch.cat([v1[index][grow], v3], dim=-2))
    with pytest.raises(ShapeError, match=r"batch 4 but got batch 3"):
        cache.append(k2, v2)


def test_mha_decoding_token_by_token_with_cache_equals_full_causal_pass():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 9, 16, generator=gen(19))
    full = mha(x, causal=True)
    for prefill in (1, 4):  # token by token, and a 4-token prompt then token by token
        cache = KVCache()
        with torch.no_grad():
            steps = [mha(x[:, :prefill], cache=cache, causal=True)]
            steps += [mha(x[:, t : t + 1], cache=cache, causal=True) for t in range(prefill, 9)]
        assert cache.length == 9
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_backward_through_cached_decoding_equals_full_pass_gradients():
    """Decoding with a cache under autograd must neither break backward nor change the gradients."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).to(DT)
    x = randn(2, 5, 8, g=gen(20)).requires_grad_()
    full = mha(x, causal=True)
    ref = torch.autograd.grad(full.square().sum(), [x, *mha.parameters()])
    cache = KVCache()
    steps = torch.cat([mha(x[:, t : t + 1], cache=cache, causal=True) for t in range(5)], dim=1)
    assert max_err(steps, full) <= TOL
    got = torch.autograd.grad(steps.square().sum(), [x, *mha.parameters()])
    for a, b in zip(got, ref, strict=True):
        assert max_err(a, b) <= TOL


def test_mha_cross_attention_cache_computes_memory_kv_once():
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3).to(DT).eval()
    g = gen(21)
    x1, x2, mem = randn(2, 1, 12, g=g), randn(2, 1, 12, g=g), randn(2, 7, 12, g=g)
    cache = KVCache()
    first = mha(x1, mem, cache=cache)
    assert cache.length == 7
    kept_k = cache.keys.clone()
    second = mha(x2, torch.full_like(mem, float("nan")), cache=cache)  # garbage memory: must be unused
    assert cache.length == 7 and torch.equal(cache.keys, kept_k)
    assert max_err(first, mha(x1, mem)) <= TOL
    assert max_err(second, mha(x2, mem)) <= TOL


# ================================================================================================
# gradcheck in float64
# ================================================================================================


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_gradcheck_attend_with_each_score_including_its_parameters(name):
    mod, _, dq, dh = make_score(name)
    g = gen(22)
    q = randn(2, 3, dq, g=g).requires_grad_()
    k = randn(2, 4, dh, g=g).requires_grad_()
    v = randn(2, 4, 3, g=g).requires_grad_()
    mask = torch.tensor([True, True, False, True])
    names = [n for n, _ in mod.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in mod.named_parameters())

    def fn(q, k, v, *ps):
        score = lambda a, b: functional_call(mod, dict(zip(names, ps, strict=True)), (a, b))  # noqa: E731
        return attend(q, k, v, score=score, mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v, *params), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_gradcheck_attend_default_score_with_mask_bias_causal(backend):
    g = gen(23)
    q = randn(1, 2, 3, 4, g=g).requires_grad_()
    k = randn(1, 2, 5, 4, g=g).requires_grad_()
    v = randn(1, 2, 5, 3, g=g).requires_grad_()
    bias = randn(2, 3, 5, g=g).requires_grad_()
    mask = torch.tensor([True, False, True, True, True])

    def fn(q, k, v, bias):
        return attend(q, k, v, mask=mask, bias=bias, causal=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-7)


def test_gradcheck_multi_head_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(6, 2, d_k=2, d_v=4).to(DT)
    names = [n for n, _ in mha.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in mha.named_parameters())
    g = gen(24)
    x = randn(1, 3, 6, g=g).requires_grad_()
    mem = randn(1, 4, 6, g=g).requires_grad_()

    def fn(x, mem, *ps):
        p = dict(zip(names, ps, strict=True))
        return functional_call(mha, p, (x,), {"causal": True}), functional_call(mha, p, (x, mem))

    assert torch.autograd.gradcheck(fn, (x, mem, *params), eps=1e-6, atol=1e-7, fast_mode=True)


# ================================================================================================
# Errors: archlab types, messages naming the values, raised before computing
# ================================================================================================


class Spy:
    """A score that records whether attend got as far as computing."""

    def __init__(self):
        self.called = False

    def __call__(self, q, k):
        self.called = True
        return q @ k.transpose(-2, -1)


def test_mha_d_model_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"d_model=500 is not divisible by n_heads=8"):
        MultiHeadAttention(500, 8)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, ArchlabError)
    MultiHeadAttention(500, 8, d_k=64, d_v=64)  # explicit widths need no divisibility


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_heads": 0}, r"n_heads=0 must be > 0"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"backend": "flash"}, r"unknown value 'flash'"),
        ({"d_k": 0, "d_v": 4}, r"d_k=0 must be > 0"),
    ],
)
def test_mha_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MultiHeadAttention(8, **{"n_heads": 2, **kwargs})


def test_mha_input_of_wrong_width_raises_before_projecting():
    mha = MultiHeadAttention(16, 4)
    calls = []
    mha.in_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ShapeError, match=r"x must be \[B, N, d_model=16\], got shape \(2, 3, 15\)"):
        mha(torch.randn(2, 3, 15))
    with pytest.raises(ShapeError, match=r"memory must be \[B, N, d_model=16\], got shape \(2, 5, 8\)"):
        mha(torch.randn(2, 3, 16), torch.randn(2, 5, 8))
    with pytest.raises(ShapeError, match=r"memory batch 3 != x batch 2"):
        mha(torch.randn(2, 3, 16), torch.randn(3, 5, 16))
    with pytest.raises(ShapeError, match=r"\(3, 16\)"):
        mha(torch.randn(3, 16))
    assert not calls


def bad_attend_cases():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 6)
    return [
        ("q_k_width", (q, torch.randn(2, 3, 5, 7), v), {}, ShapeError, r"q has d_k=8 but k has d_k=7"),
        ("k_v_length", (q, k, torch.randn(2, 3, 6, 6)), {}, ShapeError, r"k has M=5 keys but v has 6 values"),
        (
            "mask_shape",
            (q, k, v),
            {"mask": torch.ones(2, 3, 4, 6, dtype=torch.bool)},
            ShapeError,
            r"mask of shape \(2, 3, 4, 6\) does not broadcast to the scores' shape \(2, 3, 4, 5\)",
        ),
        (
            "mask_broadcast_grows",
            (q, k, v),
            {"mask": torch.ones(4, 2, 3, 4, 5, dtype=torch.bool)},
            ShapeError,
            r"mask of shape \(4, 2, 3, 4, 5\).*\(2, 3, 4, 5\)",
        ),
        ("mask_dtype", (q, k, v), {"mask": torch.ones(4, 5)}, ShapeError, r"mask must be boolean.*torch.float32"),
        (
            "bias_shape",
            (q, k, v),
            {"bias": torch.zeros(4, 4)},
            ShapeError,
            r"bias of shape \(4, 4\) does not broadcast to the scores' shape \(2, 3, 4, 5\)",
        ),
        ("lead_dims", (q, torch.randn(3, 3, 5, 8), torch.randn(3, 3, 5, 6)), {}, ShapeError, r"do not broadcast"),
        ("one_dim", (torch.randn(8), k, v), {}, ShapeError, r"must be \[\.\.\., N, d\]"),
        (
            "causal_too_few_keys",
            (torch.randn(2, 3, 6, 8), k, v),
            {"causal": True},
            ShapeError,
            r"N=6, M=5",
        ),
        ("backend", (q, k, v), {"backend": "sdap"}, ConfigError, r"'sdap' \(did you mean 'sdpa'\?\)"),
        ("sdpa_weights", (q, k, v), {"backend": "sdpa", "return_weights": True}, ConfigError, r"backend='sdpa'"),
        ("dropout_above_one", (q, k, v), {"dropout_p": 1.5}, ConfigError, r"dropout_p=1.5 must be in \[0, 1\)"),
        ("dropout_one", (q, k, v), {"dropout_p": 1.0}, ConfigError, r"dropout_p=1.0 must be in \[0, 1\)"),
        ("dropout_negative", (q, k, v), {"dropout_p": -0.1}, ConfigError, r"dropout_p=-0.1 must be in \[0, 1\)"),
    ]


@pytest.mark.parametrize("case", bad_attend_cases(), ids=lambda c: c[0])
def test_attend_bad_input_raises_before_computing(case):
    name, args, kwargs, error, match = case
    spy = Spy()
    # A custom score may compare q and k of other widths, so the width case runs the built-in one.
    if name not in ("q_k_width", "sdpa_weights"):
        kwargs = {**kwargs, "score": spy}
    with pytest.raises(error, match=match):
        attend(*args, **kwargs)
    assert not spy.called


def test_location_score_with_too_many_keys():
    mod = LocationScore(4, max_keys=3)
    with pytest.raises(ShapeError, match=r"5 keys but max_keys=3"):
        mod(torch.randn(2, 4), torch.randn(2, 5, 4))
    with pytest.raises(ShapeError, match=r"5 keys but max_keys=3"):
        attend(torch.randn(2, 1, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 2), score=mod)


@pytest.mark.parametrize(
    "mod,dq,dh,match",
    [
        (DotScore(), 4, 5, r"DotScore: query width 4 != key width 5"),
        (ContentScore(), 4, 5, r"ContentScore: query width 4 != key width 5"),
        (ScaledDotScore(), 6, 5, r"ScaledDotScore: query width 6 != key width 5"),
        (AdditiveScore(4, 5, 3), 4, 6, r"AdditiveScore: key width is 6 but the score was built for 5"),
        (GeneralScore(4, 5), 3, 5, r"GeneralScore: query width is 3 but the score was built for 4"),
        (LocationScore(4, 8), 5, 4, r"LocationScore: query width is 5 but the score was built for 4"),
    ],
)
def test_score_width_mismatch_names_the_widths(mod, dq, dh, match):
    with pytest.raises(ShapeError, match=match):
        mod(torch.randn(2, 3, dq), torch.randn(2, 4, dh))
    with pytest.raises(ShapeError, match=match):
        attend(torch.randn(2, 3, dq), torch.randn(2, 4, dh), torch.randn(2, 4, 2), score=mod)


def test_score_query_keys_rank_mismatch():
    with pytest.raises(ShapeError, match=r"query \(2, 3, 4, 5\) and keys \(2, 6, 5\)"):
        DotScore()(torch.randn(2, 3, 4, 5), torch.randn(2, 6, 5))
    with pytest.raises(ShapeError, match=r"keys must be \[\.\.\., M, d_h\], got shape \(5,\)"):
        DotScore()(torch.randn(5), torch.randn(5))


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (AdditiveScore, {"d_query": 4, "d_key": 0, "d_attn": 3}, r"d_key=0 must be > 0"),
        (LocationScore, {"d_query": 4, "max_keys": 0}, r"max_keys=0 must be > 0"),
        (GeneralScore, {"d_query": -1, "d_key": 3}, r"d_query=-1 must be > 0"),
    ],
)
def test_parametric_scores_validate_widths(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_kvcache_batch_mismatch():
    cache = KVCache()
    cache.append(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ShapeError, match=r"KV cache holds batch 2 but got batch 3"):
        cache.append(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))


def test_broadcast_of_shapes_is_numpys_rule():
    """attention's shape rule (plain Python, no sympy): equal shapes (every call of a decoding step) come back as
    they are; others broadcast as NumPy does, or give None."""
    from archlab.nn.attention import broadcast

    cases = [((2, 3), (2, 3), (2, 3)), ((3, 1), (1, 4)), ((1, 5), (5,)), ((2, 1, 4), (7, 1)), ((2,), (3,)), ((4, 2), (2, 2))]
    for shapes in cases:
        try:
            want = np.broadcast_shapes(*shapes)
        except ValueError:
            want = None
        assert broadcast(*shapes) == want, shapes
