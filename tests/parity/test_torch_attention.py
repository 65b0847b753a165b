"""Parity of ``archlab.nn.attention`` with PyTorch's own attention, in float64 at max abs error <= 1e-10.

* :func:`archlab.nn.attend` (backends ``math`` and ``sdpa``) against
  ``torch.nn.functional.scaled_dot_product_attention``: no mask, causal, boolean mask, additive float
  bias (given to SDPA as a float ``attn_mask``), boolean mask plus bias, with ``N == M`` and ``N != M``.
  The causal reference mask is built here, bottom-right aligned (query ``i`` of the last ``N`` of ``M``
  positions sees keys ``j <= i + M - N``); for ``N == M`` SDPA's own ``is_causal=True`` is the reference.
* ``attend(causal=True)`` with ``N < M`` (a KV cache holding ``M - N`` earlier keys) against the last
  ``N`` rows of the full ``M x M`` causal pass.
* :class:`archlab.nn.MultiHeadAttention` against ``torch.nn.MultiheadAttention(batch_first=True)`` with
  the same weights: self-attention, cross-attention to a memory of another length, key padding, causal
  mask, and the per-head weights (``need_weights=True, average_attn_weights=False``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.nn import MultiHeadAttention, attend, padding_mask

TOL = 1e-10
DT = torch.float64


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


def bottom_right_causal(n: int, m: int) -> torch.Tensor:
    """True where query i (the last n of m positions) may see key j: j <= i + (m - n)."""
    return torch.ones(n, m, dtype=torch.bool).tril(diagonal=m - n)


def qkv(shape: tuple[int, int, int, int], d_k: int = 8, d_v: int = 6, seed: int = 0):
    b, a, n, m = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, a, n, d_k, generator=g, dtype=DT)
    k = torch.randn(b, a, m, d_k, generator=g, dtype=DT)
    v = torch.randn(b, a, m, d_v, generator=g, dtype=DT)
    return q, k, v, g


def random_mask(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """A boolean mask with at least one True per row (SDPA's output for an empty row is a convention)."""
    mask = torch.rand(shape, generator=g) > 0.5
    mask[..., 0] = True
    return mask


SHAPES = [(2, 3, 5, 5), (2, 3, 4, 7), (1, 2, 6, 3)]  # [B, A, N, M]; N == M, N < M, N > M
BACKENDS = ["math", "sdpa"]


# ------------------------------------------------------------------------------------------------
# attend vs F.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attend_no_mask_matches_sdpa(backend, shape):
    q, k, v, _ = qkv(shape)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert max_err(attend(q, k, v, backend=backend, dropout_p=0.0), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attend_explicit_scale_matches_sdpa(backend, shape):
    q, k, v, _ = qkv(shape)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert max_err(attend(q, k, v, scale=0.3, backend=backend), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] <= s[3]])
