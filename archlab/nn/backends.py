r"""Attention backends: their names, their spec strings, and the table that sends :func:`~archlab.nn.attend`
and :class:`~archlab.nn.MultiHeadAttention` to them.

A backend is named by a spec string, so family configs stay plain JSON and take any of them in their
``backend`` field::

    "auto"  "math"  "sdpa"          (archlab.nn.attention)
    "chunked"                       "chunked:block=1024"
    "sliding:window=512,global=1"   "bigbird:block=64,window=3,random=3,global=2,seed=0"
    "linformer:rank=256,max_len=4096"
    "performer:features=256,redraw=0"   "linear:chunk=128"   (archlab.nn.efficient)

:func:`parse_backend` validates a spec once (unknown kind or key: the closest name is suggested);
:func:`check_backend` is the check every family config runs on its ``backend`` field.

Dispatch. ``math`` and ``sdpa`` live in :mod:`archlab.nn.attention`; the memory-saving backends of
:mod:`archlab.nn.efficient` register here what runs them (:func:`register_backend`): a function for the
parameter-free ones, a module factory for those with parameters (Linformer, Performer). The dependencies
point one way: ``attention -> backends <- efficient -> attention``; importing :mod:`archlab.nn` imports both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.errors import ConfigError, unknown

# ================================================================================================
# Backend specs: "kind" or "kind:key=value,key=value"
# ================================================================================================


@dataclass(frozen=True)
class Param:
    default: int
    minimum: int
    meaning: str
    maximum: int | None = None


PARAMS: dict[str, dict[str, Param]] = {
    "auto": {},
    "math": {},
    "sdpa": {},
    "chunked": {"block": Param(256, 1, "queries and keys per tile")},
    "sliding": {
        "window": Param(512, 1, "a query sees keys at distance < window (causal: the window keys up to itself)"),
        "global": Param(0, 0, "the first `global` positions attend to all keys and are attended by all"),
        "block": Param(256, 1, "queries and keys per tile"),
    },
    "bigbird": {
        "block": Param(64, 1, "tokens per block"),
        "window": Param(3, 1, "neighbouring blocks seen, the query's own included (odd unless causal)"),
        "random": Param(3, 0, "random key blocks per query block"),
        "global": Param(2, 0, "the first `global` blocks attend to all and are attended by all"),
        "seed": Param(0, 0, "seed of the random blocks"),
    },
    "linformer": {
        "rank": Param(256, 1, "k: keys and values are projected to k rows"),
        "max_len": Param(4096, 1, "n_max: the longest key sequence (E, F are [k, n_max])"),
    },
    "performer": {
        "features": Param(256, 1, "r: random features"),
        "redraw": Param(0, 0, "1: draw new features at every training forward", maximum=1),
        "chunk": Param(128, 1, "queries per step of the causal prefix sums"),
    },
    "linear": {"chunk": Param(128, 1, "queries per step of the causal prefix sums")},
}
TILED = ("chunked", "sliding", "bigbird")  # exact softmax over a pattern, through tiled_attention
KERNEL = ("performer", "linear")  # phi(Q) (phi(K)^T V): no score matrix at all
LEARNED = ("linformer", "performer")  # hold parameters or buffers: need a module (MultiHeadAttention builds it)


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec: ``kind`` and every parameter (defaults filled in)."""

    kind: str
    params: tuple[tuple[str, int], ...]

    def __getitem__(self, key: str) -> int:
        return dict(self.params)[key]

    def __str__(self) -> str:
        return self.kind + (":" + ",".join(f"{k}={v}" for k, v in self.params) if self.params else "")


