r"""Memory arithmetic: attention score matrices, each backend's working set, KV caches, training activations.

Plain functions returning bytes. ``dtype`` is a ``torch.dtype`` or its name (``"float32"``, ``"bf16"``, ...).

The score matrix is the whole problem of long contexts (lesson 8, card 3)::

    bytes(S) = B * A * N * M * sizeof(dtype)      100K^2 x 4 B = 4e10 B = 40 GB per head and batch item

(the card prints 40 TB; it is 40 GB). :func:`attention_bytes` gives what one attention call adds on
top of its inputs ``q, k, v`` for each backend of :mod:`archlab.nn.attention` and
:mod:`archlab.nn.efficient`, following what the code allocates; ``benchmarks/long_context.py`` prints
these predictions next to measured peaks.
"""

from __future__ import annotations

import os

import torch

from archlab.config import Config
from archlab.errors import ConfigError, unknown
from archlab.nn.backends import parse_backend
from archlab.nn.feedforward import GATES

_DTYPE_NAMES = {
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int8": torch.int8, "bool": torch.bool,
}  # fmt: skip


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element: ``dtype_bytes("bf16") == 2``."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ConfigError("dtype: " + unknown("dtype", dtype, _DTYPE_NAMES))
        dtype = _DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} must be a torch.dtype or one of {', '.join(_DTYPE_NAMES)}")
    return torch.empty((), dtype=dtype).element_size()


def _check_sizes(**sizes: int | None) -> None:
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{name}={value!r} must be an integer >= 0")


def score_matrix_bytes(n: int, m: int | None = None, *, heads: int = 1, batch: int = 1, dtype="float32") -> int:
    """``B A N M sizeof(dtype)``: the scores (or weights) ``[B, A, N, M]`` of standard attention."""
    _check_sizes(n=n, m=m, heads=heads, batch=batch)
    return batch * heads * n * (n if m is None else m) * dtype_bytes(dtype)


def attention_bytes(
    backend: str,
    n: int,
    m: int | None = None,
    *,
    heads: int = 8,
    batch: int = 1,
    d_k: int = 64,
    d_v: int | None = None,
    dtype="float32",
    causal: bool = True,
    threads: int = 1,
) -> int:
    """Peak bytes one attention forward adds beyond its inputs ``q, k, v``, output included (estimate).

    What each backend allocates (``S = B A N M s`` one score matrix, ``O = B A N d_v s`` the output,
    ``s = sizeof(dtype)``, ``b`` a tile size, ``r`` a rank or feature count):

    ==========  ==================================================================================
    math        ``3 S`` when masked or causal (scores, masked scores and softmax alive together;
                ``2 S`` otherwise) ``+ 2 N M`` bytes of boolean masks, ``+ O``
    sdpa        ``O`` + log-sum-exp ``B A N`` floats + per-thread tiles (PyTorch's CPU flash kernel)
    chunked,    ``O`` + log-sum-exp + running max/sum/output of one query block ``B A b (d_v + 2)``
    sliding,    + about 8 tile-sized temporaries ``B A b^2`` (scores, masks, exp, products and the
    bigbird     allocator's slack; calibrated on ``benchmarks/long_context.py``)
    linformer   projected keys/values ``B A r (d_k + d_v)`` + ``O`` (+ fused softmax over ``N x r``)
    performer   ``O`` + one chunk's features and their temporaries ``B A c (c + 3 r)`` + the state
                ``B A r d_v`` + the pass that finds the keys' stabiliser ``B A 1024 r``
    linear      ``O`` + one chunk's features and products ``B A c (c + 4 d_k)`` + the state ``B A d_k d_v``
    ==========  ==================================================================================
    """
    _check_sizes(n=n, m=m, heads=heads, batch=batch, d_k=d_k, d_v=d_v, threads=threads)
    for name, value in (("heads", heads), ("d_k", d_k), ("d_v", d_v), ("threads", threads)):
        if value == 0:  # a size of 0 would price the other terms of a call that cannot run
            raise ConfigError(f"{name}=0 must be >= 1")
    if not isinstance(causal, bool):  # "no" would read as True
        raise ConfigError(f"causal={causal!r} must be True or False")
    spec = parse_backend(backend)
    kind = "sdpa" if spec.kind == "auto" else spec.kind
    m = n if m is None else m
    d_v = d_k if d_v is None else d_v
    s = dtype_bytes(dtype)
    ba = batch * heads
    out = ba * n * d_v * s
    lse = ba * n * 4
    if kind == "math":
        scores = score_matrix_bytes(n, m, heads=heads, batch=batch, dtype=dtype)
        return (3 * scores + 2 * n * m if causal else 2 * scores) + out
    if kind == "sdpa":
        q_split, kv_split = 256, 512  # the CPU flash kernel's blocks for long sequences
        return out + lse + threads * batch * q_split * (kv_split + d_v + 2) * 4
    if kind in ("chunked", "sliding", "bigbird"):
        b = spec["block"]
        return out + lse + ba * b * (d_v + 2) * s + 8 * ba * b * b * s
    if kind == "linformer":
        r = spec["rank"]
        return out + ba * r * (d_k + d_v) * s + lse
    c = spec["chunk"]
    if kind == "performer":
        r = spec["features"]
        return out + ba * (c * (c + 3 * r) + r * d_v + 1024 * r) * s
    return out + ba * (c * (c + 4 * d_k) + d_k * d_v) * s  # linear


