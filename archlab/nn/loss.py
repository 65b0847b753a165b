r"""The output projection and the cross-entropy fused, chunk by chunk (a language model's last step).

A language model's head maps ``h [n, d]`` to logits ``z = h W^T`` of ``[n, V]``; with ``V = 50k`` the logits
and their gradient are the largest tensors of a training step (``2048 x 50304`` floats = 412 MB), and
``log_softmax`` + its backward + zero-filling the gradient take a quarter of a CPU step. Here the rows are
processed in chunks: for each chunk, the logits, the loss and the gradients are computed at once and the
logits are dropped, so memory holds ``chunk x V`` logits, never ``n x V``; on the CPU that buffer is kept
for the next call (:func:`release_workspace` frees it). With label smoothing ``eps``
(the target distribution ``q = (1 - eps) onehot(y) + eps / V``)::

    loss_i  = lse(z_i) - (1 - eps) z_{i,y_i} - eps * mean_j z_{i,j}          lse = log sum_j exp
    dz_i    = (softmax(z_i) - q_i) / n_valid                                 (mean over non-ignored rows)
    dh      = dz W,      dW = dz^T h          (the 1 / n_valid weights applied to the [n, d] factors)

Rows whose target is ``ignore_index`` contribute neither loss nor gradient. It equals
``F.cross_entropy(h @ W.T, y, ignore_index=, label_smoothing=eps)`` (tested in float64 to 1e-12).

bf16 (``h`` and ``W`` both bf16, as in :mod:`archlab.train.mixed`): the three products ``h W^T``, ``dz W``,
``dz^T h`` run in bf16 (fp32 accumulation inside the kernel); each chunk's logits are widened to fp32 for
the softmax, the log-sum-exp and the loss, ``dz`` is rounded to bf16 for the two gradient products, and
``dW`` is summed over the chunks in fp32 (one chunk: the one bf16 product is ``dW``). The loss is returned in fp32.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from archlab.config import require
from archlab.errors import ShapeError
from archlab.nn.inputs import check_class_ids, describe

LOW_PRECISION = (torch.bfloat16, torch.float16)  # products in this dtype, softmax and sums in fp32
IGNORE_INDEX = -100  # a target that adds no loss (padding), as in F.cross_entropy
DEFAULT_CHUNK = 1024  # rows per chunk: 1024 x 50304 fp32 = 206 MB of logits (HF keeps 2 x 412 MB at B=8, T=256)


class _Workspace(threading.local):
    """The logits buffers of the last call, one per dtype and thread, kept for the next call on the CPU.

    A fresh ``chunk x V`` tensor (206 MB in fp32 for GPT-2's vocabulary) is a new memory mapping whose pages
    the kernel faults in and zeroes on first touch, every step (about 25 ms per 100 MB measured here).
    CUDA's caching allocator already reuses its memory, so only CPU buffers are kept. The bf16 path holds
    two: the fp32 logits and their bf16 twin (the product's output, then ``dz`` for the gradient products).
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, Tensor] = {}


_WORKSPACE = _Workspace()


def _logits_buffer(rows: int, vocab: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised ``[rows, vocab]`` tensor of ``dtype`` on ``like``'s device."""
    if like.device.type != "cpu":
        return like.new_empty(rows, vocab, dtype=dtype)
    held = _WORKSPACE.buffers.get(dtype)
    if held is None or held.numel() < rows * vocab:
        _WORKSPACE.buffers.pop(dtype, None)  # drop the old one first: the two need not coexist
        _WORKSPACE.buffers[dtype] = held = like.new_empty(rows * vocab, dtype=dtype)
    return held[: rows * vocab].view(rows, vocab)


def release_workspace() -> None:
    """Free this thread's kept logits buffers (they are made again by the next call)."""
    _WORKSPACE.buffers.clear()


def _softmax_rows(z: Tensor, y: Tensor, eps: float) -> Tensor:
    """Per-row losses ``[c]`` of logits ``z [c, V]``; ``z`` is overwritten by ``dz = softmax(z) - q``.

    Three passes over ``z`` (max, the softmax kernel in place, max of the result) and no temporary of
    its size. The log-normaliser comes from the largest probability, ``p_max = exp(m - lse) >= 1 / V``,
    so ``lse = m - log p_max`` never underflows however far the target's logit lies below the others.
    """
    z_y = z.gather(1, y[:, None]).squeeze(1)
    mean = z.mean(dim=-1) if eps else None
    m = z.amax(dim=-1)
    # the softmax kernel works row by row, reading a row before writing it, so it may run in place
    torch.ops.aten._softmax.out(z, 1, False, out=z)
    lse = m - z.amax(dim=-1).log()
    loss = lse - (1 - eps) * z_y
    if eps:
        loss = loss - eps * mean
        z.sub_(eps / z.shape[1])
    z.scatter_add_(1, y[:, None], z.new_full((z.shape[0], 1), -(1 - eps)))
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, eps: float, chunk: int) -> Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        low = h.dtype in LOW_PRECISION  # bf16 products, fp32 softmax and sums (module docstring)
        acc = torch.float32 if low else h.dtype
        valid = targets != ignore_index
        scale = 1.0 / max(int(valid.sum()), 1)
        row_weight = (valid.to(acc) * scale)[:, None]  # [n, 1]: 1 / n_valid, 0 for ignored rows
        safe_targets = torch.where(valid, targets, 0)
        total = h.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        one_chunk = 0 < n <= chunk
        if ctx.needs_input_grad[1]:  # the first chunk writes it (bf16: an fp32 sum over several chunks;
            sum_dtype = weight.dtype if one_chunk else acc  # over one, its bf16 product is dW)
            grad_w = torch.empty_like(weight, dtype=sum_dtype) if n else torch.zeros_like(weight, dtype=acc)
        logits = _logits_buffer(min(chunk, n), vocab, h, acc)
        # bf16: the product's output, then dz, in a kept bf16 twin of the logits (no fresh [c, V] tensors)
        twin = _logits_buffer(min(chunk, n), vocab, h, h.dtype) if low else None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            z = logits[: rows.stop - start]  # logits [c, V], then dz in place
            if low:
                dz = twin[: rows.stop - start]
                torch.mm(h[rows], weight.T, out=dz)
                z.copy_(dz)
            else:
                dz = z
                torch.mm(h[rows], weight.T, out=z)
            loss = _softmax_rows(z, safe_targets[rows], eps)
            total = total + (loss * valid[rows]).sum()
            w = row_weight[rows]  # the mean's weights scale the small [c, d] factors, not dz
            if low:
                dz.copy_(z)  # dz rounded to bf16 for the two gradient products
            if grad_h is not None:
                torch.mm(dz, weight, out=grad_h[rows]).mul_(w)
            if grad_w is None:
                continue
            hw = (h[rows] * w).to(h.dtype)
            if low and one_chunk:
                torch.mm(dz.T, hw, out=grad_w)
            elif low:  # [V, d] bf16 products, added up in fp32
                part = torch.mm(dz.T, hw)
                if start == 0:
                    grad_w.copy_(part)
                else:
                    grad_w.add_(part)
            elif start == 0:
                torch.mm(z.T, hw, out=grad_w)
            else:
                grad_w.addmm_(z.T, hw)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        # kept as attributes, not saved tensors, so backward can hand them over without a copy
        ctx.grads = (grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy hands its gradients over once: backward twice "
                               "(retain_graph=True) is not supported")  # fmt: skip
        grads, ctx.grads = ctx.grads, None
        # d loss = 1 on CPU (the usual case) passes the tensors through: the autograd engine then adopts
        # them as .grad without another [V, d] pass; elsewhere the check would cost a device sync
        if not (grad_out.device.type == "cpu" and float(grad_out) == 1.0):
            grads = tuple(None if g is None else g * grad_out for g in grads)
        return (*grads, None, None, None, None)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
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
    if not isinstance(targets, Tensor) or hidden.shape[:-1] != targets.shape:
        raise ShapeError(f"targets must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {describe(targets)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(f"weight must be [V, d={hidden.shape[-1]}], got {tuple(weight.shape)}")
    require(0.0 <= label_smoothing < 1.0, f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    require(chunk_size > 0, f"chunk_size={chunk_size!r} must be > 0")
    check_class_ids("targets", targets, weight.shape[0], ignore_index=ignore_index)
    flat_t = targets.reshape(-1)
    # under autocast (bf16 hidden states, float32 weights) the loss runs in the wider dtype, autocast off;
    # bf16 hidden states and bf16 weights (archlab.train.mixed) take the bf16 path of the module docstring
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype), flat_t, ignore_index,
            float(label_smoothing), chunk_size,
        )  # fmt: skip
