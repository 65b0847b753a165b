r"""What the optimizer does beyond speed (the notes' first section).

``optimizer-bias``. An over-parameterised least-squares problem (``n`` examples, ``d > n`` weights) has a
whole affine space of exact solutions ``X w = y``. Gradient descent from ``w = 0`` stays in the row space
of ``X`` and so converges to the one of smallest norm, ``w_GD = X^+ y`` (the pseudo-inverse solution);
Adam rescales each coordinate and lands elsewhere in the space. Both fit the training data exactly; they
are different functions off it: the optimizer is part of the inductive bias.

``sequential-learning`` (Saxe, McClelland and Ganguli 2013). A two-layer linear network ``W_2 W_1``
learning ``Y = U S V^T`` from a small initialisation learns the singular modes one after another, strongest
first: mode ``i``'s strength ``a_i = u_i^T W_2 W_1 v_i`` follows a sigmoid in time with time scale
``~ 1 / s_i``. Tasks that share parameters and start together are learned in sequence.
"""

from __future__ import annotations

import torch

from archlab.labs.registry import LabResult, register_lab


def fit(X: torch.Tensor, y: torch.Tensor, optimizer: str, steps: int, lr: float) -> torch.Tensor:
    """``w [d]`` fitted to ``X [n, d] w = y [n]`` by full-batch ``gd`` (constant ``lr``) or ``adam`` (``lr``
    decayed linearly to 0, so it settles instead of hovering) from ``w = 0``, on the loss ``mean((Xw - y)^2) / 2``."""
    w = torch.zeros(X.shape[1], dtype=X.dtype, requires_grad=True)
    if optimizer == "gd":
        opt = torch.optim.SGD([w], lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        opt = torch.optim.Adam([w], lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((X @ w - y) ** 2).mean()
        loss.backward()
        opt.step()
        schedule.step()
    return w.detach()


@register_lab(
    "optimizer-bias",
    claim="In non-convex (and under-determined) settings the optimizer qualitatively alters the solution it finds, "
    "not just how fast: it is an inductive bias",
    source="notes 1.1; notes cheat-sheet: optimizer choice",
    tags=("optimization",),
)
def run_optimizer_bias(quick: bool, seed: int) -> LabResult:
    n, d = (20, 60) if quick else (40, 200)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true
    X_test = torch.randn(2000, d, generator=g, dtype=torch.float64)
    min_norm = torch.linalg.pinv(X) @ y
    # GD's step 1 / lambda_max of the loss's Hessian X^T X / n: the fastest stable rate
    lr_gd = 1.0 / torch.linalg.matrix_norm(X, ord=2).item() ** 2 * n
    steps = 2000 if quick else 10000
    solutions = {"gd": fit(X, y, "gd", steps, lr_gd), "adam": fit(X, y, "adam", steps, 1e-2)}
    rows = []
    for name, w in solutions.items():
        train = ((X @ w - y) ** 2).mean().sqrt().item()
        test = ((X_test @ (w - w_true)) ** 2).mean().sqrt().item()
        gap = ((w - min_norm).norm() / min_norm.norm()).item()
        rows.append([name, train, gap, w.norm().item(), w.abs().max().item(), test])
    (gd, adam) = rows
    apart = ((solutions["gd"] - solutions["adam"]).norm() / min_norm.norm()).item()
    supported = gd[1] < 1e-6 and adam[1] < 1e-6 and gd[2] < 1e-6 and adam[2] > 0.05
    finding = (
        f"both fit the {n} examples (train RMSE {gd[1]:.1e} and {adam[1]:.1e}); GD lands on the minimum-norm "
        f"solution (relative distance {gd[2]:.1e}), Adam {adam[2]:.2f} away from it (the two {apart:.2f} apart), with "
        f"||w|| {gd[3]:.2f} vs {adam[3]:.2f} and test RMSE {gd[5]:.2f} vs {adam[5]:.2f}"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        order = torch.argsort(min_norm)
        ax1.plot(min_norm[order].numpy(), "k-", lw=2, label="min-norm X^+ y")
        for name, style in (("gd", "--"), ("adam", ".")):
            ax1.plot(solutions[name][order].numpy(), style, label=name)
        ax1.set(xlabel="weight (sorted by the min-norm solution)", ylabel="value")
        ax1.legend()
        ax2.bar(["gd", "adam"], [gd[5], adam[5]])
        ax2.set(ylabel="test RMSE (both train RMSE ~ 0)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)

    return LabResult(
        columns=["optimizer", "train RMSE", "|w - X^+y| / |X^+y|", "||w||", "max |w_i|", "test RMSE"],
        rows=rows,
        criterion="both optimizers fit the training set (RMSE < 1e-6); GD from 0 reaches the min-norm solution "
        "(relative distance < 1e-6) while Adam's solution is > 5% away from it",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"linear least squares, n={n} < d={d}, float64, full batch, {steps} steps from w = 0 (GD lr 1/L, "
        "Adam lr 1e-2 decayed linearly to 0); a convex problem with many minima shows the effect exactly; deep nets add more",
    )


def mode_strengths(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``a_i = u_i^T W v_i`` for the network map ``W [out, in]`` and the target's singular vectors."""
    return torch.einsum("oi,ok,ik->k", W, U, V)


@register_lab(
    "sequential-learning",
    claim="Tasks that share parameters and start in parallel are learned sequentially (Saxe et al. 2013)",
    source="notes 1.3; lecture notes: interference, Saxe et al. 2013",
    tags=("optimization",),
)
def run_sequential(quick: bool, seed: int) -> LabResult:
    width = 8
    strengths = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # s_i: four "tasks" of decreasing strength
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    U, V = U[:, : len(strengths)], V[:, : len(strengths)]
    target = U @ torch.diag(strengths) @ V.T  # Y = U S V^T; inputs whitened, so the map is the whole task
    W1 = 1e-4 * torch.randn(width, width, generator=g, dtype=torch.float64)
    W2 = 1e-4 * torch.randn(width, width, generator=g, dtype=torch.float64)
    lr, steps = (0.02, 1500) if quick else (0.005, 6000)
    history = []
    for _ in range(steps):  # gradient descent on 0.5 ||Y - W2 W1||_F^2
        error = target - W2 @ W1
        W1, W2 = W1 + lr * W2.T @ error, W2 + lr * error @ W1.T
        history.append(mode_strengths(W2 @ W1, U, V) / strengths)
    history = torch.stack(history)  # [steps, modes], each in [0, 1]
    half = [int((history[:, i] >= 0.5).nonzero()[0]) if (history[:, i] >= 0.5).any() else None
            for i in range(len(strengths))]  # fmt: skip
    rows = []
    for i, s in enumerate(strengths.tolist()):
        rows.append([i + 1, s, half[i] if half[i] is not None else "never", history[-1, i].item()])
    learned = all(h is not None for h in half)
    ordered = learned and all(a < b for a, b in zip(half, half[1:], strict=False))
    # sequential: when the strongest mode is 90% learned, the weakest two have not started (< 10%)
    t90 = int((history[:, 0] >= 0.9).nonzero()[0]) if (history[:, 0] >= 0.9).any() else steps - 1
    waiting = history[t90, 2:].max().item()
    supported = ordered and waiting < 0.1
    finding = (
        f"half-learned at steps {', '.join(str(h) for h in half)} for s = {', '.join(f'{s:g}' for s in strengths)}; "
        f"when mode 1 is 90% learned (step {t90}) modes 3-4 are at {waiting:.1%} of theirs"
    )

    def plot(fig) -> None:
        ax = fig.subplots()
        for i, s in enumerate(strengths.tolist()):
            ax.plot(history[:, i].numpy(), label=f"mode {i + 1}, s = {s:g}")
        ax.set(xlabel=f"gradient step (lr {lr})", ylabel="a_i / s_i (share of the mode learned)")
        ax.grid(alpha=0.3)
        ax.legend()

    return LabResult(
        columns=["mode", "s_i", "step at 50%", "learned at end"],
        rows=rows,
        criterion="modes are half-learned in order of strength, and when the strongest is 90% learned the two "
        "weakest are below 10%",
        supported=supported,
        finding=finding,
        plot=plot,
        notes="two-layer linear network W2 W1 (width 8) on whitened inputs, init N(0, 1e-8), full-batch GD in float64",
    )
