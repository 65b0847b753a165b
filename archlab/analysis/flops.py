r"""Forward FLOPs by component, counted from the shapes of one real forward pass.

Accounting (Kaplan et al. 2020, table 1): a matrix multiply of ``[n, a] x [a, b]`` costs ``2 n a b``
FLOPs (one multiply and one add per weight per token), so a weight matrix with ``P`` entries costs
``2 P`` FLOPs per token it is applied to. Elementwise work (norms, softmax, activations, residual
adds, positional sums) and embedding lookups (a gather) are not counted. Per attention layer with
``A`` heads, ``N`` queries and ``M`` keys:

* ``attention``: ``Q K^T`` and ``alpha V``: ``2 A N M d_k + 2 A N M d_v``; it grows with the context.
  Causal attention is counted dense (every query against all ``M`` keys, as the kernels compute
  it); an ideal causal kernel does about half (Kaplan's ``2 n_layer n_ctx d_attn`` per token).
  Score terms beyond ``Q K^T`` (Transformer-XL's position term ``(q_i + v)^T W_R R_t``: another
  ``2 A N M d_k``) are stated by the attention module itself, see :class:`FlopCounter`.
* ``projections``: ``W_Q, W_K, W_V, W_O``: ``2 d (A (d_k + d_v) + G (d_k + d_v))`` per token for
  self-attention with ``G`` key/value heads (``G = A``, multi-head: ``2 d A (2 d_k + 2 d_v)``).
  Cross-attention applies ``W_Q, W_O`` to the ``N`` decoder tokens and ``W_K, W_V`` to the ``M``
  memory tokens, once: not again when a decoding cache already holds them (Transformer-XL's keys
  come the same way from its ``[memory; segment]`` context). Any other Linear of an attention module
  counts here where it runs (Transformer-XL's ``W_R``, applied to the ``M`` rows of ``R``, not per batch row).
* ``feed_forward``: ``2 x`` the FFN's weight matrices per token (``4 d d_ff`` for the plain FFN; RWKV's
  channel mixing ``2 (2 d d_ff + d^2)``).
* RWKV's time mixing: its ``W_k, W_v, W_r, W_o`` under ``projections`` (``8 d d_att`` per token, as
  :mod:`archlab.analysis.params` files them under attention); its WKV recurrence is elementwise, not counted.
* ``output_head``, ``embeddings`` (patch embeddings: a Linear or Conv), ``other``: any other Linear
  or convolution, grouped as :mod:`archlab.analysis.params` groups its parameters.

:func:`count_flops` runs the model once with hooks that read shapes only (:class:`FlopCounter`
counts any code, e.g. a decoding loop). Give it inputs on the ``meta`` device (and a model built
there) and it costs no memory and no arithmetic.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from archlab.analysis.params import FEED_FORWARD_TYPES, classify
from archlab.errors import DataError
from archlab.models.rwkv import TimeMix  # analysis sits above models
from archlab.nn.attention import MultiHeadAttention

FLOP_COMPONENTS = ("attention", "projections", "feed_forward", "output_head", "embeddings", "other")
FLOP_LABELS = {
    "attention": "attention (QK^T, AV)",
    "projections": "attention projections",
    "feed_forward": "feed-forward",
    "output_head": "output head",
    "embeddings": "embeddings",
    "other": "other",
}


@dataclass(frozen=True)
class FlopReport:
    """Forward FLOPs of one call, ``by_component`` in :data:`FLOP_COMPONENTS` order; ``total`` their sum."""

    by_component: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    def per_token(self, n_tokens: int) -> dict[str, float]:
        """Each component divided by ``n_tokens`` (e.g. ``B * N`` positions of the batch)."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral) or n_tokens <= 0:
            raise DataError(f"n_tokens={n_tokens!r} must be an integer > 0 (the positions of the batch, B * N)")
        return {name: flops / n_tokens for name, flops in self.by_component.items()}


def _matmul_flops(weight_entries: int, tokens: int) -> int:
    return 2 * weight_entries * tokens


def _tokens(x: torch.Tensor, width: int) -> int:
    return x.numel() // width


