r"""Learning-rate schedules, as multipliers of the configured ``lr`` for ``torch.optim.lr_scheduler.LambdaLR``.

``step`` counts optimiser steps from 1, as in the paper. ``LambdaLR`` calls its function with the number
of steps already *taken* (0 before the first one), so each schedule's ``__call__(e)`` returns
``factor(step = e + 1)``: the rate the coming step uses.

* :class:`NoamSchedule`, the paper's (Vaswani et al. 2017, eq. 3)::

      lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

  linear growth for ``warmup`` steps, then decay as ``1 / sqrt(step)``; the peak, at ``step = warmup``,
  is ``(d_model * warmup)^-0.5``.
* :class:`WarmupCosine`: ``step / warmup`` during warmup, then
  ``m + (1 - m) (1 + cos(pi p)) / 2`` with ``p = (step - warmup) / (total - warmup)`` and ``m = min_lr / lr``.
* :class:`WarmupConstant`: ``min(1, step / warmup)``.

The schedules are small dataclasses, so ``LambdaLR.state_dict()`` saves their fields as plain numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from archlab.config import check_positive, require
from archlab.errors import ConfigError, unknown
from archlab.train.config import SCHEDULES


@dataclass
class NoamSchedule:
    """``d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``; the paper's ``warmup`` is 4000."""

    d_model: int
    warmup: int = 4000

    def __post_init__(self) -> None:
        check_positive("d_model", self.d_model)
        check_positive("warmup", self.warmup)

    def factor(self, step: int) -> float:
        return self.d_model**-0.5 * min(step**-0.5, step * self.warmup**-1.5)

    def __call__(self, steps_taken: int) -> float:
        return self.factor(steps_taken + 1)


@dataclass
class WarmupCosine:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at step ``total``."""

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        require(self.warmup >= 0, f"warmup={self.warmup} must be >= 0")
        require(self.total > self.warmup, f"steps={self.total} must be > warmup={self.warmup} for a cosine schedule")
        require(0.0 <= self.min_ratio <= 1.0, f"min_ratio={self.min_ratio} must be in [0, 1]")

    def factor(self, step: int) -> float:
        if step <= self.warmup:
            return step / self.warmup
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, steps_taken: int) -> float:
        return self.factor(steps_taken + 1)


@dataclass
class WarmupConstant:
    """``min(1, step / warmup)``; ``warmup = 0`` is a constant rate."""

    warmup: int = 0

    def __post_init__(self) -> None:
        require(self.warmup >= 0, f"warmup={self.warmup} must be >= 0")

    def factor(self, step: int) -> float:
        return 1.0 if step >= self.warmup else step / self.warmup

    def __call__(self, steps_taken: int) -> float:
        return self.factor(steps_taken + 1)


def build_schedule(
    name: str, *, warmup: int, total: int, lr: float, min_lr: float = 0.0, d_model: int | None = None
) -> NoamSchedule | WarmupCosine | WarmupConstant:
    """The multiplier function of schedule ``name`` (``cosine | constant | noam``)."""
    if name == "noam":
        if d_model is None:
            raise ConfigError("schedule='noam' scales by d_model^-0.5, but the model has no config.d_model")
        return NoamSchedule(d_model, warmup)
    if name == "cosine":
        return WarmupCosine(warmup, total, min_lr / lr)
    if name == "constant":
        return WarmupConstant(warmup)
    raise ConfigError(unknown("schedule", name, SCHEDULES))


def build_scheduler(optimizer: Optimizer, schedule) -> LambdaLR:
    """``LambdaLR`` applying ``schedule`` to every parameter group of ``optimizer`` (state_dict-able)."""
    return LambdaLR(optimizer, schedule)