@functools.lru_cache(maxsize=256)
def parse_backend(spec: str) -> BackendSpec:
    """``"sliding:window=256"`` -> ``BackendSpec("sliding", (("window", 256), ("global", 0), ("block", 256)))``.

    Raises ConfigError naming the spec, the key, the value and what is allowed.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"backend={spec!r} must be a string such as 'sdpa' or 'chunked:block=256'")
    kind, colon, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in PARAMS:
        raise ConfigError("backend: " + unknown("kind", kind, PARAMS))
    allowed = PARAMS[kind]
    values = {name: p.default for name, p in allowed.items()}
    items = [item.strip() for item in rest.split(",")] if colon else []
    if colon and not any(items):
        raise ConfigError(f"backend {spec!r}: nothing after ':'; write {kind!r} for the defaults")
    for item in items:
        key, eq, text = (part.strip() for part in item.partition("="))
        if not allowed:
            raise ConfigError(f"backend {spec!r}: {kind!r} takes no parameters, got {key!r}")
        if key not in allowed:
            raise ConfigError(f"backend {spec!r}: " + unknown("key", key, allowed))
        p = allowed[key]
        upper = "" if p.maximum is None else f" and <= {p.maximum}"
        try:
            value = int(text) if eq else None
        except ValueError:
            value = None
        if value is None or value < p.minimum or (p.maximum is not None and value > p.maximum):
            raise ConfigError(
                f"backend {spec!r}: {key}={text!r} must be an integer >= {p.minimum}{upper} ({p.meaning})"
            )
        values[key] = value
    if kind == "bigbird" and values["window"] % 2 == 0:
        # a two-sided window is the query's block and (window - 1) / 2 on each side
        raise ConfigError(
            f"backend {spec!r}: window={values['window']} must be odd (own block + (window-1)/2 each side)"
        )
    return BackendSpec(kind, tuple(values.items()))


def is_backend(spec: object) -> bool:
    """True for a valid spec, False for an unknown kind; ConfigError for a known kind with bad parameters."""
    if not isinstance(spec, str) or spec.partition(":")[0].strip() not in PARAMS:
        return False
    parse_backend(spec)
    return True


# ================================================================================================
# A score bias generated tile by tile
# ================================================================================================


class RelativeBias:
    """``bias[h, i, j] = f_h((offset + i) - j)`` from a positional encoding whose bias depends only on
    the distance (ALiBi), generated for any tile instead of stored as ``[A, N, M]``.

    ``shape`` is ``(A, N, M)``, so it passes :func:`~archlab.nn.attend`'s shape checks like a tensor;
    the ``math`` and ``sdpa`` backends call :meth:`dense`.
    """

    def __init__(self, positional, n_queries: int, n_keys: int, offset: int, heads: int):
        self.positional, self.offset = positional, offset
        self.shape = (heads, n_queries, n_keys)

    def tile(self, rows: Tensor, cols: Tensor, *, dtype: torch.dtype) -> Tensor:
        """``[A, len(rows), len(cols)]`` for query indices ``rows`` and key positions ``cols``."""
        distance = (rows[:, None] + self.offset) - cols[None, :]  # [bq, bk]
        lo, hi = int(distance.min()), int(distance.max())
        # one query at position hi against keys 0 .. hi-lo: the biases of distances hi, hi-1, .., lo
        line = self.positional.attention_bias(1, hi - lo + 1, hi)[:, 0, :]  # [A, hi-lo+1]
        return line[:, hi - distance].to(device=rows.device, dtype=dtype)

    def dense(self, *, dtype: torch.dtype, device=None) -> Tensor:
        _, n, m = self.shape
        return self.tile(torch.arange(n, device=device), torch.arange(m, device=device), dtype=dtype)


def positional_bias(positional, n_queries: int, n_keys: int, offset: int, *, backend: str, like: Tensor):
    """The score bias of ``positional`` for a backend: a tensor ``[A, N, M]`` for ``math`` / ``sdpa``,
    a :class:`RelativeBias` for the tiled backends, None when the encoding adds no bias."""
    kind = parse_backend(backend).kind
    if kind not in TILED:
        bias = positional.attention_bias(n_queries, n_keys, offset)
        return None if bias is None else bias.to(device=like.device, dtype=like.dtype)
    probe = positional.attention_bias(1, 1, 0)
    return None if probe is None else RelativeBias(positional, n_queries, n_keys, offset, probe.shape[0])


# ================================================================================================
# Dispatch
# ================================================================================================

BACKENDS = tuple(PARAMS)  # the kinds: auto | math | sdpa | chunked | sliding | bigbird | linformer | performer | linear
DENSE = ("auto", "math", "sdpa")  # computed by archlab.nn.attention itself

# kind -> fn(spec, q, k, v, *, mask, bias, causal, scale, dropout_p) -> out          (parameter-free kinds)
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {}
# kind -> factory(spec, d_k) -> the module holding the backend's parameters          (LEARNED kinds)
_MODULES: dict[str, Callable[[BackendSpec, int], nn.Module]] = {}


def check_backend(spec: object) -> None:
    """ConfigError unless ``spec`` is a valid backend spec; the message names the kind or key, the value and
    what is allowed (every family's ``backend`` field is checked with it)."""
    if not isinstance(spec, str):  # before the lru_cache of parse_backend, which needs a hashable key
        raise ConfigError(f"backend={spec!r} must be a string such as 'sdpa' or 'chunked:block=256'")
    if spec.partition(":")[0].strip() not in PARAMS:
        raise ConfigError("backend: " + unknown("value", spec, BACKENDS))
    parse_backend(spec)


def register_backend(
    kind: str,
    *,
    function: Callable[..., Tensor] | None = None,
    module: Callable[[BackendSpec, int], nn.Module] | None = None,
) -> None:
    """Say what runs ``kind``: ``function(spec, q, k, v, *, mask, bias, causal, scale, dropout_p)``, or, for a
    backend with parameters, ``module(spec, d_k)`` building the module :class:`~archlab.nn.MultiHeadAttention` holds."""
    if kind not in PARAMS or kind in DENSE or (function is None) == (module is None):
        raise ConfigError(f"register_backend({kind!r}): a kind of {[k for k in PARAMS if k not in DENSE]} with one "
                          "of function= or module=")  # fmt: skip
    (_FUNCTIONS if function is not None else _MODULES)[kind] = function or module


def attend_with(spec: str, q, k, v, *, mask, bias, causal, scale, score, dropout_p, return_weights) -> Tensor:
    """:func:`~archlab.nn.attend` for a memory-saving backend without parameters (``chunked``, ``sliding``,
    ``bigbird``, ``linear``): its registered function."""
    bs = parse_backend(spec)
    if score is not None or return_weights:
        raise ConfigError(f"backend {spec!r} cannot return weights or use a custom score; use backend='math'")
    if bs.kind in _MODULES:
        raise ConfigError(
            f"backend {spec!r} has its own parameters (projections or random features): use "
            f"MultiHeadAttention(..., backend={spec!r}), or LinformerAttention / PerformerAttention directly"
        )
    return _FUNCTIONS[bs.kind](bs, q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)


def build_attention_module(spec: str, *, d_k: int) -> nn.Module | None:
    """The module holding a backend's own parameters (Linformer's ``E, F``; Performer's features), or None."""
    bs = parse_backend(spec)
    factory = _MODULES.get(bs.kind)
    return None if factory is None else factory(bs, d_k)
