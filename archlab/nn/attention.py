r"""Attention: alignment scores, the ``attend`` core with its backends, masks, KV cache, multi-head.

Notation (the cards'): batch ``B``, heads ``A``, query length ``N``, key length ``M``, model width
``d``, per-head widths ``d_k`` (queries and keys) and ``d_v`` (values).

The general attention step (deck)::

    Attn(q, (k_1:M, v_1:M)) = sum_i alpha_i(q, k_1:M) v_i,
    alpha_i = exp(a(q, k_i)) / sum_j exp(a(q, k_j))

with ``a`` an alignment score. :func:`attend` computes it for whole tensors; the default score is
the scaled dot product ``a(q, k) = q . k / sqrt(d_k)`` (Vaswani 2017), which the ``sdpa`` backend
runs through PyTorch's fused kernels; a decoding step's few causal queries over a KV cache (a one-token step, a
speculative verify pass, a left-padded batch's step: float32 or bfloat16, eager CPU inference) through archlab's kernel
(:func:`_attend_cached`).

Masks follow PyTorch's convention: a boolean mask is ``True`` where a query may attend a key. A
float ``bias`` is added to the scores (ALiBi, relative positions). A key a query may not attend gets
exactly zero weight; a query with no key to attend gets a zero output.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab import kernels
from archlab.config import check_choice, check_divisible, check_positive, check_probability
from archlab.errors import ConfigError, ShapeError
from archlab.nn.backends import DENSE, attend_with, build_attention_module, check_backend, positional_bias
from archlab.nn.linear import Linear, linear

# ================================================================================================
# Alignment scores (deck: "Match the following Attention variations to their alignment scores")
# ================================================================================================


class AlignmentScore(nn.Module):
    """Base of the alignment score functions ``a(s_t, h_i)``.

    ``forward(query, keys)`` accepts one decoder state per sequence, ``query [B, d_q]`` with
    ``keys [B, M, d_h]`` -> scores ``[B, M]`` (RNN seq2seq), or a batch of queries
    ``query [..., N, d_q]`` with ``keys [..., M, d_h]`` -> scores ``[..., N, M]``.
    Subclasses implement :meth:`score` for the batched form only.
    """

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        _check_tensors(query=query, keys=keys)
        if keys.ndim < 2:
            raise ShapeError(f"keys must be [..., M, d_h], got shape {tuple(keys.shape)}")
        single = query.ndim == keys.ndim - 1
        lead = query.shape[:-1] if single else query.shape[:-2]
        if (not single and query.ndim != keys.ndim) or broadcast(tuple(lead), tuple(keys.shape[:-2])) is None:
            raise ShapeError(
                f"query {tuple(query.shape)} and keys {tuple(keys.shape)}: query must be [..., d_q] "
                "(one decoder state) or [..., N, d_q] with the same leading dims as keys [..., M, d_h]"
            )
        self.check_widths(query.shape[-1], keys.shape[-1])
        q = query.unsqueeze(-2) if single else query
        scores = self.score(q, keys)
        return scores.squeeze(-2) if single else scores

    def check_widths(self, d_q: int, d_h: int) -> None:
        """Raise ShapeError unless this score can compare a ``d_q``-wide query with ``d_h``-wide keys.

        The parameter-free scores compare ``s_t`` and ``h_i`` directly, so the widths must match; the
        parametric ones override this with the widths they were built for.
        """
        if d_q != d_h:
            raise ShapeError(
                f"{type(self).__name__}: query width {d_q} != key width {d_h}; this score compares them directly"
            )

    def _expect(self, what: str, got: int, want: int) -> None:
        if got != want:
            raise ShapeError(f"{type(self).__name__}: {what} width is {got} but the score was built for {want}")

    def score(self, query: Tensor, keys: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ContentScore(AlignmentScore):
    """Content-based (Graves 2014): ``a(s_t, h_i) = cosine(s_t, h_i)``, optionally sharpened by ``beta``."""

    def __init__(self, beta: float = 1.0, eps: float = 1e-8):
        super().__init__()
        self.beta, self.eps = beta, eps

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        q = query / query.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        k = keys / keys.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return self.beta * (q @ k.transpose(-2, -1))


class AdditiveScore(AlignmentScore):
    """Additive (Bahdanau 2015): ``a(s_t, h_i) = v_a^T tanh(W_a [s_t; h_i])``.

    ``W_a in R^{d_attn x (d_q + d_h)}`` is stored as its two column blocks so the ``N x M`` pairs
    cost one broadcast add, not ``N x M`` matmuls. Memory: ``[..., N, M, d_attn]``.
    """

    def __init__(self, d_query: int, d_key: int, d_attn: int):
        super().__init__()
        for name, value in (("d_query", d_query), ("d_key", d_key), ("d_attn", d_attn)):
            check_positive(name, value)
        self.d_query, self.d_key = d_query, d_key
        self.W_s = nn.Linear(d_query, d_attn, bias=False)  # W_a[:, :d_q]
        self.W_h = nn.Linear(d_key, d_attn, bias=False)  # W_a[:, d_q:]
        self.v_a = nn.Linear(d_attn, 1, bias=False)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        hidden = torch.tanh(self.W_s(query).unsqueeze(-2) + self.W_h(keys).unsqueeze(-3))
        return self.v_a(hidden).squeeze(-1)

    def check_widths(self, d_q: int, d_h: int) -> None:
        self._expect("query", d_q, self.d_query)
        self._expect("key", d_h, self.d_key)


class LocationScore(AlignmentScore):
    """Location-based (Luong 2015): ``alpha_t = softmax(W_a s_t)``; the keys' content is not used.

    ``W_a in R^{max_keys x d_q}`` gives one score per source position, so at most ``max_keys`` keys.
    """

    def __init__(self, d_query: int, max_keys: int):
        super().__init__()
        check_positive("d_query", d_query)
        check_positive("max_keys", max_keys)
        self.d_query, self.max_keys = d_query, max_keys
        self.W_a = nn.Linear(d_query, max_keys, bias=False)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        m = keys.shape[-2]
        if m > self.max_keys:
            raise ShapeError(f"location score: {m} keys but max_keys={self.max_keys}")
        return self.W_a(query)[..., :m]

    def check_widths(self, d_q: int, d_h: int) -> None:
        self._expect("query", d_q, self.d_query)  # the keys' content (and width) is not used


class GeneralScore(AlignmentScore):
    """General (Luong 2015): ``a(s_t, h_i) = s_t^T W_a h_i`` with ``W_a in R^{d_q x d_h}``."""

    def __init__(self, d_query: int, d_key: int):
        super().__init__()
        check_positive("d_query", d_query)
        check_positive("d_key", d_key)
        self.d_query, self.d_key = d_query, d_key
        self.W_a = nn.Linear(d_key, d_query, bias=False)  # h -> W_a h

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return query @ self.W_a(keys).transpose(-2, -1)

    def check_widths(self, d_q: int, d_h: int) -> None:
        self._expect("query", d_q, self.d_query)
        self._expect("key", d_h, self.d_key)


class DotScore(AlignmentScore):
    """Dot (Luong 2015): ``a(s_t, h_i) = s_t^T h_i``."""

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return query @ keys.transpose(-2, -1)


class ScaledDotScore(AlignmentScore):
    """Scaled dot (Vaswani 2017): ``a(s_t, h_i) = s_t^T h_i / sqrt(n)``, ``n`` the key width."""

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return (query @ keys.transpose(-2, -1)) / math.sqrt(keys.shape[-1])


SCORES: dict[str, type[AlignmentScore]] = {
    "content": ContentScore,
    "additive": AdditiveScore,
    "location": LocationScore,
    "general": GeneralScore,
    "dot": DotScore,
    "scaled_dot": ScaledDotScore,
}


def build_score(name: str, **kwargs) -> AlignmentScore:
    """An alignment score by name: ``content, additive, location, general, dot, scaled_dot``; ``kwargs`` are its
    class's arguments (a missing or unknown one is a ConfigError naming the score and the arguments it takes)."""
    check_choice("score", name, list(SCORES))
    cls = SCORES[name]
    params = inspect.signature(cls.__init__).parameters
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes = [p for p in params if p != "self" and params[p].kind in plain]  # nn.Module's *args, **kwargs: none
    required = [p for p in takes if params[p].default is inspect.Parameter.empty]
    unknown = [key for key in kwargs if key not in takes]
    missing = [key for key in required if key not in kwargs]
    if unknown or missing:
        problem = f"unknown {unknown}" if unknown else f"missing {missing}"
        raise ConfigError(
            f"score={name!r} takes {takes or 'no arguments'} (required: {required or 'none'}); {problem}"
        )
    return cls(**kwargs)


