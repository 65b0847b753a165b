"""The optimiser: AdamW with the paper's Adam settings and weight decay on weight matrices only.

The rule for weight decay: a parameter decays iff it is the ``weight`` of an ``nn.Linear`` or of a
convolution (``nn.Conv1d/2d/3d``) and is not also owned by an ``nn.Embedding`` (a tied LM head is the
embedding). Biases, norm gains and offsets, embeddings (token, position, segment) and free-standing
parameters (a ViT class token, a position table) do not decay: shrinking them toward 0 only fights the
norms and the lookup tables, which have no scale to regularise.
"""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW

_DECAYED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)`` lists of the trainable parameters of ``model`` (each parameter once)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {
        id(m.weight) for m in model.modules()
        if isinstance(m, _DECAYED_MODULES) and m.weight is not None and id(m.weight) not in embedded
    }  # fmt: skip
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # parameters() yields a shared (tied) Parameter once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decayed else no_decay).append(p)
    return decay, no_decay


def build_optimizer(
    model: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9, weight_decay: float = 0.0
) -> AdamW:
    """AdamW over two groups: ``[decay, no_decay]`` (the second has ``weight_decay = 0``)."""
    decay, no_decay = split_decay(model)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=lr, betas=betas, eps=eps, fused=_can_fuse(decay + no_decay))


def _can_fuse(params: list[nn.Parameter]) -> bool:
    """PyTorch's fused AdamW (one kernel for all tensors; 9x faster than the default on this CPU for a
    30M-parameter model) takes plain floating-point tensors on CPU or CUDA, not FSDP's DTensors."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and not isinstance(p, DTensor) for p in params
    )
