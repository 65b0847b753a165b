r"""Memory-saving attention: chunked exact, sliding window + global, block-sparse, low-rank, kernel.

Standard attention materialises the scores ``S = Q K^T / sqrt(d_k)``, ``[B, A, N, M]``: at
``N = M = 100,000`` that is ``100K^2 x 4 B = 40 GB`` per head and batch item (float32). The
backends here avoid it (notation of the cards: batch ``B``, heads ``A``, ``N`` queries, ``M`` keys):

=============  ===========================================  ===============  ==================
backend        what it computes                             extra memory     time
=============  ===========================================  ===============  ==================
``chunked``    exact softmax attention, online softmax      ``O(N d)``       ``O(N M d)``
               over ``block x block`` tiles
``sliding``    each query sees keys at distance ``< w``     ``O(N d)``       ``O(N w d)``
               (Longformer/Mistral), plus global tokens
``bigbird``    block-sparse: window + global + random       ``O(N d)``       ``O(N b k d)``
               blocks of ``b`` tokens (BigBird)                               (``k`` blocks seen)
``linformer``  ``softmax(Q (E K)^T) (F V)``, ``E, F``        ``O(N k)``       ``O(N k d)``
               ``[k, n_max]`` learned (low rank)
``performer``  FAVOR+: ``phi(Q) (phi(K)^T V)`` with          ``O(N d)``       ``O(N r d)``
               positive orthogonal random features
``linear``     ``phi = elu + 1`` (Katharopoulos 2020)        ``O(N d)``       ``O(N d^2)``
=============  ===========================================  ===============  ==================

The first three are one algorithm, :func:`tiled_attention`: a *pattern* says which key tiles each
block of queries visits and which pairs inside a tile are allowed; the online softmax keeps, per
query, a running max ``m``, sum ``l`` and output ``o``::

    s = q K_j^T / sqrt(d_k) + bias_j             (-inf where not allowed)
    m' = max(m, max_j s);  p = exp(s - m')
    l  = l e^{m - m'} + sum_j p;   o = o e^{m - m'} + p V_j;   finally  out = o / l

Backward recomputes each tile from the saved log-sum-exp ``m + log l`` (flash attention's scheme),
so training memory is also ``O(N d)``. A score bias can be a tensor (sliced per tile) or a
:class:`RelativeBias` generated tile by tile (ALiBi at 100K tokens needs no ``[A, N, M]`` table).

Backends are named by spec strings (``"chunked:block=1024"``, ``"sliding:window=512,global=1"``);
:mod:`archlab.nn.backends` parses them and dispatches :func:`~archlab.nn.attend` and
:class:`~archlab.nn.MultiHeadAttention` to the functions and modules registered at the end of this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.errors import ConfigError, ShapeError
from archlab.nn.attention import attend, broadcast, check_attend_inputs
from archlab.nn.backends import BackendSpec, RelativeBias, register_backend

# ================================================================================================
# Patterns: which keys each block of queries visits
# ================================================================================================

Keys = tuple[int, int] | Tensor  # a contiguous range [j0, j1), or key positions (a LongTensor)


def _ranges(lo: int, hi: int, block: int) -> list[tuple[int, int]]:
    return [(j, min(j + block, hi)) for j in range(lo, hi, block)]


def _positions(keys: Keys, device) -> Tensor:
    return torch.arange(keys[0], keys[1], device=device) if isinstance(keys, tuple) else keys


class Pattern:
    """Which (query, key) pairs interact, as tiles. Query ``i`` sits at position ``i + (M - N)`` among
    the keys (bottom-right aligned, as :func:`~archlab.nn.causal_mask`).

    Subclasses give :meth:`key_tiles` (the keys a block of queries visits) and :meth:`allowed` (which
    pairs of a tile may interact; None = all).
    """

    def __init__(self, n: int, m: int, block: int, causal: bool):
        if not isinstance(block, int) or block < 1:
            raise ConfigError(f"block={block!r} must be an integer >= 1 (queries and keys per tile)")
        if causal and m < n:
            raise ShapeError(f"causal attention needs at least as many keys as queries, got N={n}, M={m}")
        self.n, self.m, self.block, self.causal = n, m, block, causal
        self.offset = m - n

    def query_blocks(self) -> list[tuple[int, int]]:
        return _ranges(0, self.n, self.block)

    def key_tiles(self, i0: int, i1: int) -> list[Keys]:  # pragma: no cover - abstract
        raise NotImplementedError

    def allowed(self, rows: Tensor, cols: Tensor) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense_mask(self, device=None) -> Tensor:
        """The whole pattern as an ``[N, M]`` boolean mask (small sizes: tests, plots)."""
        out = torch.zeros(self.n, self.m, dtype=torch.bool, device=device)
        for i0, i1 in self.query_blocks():
            rows = torch.arange(i0, i1, device=device)
            for keys in self.key_tiles(i0, i1):
                cols = _positions(keys, device)
                ok = self.allowed(rows, cols)
                out[i0:i1, cols] = True if ok is None else ok
        return out


class FullPattern(Pattern):
    """Every key (causal: every key up to the query's position)."""

    def key_tiles(self, i0, i1):
        return _ranges(0, i1 + self.offset if self.causal else self.m, self.block)

    def allowed(self, rows, cols):
        if not self.causal or int(cols[-1]) <= int(rows[0]) + self.offset:
            return None  # the tile is wholly at or below the diagonal
        return cols[None, :] <= rows[:, None] + self.offset


class SlidingPattern(Pattern):
    """Local window plus global tokens (Longformer).

    With ``p = i + (M - N)`` the query's position: causal, key ``j`` is near when ``0 <= p - j < w``
    (the ``w`` keys up to the query); two-sided when ``|p - j| < w``. A global position attends to
    every key and every query attends to it. Allowed: ``(near or global) and (j <= p if causal)``.
    """

    def __init__(self, n, m, block, causal, window: int, global_positions: Tensor):
        super().__init__(n, m, block, causal)
        self.window = window
        self.globals = global_positions  # sorted, unique, in [0, M)

    def _is_global(self, pos: Tensor) -> Tensor:
        return torch.isin(pos, self.globals.to(pos.device))

    def key_tiles(self, i0, i1):
        p0, p1 = i0 + self.offset, i1 + self.offset  # positions of the block's queries
        end = p1 if self.causal else self.m
        if bool(self._is_global(torch.arange(p0, p1)).any()):
            return _ranges(0, end, self.block)  # a global query attends to every key
        lo = max(0, p0 - self.window + 1)
        hi = min(end, p1 + (0 if self.causal else self.window - 1))
        outside = self.globals[(self.globals < lo) | (self.globals >= hi)]
        if self.causal:
            outside = outside[outside < p1]
        return _ranges(lo, hi, self.block) + ([] if outside.numel() == 0 else list(outside.split(self.block)))

    def allowed(self, rows, cols):
        p = rows[:, None] + self.offset
        d = p - cols[None, :]
        near = (d >= 0) & (d < self.window) if self.causal else d.abs() < self.window
        ok = near | self._is_global(rows + self.offset)[:, None] | self._is_global(cols)[None, :]
        return ok & (d >= 0) if self.causal else ok


def bigbird_layout(
    n_blocks: int, *, window: int, n_random: int, n_global: int, seed: int, causal: bool
) -> list[list[int]]:
    """The key blocks each query block attends (BigBird, Zaheer 2020), sorted.

    * global: query blocks ``< n_global`` see every block; every query block sees blocks ``< n_global``;
    * window: two-sided, blocks ``b - (window-1)/2 .. b + (window-1)/2``; causal, ``b - window + 1 .. b``;
    * random: ``n_random`` more blocks drawn without replacement from the rest (causal: earlier
      blocks only), by a generator seeded with ``seed``, so the layout is reproducible.
    """
    g = torch.Generator().manual_seed(seed)
    layout = []
    for b in range(n_blocks):
        if b < n_global:
            layout.append(list(range(b + 1 if causal else n_blocks)))
            continue
        near = range(b - window + 1, b + 1) if causal else range(b - window // 2, b + window // 2 + 1)
        chosen = set(range(min(n_global, n_blocks))) | {x for x in near if 0 <= x < n_blocks}
        eligible = [x for x in range(b if causal else n_blocks) if x not in chosen]
        picks = torch.randperm(len(eligible), generator=g)[:n_random].tolist()
        layout.append(sorted(chosen | {eligible[i] for i in picks}))
    return layout


class BigBirdPattern(Pattern):
    """Block-sparse attention over ``block``-token blocks following :func:`bigbird_layout` (``N == M``)."""

    def __init__(self, n, m, block, causal, *, window: int, n_random: int, n_global: int, seed: int):
        if n != m:
            raise ShapeError(
                f"bigbird attends a whole sequence to itself (N == M), got N={n} queries and M={m} keys; "
                "for cached decoding use 'sliding' or 'chunked'"
            )
        super().__init__(n, m, block, causal)
        self.layout = bigbird_layout(
            -(-n // block), window=window, n_random=n_random, n_global=n_global, seed=seed, causal=causal
        )

    def key_tiles(self, i0, i1):
        return [(kb * self.block, min((kb + 1) * self.block, self.m)) for kb in self.layout[i0 // self.block]]

    def allowed(self, rows, cols):
        if not self.causal or int(cols[-1]) <= int(rows[0]):
            return None
        return cols[None, :] <= rows[:, None]


# ================================================================================================
# Tiled exact attention: online softmax forward, recomputing backward
# ================================================================================================


def _slice_last2(t: Tensor, rows: slice | Tensor, keys: Keys) -> Tensor:
    """``t[..., rows, keys]`` for a mask/bias broadcastable to ``[..., N, M]`` (size-1 dims kept)."""
    if t.shape[-2] != 1:
        t = t[..., rows, :]
    if t.shape[-1] != 1:
        t = t[..., keys[0] : keys[1]] if isinstance(keys, tuple) else t.index_select(-1, keys)
    return t


def _take(t: Tensor, keys: Keys) -> Tensor:
    """Rows ``keys`` of ``t [..., M, d]``."""
    return t[..., keys[0] : keys[1], :] if isinstance(keys, tuple) else t.index_select(-2, keys)


def _add_into(total: Tensor, keys: Keys, value: Tensor, dim: int = -2) -> None:
    if isinstance(keys, tuple):
        total.narrow(dim, keys[0], keys[1] - keys[0]).add_(value)
    else:
        total.index_add_(dim % total.ndim, keys, value)


class _Tiles:
    """The tile computations of forward and backward; :meth:`scores` is the one place a tile's score is formed."""

    def __init__(self, q, k, v, pattern: Pattern, mask, bias, scale: float, dropout_p: float, seed: int):
        self.q, self.k, self.v, self.pattern = q, k, v, pattern
        self.mask, self.bias, self.scale = mask, bias, scale
        self.dropout_p, self.seed = dropout_p, seed

    def key_tiles(self, i0: int, i1: int) -> list[Keys]:
        """The pattern's key tiles, key positions on the device of ``q`` (a pattern lists them on the CPU)."""
        return [k if isinstance(k, tuple) else k.to(self.q.device) for k in self.pattern.key_tiles(i0, i1)]

    def scores(self, i0: int, i1: int, keys: Keys) -> Tensor:
        """``s = q_i K_j^T scale + bias``, ``-inf`` where the pattern or the mask forbids: ``[..., bq, bk]``."""
        s = self.q[..., i0:i1, :] @ _take(self.k, keys).transpose(-2, -1)
        s.mul_(self.scale)
        rows = torch.arange(i0, i1, device=s.device)
        cols = _positions(keys, s.device)
        if isinstance(self.bias, RelativeBias):
            s += self.bias.tile(rows, cols, dtype=s.dtype)
        elif self.bias is not None:
            s += _slice_last2(self.bias, slice(i0, i1), keys)
        ok = self.pattern.allowed(rows, cols)
        if self.mask is not None:
            tile_mask = _slice_last2(self.mask, slice(i0, i1), keys)
            ok = tile_mask if ok is None else ok & tile_mask
        return s if ok is None else s.masked_fill_(~ok, float("-inf"))

    def keep(self, tile: int, shape, device, dtype) -> Tensor | None:
        """Tile number ``tile``'s dropout multiplier (0 or ``1/(1-p)``), drawn alike in forward and backward."""
        if self.dropout_p == 0.0:
            return None
        g = torch.Generator(device=device).manual_seed(self.seed + tile)
        kept = torch.rand(shape, generator=g, device=device) >= self.dropout_p
        return kept.to(dtype) / (1.0 - self.dropout_p)

    def forward(self) -> tuple[Tensor, Tensor]:
        """``out [..., N, d_v]`` and the log-sum-exp ``[..., N]`` (``+inf`` for a query with no key)."""
        q, v = self.q, self.v
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1])
        tile = 0
        for i0, i1 in self.pattern.query_blocks():
            m = q.new_full((*q.shape[:-2], i1 - i0), float("-inf"))  # running max
            l = q.new_zeros(m.shape)  # running sum of exp(s - m)
            o = q.new_zeros(*m.shape, v.shape[-1])  # running sum of exp(s - m) v
            for keys in self.key_tiles(i0, i1):
                s = self.scores(i0, i1, keys)
                m_new = torch.maximum(m, s.amax(dim=-1))
                shift = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows that have seen no key yet
                p = s.sub_(shift[..., None]).exp_()
                alpha = torch.exp(m - shift)
                l.mul_(alpha).add_(p.sum(dim=-1))
                keep = self.keep(tile, p.shape, p.device, p.dtype)
                o.mul_(alpha[..., None]).add_((p if keep is None else p * keep) @ _take(v, keys))
                m, tile = m_new, tile + 1
            empty = l == 0
            out[..., i0:i1, :] = o / l.masked_fill(empty, 1.0)[..., None]
            lse[..., i0:i1] = (m + torch.log(l)).masked_fill(empty, float("inf"))
        return out, lse

    def backward(self, out: Tensor, lse: Tensor, d_out: Tensor, bias_grad: bool):
        """Gradients of ``q, k, v`` (and of a tensor bias), recomputing each tile's weights from ``lse``::

        P = exp(S - lse),  dV += P^T dO,  dP = dO V^T,  dS = P o (dP - D),  D = rowsum(dO o O)
        dQ += dS K scale,  dK += dS^T Q scale,  dbias += dS
        """
        q, k, v = self.q, self.k, self.v
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dbias = torch.zeros_like(self.bias) if bias_grad else None
        delta = (d_out * out).sum(dim=-1)
        tile = 0
        for i0, i1 in self.pattern.query_blocks():
            q_i, do_i = q[..., i0:i1, :], d_out[..., i0:i1, :]
            for keys in self.key_tiles(i0, i1):
                p = self.scores(i0, i1, keys).sub_(lse[..., i0:i1, None]).exp_()
                keep = self.keep(tile, p.shape, p.device, p.dtype)
                dp = do_i @ _take(v, keys).transpose(-2, -1)
                if keep is not None:
                    dp.mul_(keep)
                _add_into(dv, keys, (p if keep is None else p * keep).transpose(-2, -1) @ do_i)
                ds = p.mul_(dp.sub_(delta[..., i0:i1, None]))
                dq[..., i0:i1, :] += (ds @ _take(k, keys)).mul_(self.scale)
                _add_into(dk, keys, (ds.transpose(-2, -1) @ q_i).mul_(self.scale))
                if dbias is not None:
                    part = ds.sum_to_size(_slice_last2(dbias, slice(i0, i1), keys).shape)
                    rows = dbias if dbias.shape[-2] == 1 else dbias[..., i0:i1, :]
                    _add_into(rows, (0, 1) if dbias.shape[-1] == 1 else keys, part, dim=-1)
                tile += 1
        return dq, dk, dv, dbias


class _TiledAttention(torch.autograd.Function):
    """Saves ``q, k, v, out`` and the log-sum-exp (all ``O(N d)``); backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, pattern, lazy_bias, scale, dropout_p, seed):
        out, lse = _Tiles(q, k, v, pattern, mask, lazy_bias if bias is None else bias, scale, dropout_p, seed).forward()
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.args = (pattern, lazy_bias, scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        pattern, lazy_bias, scale, dropout_p, seed = ctx.args
        tiles = _Tiles(q, k, v, pattern, mask, lazy_bias if bias is None else bias, scale, dropout_p, seed)
        dq, dk, dv, dbias = tiles.backward(out, lse, d_out.contiguous(), bias_grad=ctx.needs_input_grad[3])
        return dq, dk, dv, dbias, None, None, None, None, None, None


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    mask: Tensor | None = None,
    bias: Tensor | RelativeBias | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact softmax attention restricted to ``pattern`` (and ``mask``), tile by tile; ``[..., N, d_v]``.

    Args:
        q, k, v: ``[..., N, d_k]``, ``[..., M, d_k]``, ``[..., M, d_v]`` (leading dims broadcast).
        pattern: a :class:`Pattern` built for ``N``, ``M``.
        mask: boolean, broadcastable to ``[..., N, M]``; True where a query may attend a key.
        bias: a float tensor broadcastable to ``[..., N, M]`` (gradients flow to it) or a
            :class:`RelativeBias`.
        scale: default ``1/sqrt(d_k)``.
        dropout_p: dropout on the attention weights.

    A query with no key to attend gets a zero output (and zero gradients).
    """
    check_attend_inputs(q, k, v, mask, bias)
    if (pattern.n, pattern.m) != (q.shape[-2], k.shape[-2]):
        raise ShapeError(
            f"pattern built for N={pattern.n}, M={pattern.m} but q has N={q.shape[-2]}, k has M={k.shape[-2]}"
        )
    lead = broadcast(tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2]))
    q, k, v = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
    mask = mask if mask is None or mask.ndim >= 2 else mask.reshape(1, -1)
    lazy = bias if isinstance(bias, RelativeBias) else None
    dense = None if lazy is not None or bias is None else (bias if bias.ndim >= 2 else bias.reshape(1, -1)).to(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    return _TiledAttention.apply(q, k, v, dense, mask, pattern, lazy, scale, dropout_p, seed)


def chunked_attention(
    q, k, v, *, mask=None, bias=None, causal: bool = False, scale=None, dropout_p: float = 0.0, block: int = 256
) -> Tensor:
    """Exact attention ``softmax(Q K^T / sqrt(d_k) + bias) V`` in ``block x block`` tiles: ``O(N d)`` memory.

    Arguments as :func:`~archlab.nn.attend` (``causal`` is bottom-right aligned); ``[..., N, d_v]``.
    """
    pattern = FullPattern(q.shape[-2], k.shape[-2], block, causal)
    return tiled_attention(q, k, v, pattern, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p)


def _global_positions(global_tokens: int | Sequence[int] | Tensor, m: int) -> Tensor:
    if isinstance(global_tokens, int):
        if global_tokens < 0:
            raise ConfigError(f"global_tokens={global_tokens} must be >= 0 (the first positions made global)")
        return torch.arange(min(global_tokens, m))
    pos = torch.as_tensor(global_tokens, dtype=torch.long).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= m):
        raise ShapeError(f"global token positions must be in [0, M={m}), got {pos.tolist()}")
    return torch.unique(pos)


def sliding_window_attention(
    q, k, v, *, window: int, global_tokens: int | Sequence[int] | Tensor = 0, mask=None, bias=None,
    causal: bool = False, scale=None, dropout_p: float = 0.0, block: int = 256,
) -> Tensor:  # fmt: skip
    """Attention to keys at distance ``< window`` plus global tokens (see :class:`SlidingPattern`).

    Memory ``O(N d)`` and time ``O(N window d)``: no ``N x M`` mask or score matrix is ever built.

    Args:
        window: ``w``; causal queries see their ``w`` most recent keys, two-sided ``2w - 1`` keys.
        global_tokens: an int ``g`` (the first ``g`` positions) or the positions themselves.
        others: as :func:`~archlab.nn.attend`.
    """
    if window < 1:
        raise ConfigError(f"window={window} must be >= 1")
    pattern = SlidingPattern(
        q.shape[-2], k.shape[-2], block, causal, window, _global_positions(global_tokens, k.shape[-2])
    )
    return tiled_attention(q, k, v, pattern, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p)


def bigbird_attention(
    q, k, v, *, block: int = 64, window: int = 3, n_random: int = 3, n_global: int = 2, seed: int = 0,
    mask=None, bias=None, causal: bool = False, scale=None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """Block-sparse attention over the :func:`bigbird_layout` (``N == M``); ``[..., N, d_v]``."""
    pattern = BigBirdPattern(
        q.shape[-2], k.shape[-2], block, causal, window=window, n_random=n_random, n_global=n_global, seed=seed
    )
    return tiled_attention(q, k, v, pattern, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p)


# ================================================================================================
# Kernel (linear) attention: phi(Q) (phi(K)^T V), no score matrix
# ================================================================================================


FeatureMap = Callable[[Tensor], Tensor]  # [..., c, d_k] -> non-negative features [..., c, r]


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    phi_q: FeatureMap,
    phi_k: FeatureMap,
    causal: bool = False,
    key_mask: Tensor | None = None,
    chunk: int = 128,
) -> Tensor:
    r"""``out_i = phi(q_i)^T S / phi(q_i)^T z`` with ``S = sum_j phi(k_j) v_j^T`` ``[r, d_v]``, ``z = sum_j phi(k_j)``.

    Non-causal: ``S``, ``z`` over all keys. Causal: over keys ``j <= i + (M - N)``, by prefix sums
    taken ``chunk`` queries at a time: inside a chunk the quadratic form ``(phi_Q phi_K^T o tril) V``,
    across chunks the running ``S``, ``z``. Features are computed chunk by chunk, so memory is
    ``O(N d_v + chunk (chunk + r) + r d_v)``: neither ``[N, r]`` features nor ``[N, r, d_v]`` states.

    Args:
        q, k, v: ``[..., N, d_k]``, ``[..., M, d_k]``, ``[..., M, d_v]``.
        phi_q, phi_k: the feature maps of queries and keys (rows independently).
        key_mask: ``[..., M]`` boolean, False for keys no query may attend (padding).

    A query with no key to attend (or zero normaliser) gets a zero output.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk={chunk!r} must be an integer >= 1 (queries per step of the prefix sums)")
    n, m = q.shape[-2], k.shape[-2]
    seen = m - n if causal else m  # keys every query sees: those before the first query (causal), or all
    if key_mask is None:
        key_mask = torch.ones(m, dtype=torch.bool, device=k.device)

    def features(kc: Tensor, mc: Tensor) -> Tensor:
        return phi_k(kc) * mc[..., None].to(kc.dtype)

    # split once (not sliced per chunk: autograd would build a full-size gradient for every slice)
    k_seen, k_own = k[..., :seen, :], k[..., seen:, :]
    v_seen, v_own = v[..., :seen, :], v[..., seen:, :]
    m_seen, m_own = key_mask[..., :seen], key_mask[..., seen:]
    fk = features(k_seen[..., :0, :], m_seen[..., :0])  # [..., 0, r]: S and z start at zero
    s, z = fk.transpose(-2, -1) @ v_seen[..., :0, :], fk.sum(dim=-2)
    for kc, vc, mc in zip(*(t.split(chunk, dim=-2) for t in (k_seen, v_seen)), m_seen.split(chunk, dim=-1)):
        fk = features(kc, mc)
        s, z = s + fk.transpose(-2, -1) @ vc, z + fk.sum(dim=-2)
    # with gradients the chunk outputs are concatenated; without, they are written into one tensor
    tracking = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    lead = broadcast(tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2]))
    out = [] if tracking else v.new_empty(*lead, n, v.shape[-1])
    own = zip(*(t.split(chunk, dim=-2) for t in (k_own, v_own)), m_own.split(chunk, dim=-1)) if causal else None
    for i0, qc in zip(range(0, n, chunk), q.split(chunk, dim=-2)):
        fq = phi_q(qc)
        num, den = fq @ s, fq @ z[..., None]
        if causal:  # the chunk's own keys, up to each query
            kc, vc, mc = next(own)
            fk = features(kc, mc)
            local = (fq @ fk.transpose(-2, -1)).tril()  # [..., c, c]
            num, den = num + local @ vc, den + local.sum(dim=-1, keepdim=True)
            s, z = s + fk.transpose(-2, -1) @ vc, z + fk.sum(dim=-2)
        if tracking:
            out.append(_normalise(num, den))
        else:
            out[..., i0 : i0 + qc.shape[-2], :] = _normalise(num, den)
    return torch.cat(out, dim=-2) if tracking else out


def _normalise(num: Tensor, den: Tensor) -> Tensor:
    return num / den.masked_fill(den == 0, 1.0)


def elu_feature_map(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1 > 0`` (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


def _key_mask(mask: Tensor | None, n: int, m: int, backend: str) -> Tensor | None:
    """A ``[..., 1, M]`` key mask as ``[..., M]``; any mask that varies over queries is refused."""
    if mask is None:
        return None
    if mask.ndim >= 2 and mask.shape[-2] != 1 and n != 1:
        raise ShapeError(
            f"backend {backend!r} takes only key masks [..., 1, M] (padding), got a mask of shape "
            f"{tuple(mask.shape)} that varies over queries; use 'chunked' for arbitrary masks"
        )
    return mask if mask.ndim == 1 else mask[..., 0, :]


def _refuse_score_terms(backend: str, bias, dropout_p: float) -> None:
    if bias is not None:
        raise ConfigError(
            f"backend {backend!r} never forms the scores, so it cannot add a score bias (ALiBi, relative "
            "positions); use positional='rope' or 'learned', or a backend with exact softmax ('chunked', 'sliding')"
        )
    if dropout_p > 0:
        raise ConfigError(
            f"backend {backend!r} has no attention weights to drop; set the attention dropout to 0 (got {dropout_p})"
        )


def linear_attention(q, k, v, *, mask=None, bias=None, causal: bool = False, dropout_p: float = 0.0, chunk: int = 128):
    """Linear attention with ``phi = elu + 1``: ``[..., N, d_k]`` queries -> ``[..., N, d_v]``; ``O(N d^2)`` time."""
    check_attend_inputs(q, k, v, mask, bias)
    _refuse_score_terms("linear", bias, dropout_p)
    key_mask = _key_mask(mask, q.shape[-2], k.shape[-2], "linear")
    if causal and k.shape[-2] < q.shape[-2]:
        raise ShapeError(
            f"causal attention needs at least as many keys as queries, got N={q.shape[-2]}, M={k.shape[-2]}"
        )
    return kernel_attention(
        q, k, v, phi_q=elu_feature_map, phi_k=elu_feature_map, causal=causal, key_mask=key_mask, chunk=chunk
    )


def orthogonal_gaussian(n_features: int, d: int, *, generator: torch.Generator | None = None) -> Tensor:
    """``[r, d]`` random features: blocks of ``d`` orthogonal rows, each row scaled to the norm of a
    Gaussian vector, so every row is marginally ``N(0, I_d)`` (Performer's orthogonal random features)."""
    blocks = []
    for _ in range(-(-n_features // d)):
        gauss = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qmat, r = torch.linalg.qr(gauss)
        blocks.append((qmat * torch.sign(torch.diagonal(r))).T)  # sign fix: a uniformly random rotation
    w = torch.cat(blocks)[:n_features]
    norms = torch.randn(n_features, d, generator=generator, dtype=torch.float64).norm(dim=-1)
    return (w * norms[:, None]).float()


def favor_features(x: Tensor, omega: Tensor, *, stabiliser: Tensor | None = None) -> Tensor:
    r"""FAVOR+ positive features ``phi(x) = exp(omega x' - |x'|^2 / 2 - c) / sqrt(r)``, ``x' = x / d^{1/4}``.

    ``E[phi(q)^T phi(k)] = exp(q^T k / sqrt(d)) e^{-c_q - c_k}``: the softmax kernel up to the
    stabilising constants ``c``, which cancel in attention's ratio as long as ``c`` is the same for
    every key (``stabiliser``, see :func:`favor_key_stabiliser`); ``c`` may vary per query, and
    without a ``stabiliser`` it is the row's own max. ``x [..., N, d]``, ``omega [r, d]`` -> ``[..., N, r]``.
    """
    x = x * x.shape[-1] ** -0.25
    proj = x @ omega.to(x.dtype).T  # [..., N, r]
    sq = (x * x).sum(dim=-1, keepdim=True) / 2
    c = proj.amax(dim=-1, keepdim=True).detach() if stabiliser is None else stabiliser
    return torch.exp(proj - sq - c) / math.sqrt(omega.shape[0])


@torch.no_grad()
def favor_key_stabiliser(k: Tensor, omega: Tensor, chunk: int = 1024) -> Tensor:
    """``max_j omega k_j'`` over all keys and features, per leading index: ``[..., 1, 1]`` (chunk by chunk)."""
    scale = k.shape[-1] ** -0.25
    maxima = [(kc * scale @ omega.to(k.dtype).T).amax(dim=(-2, -1), keepdim=True) for kc in k.split(chunk, dim=-2)]
    return torch.stack(maxima).amax(dim=0) if maxima else k.new_zeros(*k.shape[:-2], 1, 1)


class PerformerAttention(nn.Module):
    """Performer (Choromanski et al. 2021), FAVOR+: softmax attention estimated with ``r`` positive
    orthogonal random features, ``O(N r d)`` time and ``O(N d)`` memory; causal by prefix sums.

    The features ``omega [r, d_k]`` are a buffer (saved with the model); ``redraw=True`` draws new
    ones at every forward in training mode (the paper's feature redrawing).
    """

    def __init__(self, d_k: int, features: int = 256, redraw: bool = False, chunk: int = 128):
        super().__init__()
        self.d_k, self.features, self.redraw, self.chunk = d_k, features, redraw, chunk
        self.register_buffer("omega", orthogonal_gaussian(features, d_k))

    def extra_repr(self) -> str:
        return f"d_k={self.d_k}, features={self.features}, redraw={self.redraw}"

    @torch.no_grad()
    def redraw_features(self) -> None:
        self.omega.copy_(orthogonal_gaussian(self.features, self.d_k))

    def forward(
        self,
        q,
        k,
        v,
        *,
        mask=None,
        bias=None,
        causal=False,
        scale=None,
        dropout_p=0.0,
        backend=None,
        return_weights=False,
    ):
        """``q [..., N, d_k]``, ``k [..., M, d_k]``, ``v [..., M, d_v]`` -> ``[..., N, d_v]`` (default scale only)."""
        check_attend_inputs(q, k, v, mask, bias)
        if q.shape[-1] != self.d_k:
            raise ShapeError(f"performer built for d_k={self.d_k}, got queries of width {q.shape[-1]}")
        if return_weights or (scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5)):
            raise ConfigError("backend 'performer' estimates softmax(q.k / sqrt(d_k)): no weights, no other scale")
        _refuse_score_terms("performer", bias, dropout_p)
        if causal and k.shape[-2] < q.shape[-2]:
            raise ShapeError(
                f"causal attention needs at least as many keys as queries, got N={q.shape[-2]}, M={k.shape[-2]}"
            )
        if self.redraw and self.training:
            self.redraw_features()
        key_mask = _key_mask(mask, q.shape[-2], k.shape[-2], "performer")
        c_k = favor_key_stabiliser(k, self.omega)
        return kernel_attention(
            q, k, v, causal=causal, key_mask=key_mask, chunk=self.chunk,
            phi_q=lambda x: favor_features(x, self.omega),
            phi_k=lambda x: favor_features(x, self.omega, stabiliser=c_k),
        )  # fmt: skip


# ================================================================================================
# Low rank: Linformer
# ================================================================================================


class LinformerAttention(nn.Module):
    r"""Linformer (Wang et al. 2020): ``softmax(Q (E K)^T / sqrt(d_k)) (F V)``.

    ``E, F in R^{k x n_max}`` project the key/value *sequence axis* from ``M`` to ``k`` rows (the
    first ``M`` columns are used), so the scores are ``[N, k]``: ``O(N k)`` memory. Shared by all
    heads of the layer. A sequence longer than ``n_max`` has no columns of ``E``: ShapeError.
    Causal attention is impossible (each projected row mixes all positions): ConfigError.
    """

    def __init__(self, rank: int = 256, max_len: int = 4096):
        super().__init__()
        self.rank, self.max_len = rank, max_len
        self.E = nn.Parameter(torch.randn(rank, max_len) / math.sqrt(rank))
        self.F = nn.Parameter(torch.randn(rank, max_len) / math.sqrt(rank))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, max_len={self.max_len}"

    def forward(
        self,
        q,
        k,
        v,
        *,
        mask=None,
        bias=None,
        causal=False,
        scale=None,
        dropout_p=0.0,
        backend=None,
        return_weights=False,
    ):
        """``q [..., N, d_k]``, ``k [..., M, d_k]``, ``v [..., M, d_v]`` -> ``[..., N, d_v]``."""
        check_attend_inputs(q, k, v, mask, bias)
        m = k.shape[-2]
        if m > self.max_len:
            raise ShapeError(
                f"linformer: {m} keys but max_len={self.max_len} (E and F are [rank={self.rank}, {self.max_len}]); "
                "build it with a larger max_len or use another backend"
            )
        if causal:
            raise ConfigError(
                "backend 'linformer' cannot be causal: each projected key mixes every position (future ones too)"
            )
        if bias is not None:
            raise ConfigError("backend 'linformer' cannot add a score bias: its scores are over projected keys")
        key_mask = _key_mask(mask, q.shape[-2], m, "linformer")
        if key_mask is not None:  # padded keys and values contribute nothing to the projections
            keep = key_mask[..., None].to(k.dtype)
            k, v = k * keep, v * keep
        k_proj = self.E[:, :m].to(k.dtype) @ k  # [..., rank, d_k]
        v_proj = self.F[:, :m].to(v.dtype) @ v  # [..., rank, d_v]
        return attend(q, k_proj, v_proj, scale=scale, dropout_p=dropout_p, backend="math" if return_weights else "sdpa",
                      return_weights=return_weights)  # fmt: skip


# ================================================================================================
# Registration: what archlab.nn.backends dispatches each kind to
# ================================================================================================


def _linear_backend(bs: BackendSpec, q, k, v, *, mask, bias, causal, scale, dropout_p) -> Tensor:
    if scale is not None:
        raise ConfigError("backend 'linear' uses phi(q).phi(k) with phi = elu + 1: there is no scale to set")
    return linear_attention(q, k, v, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p, chunk=bs["chunk"])


register_backend("chunked", function=lambda bs, q, k, v, **kw: chunked_attention(q, k, v, block=bs["block"], **kw))
register_backend(
    "sliding",
    function=lambda bs, q, k, v, **kw: sliding_window_attention(
        q, k, v, window=bs["window"], global_tokens=bs["global"], block=bs["block"], **kw
    ),
)  # fmt: skip
register_backend(
    "bigbird",
    function=lambda bs, q, k, v, **kw: bigbird_attention(
        q, k, v, block=bs["block"], window=bs["window"], n_random=bs["random"], n_global=bs["global"], seed=bs["seed"],
        **kw,
    ),
)  # fmt: skip
register_backend("linear", function=_linear_backend)
register_backend("linformer", module=lambda bs, d_k: LinformerAttention(bs["rank"], bs["max_len"]))
register_backend(
    "performer", module=lambda bs, d_k: PerformerAttention(d_k, bs["features"], bool(bs["redraw"]), bs["chunk"])
)