# ================================================================================================
# Masks
# ================================================================================================


def causal_mask(n_queries: int, n_keys: int | None = None, *, device=None) -> Tensor:
    """``[N, M]`` boolean, True where query ``i`` may attend key ``j``.

    Queries are the *last* ``N`` of ``M`` positions (bottom-right aligned), so the mask stays right
    when a KV cache holds ``M - N`` earlier keys: query ``i`` sees keys ``j <= i + (M - N)``.
    """
    n_keys = n_queries if n_keys is None else n_keys
    for name, value in (("n_queries", n_queries), ("n_keys", n_keys)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise ShapeError(f"causal mask: {name}={value!r} must be an integer >= 0")
    if n_keys < n_queries:
        raise ShapeError(f"causal mask: n_keys={n_keys} < n_queries={n_queries}")
    offset = n_keys - n_queries
    i = torch.arange(n_queries, device=device).unsqueeze(1)
    j = torch.arange(n_keys, device=device).unsqueeze(0)
    return j <= i + offset


def padding_mask(attention_mask: Tensor) -> Tensor:
    """From a ``[B, M]`` 0/1 (or bool) mask of real tokens to a ``[B, 1, 1, M]`` key mask for :func:`attend`."""
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ShapeError(f"attention_mask must be [B, M], got shape {got}")
    return attention_mask.bool()[:, None, None, :]


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax`` over the last axis where ``mask`` is True; masked entries get exactly 0.

    A row with no allowed key is all zeros (not NaN).
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    if not isinstance(mask, Tensor):
        _check_tensors(mask=mask)
    if mask.dtype != torch.bool:
        raise ShapeError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
    _check_broadcast("mask", mask, tuple(scores.shape))
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return weights.masked_fill(~mask, 0.0)


# ================================================================================================
# attend(): the one functional entry, with backends
# ================================================================================================

Score = Callable[[Tensor, Tensor], Tensor]


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcasting of shapes, or None if they do not broadcast.

    Plain Python: ``torch.broadcast_shapes`` imports sympy on first use (about a second per process).
    """
    if all(s == shapes[0] for s in shapes[1:]):  # equal shapes (attention's every call in a decoding step)
        return tuple(shapes[0])
    out: list[int] = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s)) + tuple(s)) for s in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _check_tensors(**tensors) -> None:
    """ShapeError naming the first argument that is not a tensor (a list, a NumPy array) before any computation."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_broadcast(name: str, tensor: Tensor, target: tuple[int, ...]) -> None:
    if broadcast(tuple(tensor.shape), target) != target:
        raise ShapeError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to the scores' shape {target} "
            "([..., N, M]: queries x keys)"
        )


def check_kv_heads(n_heads: int, n_kv_heads: int) -> None:
    """ConfigError unless ``n_kv_heads`` (``G``) is a positive divisor of ``n_heads`` (``A``)."""
    check_positive("n_kv_heads", n_kv_heads)
    if n_heads % n_kv_heads:
        raise ConfigError(
            f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: each key/value head serves "
            "n_heads / n_kv_heads query heads (1 = multi-query, n_heads = multi-head attention)"
        )


