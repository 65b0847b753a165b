r"""Scaling laws in data: held-out loss against the number of training tokens, ``L(D) = (D_c / D)^alpha_D``.

Kaplan et al. 2020 (eq. 1.2) measure ``L(D)`` with a model large enough for data to be the bottleneck, trained
with early stopping on ``D`` tokens. Here one byte-level GPT shape (:func:`archlab.labs.scaling.gpt_config`) is
trained, from the same seed and on the same schedule, on the first ``D`` bytes of the Python standard-library
corpus for geometrically spaced ``D``; every run takes the same number of steps, so the small sets are seen
for many epochs and overfit. The held-out loss is measured at checkpoints along training and each ``D`` is
scored by its best checkpoint (early stopping), then fitted as in ``scaling-laws``
(:func:`archlab.analysis.scaling.fit_power_law`)::

    pure          L(D) = (D_c / D)^alpha_D           a straight line in log-log
    irreducible   L(D) = E + (D_c / D)^alpha_D       the loss no amount of data removes at this model size
"""

from __future__ import annotations

from archlab.analysis import count_parameters
from archlab.analysis.scaling import fit_power_law
from archlab.data import LMWindows
from archlab.labs.common import byte_lm_data, learned_too_little, train_gpt
from archlab.labs.registry import LabResult, register_lab
from archlab.labs.scaling import (
    MIN_R2,
    checkpoint_steps,
    gpt_config,
    held_out_loss,
    non_embedding_params,
    plot_power_fits,
    style_loss_axes,
)

CORPUS_BYTES = 1_200_000  # of stdlib source; D takes its first bytes
LR, CLIP = 1e-2, 1.0
KAPLAN_ALPHA_D = 0.095  # Kaplan et al. 2020, eq. 1.2 (the deck states the law, not the exponent)
MIN_SIZES = 5  # fewer data sizes than this cannot show a power law: undecided
CHECKPOINTS = 8


def data_sizes(smallest: int, count: int) -> list[int]:
    """``count`` training-set sizes in tokens, doubling from ``smallest``."""
    return [smallest * 2**k for k in range(count)]


def best_loss(curve: dict[int, float]) -> tuple[int, float]:
    """Early stopping: the ``(step, held-out loss)`` of the lowest loss in ``curve`` (``{step: loss}``; the
    earliest step on a tie)."""
    step = min(curve, key=lambda s: (curve[s], s))
    return step, curve[step]


def judge(losses: list[float], r2: float, sizes: int) -> tuple[bool, bool, str]:
    """The criterion on the best losses by increasing ``D``: ``(supported, strictly decreasing, why undecided)``;
    ``sizes``: how many data sizes were trained (fewer than :data:`MIN_SIZES` cannot decide)."""
    decreasing = all(b < a for a, b in zip(losses, losses[1:]))
    undecided = "" if sizes >= MIN_SIZES else f"{sizes} data sizes, fewer than {MIN_SIZES}: too few to show a power law"
    return decreasing and r2 >= MIN_R2, decreasing, undecided


