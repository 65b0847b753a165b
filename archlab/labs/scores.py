r"""Dot-product against additive alignment scores: the same job, different costs (the deck's score cards).

For ``N`` queries and ``M`` keys of width ``d``:

* dot (Luong) / scaled dot (Vaswani): ``S = Q K^T`` (``/ sqrt(d)``), one matrix product, ``[N, M]``;
* additive (Bahdanau): ``a_ij = v_a^T tanh(W_s s_i + W_h h_j)``: every query-key pair gets its own
  ``d_attn``-wide hidden vector, a ``[N, M, d_attn]`` tensor, before ``v_a`` reduces it.

Both take about ``2 N M d`` multiply-adds, but the additive score also moves ``N M d_attn`` numbers through
an add and a ``tanh``, which run at memory speed, not matrix-product speed. The lab measures, with
archlab's score modules (:mod:`archlab.nn.attention`): the largest tensor each creates (seen at
PyTorch's dispatcher), the FLOPs PyTorch counts (``FlopCounterMode``) and the wall time.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from archlab import kernels
from archlab.labs.registry import LabResult, register_lab
from archlab.nn.attention import AdditiveScore, DotScore, ScaledDotScore

WIDTH = 64  # d = d_attn


class _LargestOutput(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation run inside it returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.nbytes)
        return out


def largest_allocation(fn) -> int:
    """Bytes of the largest tensor an operation returns while ``fn()`` runs (no autograd; a view counts as its size)."""
    with torch.no_grad(), _LargestOutput() as seen:
        fn()
    return seen.largest


def counted_flops(fn) -> int:
    with torch.no_grad(), kernels.flop_counter(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@register_lab(
    "dot-vs-additive",
    claim="Dot-product attention is preferred over additive attention because it runs as optimised matrix "
    "multiplication: significantly faster and more space-efficient",
    source="deck: dot-product vs additive attention; deck: alignment score functions",
    tags=("attention",),
)
def run(quick: bool, seed: int) -> LabResult:
    sizes = [64, 128] if quick else [128, 256, 512, 1024]
    repeats = 3 if quick else 7
    g = torch.Generator().manual_seed(seed)
    scores = {"dot": DotScore(), "scaled_dot": ScaledDotScore(), "additive": AdditiveScore(WIDTH, WIDTH, WIDTH)}
    rows, measured = [], {}
    for n in sizes:
        q = torch.randn(n, WIDTH, generator=g)
        k = torch.randn(n, WIDTH, generator=g)
        for name, module in scores.items():
            call = lambda module=module: module(q, k)  # noqa: E731 - a closure over this pair of inputs
            memory, flops, seconds = largest_allocation(call), counted_flops(call), median_seconds(call, repeats)
            measured[(n, name)] = (memory, seconds)
            rows.append([n, name, memory, flops, seconds * 1e3])
    top = sizes[-1]
    memory_ratio = min(measured[(n, "additive")][0] / measured[(n, "dot")][0] for n in sizes)
    speed_ratio = measured[(top, "additive")][1] / measured[(top, "dot")][1]
    flops = {(r[0], r[1]): r[3] for r in rows}
    flop_ratio = flops[(top, "additive")] / flops[(top, "dot")]  # -> 1 + 2 d / N: the projections fade as N grows
    supported = memory_ratio >= WIDTH / 2 and speed_ratio >= 2
    finding = (
        f"the additive score's largest tensor is {memory_ratio:.0f}x the dot score's at every size "
        f"([N, M, d_attn] vs [N, M]), and at N = M = {top} it takes {speed_ratio:.1f}x the dot score's time, "
        f"for {flop_ratio:.2f}x its matrix FLOPs"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for name, style in (("dot", "o-"), ("scaled_dot", "^--"), ("additive", "s-")):
            ax1.plot(sizes, [measured[(n, name)][0] / 2**20 for n in sizes], style, label=name)
            ax2.plot(sizes, [measured[(n, name)][1] * 1e3 for n in sizes], style, label=name)
        ax1.set(xscale="log", yscale="log", xlabel="N = M (queries = keys)", ylabel="largest tensor, MiB")
        ax2.set(xscale="log", yscale="log", xlabel="N = M", ylabel="median ms per score matrix")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()

    return LabResult(
        columns=["N = M", "score", "largest tensor (bytes)", "FLOPs counted", "ms"],
        rows=rows,
        criterion=f"the additive score's largest tensor is >= {WIDTH // 2}x the dot score's at every size (memory, "
        "deterministic), and it is >= 2x slower at the largest size (wall time, measured here)",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"d = d_attn = {WIDTH}, float32, no autograd, the machine's threads; times are this machine's and vary "
        "from run to run (the memory figures do not); FlopCounterMode counts matrix products only, so the additive "
        "score's add and tanh over N M d_attn numbers are not in the FLOPs column",
    )