def kv_groups(q: Tensor, k: Tensor, v: Tensor) -> int:
    """Query heads per key/value head: ``A / G`` when ``q [B, A, N, d_k]`` meets ``k``, ``v`` with ``G < A``
    heads dividing ``A`` (grouped-query attention); 1 otherwise (one K/V head per query head, or plain
    broadcasting of other leading dims)."""
    if q.ndim < 4 or k.ndim != q.ndim or v.ndim != q.ndim:
        return 1
    a, g = q.shape[-3], k.shape[-3]
    return a // g if v.shape[-3] == g and 0 < g < a and a % g == 0 else 1


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``[..., G, M, d] -> [..., G * groups, M, d]``: K/V head ``g`` becomes heads ``g * groups .. g * groups
    + groups - 1``, one per query head it serves (a copy, except when ``G = 1``)."""
    if groups == 1:
        return x
    *lead, g, m, d = x.shape
    return x.unsqueeze(-3).expand(*lead, g, groups, m, d).reshape(*lead, g * groups, m, d)


def check_attend_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    *,
    same_width: bool = True,
) -> None:
    """Shape checks of :func:`attend`, before any computation.

    ``same_width=False`` (a custom alignment score) lets ``q`` and ``k`` differ in width: an additive
    or general score compares a decoder state ``s_t`` with encoder states ``h_i`` of another width.
    ``k`` and ``v`` may hold fewer heads than ``q`` (see :func:`kv_groups`).
    """
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        _check_tensors(q=q, k=k, v=v)
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ShapeError(f"q, k, v must be [..., N, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or not q.is_floating_point():
        raise ShapeError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if same_width and q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q has d_k={q.shape[-1]} but k has d_k={k.shape[-1]}; they must match")
    if k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"k has M={k.shape[-2]} keys but v has {v.shape[-2]} values; they must match")
    heads = () if kv_groups(q, k, v) == 1 else (q.shape[-3],)  # grouped K/V: checked as if repeated
    k_lead, v_lead = (tuple(t.shape[: -3 if heads else -2]) + heads for t in (k, v))
    lead = broadcast(tuple(q.shape[:-2]), k_lead, v_lead)
    if lead is None:
        raise ShapeError(
            f"leading dims of q {tuple(q.shape[:-2])}, k {tuple(k.shape[:-2])}, v {tuple(v.shape[:-2])} do not broadcast"
        )
    target = (*lead, q.shape[-2], k.shape[-2])
    if mask is not None:
        if not isinstance(mask, Tensor):
            _check_tensors(mask=mask)
        if mask.dtype != torch.bool:
            raise ShapeError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}; pass floats as bias")
        _check_broadcast("mask", mask, target)
    if bias is not None:
        if isinstance(bias, Tensor) and not bias.is_floating_point():  # a RelativeBias is generated per tile
            raise ShapeError(f"bias must be a float tensor added to the scores, got dtype {bias.dtype}; "
                             "pass a boolean mask as mask=")  # fmt: skip
        _check_broadcast("bias", bias, target)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    score: Score | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""``softmax(a(Q, K) + bias, masked) V``; the core of every attention in archlab.

    Args:
        q: queries ``[..., N, d_k]`` (usually ``[B, A, N, d_k]``).
        k: keys ``[..., M, d_k]`` (another width is allowed when ``score`` compares the two). With
            ``q [B, A, N, d_k]``, ``k [B, G, M, d_k]`` may hold ``G < A`` heads dividing ``A``
            (grouped-query attention: query head ``i`` reads K/V head ``i // (A / G)``).
        v: values ``[..., M, d_v]``, as many heads as ``k``.
        mask: boolean, broadcastable to ``[..., N, M]``; True where a query may attend a key.
        bias: float, broadcastable to ``[..., N, M]``, added to the scores (ALiBi: ``-m|i-j|``).
        causal: query ``i`` attends keys ``j <= i + (M - N)`` only (see :func:`causal_mask`).
        scale: multiplies ``Q K^T``; default ``1/sqrt(d_k)``. Ignored when ``score`` is given.
        score: an alignment score ``(q [..., N, d], k [..., M, d]) -> [..., N, M]`` replacing
            the scaled dot product (e.g. :class:`AdditiveScore`); forces the ``math`` backend.
        dropout_p: dropout on the attention weights (pass 0 in eval mode).
        backend: ``"math"`` (explicit softmax; can return weights), ``"sdpa"``
            (``F.scaled_dot_product_attention``: fused / flash kernels), ``"auto"`` (sdpa unless
            weights or a custom score are asked for), or a memory-saving spec of
            :mod:`archlab.nn.efficient` (``"chunked"``, ``"sliding:window=512"``, ``"linear"``, ...).
        return_weights: also return the weights ``[..., N, M]`` (rows sum to 1).

    Returns:
        ``out [..., N, d_v]``, or ``(out, weights)`` when ``return_weights``.
    """
    check_backend(backend)
    check_probability("dropout_p", dropout_p)
    check_attend_inputs(q, k, v, mask, bias, same_width=score is None)
    if isinstance(score, AlignmentScore):
        score.check_widths(q.shape[-1], k.shape[-1])
    n, m = q.shape[-2], k.shape[-2]
    if causal:
        if m < n:
            raise ShapeError(f"causal attention needs at least as many keys as queries, got N={n}, M={m}")
    groups = kv_groups(q, k, v)
    fused = backend == "sdpa" or (backend == "auto" and not return_weights and score is None)
    if groups > 1 and not fused:  # sdpa reads grouped K/V itself; the others get one K/V head per query head
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if backend not in DENSE:  # memory-saving backends: archlab.nn.efficient, through archlab.nn.backends
        return attend_with(
            backend, q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, score=score,
            dropout_p=dropout_p, return_weights=return_weights,
        )  # fmt: skip
    if bias is not None and not isinstance(bias, Tensor):  # a RelativeBias generated per tile
        bias = bias.dense(dtype=q.dtype, device=q.device)
    if backend == "auto":
        backend = "math" if (return_weights or score is not None) else "sdpa"
    if backend == "sdpa" and (return_weights or score is not None):
        raise ConfigError("backend='sdpa' cannot return weights or use a custom score; use backend='math'")

    if backend == "sdpa":
        return _attend_sdpa(q, k, v, mask, bias, causal, scale, dropout_p)

    if causal:
        cm = causal_mask(n, m, device=q.device)
        mask = cm if mask is None else (mask & cm)
    if score is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = (q @ k.transpose(-2, -1)) * scale
    else:
        scores = score(q, k)
    if bias is not None:
        scores = scores + bias
    weights = masked_softmax(scores, mask)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = dropped @ v
    return (out, weights) if return_weights else out


