r"""Why attention divides by ``sqrt(d_k)``.

For ``q, k`` with independent unit-variance entries, ``q . k`` has variance ``d_k``. Unscaled scores
therefore spread wider as ``d_k`` grows, the softmax over them approaches one-hot, and its Jacobian
``J = diag(p) - p p^T`` (what backpropagation multiplies by) goes to zero. Dividing by ``sqrt(d_k)``
restores unit variance at every width. The lab draws ``n`` keys and a query per trial and measures,
for each ``d_k``, the largest attention weight, the entropy of the weights and ``||J||_F``.
"""

from __future__ import annotations

import math

import torch

from archlab.labs.registry import LabResult, register_lab

KEYS = 64  # n: keys per query


def softmax_stats(scores: torch.Tensor) -> tuple[float, float, float]:
    """``scores [trials, n]`` -> mean max weight, mean entropy (nats), mean ``||diag(p) - p p^T||_F``."""
    p = scores.softmax(dim=-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    # ||diag(p) - p p^T||_F^2 = sum p^2 - 2 sum p^3 + (sum p^2)^2
    s2, s3 = (p**2).sum(-1), (p**3).sum(-1)
    jacobian = (s2 - 2 * s3 + s2**2).clamp_min(0).sqrt()
    return p.max(-1).values.mean().item(), entropy.mean().item(), jacobian.mean().item()


@register_lab(
    "sqrt-dk",
    claim="Scaling scores by 1/sqrt(d_k) keeps the softmax out of its saturated, vanishing-gradient region "
    "as d_k grows; unscaled dot products push it towards one-hot",
    source="lesson 4 card 1; lesson 8 card 2; deck: scaled dot-product attention",
    tags=("attention",),
)
def run(quick: bool, seed: int) -> LabResult:
    widths = [4, 256, 4096] if quick else [4, 16, 64, 256, 1024, 4096]
    trials = 100 if quick else 1000
    g = torch.Generator().manual_seed(seed)
    rows, curves = [], {"unscaled": [], "scaled": []}
    for d_k in widths:
        q = torch.randn(trials, 1, d_k, generator=g, dtype=torch.float64)
        k = torch.randn(trials, KEYS, d_k, generator=g, dtype=torch.float64)
        dots = (q * k).sum(-1)  # [trials, n]
        for name, scores in (("unscaled", dots), ("scaled", dots / math.sqrt(d_k))):
            top, entropy, jac = softmax_stats(scores)
            curves[name].append((d_k, top, jac))
            rows.append([d_k, name, scores.std().item(), top, entropy, jac])
    un, sc = curves["unscaled"], curves["scaled"]
    at_256 = next(c for c in un if c[0] == 256)
    fall = at_256[2] / un[-1][2]  # unscaled ||J|| from d_k = 256 to the widest
    gap = sc[-1][2] / un[-1][2]  # scaled over unscaled ||J|| at the widest d_k
    sc_spread = max(c[2] for c in sc) / min(c[2] for c in sc)
    supported = un[-1][1] >= 0.9 and fall >= 2 and sc_spread <= 1.1
    finding = (
        f"unscaled: the largest weight grows from {un[0][1]:.2f} (d_k={un[0][0]}) to {un[-1][1]:.3f} "
        f"(d_k={un[-1][0]}) and ||J|| falls {fall:.1f}x from d_k=256, ending {gap:.1f}x below the scaled one; "
        f"scaled: ||J|| varies {sc_spread:.2f}x across the widths and the largest weight stays near {sc[-1][1]:.2f}"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for name, style in (("unscaled", "o-"), ("scaled", "s-")):
            d, top, jac = zip(*curves[name])
            ax1.plot(d, top, style, label=name)
            ax2.plot(d, jac, style, label=name)
        ax1.set(xscale="log", xlabel="d_k", ylabel="mean largest attention weight", ylim=(0, 1.02))
        ax2.set(xscale="log", yscale="log", xlabel="d_k", ylabel="mean ||softmax Jacobian||_F")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()

    return LabResult(
        columns=["d_k", "scores", "score std", "max weight", "entropy", "||J||_F"],
        rows=rows,
        criterion="unscaled: near one-hot at the widest d_k (largest weight >= 0.9) and ||J|| falling >= 2x from "
        "d_k=256 to the widest (16x wider: 4x if ||J|| ~ 1/sqrt(d_k)); scaled: ||J|| varies <= 1.1x across the widths",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"q, k ~ N(0, 1) entries, {KEYS} keys per query, {trials} queries per width, float64. The "
        "unscaled ||J|| first rises (small d_k: scores too flat to saturate), then falls like 1/sqrt(d_k): it "
        "vanishes, but slowly",
    )
