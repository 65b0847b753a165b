r"""bf16 training with fp32 master weights: each weight cast to bf16 **once per optimiser step**.

The recipe (mixed precision as Micikevicius et al. 2018 describe it, in bf16 so no loss scaling)::

    W16   = bf16(W)             once per step, for every floating parameter W (fp32 master weights)
    for each micro-batch:  loss(x; W16).backward()       matmuls, attention, norms in bf16
    dL/dW += fp32(dL/dW16)      the cast's backward: gradients accumulate in fp32 on W.grad
    AdamW on (W, W.grad)        fp32 moments and update

:func:`compute_weights` puts the casts in place of the parameters for the whole step (forwards, backwards
and a gradient-checkpointed block's recomputation all read the same bf16 copies) and puts the parameters
back afterwards; the model's ``state_dict``, checkpoints and the optimiser see only the fp32 weights.

Why not ``torch.autocast`` alone: its weight cache lives for one autocast region (one forward), so it casts
every weight again in each micro-batch's forward and in every recomputation, and the fused LM-head loss
runs in fp32 under it (:func:`archlab.nn.loss.linear_cross_entropy` leaves autocast). Here the cast is done
once; inside the step an ``autocast`` region still sets the dtype of ops whose inputs mix precisions (a
float32 buffer meeting a bf16 activation), and finds the weights already in bf16 (no copy). Accuracy where it
matters: the LM-head loss takes its log-sum-exp in fp32 (``linear_cross_entropy``), PyTorch's CPU
``layer_norm``, ``rms_norm``, softmax and ``scaled_dot_product_attention`` accumulate bf16 inputs in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def compute_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[dict[str, Tensor]]:
    """Within the block, every floating parameter of ``model`` reads as ``dtype`` copy cast once on entry.

    With gradients enabled on entry the copies stay attached to the graph: a backward through them
    accumulates fp32 gradients on the parameters (``.grad``), however many forwards and backwards the block
    holds. Under ``torch.no_grad`` (evaluation) they are plain copies. A parameter shared by two
    modules (a tied LM head) gets one copy. Yields ``{name: copy}``. On exit the parameters are back, in their
    order (the ``state_dict`` and the optimiser are untouched).
    """
    copies: dict[int, Tensor] = {}
    swapped: list[tuple[nn.Module, dict[str, nn.Parameter | None], list[str]]] = []
    named: dict[str, Tensor] = {}
    tracked = torch.is_grad_enabled()
    try:
        for prefix, module in model.named_modules(remove_duplicate=False):
            names = [n for n, p in module._parameters.items() if p is not None and p.is_floating_point()
                     and p.dtype != dtype]  # fmt: skip
            if not names:
                continue
            original = module._parameters
            module._parameters = {n: p for n, p in original.items() if n not in names}
            swapped.append((module, original, names))
            for n in names:
                p = original[n]
                if id(p) not in copies:
                    copies[id(p)] = p.to(dtype) if tracked and p.requires_grad else p.detach().to(dtype)
                module.__dict__[n] = copies[id(p)]
                named[f"{prefix}.{n}" if prefix else n] = copies[id(p)]
        yield named
    finally:
        for module, original, names in reversed(swapped):
            for n in names:
                module.__dict__.pop(n, None)
            module._parameters = original
