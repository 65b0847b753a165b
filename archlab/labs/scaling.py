r"""Scaling laws: held-out loss against model size, ``L(N) = (N_c / N)^alpha_N`` (Kaplan et al. 2020).

Byte-level GPTs of several shapes ``(d, n_layer)``, with ``A = d / 16`` heads of width ``d_k = 16`` (one head
below ``d = 16``), are trained on the same batches of Python standard-library source (the same ``D`` tokens,
same seed, same schedule) and scored on the same held-out bytes. ``N`` is Kaplan's non-embedding parameter
count (everything but the token and position tables; the LM head is tied to the token table); per block
``4 d^2`` attention and ``2 d d_ff = 8 d^2`` FFN weights give the cards' ``N ~ 12 n_layer d^2``. Two fits of
the ``(N, loss)`` points, in log space (:func:`archlab.analysis.scaling.fit_power_law`)::

    pure          L(N) = (N_c / N)^alpha_N           a straight line in log-log
    irreducible   L(N) = E + (N_c / N)^alpha_N       the loss no size removes: entropy, and here the fixed D

The loss is also measured at checkpoints along training; each is a compute ``C = 6 N D_seen`` (forward and
backward, 6 FLOPs per parameter per token), and the lower envelope over all models (the compute frontier) is
fitted with ``L(C) = (C_c / C)^alpha_C``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from archlab.analysis import count_parameters
from archlab.analysis.scaling import PowerLawFit, fit_power_law
from archlab.data import ByteTokenizer, LMWindows
from archlab.labs.common import byte_lm_data, learned_too_little, train_gpt
from archlab.labs.registry import LabResult, register_lab
from archlab.models.gpt import GPT, GPTConfig

CORPUS_BYTES = 2_000_000  # of stdlib source: ~1.9M training and ~57K held-out byte tokens
HEAD_WIDTH = 16  # d_k
LR, CLIP = 1e-2, 1.0
MIN_R2 = 0.9  # the pure power law's R^2 in log space
KAPLAN = {"alpha_N": 0.076, "alpha_C": 0.050}  # Kaplan et al. 2020, eq. 1.1 and 1.3 (C_min)
CHECKPOINTS = 7  # evaluations along training, geometrically spaced from the first step after warmup to the last


def gpt_config(d: int, n_layers: int, seq_len: int) -> GPTConfig:
    """A byte-level GPT of width ``d`` and ``n_layers`` blocks (``A = d / 16``, at least 1), without dropout."""
    return GPTConfig(vocab_size=ByteTokenizer().vocab_size, max_len=seq_len, d_model=d,
                     n_heads=max(1, d // HEAD_WIDTH), n_layers=n_layers, dropout=0.0, attn_dropout=0.0)  # fmt: skip


def non_embedding_params(model: nn.Module) -> int:
    """Kaplan's ``N``: every distinct parameter except the embedding tables (token, position)."""
    report = count_parameters(model)
    return report.total - report.by_component["embeddings"]


@torch.no_grad()
def held_out_loss(model: GPT, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats per byte) of ``model`` on ``inputs, labels [B, T]``, in eval mode."""
    was_training = model.training
    model.eval()
    loss = model.loss(inputs, labels).item()
    model.train(was_training)
    return loss


def checkpoint_steps(first: int, last: int, count: int) -> list[int]:
    """Up to ``count`` distinct steps, geometrically spaced from ``first`` to ``last`` (both included)."""
    return sorted({round(first * (last / first) ** (k / (count - 1))) for k in range(count)})


def compute_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(C, loss)`` points no cheaper-or-equal point beats: the lower envelope, by increasing ``C``."""
    frontier: list[tuple[float, float]] = []
    for c, loss in sorted(points, key=lambda p: (p[0], p[1])):
        if not frontier or loss < frontier[-1][1]:
            frontier.append((c, loss))
    return frontier


def plot_power_fits(ax, x, losses, pure: PowerLawFit, floor: PowerLawFit, variable: str, points: str,
                    unigram: float) -> np.ndarray:
    """The measured ``(x, loss)`` points, the pure and the offset power-law fits in ``variable`` and the unigram
    baseline on ``ax``; returns the log-spaced grid the fits are drawn on (for more curves)."""
    grid = np.geomspace(x[0] / 1.5, x[-1] * 1.5, 100)
    ax.plot(x, losses, "o", color="k", label=points, zorder=3)
    ax.plot(grid, pure.predict(grid), "-", label=f"{pure.formula(variable)}  (R^2 {pure.r2:.3f})")
    ax.plot(grid, floor.predict(grid), "--", label=f"{floor.formula(variable)}  (R^2 {floor.r2:.4f})")
    ax.axhline(unigram, color="gray", lw=0.8, ls="-.", label=f"unigram baseline {unigram:.2f}")
    return grid


