"""Training helpers shared by the model tests: a few AdamW steps, and digits accuracy after some epochs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.models import build_model


def digits(flat: bool = True) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits in dataset order, pixels / 16: ``x [N, 64]`` (or ``[N, 1, 8, 8]``), ``y [N]``."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()  # ships with scikit-learn, no download
    x = torch.tensor(data.data if flat else data.images, dtype=torch.float32) / 16.0
    return (x if flat else x[:, None]), torch.tensor(data.target)


def fit(model: nn.Module, loss_fn: Callable[[], Tensor], steps: int, lr: float = 1e-3) -> list[float]:
    """``steps`` AdamW steps on ``loss_fn()``; the losses seen, one per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def digits_accuracy(preset: str, epochs: int, *, flat: bool, **overrides) -> float:
    """Minibatch AdamW (64, lr 1e-3) on 1500 digits for ``epochs``; accuracy on the 297 held out."""
    torch.manual_seed(0)
    x, y = digits(flat)
    perm = torch.randperm(len(x))
    train, test = perm[:1500], perm[1500:]
    torch.manual_seed(0)
    model = build_model(preset, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(1500)].split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x[test]).argmax(-1) == y[test]).float().mean().item()
