r"""Positional encodings behind one small interface.

Self-attention is blind to order, so position enters in one of two places:

* added to the input embeddings ``x [B, N, d]`` (sinusoidal, learned): :meth:`add_to_input`;
* inside attention (RoPE rotates queries and keys: :meth:`transform_qk`, or :meth:`transform_qk_heads` on
  the two stacked along the head axis; ALiBi adds ``-m|i-j|`` to the scores: :meth:`attention_bias`).

Every encoding implements all the hooks (the ones it does not use are identities), so a model
calls them all and never asks which kind it holds. ``offset`` is the absolute position of the first
token: the length of the KV cache during incremental decoding. Rows of a batch whose tokens sit at
positions of their own (left padding: a row's first real token is its position 0) take :meth:`at_rows`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archlab.config import check_choice, check_positive, check_type
from archlab.errors import ConfigError, ShapeError
from archlab.nn.buffers import KeptDtypeBuffers

#: the most elements (positions x width) a cached position table grows to; positions past it are computed alone, so a
#: huge ``offset`` (any position works for sinusoidal and RoPE) costs the rows asked, not a table up to them
MAX_CACHED_ELEMENTS = 2**24


def _check_size(name: str, value: int) -> None:
    """ConfigError unless ``value`` is an int (not a bool or float) > 0."""
    check_type(name, value, int)
    check_positive(name, value)


class PositionalEncoding(KeptDtypeBuffers):
    """The interface. The default hooks do nothing."""

    def _kept_dtype_buffers(self) -> list[str]:
        """A dtype change (``model.bfloat16()``, ``model.float()``) leaves the float64 constants float64 (RoPE's
        frequencies, ALiBi's slopes), as their equations have them; a device move applies. Rounded to the model's
        dtype they moved every position: RoPE's frequencies in bfloat16 (relative 2^-9) turn position ``p`` up to
        ``p theta_i 2^-9`` radians off (0.28 rad for SmolLM2's second pair at ``p = 200``), and ALiBi's distances,
        computed in the slopes' dtype, lost their integer steps past 256 in bfloat16; in float32 the tables differed
        from a freshly built model's in the last bit (a saved model loaded back, ``load_model``, decoded otherwise)."""
        return [name for name, b in self._buffers.items() if b is not None and b.dtype == torch.float64]

    def add_to_input(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x [B, N, d]`` -> ``x + PE[offset : offset + N]``."""
        return x

    def transform_qk(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """``q [B, A, N, d_k]``, ``k [B, A, N, d_k]`` of the same new positions -> rotated q, k."""
        return q, k

    def transform_qk_heads(self, qk: Tensor, n_queries: int, offset: int = 0) -> Tensor:
        """Queries and keys stacked on the head axis, ``qk [B, A + G, N, d_k]`` (the first ``A = n_queries`` heads
        the queries), as :meth:`transform_qk` transforms them, same layout. Self-attention computes q, k and v in
        one product, so its q and k heads are side by side already: an encoding that treats every head alike
        (RoPE) transforms them in one pass. This default splits them and calls :meth:`transform_qk` (no op for
        an encoding that leaves them unchanged)."""
        q, k = qk.split([n_queries, qk.shape[-3] - n_queries], dim=-3)
        q2, k2 = self.transform_qk(q, k, offset)
        return qk if q2 is q and k2 is k else torch.cat([q2, k2], dim=-3)

    def attention_bias(self, n_queries: int, n_keys: int, offset: int = 0) -> Tensor | None:
        """An additive score bias ``[A, N, M]`` (queries at ``offset + i``, keys at ``j``), or None."""
        return None

    def at_rows(self, positions: Tensor, end: int | None = None) -> PositionalEncoding | RowRotation:
        """The encoding acting inside attention for tokens at per-row ``positions [B, N]`` (each row's own count of
        real tokens before each: :func:`archlab.models.decoder.positions_from_mask` for a left-padded batch), where
        the hooks' ``offset`` would give every row the same; ``end``: a bound the positions stay below, if known (a
        mask's length), which spares reading their largest. This default is the encoding itself: those added to
        the input take the positions as ``position_ids``, and a bias that reads the distance ``i - j`` between a
        row's tokens is the same whatever padding comes before them."""
        return self


class NoPositionalEncoding(PositionalEncoding):
    """No position at all (a bag of tokens; useful for ablations)."""


def sinusoid_table(n_positions: int, d_model: int, offset: int = 0, *, dtype=torch.float32, device=None) -> Tensor:
    r"""``PE[pos, 2i] = sin(pos / 10000^{2i/d})``, ``PE[pos, 2i+1] = cos(pos / 10000^{2i/d})``; ``[n, d]``.

    Computed in float64 and cast, so large positions stay accurate.
    """
    check_type("n_positions", n_positions, int)
    check_type("offset", offset, int)
    if n_positions < 0 or offset < 0:
        raise ShapeError(f"sinusoid_table: n_positions={n_positions} and offset={offset} must be >= 0")
    _check_size("d_model", d_model)
    pos = torch.arange(offset, offset + n_positions, dtype=torch.float64, device=device).unsqueeze(1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos / torch.pow(10000.0, two_i / d_model)
    pe = torch.zeros(n_positions, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)


def _check_offset(offset: int) -> None:
    if not isinstance(offset, int | torch.SymInt) or isinstance(offset, bool):
        raise ShapeError(f"offset={offset!r} must be an int (the absolute position of the first token)")
    if offset < 0:
        raise ShapeError(f"offset={offset} must be >= 0 (the absolute position of the first token)")


class SinusoidalPositionalEncoding(PositionalEncoding):
    """Fixed sine/cosine encoding (Vaswani 2017), added to the embeddings; no length limit.

    A table is cached per dtype and device and grown on demand, so any position works. It is a
    plain attribute, not a buffer: each table is computed in float64 and rounded once to the input's
    dtype, so ``module.double()`` after a float32 run does not leave float32-rounded values behind.
    """

    def __init__(self, d_model: int, initial_length: int = 1024):
        super().__init__()
        _check_size("d_model", d_model)
        _check_size("initial_length", initial_length)
        self.d_model, self.initial_length = d_model, initial_length
        self._table: Tensor | None = None

    @property
    def table(self) -> Tensor:
        """The cached table ``[L, d]`` (float32 on the CPU until an input of another dtype or device is seen)."""
        if self._table is None:  # (at most MAX_CACHED_ELEMENTS: a huge initial_length must not allocate it all)
            self._table = sinusoid_table(min(self.initial_length, self._most_rows), self.d_model)
        return self._table

    @property
    def _most_rows(self) -> int:
        return max(MAX_CACHED_ELEMENTS // self.d_model, 1)

    def _table_for(self, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        t = self.table
        if t.shape[0] < end or t.dtype != dtype or t.device != device:
            grow = 2 * t.shape[0] if t.shape[0] < end else t.shape[0]
            self._table = t = sinusoid_table(max(end, grow), self.d_model, dtype=dtype, device=device)
        return t

    def add_to_input(self, x: Tensor, offset: int = 0) -> Tensor:
        n = x.shape[-2]
        if x.shape[-1] != self.d_model:
            raise ShapeError(f"x has width {x.shape[-1]} but the encoding has d_model={self.d_model}")
        _check_offset(offset)
        if offset + n > self._most_rows:  # past the cached table's bound: these rows alone (the same values)
            return x + sinusoid_table(n, self.d_model, offset, dtype=x.dtype, device=x.device)
        return x + self._table_for(offset + n, x.dtype, x.device)[offset : offset + n]


class LearnedPositionalEncoding(PositionalEncoding):
    """A learned table of ``max_len`` position vectors (BERT, GPT-2). It cannot go past its table."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        _check_size("max_len", max_len)
        _check_size("d_model", d_model)
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)

    def add_to_input(self, x: Tensor, offset: int = 0) -> Tensor:
        n = x.shape[-2]
        if x.shape[-1] != self.embedding.embedding_dim:
            raise ShapeError(f"x has width {x.shape[-1]} but the encoding has d_model={self.embedding.embedding_dim}")
        _check_offset(offset)
        if offset + n > self.max_len:
            raise ShapeError(
                f"position {offset + n - 1} is past the learned position table of max_len={self.max_len} "
                f"positions (0..{self.max_len - 1}); a learned encoding cannot extrapolate: shorten the input "
                "or use 'rope' / 'alibi'"
            )
        positions = torch.arange(offset, offset + n, device=x.device)
        return x + self.embedding(positions)


class RotaryPositionalEncoding(PositionalEncoding):
    r"""RoPE (Su et al. 2021): rotate each pair of query/key features by an angle ``pos * theta_i``.

    ``theta_i = base^{-2i/d_rot}`` for ``i < d_rot/2``. Feature ``i`` is paired with feature
    ``i + d_rot/2`` (the "rotate half" layout of GPT-NeoX and Llama). Since rotations compose,
    ``<R_m q, R_n k> = <q, R_{n-m} k>``: scores depend only on the offset ``i - j``.

    Args:
        d_head: per-head width ``d_k``.
        base: the wavelength base (10000).
        rotary_dim: rotate only the first ``rotary_dim`` features (partial RoPE); default all.
    """

    def __init__(self, d_head: int, base: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        _check_size("d_head", d_head)
        if rotary_dim is None and d_head % 2:
            raise ConfigError(f"d_head={d_head} must be even: RoPE rotates feature pairs (or pass an even rotary_dim)")
        if rotary_dim is not None:
            check_type("rotary_dim", rotary_dim, int)
        if not isinstance(base, int | float) or isinstance(base, bool) or not 0 < base < math.inf:
            raise ConfigError(f"base={base!r} must be a finite number > 0 (RoPE's wavelength base, e.g. 10000)")
        self.rotary_dim = d_head if rotary_dim is None else rotary_dim
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= d_head:
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and in (0, d_head={d_head}]")
        self.d_head, self.base = d_head, base
        half = self.rotary_dim // 2
        inv_freq = 1.0 / (base ** (torch.arange(half, dtype=torch.float64) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.dtype, torch.device, Tensor, Tensor, Tensor] | None = None
        self._last: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None  # see _rows

    def _cos_sin(self, end: int, dtype, device) -> tuple[Tensor, Tensor, Tensor]:
        """``cos``, ``sin`` and ``(-sin, sin)`` halves, ``[>= end, d_rot]`` each, cached per dtype and device."""
        c = self._cache
        if c is None or c[0] < end or c[1] != dtype or c[2] != device:
            # grown by doubling when too short; rebuilt at its length for another dtype or device (callers that
            # alternate dtypes must not double it each time)
            length = max(end, 256, 0 if c is None else 2 * c[0] if c[0] < end else c[0])
            cos, sin, signed = self._at(torch.arange(length, dtype=torch.float64, device=device), dtype)
            self._cache = c = (length, dtype, device, cos, sin, signed)
        return c[3], c[4], c[5]

    def _at(self, positions: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``cos``, ``sin``, ``(-sin, sin)`` at float64 ``positions [...]``, ``[..., d_rot]`` each: a table's rows."""
        angles = positions[..., None] * self.inv_freq.to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        sin = angles.sin().to(dtype)
        signed = torch.cat([-sin[..., : self.rotary_dim // 2], sin[..., self.rotary_dim // 2 :]], dim=-1)
        return angles.cos().to(dtype), sin, signed

    @property
    def _most_rows(self) -> int:
        """The longest table kept (MAX_CACHED_ELEMENTS); positions past it are computed alone, to the same bits."""
        return max(MAX_CACHED_ELEMENTS // self.rotary_dim, 256)

    def _rows(self, offset: int, n: int, dtype, device) -> tuple[Tensor, Tensor, Tensor]:
        """``cos``, ``sin``, ``(-sin, sin)`` at positions ``offset .. offset + n - 1``, ``[n, d_rot]`` each. The last
        positions asked are kept: every layer of a decoding step asks for the same ones (3 slices a step, not 3
        a layer). A grown table holds the same values at the old positions, so kept rows stay right."""
        key, last = (offset, n, dtype, device), self._last  # one read: another thread may replace it meanwhile
        if last is None or last[0] != key:
            with torch.inference_mode(False):  # kept tables and rows must serve training after a generation too
                if offset + n > self._most_rows:  # a huge offset: these rows alone, not a table up to them
                    rows = self._at(torch.arange(offset, offset + n, dtype=torch.float64, device=device), dtype)
                else:
                    rows = tuple(t[offset : offset + n] for t in self._cos_sin(offset + n, dtype, device))
                last = self._last = (key, rows)
        return last[1]

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x [..., N, d_head]`` at positions ``offset .. offset+N-1`` -> rotated, same shape."""
        if x.ndim < 2:
            raise ShapeError(f"RoPE rotates x [..., N, d_head={self.d_head}], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.d_head:
            raise ShapeError(f"RoPE built for d_head={self.d_head}, got width {x.shape[-1]}")
        _check_offset(offset)
        return self.rotate_with(x, *self._rows(offset, x.shape[-2], x.dtype, x.device))

    def tables(self, end: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``cos``, ``sin`` and ``(-sin, sin)`` at positions ``0 .. end - 1``, ``[end, d_rot]`` each: the rows
        :meth:`rotate_with` takes, for a caller that addresses positions by a tensor (static decoding,
        :mod:`archlab.static_decoding`)."""
        if not isinstance(end, int) or isinstance(end, bool) or end < 0:
            raise ShapeError(f"end={end!r} must be an int >= 0 (the number of positions 0 .. end - 1)")
        with torch.inference_mode(False):  # as _rows: kept tables must serve training too
            return tuple(t[:end] for t in self._cos_sin(end, dtype, device))

    def rotate_with(self, x: Tensor, cos: Tensor, sin: Tensor, signed: Tensor) -> Tensor:
        """The rotation of ``x [..., N, d_head]`` by the rows ``cos``, ``sin``, ``signed = (-sin, sin)`` ``[N, d_rot]``
        of its ``N`` positions (:meth:`tables`); :meth:`rotate` takes them at ``offset .. offset + N - 1``."""
        r = self.rotary_dim
        if r == self.d_head:  # the same products in fewer ops: [x2, x1] * (-sin, sin) = [-x2, x1] * sin
            return x * cos + x.roll(r // 2, dims=-1) * signed
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
        rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
        return rotated if r == self.d_head else torch.cat([rotated, x_pass], dim=-1)

    def transform_qk(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """``q [B, A, N, d_head]`` and ``k [B, G, N, d_head]`` rotated; heads side by side are rotated in one pass
        (a decoding step's rotation is a few small ops whose cost is their count, not their size)."""
        if q.ndim == k.ndim >= 3 and q.shape[:-3] == k.shape[:-3] and q.shape[-2:] == k.shape[-2:] and q.dtype == k.dtype:
            both = self.rotate(torch.cat([q, k], dim=-3), offset)
            return both[..., : q.shape[-3], :, :], both[..., q.shape[-3] :, :, :]
        return self.rotate(q, offset), self.rotate(k, offset)

    def transform_qk_heads(self, qk: Tensor, n_queries: int, offset: int = 0) -> Tensor:
        """``qk [B, A + G, N, d_head]`` (queries, then keys) rotated in one pass: every head is rotated alike."""
        return self.rotate(qk, offset)

    def at_rows(self, positions: Tensor, end: int | None = None) -> RowRotation:
        """The rotation at per-row ``positions [B, N]`` (all below ``end`` if given): a row's query and key at
        position ``p`` are rotated by ``p * theta`` whatever padding comes before them, by the table rows a row alone
        reads at ``p``, so a left-padded row's queries and keys are those it has alone, to the bit (a rotation by
        the storage index gives the same scores only up to rounding)."""
        return RowRotation(self, positions, end)


class RowRotation:
    """RoPE at per-row positions (:meth:`RotaryPositionalEncoding.at_rows`): the hooks of the attention side of
    :class:`PositionalEncoding` (``transform_qk``, ``transform_qk_heads``, ``attention_bias``), each row's tokens
    rotated at ``positions [B, N]`` whatever the ``offset`` they are given. The table rows are gathered once per
    dtype and device, at the first layer that asks: a decoder's layers share them. ``end`` (optional): a bound the
    positions stay below, so the tables' length is known without reading the positions' largest (on CUDA a sync,
    under ``torch.compile`` a graph break)."""

    def __init__(self, rope: RotaryPositionalEncoding, positions: Tensor, end: int | None = None):
        if not isinstance(positions, Tensor) or positions.ndim != 2 or positions.dtype.is_floating_point:
            raise ShapeError(f"positions must be integer [B, N], got {positions!r:.80}")
        self.rope, self.positions, self.end = rope, positions, end
        self._rows: tuple[torch.dtype, torch.device, tuple[Tensor, Tensor, Tensor]] | None = None

    def _rows_for(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``cos``, ``sin``, ``(-sin, sin)`` at the positions, ``[B, 1, N, d_rot]`` each (broadcast over heads)."""
        if self._rows is None or self._rows[:2] != (x.dtype, x.device):
            positions = self.positions.to(x.device)
            end = self.end if self.end is not None else int(positions.max()) + 1 if positions.numel() else 1
            with torch.inference_mode(False):  # as RotaryPositionalEncoding._rows: kept tables serve training too
                if end > self.rope._most_rows:  # huge positions: their rows alone, not a table up to them
                    rows = self.rope._at(positions.double(), x.dtype)
                else:
                    rows = tuple(t[positions] for t in self.rope._cos_sin(end, x.dtype, x.device))
            self._rows = (x.dtype, x.device, tuple(t[:, None] for t in rows))
        return self._rows[2]

    def rotate(self, x: Tensor) -> Tensor:
        """``x [B, H, N, d_head]``, row ``b``'s tokens at ``positions[b]`` -> rotated, same shape."""
        if x.ndim != 4 or x.shape[0] != self.positions.shape[0] or x.shape[-2] != self.positions.shape[1]:
            raise ShapeError(f"RoPE rows: x must be [B, H, N, d] = [{self.positions.shape[0]}, H, "
                             f"{self.positions.shape[1]}, d], got {tuple(x.shape)}")  # fmt: skip
        if x.shape[-1] != self.rope.d_head:
            raise ShapeError(f"RoPE built for d_head={self.rope.d_head}, got width {x.shape[-1]}")
        return self.rope.rotate_with(x, *self._rows_for(x))

    def transform_qk(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """``q [B, A, N, d_head]``, ``k [B, G, N, d_head]`` rotated at the rows' positions (``offset`` unused)."""
        return self.rotate(q), self.rotate(k)

    def transform_qk_heads(self, qk: Tensor, n_queries: int, offset: int = 0) -> Tensor:
        """``qk [B, A + G, N, d_head]`` rotated at the rows' positions in one pass (``offset`` unused)."""
        return self.rotate(qk)

    def attention_bias(self, n_queries: int, n_keys: int, offset: int = 0) -> None:
        return None


def check_rope_width(positional: str, d_model: int, n_heads: int, d_k: int | None = None) -> None:
    """A model config's check: RoPE (``positional='rope'``) rotates feature pairs of queries and keys, so each
    head's query/key width ``d_k`` (``d_model / n_heads`` unless given) must be even; ConfigError naming the
    values otherwise."""
    if positional != "rope":
        return
    if d_k is not None and d_k % 2:
        raise ConfigError(f"positional='rope' rotates feature pairs, so d_k must be even; got d_k={d_k}")
    if d_k is None:
        _check_size("n_heads", n_heads)
    if d_k is None and (d_model // n_heads) % 2:
        raise ConfigError(
            f"positional='rope' rotates feature pairs, so d_k = d_model / n_heads must be even; "
            f"got d_model={d_model}, n_heads={n_heads}, d_k={d_model // n_heads}"
        )


def alibi_slopes(n_heads: int) -> Tensor:
    r"""ALiBi head slopes (Press et al. 2022): for ``A`` a power of two, ``m_h = 2^{-8h/A}``, ``h = 1..A``.

    Otherwise the slopes of the nearest lower power of two ``P``, followed by every other slope of
    ``2P`` for the remaining ``A - P`` heads (the paper's reference code).
    """
    _check_size("n_heads", n_heads)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(p)
    if p < n_heads:
        slopes += power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float64)


class ALiBi(PositionalEncoding):
    """ALiBi: add ``-m_h |i - j|`` to head ``h``'s scores; no parameters, extrapolates to any length."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def attention_bias(self, n_queries: int, n_keys: int, offset: int = 0) -> Tensor:
        """``[A, N, M]``: ``-m_h |(offset + i) - j|``; any ``offset`` (negative: a tile of keys after its queries)."""
        if n_queries < 0 or n_keys < 0:
            raise ShapeError(f"ALiBi bias of n_queries={n_queries} by n_keys={n_keys}: both must be >= 0")
        i = torch.arange(offset, offset + n_queries, device=self.slopes.device)[:, None]
        j = torch.arange(n_keys, device=self.slopes.device)[None, :]
        distance = (i - j).abs().to(self.slopes.dtype)
        return -self.slopes[:, None, None] * distance  # float64; the caller casts to its dtype


POSITIONAL_KINDS = ("sinusoidal", "learned", "rope", "alibi", "none")


def build_positional(
    kind: str, *, d_model: int, n_heads: int, max_len: int = 1024, rope_base: float = 10000.0, d_k: int | None = None
) -> PositionalEncoding:
    """A positional encoding by name: ``sinusoidal``, ``learned``, ``rope``, ``alibi`` or ``none``. RoPE rotates
    queries and keys of width ``d_k`` (``d_model / n_heads`` unless given)."""
    check_choice("positional", kind, POSITIONAL_KINDS)
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, initial_length=max_len)
    if kind == "learned":
        return LearnedPositionalEncoding(max_len, d_model)
    if kind == "rope":
        if d_k is None:
            _check_size("n_heads", n_heads)
        return RotaryPositionalEncoding(d_model // n_heads if d_k is None else d_k, base=rope_base)
    if kind == "alibi":
        return ALiBi(n_heads)
    return NoPositionalEncoding()