def test_attend_causal_matches_sdpa(backend, shape):
    q, k, v, _ = qkv(shape)
    n, m = shape[2], shape[3]
    if n == m:
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # SDPA's is_causal is top-left aligned for N != M; archlab's is bottom-right (KV cache)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_causal(n, m))
    assert max_err(attend(q, k, v, causal=True, backend=backend), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_shape", ["full", "per_query", "padding"])
def test_attend_bool_mask_matches_sdpa(backend, shape, mask_shape):
    q, k, v, g = qkv(shape)
    b, a, n, m = shape
    dims = {"full": (b, a, n, m), "per_query": (b, 1, n, m), "padding": (b, 1, 1, m)}[mask_shape]
    mask = random_mask(g, dims)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert max_err(attend(q, k, v, mask=mask, backend=backend), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attend_float_bias_matches_sdpa_float_mask(backend, shape):
    q, k, v, g = qkv(shape)
    b, a, n, m = shape
    bias = torch.randn(a, n, m, generator=g, dtype=DT)  # per head, broadcast over the batch
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert max_err(attend(q, k, v, bias=bias, backend=backend), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attend_mask_and_bias_matches_sdpa(backend, shape):
    q, k, v, g = qkv(shape)
    b, a, n, m = shape
    bias = torch.randn(n, m, generator=g, dtype=DT)
    mask = random_mask(g, (b, 1, 1, m))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")))
    assert max_err(attend(q, k, v, mask=mask, bias=bias, backend=backend), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_attend_causal_with_mask_and_bias_matches_sdpa(backend):
    q, k, v, g = qkv((2, 3, 4, 6))
    mask = random_mask(g, (2, 1, 1, 6))
    mask[..., -1] = True  # the last key is visible to every query under the causal mask too
    bias = torch.randn(3, 4, 6, generator=g, dtype=DT)
    allowed = mask & bottom_right_causal(4, 6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~allowed, float("-inf")))
    out = attend(q, k, v, mask=mask, bias=bias, causal=True, backend=backend)
    assert max_err(out, ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_attend_three_dim_inputs_match_sdpa(backend):
    """No head axis: [B, N, d]."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 5, generator=g, dtype=DT) for n in (3, 4, 4))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert max_err(attend(q, k, v, backend=backend), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_new", [1, 2, 5])
def test_causal_with_fewer_queries_equals_last_rows_of_full_pass(backend, n_new):
    """KV-cache case: the last N queries against all M keys == the last N rows of the M x M causal pass."""
    q, k, v, _ = qkv((2, 3, 7, 7), seed=1)
    full = attend(q, k, v, causal=True, backend=backend)
    tail = attend(q[..., -n_new:, :], k, v, causal=True, backend=backend)
    assert max_err(tail, full[..., -n_new:, :]) <= TOL


# ------------------------------------------------------------------------------------------------
# MultiHeadAttention vs torch.nn.MultiheadAttention
# ------------------------------------------------------------------------------------------------

D, HEADS = 12, 3


def mha_pair(seed: int = 0, backend: str = "auto", bias: bool = True):
    torch.manual_seed(seed)
    ours = MultiHeadAttention(D, HEADS, backend=backend, bias=bias).to(DT).eval()
    theirs = torch.nn.MultiheadAttention(D, HEADS, batch_first=True, bias=bias, dtype=DT).eval()
    with torch.no_grad():
        # Start from random weights and biases (torch initialises its biases to zero).
        for p in ours.parameters():
            p.normal_(0.0, 0.4)
        theirs.in_proj_weight.copy_(ours.in_proj.weight)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        if bias:
            theirs.in_proj_bias.copy_(ours.in_proj.bias)
            theirs.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, theirs


def inputs(b: int, n: int, m: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D, generator=g, dtype=DT)
    mem = None if m is None else torch.randn(b, m, D, generator=g, dtype=DT)
    return x, mem, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_matches_torch(backend, bias):
    ours, theirs = mha_pair(backend=backend, bias=bias)
    x, _, _ = inputs(2, 5)
    ref, _ = theirs(x, x, x, need_weights=False)
    assert max_err(ours(x), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_cross_attention_matches_torch(backend):
    ours, theirs = mha_pair(backend=backend)
    x, mem, _ = inputs(2, 4, m=7)
    ref, _ = theirs(x, mem, mem, need_weights=False)
    assert max_err(ours(x, mem), ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cross", [False, True])
def test_mha_key_padding_matches_torch(backend, cross):
    ours, theirs = mha_pair(backend=backend)
    x, mem, _ = inputs(3, 5, m=6 if cross else None)
    kv = x if mem is None else mem
    lengths = torch.tensor([kv.shape[1], 2, 4])
    real = (torch.arange(kv.shape[1])[None, :] < lengths[:, None]).long()  # HF style: 1 = real token
    ref, _ = theirs(x, kv, kv, key_padding_mask=real == 0, need_weights=False)  # torch: True = ignore
    out = ours(x, mem, mask=padding_mask(real))  # archlab: True = may attend
    assert max_err(out, ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_causal_matches_torch(backend):
    ours, theirs = mha_pair(backend=backend)
    x, _, _ = inputs(2, 6)
    future = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)  # torch: True = not allowed
    ref, _ = theirs(x, x, x, attn_mask=future, need_weights=False)
    assert max_err(ours(x, causal=True), ref) <= TOL


def test_mha_causal_and_padding_matches_torch():
    ours, theirs = mha_pair()
    x, _, _ = inputs(2, 6)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    future = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)
    ref, _ = theirs(x, x, x, attn_mask=future, key_padding_mask=real == 0, need_weights=False)
    assert max_err(ours(x, mask=padding_mask(real), causal=True), ref) <= TOL


@pytest.mark.parametrize("cross", [False, True])
def test_mha_weights_match_torch_per_head(cross):
    ours, theirs = mha_pair()
    x, mem, _ = inputs(2, 4, m=5 if cross else None)
    kv = x if mem is None else mem
    real = torch.tensor([[1] * kv.shape[1], [1] * (kv.shape[1] - 2) + [0, 0]])
    ref_out, ref_w = theirs(
        x, kv, kv, key_padding_mask=real == 0, need_weights=True, average_attn_weights=False
    )
    out, weights = ours(x, mem, mask=padding_mask(real), return_weights=True)
    assert weights.shape == ref_w.shape == (2, HEADS, 4, kv.shape[1])
    assert max_err(out, ref_out) <= TOL
    assert max_err(weights, ref_w) <= TOL