def _at_least_2d(t: Tensor | None) -> Tensor | None:
    """A ``[M]`` (or scalar) mask/bias as ``[1, M]``: same broadcast, but sdpa's kernels index dim -2."""
    return t if t is None or t.ndim >= 2 else t.reshape((1,) * (2 - t.ndim) + tuple(t.shape))


# torch's CPU flash kernel (FlashAttentionKernel.cpp) takes a row's max over the keys that do not fill
# a SIMD vector with std::max, which skips NaN. Without a mask and with fewer keys than one vector (16
# floats with AVX-512, 8 with AVX2), a query whose scores are all NaN (a NaN in q) keeps the max -inf,
# is taken for a fully masked row and gets an exact-zero output where the equation gives NaN (with a
# mask, or more keys, the vectorised max propagates NaN). A row whose largest entry is exactly 0 is
# otherwise rare, so only such a call is recomputed by the equation: one max over the (small) output
# when M < 16 on the CPU without a mask (about 10 us on [8, 12, 15, 64]), nothing otherwise.
_CPU_FLASH_VECTOR_KEYS = 16


def _attend_sdpa(q, k, v, mask, bias, causal, scale, dropout_p) -> Tensor:
    n, m = q.shape[-2], k.shape[-2]
    if bias is None and dropout_p == 0 and (causal or n == 1):
        out = _attend_cached(q, k, v, mask, scale)
        if out is None and causal and n == m and mask is not None:
            out = _attend_rows_alone(q, k, v, mask, scale)
        if out is not None:
            return out
    mask, bias = _at_least_2d(mask), _at_least_2d(bias)
    is_causal = causal and mask is None and bias is None and n == m
    if causal and not is_causal and n > 1:
        cm = causal_mask(n, m, device=q.device)
        mask = cm if mask is None else (mask & cm)
    attn_mask, prepared = mask, None
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    elif mask is not None and q.shape[-2] > 0 and _reuses_masks(mask):
        prepared = _prepared_mask(mask, q.dtype)
        attn_mask = prepared[0]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=kv_groups(q, k, v) > 1,
    )  # fmt: skip
    if mask is not None and q.shape[-2] > 0:
        # sdpa gives NaN where a query has no key to attend; archlab's contract is a zero output.
        has_key, every = prepared[1:3] if prepared is not None else _keys_of(mask)
        if not every:
            out = out.masked_fill(~has_key, 0.0)
    if attn_mask is None and _may_hide_nan(out, m):
        return attend(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, backend="math")
    return out


def _keys_of(mask: Tensor) -> tuple[Tensor, bool]:
    """``mask [..., N, M]`` -> ``has_key [..., N, 1]`` (the query may attend some key) and whether every query may
    (:func:`_every_query_has_a_key`)."""
    has_key = mask.any(dim=-1, keepdim=True)
    return has_key, _every_query_has_a_key(has_key)


# (a copy of the last boolean mask prepared, the dtype, the key check used, what _prepared_mask returned)
_PREPARED: tuple | None = None


def _prepared_mask(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool, list]:
    """What sdpa's call needs from a boolean ``mask [..., N, M]``: the float mask that sdpa itself would convert it to
    (0 where True, ``-inf`` where False, in ``dtype``: the same values, so the same output), and :func:`_keys_of`.

    A decoder passes one padding mask to each of its layers, so this is computed at a forward pass's first layer and
    reused by the others while the mask given is equal to the last one prepared (one ``torch.equal`` against a copy
    kept of it: no reliance on the object, which inference tensors give no version counter to check). Per layer it
    saves the conversion and the ``any``/``all`` check with its sync: SmolLM2's 30 layers at 10 rows x 220 keys,
    18.3 -> 16.6 ms of CPU time a step (1 thread, loaded AMD EPYC), about 1.6% of a 10-row step of
    :func:`archlab.generation.generate_batch`, a cost that a one-row step without a mask does not have.
    Where :func:`_reuses_masks` says."""
    global _PREPARED
    memo = _PREPARED
    if memo is not None and memo[1] == dtype and memo[2] is _every_query_has_a_key and memo[0].shape == mask.shape \
            and memo[0].device == mask.device and torch.equal(memo[0], mask):  # fmt: skip
        return memo[3]
    prepared = _prepare(mask, dtype)
    _PREPARED = (mask.clone(), dtype, _every_query_has_a_key, prepared)
    return prepared


def _reuses_masks(mask: Tensor) -> bool:
    """Whether :func:`_prepared_mask` serves ``mask``: a key mask ``[..., 1, M]`` (padding: small, so keeping a copy
    costs nothing; a ``[.., N, M]`` causal prefill mask is converted per call as before) in eager CPU inference
    (decoding). Not under ``torch.compile`` (the lookup would break the graph), not on CUDA (the comparison would
    sync the device) or the meta device (no ``torch.equal``), not with autograd recording (the layers would save one
    shared float mask for backward where they saved one each: the meta device's activation count is of the latter)."""
    return mask.shape[-2] == 1 and mask.device.type == "cpu" and not torch.is_grad_enabled() \
        and not torch.compiler.is_compiling()