@register_lab(
    "scaling-data",
    claim="Model performance scales predictably as a power law in the size of the dataset, L(D) ~ (D_c / D)^alpha_D, "
    "when not bottlenecked by the other factors (model size, compute)",
    source="deck: scaling laws (Kaplan et al., 2020): L(D)",
    tags=("scaling", "training"),
    minutes=4.0,  # the full run's wall time, one thread: 239 s on the shared, loaded machine (1,000 steps)
)
def run(quick: bool, seed: int) -> LabResult:
    if quick:
        d, n_layers, seq_len, batch_size, steps, sizes, windows = 32, 2, 32, 16, 60, data_sizes(4096, 3), 32
    else:
        d, n_layers, seq_len, batch_size, steps, sizes, windows = 64, 2, 64, 16, 1000, data_sizes(8192, 5), 128
    data = byte_lm_data(CORPUS_BYTES, seq_len, windows, unigram_bytes=sizes[-1])
    all_train, inputs, labels, unigram = data.train_ids, data.inputs, data.labels, data.unigram
    total = windows * seq_len
    at = checkpoint_steps(steps // 8, steps, CHECKPOINTS)
    tokens_per_step = batch_size * seq_len
    config = gpt_config(d, n_layers, seq_len)

    curves, best, n_params, params = {}, {}, 0, 0
    for size in sizes:
        batches = LMWindows(all_train[:size], seq_len=seq_len, batch_size=batch_size, seed=seed)
        model, curves[size] = train_gpt(config, batches, steps, lr=LR, seed=seed, clip=CLIP, evaluate_at=at,
                                        evaluate=lambda m: held_out_loss(m, inputs, labels), label=f"D={size:,}")  # fmt: skip
        best[size] = best_loss(curves[size])
        n_params, params = non_embedding_params(model), count_parameters(model).total
    losses = [best[s][1] for s in sizes]
    pure = fit_power_law(sizes, losses)
    floor = fit_power_law(sizes, losses, irreducible=True)
    supported, decreasing, undecided = judge(losses, pure.r2, len(sizes))
    undecided = undecided or learned_too_little({f"D={sizes[-1]:,}": losses[-1]}, unigram)

    rows = [[s, steps * tokens_per_step / s, best[s][0], loss, curves[s][steps], pure.predict(s), floor.predict(s)]
            for s, loss in zip(sizes, losses)]  # fmt: skip
    drops = ", ".join(f"{a - b:+.3f}" for a, b in zip(losses, losses[1:]))
    finding = (
        f"best held-out loss falls {losses[0]:.3f} -> {losses[-1]:.3f} nats/byte as D grows {sizes[0]:,} -> "
        f"{sizes[-1]:,} bytes (drops {drops}; {'strictly decreasing' if decreasing else 'not monotone'}); pure fit "
        f"alpha_D = {pure.alpha:.3f} (Kaplan: {KAPLAN_ALPHA_D}) with R^2 = {pure.r2:.3f}; with an irreducible term "
        f"E = {floor.irreducible:.2f}, alpha_D = {floor.alpha:.2f} and R^2 = {floor.r2:.4f}"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        plot_power_fits(ax1, sizes, losses, pure, floor, "D", "best held-out loss (early stopping)", unigram)
        ax1.set(xscale="log", yscale="log", xlabel="D: training tokens (bytes)", ylabel="held-out loss (nats / byte)",
                title=f"L(D), one model (N = {n_params:,})")  # fmt: skip
        for s in sizes:
            steps_seen, values = zip(*sorted(curves[s].items()))
            ax2.plot([k * tokens_per_step for k in steps_seen], values, "o-", ms=3, lw=1, label=f"D = {s:,}")
        ax2.set(xscale="log", xlabel="tokens seen", ylabel="held-out loss (nats / byte)",
                title="along training: small D overfits")  # fmt: skip
        style_loss_axes((ax1, ax2))

    return LabResult(
        columns=["D (tokens)", "epochs", "best step", "best held-out loss", "final loss", "pure fit", "fit with E"],
        rows=rows,
        criterion=f"the best held-out loss (early stopping over {len(at)} checkpoints) falls strictly from each data "
        f"size to the next larger one, and the pure power law L = (D_c / D)^alpha_D fits the (D, loss) points with "
        f"R^2 >= {MIN_R2} in log space; alpha_D is reported next to Kaplan's {KAPLAN_ALPHA_D}, not judged",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"one byte-level GPT (d={d}, {n_layers} blocks, A={max(1, d // 16)}, {params:,} parameters, N = "
        f"{n_params:,} non-embedding) trained {steps} AdamW steps of {batch_size} x {seq_len} tokens on each of "
        f"{len(sizes)} prefixes of the stdlib-source corpus (lr {LR}, 10% warmup then cosine, clip {CLIP}); scored on "
        f"{total:,} held-out bytes (unigram baseline {unigram:.2f}). Every run sees {steps * tokens_per_step:,} "
        f"tokens, so the smallest sets are repeated for many epochs (data is the bottleneck) and the largest only "
        f"{steps * tokens_per_step / sizes[-1]:.1f} times: a best checkpoint at the last step means the steps, not "
        "the data, limited that run (Kaplan's L(D) assumes training to early stopping). Kaplan's alpha_D comes from 22M to 23B WebText2 BPE tokens with a 1.5B-parameter model; this is a "
        "byte-level miniature, so its exponent is not expected to match",
    )
