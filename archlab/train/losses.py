r"""Label-smoothed cross-entropy, written from its definition.

For logits ``z [..., V]`` and a target class ``y``, with ``p = softmax(z)``, the smoothed target is::

    q = (1 - eps) onehot(y) + eps / K          K = number of classes the model can predict
    loss = - sum_v q_v log p_v = (1 - eps) (-log p_y) + eps * mean_v(-log p_v)

With every logit finite, ``K = V`` and this is ``F.cross_entropy(z, y, label_smoothing=eps)``. A logit
of ``-inf`` marks a class as impossible (``p_v = 0``): ``q`` then spreads ``eps`` over the ``K`` allowed
classes only (``0 log 0 := 0``), so masked vocabularies give a finite loss instead of ``inf``; it equals
``F.cross_entropy`` on the logits with those classes removed. Positions whose target is ``ignore_index``
(padding, ``-100``) add nothing to the loss nor to the gradient, even if their logits are all ``-inf``.
A ``-inf`` logit on the target itself gives ``inf``: the model rules out the right answer.

Reduction ``mean`` divides by the number of kept targets (0 targets -> 0, not ``nan``).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from archlab.errors import ConfigError, ShapeError
from archlab.nn.inputs import check_class_ids
from archlab.nn.loss import IGNORE_INDEX

REDUCTIONS = ("mean", "sum", "none")


class TokenLosses(NamedTuple):
    """Per-position values, ``[...]`` each: ``loss`` (smoothed), ``nll`` (``-log p_y``), ``keep`` (target not ignored)."""

    loss: Tensor
    nll: Tensor
    keep: Tensor


def _check(logits: Tensor, target: Tensor, eps: float, ignore_index: int) -> None:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.ndim < 1:
        raise ShapeError(f"logits must be a floating-point [..., V] tensor, got {_describe(logits)}")
    check_class_ids("target", target, logits.shape[-1], ignore_index=ignore_index)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(
            f"target {tuple(target.shape)} must have the shape of logits {tuple(logits.shape)} without the last (class) axis"
        )
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ConfigError(f"label smoothing eps={eps!r} must be in [0, 1)")


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def token_losses(logits: Tensor, target: Tensor, eps: float = 0.1, ignore_index: int = IGNORE_INDEX) -> TokenLosses:
    """Smoothed loss and plain NLL at each position: ``logits [..., V]``, ``target [...]`` -> :class:`TokenLosses`.

    Target ids outside ``[0, V)`` (other than ``ignore_index``) raise ShapeError before any computation.
    """
    _check(logits, target, eps, ignore_index)
    keep = target != ignore_index
    logits = logits.masked_fill(~keep[..., None], 0.0)  # ignored rows: no NaN from an all -inf row
    log_p = logits.log_softmax(dim=-1)  # [..., V]
    allowed = logits != float("-inf")  # the K classes the model can predict
    nll = -log_p.gather(-1, target.masked_fill(~keep, 0)[..., None]).squeeze(-1)  # -log p_y
    uniform = -log_p.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)  # mean over allowed of -log p_v
    loss = (1.0 - eps) * nll + eps * uniform
    return TokenLosses(loss.masked_fill(~keep, 0.0), nll.masked_fill(~keep, 0.0), keep)


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, eps: float = 0.1, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """``-sum_v q_v log softmax(logits)_v`` with ``q = (1 - eps) onehot(target) + eps / K`` (module docstring).

    Args:
        logits: ``[..., V]`` (e.g. ``[B, N, V]``); ``-inf`` entries are classes ruled out.
        target: ``[...]`` class ids; ``ignore_index`` positions are skipped.
        eps: ``eps_ls``; 0 is plain cross-entropy.
        reduction: ``mean`` over kept targets, ``sum``, or ``none`` (``[...]``, 0 at ignored positions).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r} must be one of {', '.join(REDUCTIONS)}")
    loss, _, keep = token_losses(logits, target, eps, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1)