def _prepare(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool, list]:
    """:func:`_prepared_mask` without the reuse; the last entry, empty, keeps :func:`_padded_rows`'s answer once
    asked (the same for every layer of a forward pass)."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return (additive, *_keys_of(mask), [])


def _padded_rows(mask: Tensor) -> tuple[Tensor, int] | None:
    """``(starts [B], latest)`` where the key mask ``mask [B, 1, 1, M]`` lets each row ``b`` attend exactly its keys
    ``starts[b]..M-1``, at least one (left padding: :func:`archlab.generation.generate_batch`'s rows, whose real tokens
    end at the last position), ``latest = max_b starts[b]``; None for any other mask."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] == 0:
        return None
    rows = mask[:, 0, 0]  # [B, M]
    m = rows.shape[1]
    starts = m - rows.sum(dim=1)  # int64: the first real key of a suffix
    if bool((starts >= m).any()) or not torch.equal(rows, torch.arange(m, device=rows.device) >= starts[:, None]):
        return None
    return starts, int(starts.max())


@functools.lru_cache(maxsize=64)
def _last_position(m: int) -> Tensor:
    """``[m - 1]`` int64: the kernel's last position for ``m`` keys, made once per length (not per layer: four ops)."""
    return torch.tensor([m - 1])


def _attend_cached(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor | None:
    """A decoding step's attention on archlab's kernel (:func:`archlab.kernels.cached_attention`): the ``N`` causal
    queries of the last positions, ``q [B, A, N, d_k]``, over ``k [B, G, M, d_k]``, ``v [B, G, M, d_v]`` (query ``i``
    reads the keys up to ``M - N + i``; a single query reads them all, causal or not), the KV cache's view read in
    place -> ``[B, A, N, d_v]``. Unmasked (a one-token step, a speculative verify pass), or under a left-padding key
    mask ``mask [B, 1, 1, M]`` (:func:`_padded_rows`; :func:`archlab.kernels.cached_attention_padded`: row ``b`` reads
    only its keys from ``starts[b]``). None where it does not apply, and sdpa serves: another mask, more than
    :data:`~archlab.kernels.CACHED_MAX_QUERIES` queries, not float32 or bfloat16 on the CPU, a gradient recorded, under
    ``torch.compile``, widths not multiples of 16, no kernel here, or a query left without a key.

    The same equation as sdpa's; the float rounding differs, and each query is computed on its own, so a position's
    result is the same to the bit in a one-token step and in a verify pass of any width (with the float32 and bfloat16
    products of :func:`archlab.nn.linear.linear`, the reason speculative greedy decoding gives plain greedy's
    tokens). Measured
    (SmolLM2's 9 heads on 3 key heads, 300 keys, 2 threads, AMD EPYC): one query 27 us a layer against 56 for sdpa,
    9 causal queries 140 against 188 with the causal mask built; on 10-row padded steps (145-270 keys, loaded) sdpa
    took 240-390 us a layer, the kernel 100-175 (docs/speed.md)."""
    n, m = q.shape[-2], k.shape[-2]
    if q.ndim != 4 or not 1 <= n <= min(m, kernels.CACHED_MAX_QUERIES) or not q.shape[0] == k.shape[0] == v.shape[0]:
        return None
    if torch.compiler.is_compiling() or not kernels.cached_attention_serves(q, k, v):
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    positions = _last_position(m)
    if mask is None:
        return torch.ops.archlab_kernels.cached_attention(q, k, v, positions, scale, kernels.f32_kernel())
    padded = _left_padding(mask, q)
    if padded is None or padded[1] > m - n:  # another mask, or a row whose first query has no key
        return None
    return torch.ops.archlab_kernels.cached_attention_padded(q, k, v, padded[0], positions, scale,
                                                             kernels.f32_kernel())  # fmt: skip


def _left_padding(mask: Tensor, q: Tensor) -> tuple[Tensor, int] | None:
    """:func:`_padded_rows` of the key ``mask`` of queries ``q [B, A, N, d_k]``, found once per forward pass (kept
    with the mask's :func:`_prepared_mask`, which its layers share); None for another mask, or where masks are not
    reused (:func:`_reuses_masks`: eager CPU inference only)."""
    if mask.ndim != 4 or mask.shape[0] != q.shape[0] or not _reuses_masks(mask):
        return None
    memo = _prepared_mask(mask, q.dtype)[3]
    if not memo:
        memo.append(_padded_rows(mask))
    return memo[0]


def _attend_rows_alone(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None) -> Tensor | None:
    """A left-padded batch's causal prefill (``q [B, A, N, d_k]``, ``k [B, G, N, d_k]``, ``v [B, G, N, d_v]``, the key
    mask ``mask [B, 1, 1, N]`` of :func:`_padded_rows`), each row attended over its own tokens as it is alone: row
    ``b``'s queries and keys from ``starts[b]`` through the unmasked causal call its prompt alone makes (sdpa's kernel,
    or archlab's for up to 16 tokens), the padding's queries (no key) zero -> ``[B, A, N, d_v]``. sdpa under the padding
    mask computes the same equation but rounds otherwise than on the row alone (in bfloat16 by up to 2e-3 after one
    layer on SmolLM2, enough to move greedy tokens at near-ties), so :func:`archlab.generation.generate_batch`'s rows
    would not be their prompts' decoding alone. None where it does not apply (as :func:`_attend_cached`: eager CPU
    inference, a padding mask), and the masked sdpa serves."""
    padded = _left_padding(mask, q) if q.ndim == 4 else None
    if padded is None:
        return None
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for b, start in enumerate(padded[0].tolist()):
        row = (t[b : b + 1, :, start:] for t in (q, k, v))
        out[b : b + 1, :, start:] = _attend_sdpa(*row, None, None, True, scale, 0.0)  # as the row's call alone
    return out


def _every_query_has_a_key(has_key: Tensor) -> bool:
    """Whether no query of the call is fully masked (``has_key``: ``mask.any(-1)``), answered only where asking
    costs nothing: eager on the CPU. There the zeroing's ``masked_fill`` is skipped when it would change nothing,
    as in every padded encoder batch ([CLS] is always a key): the fill copies the kernel's ``[B, N, A, d_k]``
    output into ``[B, A, N, d_k]`` order, which the heads' merge then copies back (3 passes over the output;
    MiniLM encoding 1.03-1.04x faster in float32 without them, 1.00-1.05x in bf16: CPU time, one thread, AMD
    EPYC, loaded). Elsewhere (CUDA: a device sync; the meta device; under ``torch.compile``: a data-dependent
    branch) the fill always runs."""
    if has_key.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(has_key.all())


def _may_hide_nan(out: Tensor, m: int) -> bool:
    """Whether the unmasked CPU flash kernel may have zeroed an all-NaN row of ``out [..., N, d_v]`` (above)."""
    if m >= _CPU_FLASH_VECTOR_KEYS or out.device.type != "cpu" or out.shape[-1] == 0:
        return False
    return bool(out.amax(-1).eq(0).any())


# ================================================================================================
# KV cache
# ================================================================================================


class KVCache:
    """Keys and values of one attention layer across decoding steps: ``k [B, G, M, d_k]``, ``v [B, G, M, d_v]``
    (``G`` key/value heads: ``A`` for multi-head attention, fewer for grouped-query attention).

    Storage is preallocated and grows by doubling, so appending one token is O(1) amortised instead
    of the O(M) copy of ``torch.cat``. :meth:`append` returns views of the first ``M`` positions.
    Beam search uses :meth:`reorder`; speculative or windowed decoding uses :meth:`crop`.
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k [B, G, n, d_k]``, ``v [B, G, n, d_v]``; return all keys and values so far."""
        n = k.shape[-2]
        need = self.length + n
        if self._k is not None and self._k.shape[0] != k.shape[0]:
            raise ShapeError(
                f"KV cache holds batch {self._k.shape[0]} but got batch {k.shape[0]}; use reorder() for beams"
            )
        stored = () if self._k is None else (self._k, self._v)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, *stored)):
            # Earlier steps' attention saved views of the stored keys for backward; writing the new
            # ones into that storage in place would invalidate them, so grow out of place instead.
            if self.length:
                k, v = torch.cat([self.keys, k], dim=-2), torch.cat([self.values, v], dim=-2)
            self._k, self._v, self.length = k, v, need
            return self.keys, self.values
        if self._k is None or need > self._k.shape[-2]:
            capacity = max(need, 2 * (0 if self._k is None else self._k.shape[-2]), 16)
            new_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            new_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self._k is not None and self.length:
                new_k[:, :, : self.length] = self._k[:, :, : self.length]
                new_v[:, :, : self.length] = self._v[:, :, : self.length]
            elif self.length:  # positions padded in front before any were stored: zero keys and values
                new_k[:, :, : self.length], new_v[:, :, : self.length] = 0, 0
            self._k, self._v = new_k, new_v
        self._k[:, :, self.length : need] = k
        self._v[:, :, self.length : need] = v
        self.length = need
        return self.keys, self.values

    def set(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Replace the contents (cross-attention: the encoder memory, computed once)."""
        self._k, self._v, self.length = k, v, k.shape[-2]
        return k, v

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        if not 0 <= length <= self.length:
            raise ShapeError(f"crop length={length} must be in [0, {self.length}]")
        self.length = length

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` positions; the others move ``n`` places back. Continuous batching drops positions
        that every row's mask hides (:class:`archlab.generation.RowBatch`), so a batch that never empties does not
        grow without bound. A key stays as it was: positions are counted from each row's mask, not from where a
        token is stored (:meth:`archlab.nn.positional.PositionalEncoding.at_rows`)."""
        if not 0 <= n <= self.length:
            raise ShapeError(f"drop_front n={n} must be in [0, {self.length}]")
        if self._k is not None and n:  # a view: the storage is copied (and the front freed) at the next growth
            self._k, self._v = self._k[:, :, n:], self._v[:, :, n:]
        self.length -= n

    def pad_front(self, n: int) -> None:
        """``n`` positions of zero keys and values before the first: left padding, which the caller's attention mask
        hides; the cached positions move ``n`` places on, their keys and values unchanged (as :meth:`drop_front`).
        Batched decoding lines up the rows of two caches so before :meth:`join` (:func:`archlab.generation.generate_batch`,
        :class:`archlab.generation.RowBatch`). On a fresh cache the zeros are written at the first append."""
        if n < 0:
            raise ShapeError(f"pad_front n={n} must be >= 0")
        if self._k is None or not n:
            self.length += n
            return
        capacity = max(self._k.shape[-2], self.length + n)
        moved = []
        for used in (self.keys, self.values):
            out = used.new_empty(*used.shape[:-2], capacity, used.shape[-1])
            out[:, :, :n] = 0
            out[:, :, n : n + self.length] = used
            moved.append(out)
        self._k, self._v = moved
        self.length += n

    def join(self, other: KVCache) -> None:
        """Append ``other``'s batch rows after this cache's: ``[B1, G, M, d]`` and ``[B2, G, M, d]`` ->
        ``[B1 + B2, G, M, d]``. Both hold the same ``M`` positions (:meth:`pad_front` the shorter first)."""
        if other.length != self.length:
            raise ShapeError(f"join needs caches of one length, got {self.length} and {other.length} (pad_front the shorter)")
        if other._k is None or self._k is None:
            raise ShapeError("join needs caches that hold keys (decoded at least once)")
        capacity = max(self._k.shape[-2], other._k.shape[-2])
        joined = []
        for mine, theirs in ((self._k, other._k), (self._v, other._v)):
            out = mine.new_empty(mine.shape[0] + theirs.shape[0], *mine.shape[1:-2], capacity, mine.shape[-1])
            torch.cat([mine[:, :, : self.length], theirs[:, :, : self.length]], out=out[:, :, : self.length])
            joined.append(out)
        self._k, self._v = joined

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row ``b`` becomes old row ``index[b]`` (``index [B']``, any ``B'``).

        Copies the ``M`` positions in use only, into storage of the same capacity, so the appends
        after it stay O(1) amortised. Where no row is read after it is written (``index[b] >= b`` for every ``b``:
        rows leaving a batch, :func:`archlab.generation.generate_batch`, which fills each freed row from the end)
        the rows move within the storage, which then holds its first ``B'`` rows: only the moved rows are copied,
        and no new memory is touched.
        """
        if self._k is None:
            return
        moves = self._moves_in_place(index)
        if moves is None:
            self._k, self._v = self._select_rows(self._k, index), self._select_rows(self._v, index)
            return
        for stored in (self._k, self._v):
            for row, source in moves:
                stored[row, :, : self.length] = stored[source, :, : self.length]
        self._k, self._v = self._k[: index.shape[0]], self._v[: index.shape[0]]

    def _moves_in_place(self, index: Tensor) -> list[tuple[int, int]] | None:
        """The ``(row, source)`` copies that select ``index`` within the storage, in order, or None where that is not
        safe: a source written before it is read (some ``index[b] < b``), an index out of range, or autograd
        recording (earlier steps' attention saved views of the stored rows)."""
        if index.ndim != 1 or index.dtype == torch.bool or index.dtype.is_floating_point or index.device.type != "cpu":
            return None
        if torch.is_grad_enabled() and self._k.requires_grad:
            return None
        sources = index.tolist()
        if len(sources) > self._k.shape[0] or any(not b <= s < self._k.shape[0] for b, s in enumerate(sources)):
            return None
        return [(b, s) for b, s in enumerate(sources) if s != b]

    def _select_rows(self, stored: Tensor, index: Tensor) -> Tensor:
        used = stored[:, :, : self.length]
        if torch.is_grad_enabled() and used.requires_grad:  # out= is not differentiable; no spare capacity here
            return used.index_select(0, index)
        selected = stored.new_empty(index.shape[0], *stored.shape[1:])
        torch.index_select(used, 0, index, out=selected[:, :, : self.length])
        return selected


def rewind_rows(caches: Sequence[KVCache], n: Sequence[int]) -> None:
    """Row ``b`` of every cache of ``caches`` (one batch's layers, each ``[B, G, M, d]``) forgets its last ``n[b]``
    positions (``n``: one count per row), and every row still ends at the last position: the caches keep
    ``M - min(n)`` positions, and a row that forgets ``e`` more than the least moves ``e`` places on, zero keys and
    values before it (left padding, as :meth:`KVCache.pad_front`; the caller's mask hides them). A batch's speculative
    rounds accept a different number of drafts in each row (:class:`archlab.generation.RowBatch`). No kept key or
    value changes; the moves of all the layers are one call (:func:`archlab.kernels.shift_rows`)."""
    lengths = {c.length for c in caches}
    rows = {0 if c._k is None else c._k.shape[0] for c in caches}
    if len(lengths) > 1 or len(rows) > 1:
        raise ShapeError(f"rewind_rows needs caches of one length and batch, got lengths {sorted(lengths)} and "
                         f"batches {sorted(rows)}")  # fmt: skip
    length, batch = (lengths.pop(), rows.pop()) if caches else (0, len(n))
    if len(n) != batch or any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= length for e in n):
        raise ShapeError(f"rewind_rows n={list(n)} must hold one int count in [0, {length}] per row ({batch})")
    least = min(n, default=0)
    for c in caches:
        c.crop(length - least)
    stored = [t for c in caches if c._k is not None for t in (c._k, c._v)]
    kernels.shift_rows(stored, [e - least for e in n], length - least)


# ================================================================================================
# Multi-head attention
# ================================================================================================


class MultiHeadAttention(nn.Module):
    r"""``MultiHead(Q, K, V) = Concat(head_1, ..., head_A) W_O``, ``head_i = Attention(Q W_Q^i, K W_K^i, V W_V^i)``.

    Shapes (cards): ``W_Q^i in R^{d x d_k}``, ``W_K^i in R^{d x d_k}``, ``W_V^i in R^{d x d_v}``,
    ``W_O in R^{A d_v x d}``; ``d_k = d_v = d / A`` unless given.

    Grouped-query attention (Ainslie et al. 2023): ``G = n_kv_heads`` key/value heads, each shared by
    ``A / G`` consecutive query heads (query head ``i`` reads K/V head ``i // (A / G)``). ``G = A`` is
    multi-head attention, ``G = 1`` multi-query attention. Only the ``G`` heads are projected and cached:
    the KV cache shrinks by ``A / G``.

    The per-head matrices live side by side in one fused input projection ``in_proj`` of shape
    ``[A d_k + G (d_k + d_v), d]`` (rows: all ``W_Q^i``, then all ``W_K^g``, then all ``W_V^g``; with
    ``G = A`` the layout of ``torch.nn.MultiheadAttention.in_proj_weight``). Self-attention computes Q,
    K and V with one matmul; cross-attention (Q from the decoder ``x``, K and V from the encoder
    ``memory``) uses the row blocks separately.

    Args:
        d_model: ``d``.
        n_heads: ``A``.
        n_kv_heads: ``G``, dividing ``A``; default ``A``.
        d_k, d_v: per-head widths; default ``d / A``.
        bias: biases on the projections.
        dropout: dropout on the attention weights.
        backend: passed to :func:`attend` (``auto``, ``math``, ``sdpa``, or a spec of
            :mod:`archlab.nn.efficient`).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        d_k: int | None = None,
        d_v: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        check_kv_heads(n_heads, n_kv_heads)
        check_probability("dropout", dropout)
        check_backend(backend)
        if d_k is None or d_v is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.d_k = d_model // n_heads if d_k is None else d_k
        self.d_v = d_model // n_heads if d_v is None else d_v
        check_positive("d_k", self.d_k)
        check_positive("d_v", self.d_v)
        self.dropout, self.backend = dropout, backend
        self.in_proj = Linear(d_model, n_heads * self.d_k + n_kv_heads * (self.d_k + self.d_v), bias=bias)
        self.out_proj = Linear(n_heads * self.d_v, d_model, bias=bias)
        # a backend with its own parameters (Linformer's E, F; Performer's features), else None
        self.backend_module = build_attention_module(backend, d_k=self.d_k)

    def fused_rows(self) -> dict[str, dict[str, tuple[int, int]]]:
        """The row blocks of ``in_proj`` ``[W_Q (A d_k); W_K (G d_k); W_V (G d_v)]``: ``q``, ``k``, ``v`` (LoRA targets
        them by name, :mod:`archlab.nn.lora`)."""
        q, k = self.n_heads * self.d_k, self.n_kv_heads * self.d_k
        return {"in_proj": {"q": (0, q), "k": (q, q + k), "v": (q + k, q + k + self.n_kv_heads * self.d_v)}}

    def extra_repr(self) -> str:
        kv = "" if self.n_kv_heads == self.n_heads else f", n_kv_heads={self.n_kv_heads}"
        return f"d_model={self.d_model}, n_heads={self.n_heads}{kv}, d_k={self.d_k}, d_v={self.d_v}, backend={self.backend!r}"

    def _heads(self, x: Tensor, heads: int, width: int) -> Tensor:
        """``[B, N, heads*w] -> [B, heads, N, w]``."""
        b, n, _ = x.shape
        return x.view(b, n, heads, width).transpose(1, 2)

    def _project_q(self, x: Tensor) -> Tensor:
        qw = self.n_heads * self.d_k
        b = None if self.in_proj.bias is None else self.in_proj.bias[:qw]
        return self._heads(linear(x, self.in_proj.weight[:qw], b), self.n_heads, self.d_k)

    def _project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        qw, kw = self.n_heads * self.d_k, self.n_kv_heads * self.d_k
        b = None if self.in_proj.bias is None else self.in_proj.bias[qw:]
        kv = F.linear(memory, self.in_proj.weight[qw:], b)
        return self._split_kv(kv[..., :kw], kv[..., kw:])

    def _project_qkv(self, x: Tensor, positional, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's ``q [B, A, N, d_k]``, ``k [B, G, N, d_k]``, ``v [B, G, N, d_v]`` from ``x [B, N, d]`` by
        one product, q and k transformed by ``positional`` (RoPE) at positions ``offset ..``.

        With ``d_k = d_v`` the product's ``[B, N, (A + 2G) d_k]`` is viewed as heads ``[B, A + 2G, N, d_k]`` and
        split: q and k sit side by side and are transformed in one pass (:meth:`PositionalEncoding.transform_qk_heads`).
        A decoding step is a few small ops per layer whose cost is their count: this is 4 ops (+ RoPE's 4) where
        slicing q, k, v apart, heads each, and rotating them together was 14."""
        a, g = self.n_heads, self.n_kv_heads
        qkv = self.in_proj(x)  # [B, N, (A + 2G) d_k]
        if self.d_k != self.d_v:
            qw, kw = a * self.d_k, g * self.d_k
            q = self._heads(qkv[..., :qw], a, self.d_k)
            k, v = self._split_kv(qkv[..., qw : qw + kw], qkv[..., qw + kw :])
            return (q, k, v) if positional is None else (*positional.transform_qk(q, k, offset), v)
        qk, v = self._heads(qkv, a + 2 * g, self.d_k).split([a + g, g], dim=1)  # [B, A + G, N, d_k], [B, G, N, d_v]
        if positional is not None:
            qk = positional.transform_qk_heads(qk, a, offset)
        q, k = qk.split([a, g], dim=1)
        return q, k, v

    def _split_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, M, G d_k]``, ``[B, M, G d_v]`` -> ``k [B, G, M, d_k]``, ``v [B, G, M, d_v]``."""
        return self._heads(k, self.n_kv_heads, self.d_k), self._heads(v, self.n_kv_heads, self.d_v)

    def _check_input(self, name: str, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ShapeError(f"{name} must be [B, N, d_model={self.d_model}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():  # token ids passed where vectors go: say so, not torch's dtype mismatch
            raise ShapeError(f"{name} must hold floating-point vectors [B, N, d_model], got dtype {x.dtype}")

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        positional=None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Self-attention over ``x [B, N, d]``, or cross-attention to ``memory [B, M, d]``.

        Args:
            mask: boolean, broadcastable to ``[B, A, N, M]`` (True = may attend); see
                :func:`padding_mask` and :func:`causal_mask`.
            causal: mask future keys (decoder self-attention).
            positional: a positional encoding acting inside attention (RoPE rotates q and k;
                ALiBi adds a bias); ignored for cross-attention.
            cache: self-attention: new keys/values are appended and attention runs over all of
                them, positions offset by what the cache held. Cross-attention: the memory's keys
                and values are computed on the first call and reused after.
            return_weights: also return the weights ``[B, A, N, M]`` (forces the math backend).

        Returns:
            ``[B, N, d]``, or ``([B, N, d], weights [B, A, N, M])``.
        """
        self._check_input("x", x)
        if memory is None:  # self-attention
            offset = 0 if cache is None else cache.length
            q, k, v = self._project_qkv(x, positional, offset)
            if cache is not None:
                k, v = cache.append(k, v)
            bias = None if positional is None else positional_bias(
                positional, q.shape[-2], k.shape[-2], offset, backend=self.backend, like=q
            )  # fmt: skip
        else:  # cross-attention
            self._check_input("memory", memory)
            if memory.shape[0] != x.shape[0]:
                raise ShapeError(f"memory batch {memory.shape[0]} != x batch {x.shape[0]}")
            q = self._project_q(x)
            if cache is not None and cache.length:
                k, v = cache.keys, cache.values
            else:
                k, v = self._project_kv(memory)
                if cache is not None:
                    cache.set(k, v)
            bias = None
        if self.backend_module is None:
            attention = attend  # takes K/V with G heads itself
        else:  # Linformer / Performer: every query head gets its K/V head
            attention = self.backend_module
            k, v = repeat_kv(k, self.n_heads // self.n_kv_heads), repeat_kv(v, self.n_heads // self.n_kv_heads)
        result = attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
            return_weights=return_weights,
        )
        out, weights = result if return_weights else (result, None)
        b, _, n, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.d_v))
        return (out, weights) if return_weights else out