def _attention(config: Config):
    """The self-attention layers a family's config declares (its ``attention_shape``, see
    :mod:`archlab.models.base`): ``L``, ``A``, ``G`` and ``d``. GPT, Llama, BERT, ViT, Transformer-XL and the
    encoder-decoder have one; other configs raise ConfigError."""
    shape = None if isinstance(config, type) else getattr(config, "attention_shape", None)
    if isinstance(config, type) and issubclass(config, Config):
        raise ConfigError(f"{config.__name__} is a config class; pass a config, e.g. {config.__name__}() or "
                          "archlab.models.get_config('<preset>')")  # fmt: skip
    if shape is None:
        raise ConfigError(f"{type(config).__name__} is not a Transformer config (it declares no attention_shape)")
    return shape


def kv_cache_bytes(config: Config, *, batch: int, length: int, dtype="float32") -> int:
    """Keys and values of every self-attention layer for ``length`` positions: ``L B M G (d_k + d_v) s``.

    ``G`` key/value heads, keys of width ``d_k`` and values of width ``d_v = d / A`` (``2 L B M G d_k s`` when
    ``d_k = d / A``, as in every preset). With multi-head attention (``G = A``) this is
    ``2 L B M d s``: GPT-2 small (``L = 12``, ``d = 768``) at 1,024 tokens in fp16 keeps
    ``2 x 12 x 1024 x 768 x 2 B = 37.7 MB`` per sequence. Grouped-query attention divides it by ``A / G``:
    SmolLM2-135M (``L = 30``, ``G = 3``, ``d_k = 64``) keeps ``2 x 30 x 3 x 64 x 2 B = 23 kB`` per bf16 token.
    """
    _check_sizes(batch=batch, length=length)
    a = _attention(config)
    return a.n_layers * batch * length * a.n_kv_heads * (a.d_k + a.d_v) * dtype_bytes(dtype)


def training_activation_bytes(
    config: Config, *, batch: int, seq_len: int, dtype="float32", backend: str | None = None
) -> int:
    """Rough bytes of the activations a training step saves for backward (pre-norm GPT-style stack).

    Per layer and token, the tensors autograd keeps: LayerNorm inputs and outputs (``4 d``), the fused
    ``Q, K, V`` (``A d_k + G (d_k + d_v)``: ``3 d`` unless grouped-query attention has ``G < A`` K/V heads or
    ``d_k`` is set apart from ``d / A``), the attention output before and after merging heads (``2 d``), the FFN
    hidden before and after the activation (``2 d_ff``; a gated FFN keeps ``4 d_ff``: gate, value, activated
    gate, product); dropout masks when ``dropout > 0`` (``2 d`` per layer, ``d`` on the embeddings). Attention
    weights are kept (``2 A N``, plus their boolean mask ``A N`` bytes) with the ``math`` backend, and also with
    ``sdpa`` when ``attn_dropout > 0`` (PyTorch's CPU flash kernel has no dropout: it falls back to the math
    path, which then keeps the dropout mask too, ``A N``). Plus the final norm (``2 d``) and the logits with
    their log-softmax (``2 V``) when the config has a vocabulary::

        bytes ~ B N s [L (6 d + (A d_k + G (d_k + d_v)) + 2 d_ff + drop + attn) + 2 d + 2 V]

    (``9 d + 2 d_ff`` for the layer's first terms when ``G = A`` and ``d_k = d_v = d / A``.)

    Checked against the bytes autograd really saves for archlab's GPT in ``tests/analysis/test_memory.py``.
    """
    _check_sizes(batch=batch, seq_len=seq_len)
    a = _attention(config)
    n_layers, heads, d_model = a.n_layers, a.n_heads, a.d_model
    d_ff = getattr(config, "ffn_width", None) or getattr(config, "d_ff", None) or 4 * d_model
    if getattr(config, "ffn", None) in GATES:
        d_ff *= 2  # gate and value, before and after: 4 d_ff
    qkv = heads * a.d_k + a.n_kv_heads * (a.d_k + a.d_v)
    vocab = getattr(config, "vocab_size", 0)
    dropout, attn_dropout = getattr(config, "dropout", 0.0), getattr(config, "attn_dropout", 0.0)
    s = dtype_bytes(dtype)
    kind = parse_backend(backend or getattr(config, "backend", "auto")).kind
    attn = 0
    if kind == "math" or (kind in ("auto", "sdpa") and attn_dropout > 0):
        attn = 2 * heads * seq_len * s + heads * seq_len + (heads * seq_len * s if attn_dropout > 0 else 0)
    drop = 2 * d_model * s if dropout > 0 else 0
    per_token = n_layers * ((6 * d_model + qkv + 2 * d_ff) * s + drop + attn) + (2 * d_model + 2 * vocab) * s
    per_token += d_model * s if dropout > 0 else 0
    return batch * seq_len * per_token


# -- a model's own size, and the machine's memory ------------------------------------------------------------


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors once), ``sum numel x sizeof(dtype)``;
    works on a model built on the ``meta`` device, where nothing is allocated."""
    seen: dict[tuple, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        key = (id(t),) if t.device.type == "meta" else (t.untyped_storage().data_ptr(), t.storage_offset())
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get now: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the
    physical memory (``sysconf``); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    """``format_bytes(13194139533312) == "13.2 TB"`` (powers of 1000)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
