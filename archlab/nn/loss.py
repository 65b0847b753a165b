r"""The output projection and the cross-entropy fused, chunk by chunk (a language model's last step).

A language model's head maps ``h [n, d]`` to logits ``z = h W^T`` of ``[n, V]``; with ``V = 50k`` the logits
and their gradient are the largest tensors of a training step (``2048 x 50304`` floats = 412 MB), and
``log_softmax`` + its backward + zero-filling the gradient take a quarter of a CPU step. Here the rows are
processed in chunks: for each chunk, the logits, the loss and the gradients are computed at once and the
logits are dropped, so memory holds ``chunk x V`` logits, never ``n x V``. With label smoothing ``eps``
(the target distribution ``q = (1 - eps) onehot(y) + eps / V``)::

    loss_i  = lse(z_i) - (1 - eps) z_{i,y_i} - eps * mean_j z_{i,j}          lse = log sum_j exp
    dz_i    = (softmax(z_i) - q_i) / n_valid                                 (mean over non-ignored rows)
    dh      = dz W,      dW = dz^T h

Rows whose target is ``ignore_index`` contribute neither loss nor gradient. It equals
``F.cross_entropy(h @ W.T, y, ignore_index=, label_smoothing=eps)`` (tested in float64 to 1e-12).
"""

from __future__ import annotations

import torch
from torch import Tensor

from archlab.config import require
from archlab.errors import ShapeError

DEFAULT_CHUNK = 512  # rows whose dz feed one gradient matmul: 512 x 50304 fp32 = 103 MB


def _loss_rows(z: Tensor, y: Tensor, weight: Tensor, eps: float, need_grad: bool) -> Tensor:
    """Per-row losses ``[c]`` of logits ``z [c, V]``; with ``need_grad``, ``z`` is overwritten by ``dz``.

    ``weight [c]`` scales each row's gradient (``1 / n_valid``, 0 for ignored rows). Works in place:
    a few passes over ``z`` (max, exp, sum, scale) and no temporary of its size.
    """
    z_y = z.gather(1, y[:, None]).squeeze(1)
    mean = z.mean(dim=-1) if eps else None
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(m).exp_()  # exp(z - m)
    total = z.sum(dim=-1, keepdim=True)
    lse = (m + total.log()).squeeze(1)
    loss = lse - (1 - eps) * z_y
    if eps:
        loss = loss - eps * mean
    if need_grad:
        z.mul_(weight[:, None] / total)  # softmax(z) * weight
        z.scatter_add_(1, y[:, None], (-(1 - eps) * weight)[:, None])
        if eps:
            z.sub_((eps / z.shape[1]) * weight[:, None])
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, eps: float, chunk: int) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n, vocab = h.shape[0], weight.shape[0]
        valid = targets != ignore_index
        scale = 1.0 / max(int(valid.sum()), 1)
        row_weight = valid.to(h.dtype) * scale
        safe_targets = torch.where(valid, targets, 0)
        total = h.new_zeros(())
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # the first chunk writes it
            grad_w = torch.empty_like(weight) if n else torch.zeros_like(weight)
        dz_buffer = h.new_empty(min(chunk, n), vocab) if need_grad else None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            out = None if dz_buffer is None else dz_buffer[: rows.stop - start]
            z = torch.mm(h[rows], weight.T, out=out)  # logits [c, V], then dz in place
            loss = _loss_rows(z, safe_targets[rows], row_weight[rows], eps, need_grad)
            total = total + (loss * valid[rows]).sum()
            if grad_h is not None:
                torch.mm(z, weight, out=grad_h[rows])
            if grad_w is not None and start == 0:
                torch.mm(z.T, h[rows], out=grad_w)
            elif grad_w is not None:
                grad_w.addmm_(z.T, h[rows])
        ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out,
            None if grad_w is None else grad_w * grad_out,
            None, None, None, None,
        )  # fmt: skip


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, without materialising them.

    Args:
        hidden: ``[..., d]`` final hidden states (e.g. ``[B, N, d]``).
        weight: ``[V, d]`` output projection (the tied embedding matrix of a GPT).
        targets: ``[...]`` class ids in ``[0, V)`` or ``ignore_index``, shaped like ``hidden`` without ``d``.
        label_smoothing: ``eps`` in ``[0, 1)``.
        chunk_size: rows per chunk; memory for logits is ``chunk_size x V``.

    Returns:
        The scalar mean over non-ignored rows (0 if every row is ignored), differentiable w.r.t. ``hidden``
        and ``weight``. The gradients are computed in the forward pass (no logits are kept for backward).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ShapeError(f"targets must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(f"weight must be [V, d={hidden.shape[-1]}], got {tuple(weight.shape)}")
    require(0.0 <= label_smoothing < 1.0, f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    require(chunk_size > 0, f"chunk_size={chunk_size!r} must be > 0")
    flat_t = targets.reshape(-1)
    bad = (flat_t != ignore_index) & ((flat_t < 0) | (flat_t >= weight.shape[0]))
    if bad.any():
        value = int(flat_t[bad][0])
        raise ShapeError(f"targets hold {value}, outside [0, V={weight.shape[0]}) and not ignore_index={ignore_index}")
    # under autocast (bf16 hidden states, float32 weights) the loss runs in the wider dtype, autocast off
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype), flat_t, ignore_index,
            float(label_smoothing), chunk_size,
        )  # fmt: skip