def style_loss_axes(axes) -> None:
    """Plain-number loss ticks, a light grid and a small legend on each of ``axes``."""
    from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

    for ax in axes:
        ax.yaxis.set(major_locator=MaxNLocator(8), minor_locator=NullLocator(), major_formatter=ScalarFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5)


def judge(losses: list[float], fit: PowerLawFit) -> tuple[bool, bool]:
    """The criterion on the final losses by increasing ``N``: ``(supported, strictly decreasing)``."""
    decreasing = all(b < a for a, b in zip(losses, losses[1:]))
    return decreasing and fit.r2 >= MIN_R2, decreasing


#: A recorded result, not a measurement of the run that prints it: the notes of every run but that one repeat it.
SEED_1_RECORD = (
    "Recorded, not this run: the full run at seed 1 (archlab lab scaling-laws --seed 1) gave the same verdict "
    "(alpha_N 0.093, R^2 0.979; with E: alpha_N 0.32). "
)


@register_lab(
    "scaling-laws",
    claim="Model performance scales predictably as a power law in the number of parameters, "
    "L(N) ~ (N_c / N)^alpha_N (and likewise in compute and data), when not bottlenecked by the other factors; "
    "N ~ 2 d n_layer (2 d_attn + d_ff) ~ 12 n_layer d^2",
    source="deck: scaling laws (Kaplan et al., 2020); deck: parameter estimation",
    tags=("scaling", "training"),
)
def run(quick: bool, seed: int) -> LabResult:
    if quick:
        sizes, seq_len, batch_size, steps, windows = ((8, 1), (16, 1), (16, 2), (24, 2), (32, 2)), 32, 16, 100, 64
    else:
        sizes, seq_len, batch_size, steps, windows = ((16, 2), (32, 2), (48, 2), (64, 3), (96, 3)), 64, 32, 1000, 512
    data = byte_lm_data(CORPUS_BYTES, seq_len, windows)
    train_ids, inputs, labels, unigram = data.train_ids, data.inputs, data.labels, data.unigram
    total = windows * seq_len  # held-out predictions every model is scored on
    batches = LMWindows(train_ids, seq_len=seq_len, batch_size=batch_size, seed=seed)
    tokens_per_step = batch_size * seq_len
    at = checkpoint_steps(steps // 8, steps, CHECKPOINTS)  # from just after the warmup (steps // 10)

    models = []  # (d, n_layer, N, total parameters, {step: held-out loss})
    for d, n_layers in sizes:
        config = gpt_config(d, n_layers, seq_len)
        model, curve = train_gpt(config, batches, steps, lr=LR, seed=seed, clip=CLIP, evaluate_at=at,
                                 evaluate=lambda m: held_out_loss(m, inputs, labels), label=f"d={d} L={n_layers}")  # fmt: skip
        models.append((d, n_layers, non_embedding_params(model), count_parameters(model).total, curve))
    n_params = [m[2] for m in models]
    losses = [m[4][steps] for m in models]
    pure, floor = fit_power_law(n_params, losses), fit_power_law(n_params, losses, irreducible=True)
    by_formula = fit_power_law([12 * nl * d**2 for d, nl, *_ in models], losses)
    curves = {n: [(6 * n * s * tokens_per_step, loss) for s, loss in curve.items()] for _, _, n, _, curve in models}
    frontier = compute_frontier([p for points in curves.values() for p in points])
    compute_fit = fit_power_law(*zip(*frontier)) if len(frontier) >= 3 else None
    supported, decreasing = judge(losses, pure)
    undecided = learned_too_little({f"d={d} L={nl}": loss for (d, nl, *_), loss in zip(models, losses)}, unigram)

    rows = [[d, nl, max(1, d // HEAD_WIDTH), n, 12 * nl * d**2, total_params, loss, pure.predict(n), floor.predict(n)]
            for (d, nl, n, total_params, _), loss in zip(models, losses)]  # fmt: skip
    drops = ", ".join(f"{a - b:+.3f}" for a, b in zip(losses, losses[1:]))
    finding = (
        f"held-out loss falls {losses[0]:.3f} -> {losses[-1]:.3f} nats/byte as N grows {n_params[0]:,} -> "
        f"{n_params[-1]:,} (step drops {drops}; {'strictly decreasing' if decreasing else 'not monotone'}); "
        f"pure fit alpha_N = {pure.alpha:.3f} (Kaplan: {KAPLAN['alpha_N']}) with R^2 = {pure.r2:.3f}; with an "
        f"irreducible term E = {floor.irreducible:.2f}, alpha_N = {floor.alpha:.2f} and R^2 = {floor.r2:.4f}"
    )
    if compute_fit is not None:
        finding += f"; compute frontier alpha_C = {compute_fit.alpha:.3f} (Kaplan: {KAPLAN['alpha_C']})"

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        grid = plot_power_fits(ax1, n_params, losses, pure, floor, "N", "held-out loss (end of training)", unigram)
        kaplan = losses[0] * (n_params[0] / grid) ** KAPLAN["alpha_N"]
        ax1.plot(grid, kaplan, ":", color="gray", label=f"Kaplan's slope alpha_N = {KAPLAN['alpha_N']} (for scale)")
        ax1.set(xscale="log", yscale="log", xlabel="N: non-embedding parameters", ylabel="held-out loss (nats / byte)",
                title=f"L(N) after D = {steps * tokens_per_step:,} tokens")  # fmt: skip
        for n, points in curves.items():
            c, loss = zip(*points)
            ax2.plot(c, loss, "o-", ms=3, lw=1, label=f"N = {n:,}")
        if compute_fit is not None:
            c = np.array([frontier[0][0], frontier[-1][0]])
            ax2.plot(c, compute_fit.predict(c), "k--", lw=1.5, label=f"frontier fit {compute_fit.formula('C')}")
        ax2.set(xscale="log", yscale="log", xlabel="C = 6 N D (FLOPs)", ylabel="held-out loss (nats / byte)",
                title="L(C): checkpoints along training")  # fmt: skip
        style_loss_axes((ax1, ax2))

    return LabResult(
        columns=["d", "n_layer", "A", "N (non-emb.)", "12 n_layer d^2", "params (all)", "held-out loss"]
        + ["pure fit", "fit with E"],
        rows=rows,
        criterion=f"the held-out loss falls strictly from each size to the next larger one, and the pure power law "
        f"L = (N_c / N)^alpha_N fits the (N, loss) points with R^2 >= {MIN_R2} in log space; alpha_N is reported "
        f"next to Kaplan's {KAPLAN['alpha_N']}, not judged (it depends on the data, tokenizer and scale)",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"byte-level GPTs, {len(sizes)} sizes, each trained on the same {steps} AdamW steps of {batch_size} x "
        f"{seq_len} tokens (D = {steps * tokens_per_step:,}), lr {LR} with 10% warmup and cosine decay, one seed "
        f"(of lr 3e-3, 6e-3 and 1e-2 tried on seed 0, 1e-2 gave the lowest loss at every size but the largest, where "
        f"6e-3 was 0.006 lower; Kaplan's lr(N) rule, ~2e-3, was worse at every size); scored on {total:,} held-out "
        f"bytes (unigram baseline {unigram:.2f}). With N ~ 12 n_layer d^2 in place of the exact count the pure fit "
        f"gives alpha_N = {by_formula.alpha:.3f} (R^2 {by_formula.r2:.3f}). Kaplan's exponents come from 768 to 1.5B "
        f"non-embedding parameters trained towards convergence on WebText2 BPE tokens; these models sit at the bottom "
        f"of that range, are byte-level, and share one fixed D, so the larger ones are likely bottlenecked by data and "
        f"steps (Kaplan's L(N, D)): a plausible cause of the bend that E absorbs. The L(C) points are checkpoints "
        f"after warmup on one cosine schedule per model (annealed only at the end), so the frontier overstates the "
        f"loss at small C, and Kaplan's alpha_C is for compute-efficient training. A fit of {len(sizes)} points cannot "
        f"tell a power law from other smooth decreasing curves; it only shows whether one describes them. "
        + ("" if seed == 1 and not quick else SEED_1_RECORD)
        + "Quick mode (100 steps of 16 x 32 tokens) is a smoke test: its models barely leave the unigram baseline, so "
        "it is undecided",
    )