class FlopCounter:
    """Context manager counting the forward FLOPs of ``model`` (and its submodules) run inside it.

    ::

        with FlopCounter(model) as counter:
            step(tokens, cache)  # any code that calls the model's modules
        counter.report.by_component

    Counted: archlab ``MultiHeadAttention`` (scores and projections, see the module notes),
    ``FeedForward`` / ``GatedFeedForward``, and every other ``nn.Linear`` and ``nn.Conv1d/2d``.
    Modules of other kinds (recurrent cells, torch's own ``MultiheadAttention``) are not counted.

    An attention module whose scores take more matmuls than ``Q K^T`` states them in a method
    ``extra_score_flops(batch, n_queries, n_keys) -> int`` (counted under ``attention``); its
    forward is ``(x, memory_or_context, ...)`` like :class:`~archlab.nn.MultiHeadAttention`'s.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise DataError(f"FLOP counting needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.counts = dict.fromkeys(FLOP_COMPONENTS, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def report(self) -> FlopReport:
        return FlopReport(dict(self.counts))

    def __enter__(self) -> FlopCounter:
        chains: dict[str, list[tuple[str, nn.Module]]] = {"": []}
        covered: set[int] = set()  # Linears counted by their owner's hook (or, in torch's attention, not at all)
        for name, module in self.model.named_modules():
            if name:
                parent, _, attr = name.rpartition(".")
                chains[name] = [*chains[parent], (attr, module)]
            if isinstance(module, MultiHeadAttention):  # W_Q, W_K, W_V, W_O (LoRA-wrapped or not)
                covered.update(id(m) for proj in (module.in_proj, module.out_proj) for m in proj.modules())
            elif isinstance(module, (nn.MultiheadAttention, *FEED_FORWARD_TYPES)):
                covered.update(id(m) for m in module.modules() if m is not module)
        counts, handles = self.counts, self._handles
        for name, module in self.model.named_modules():
            if isinstance(module, MultiHeadAttention):
                handles.append(module.register_forward_pre_hook(_attention_hook(counts), with_kwargs=True))
            elif isinstance(module, FEED_FORWARD_TYPES):
                handles.append(module.register_forward_hook(_ffn_hook(counts, module)))
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(module) not in covered:
                component = classify(chains[name], "weight")
                if component in ("attention", "cross_attention"):  # not W_Q, W_K, W_V, W_O: e.g. XL's W_R
                    component = "projections"
                elif component not in ("feed_forward", "output_head", "embeddings"):
                    component = "other"
                handles.append(module.register_forward_hook(_weight_hook(counts, component)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def counts_token_mixing(model: nn.Module) -> bool:
    """Whether :class:`FlopCounter` counts the matmuls that mix ``model``'s positions: archlab attention layers
    (``MultiHeadAttention``) or RWKV's time mixing (``W_k, W_v, W_r, W_o``; its WKV recurrence is elementwise).
    False for recurrent cells, gMLP's spatial weights and torch's own attention, which it does not count."""
    return any(isinstance(m, (MultiHeadAttention, TimeMix)) for m in model.modules())


def count_flops(model: nn.Module, *args, **kwargs) -> FlopReport:
    """FLOPs of ``model(*args, **kwargs)``, run once under ``torch.no_grad`` (see :class:`FlopCounter`)."""
    with FlopCounter(model) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.report


def _attention_hook(counts: dict[str, int]) -> Callable:
    def pre(module: MultiHeadAttention, args, kwargs) -> None:
        x = args[0]
        # keys from a memory (cross-attention) or, in Transformer-XL, from its context [memory; x]
        memory = args[1] if len(args) > 1 else kwargs.get("memory")
        cache = kwargs.get("cache")
        b, n = x.shape[0], x.shape[1]
        d, a, g, d_k, d_v = module.d_model, module.n_heads, module.n_kv_heads, module.d_k, module.d_v
        q_o = d * a * d_k + a * d_v * d  # W_Q and W_O entries
        k_v = d * g * (d_k + d_v)  # W_K and W_V entries: G key/value heads
        if memory is None:  # self-attention: keys = what the cache holds + the new tokens
            m = n + (0 if cache is None else cache.length)
            counts["projections"] += _matmul_flops(q_o + k_v, b * n)
        else:  # cross-attention: K, V of the memory once, unless a cache already holds them
            m = memory.shape[1]
            fresh = cache is None or not cache.length
            counts["projections"] += _matmul_flops(q_o, b * n) + (_matmul_flops(k_v, b * m) if fresh else 0)
        counts["attention"] += 2 * b * a * n * m * (d_k + d_v)
        extra_score_flops = getattr(module, "extra_score_flops", None)
        if extra_score_flops is not None:
            counts["attention"] += extra_score_flops(b, n, m)

    return pre


def _ffn_hook(counts: dict[str, int], module: nn.Module) -> Callable:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    weights, width = sum(m.weight.numel() for m in linears), linears[0].in_features

    def post(_module, args, output) -> None:
        counts["feed_forward"] += _matmul_flops(weights, _tokens(args[0], width))

    return post


def _weight_hook(counts: dict[str, int], component: str) -> Callable:
    """A Linear (``2 P`` per token) or a convolution (``2 P`` per output position, ``P`` = its weight entries)."""

    def post(module: nn.Module, args, output) -> None:
        if isinstance(module, nn.Linear):
            positions = _tokens(args[0], module.in_features)
        else:
            positions = output.numel() // module.out_channels
        counts[component] += _matmul_flops(module.weight.numel(), positions)

    return post
