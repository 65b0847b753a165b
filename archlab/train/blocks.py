"""The repeated blocks of a model: the unit of gradient checkpointing and of FSDP sharding.

A *block stack* is an ``nn.ModuleList`` attribute named ``blocks`` or ``layers`` anywhere in the model
(archlab's :class:`~archlab.nn.Encoder` / :class:`~archlab.nn.Decoder` hold ``blocks``; so do GPT, BERT,
ViT and the encoder-decoder Transformer through them). Each element of such a list is one block. A model
with no such list has no blocks: gradient checkpointing then raises ConfigError rather than doing nothing,
and FSDP shards it as one unit.

Gradient checkpointing runs each block's forward under ``torch.utils.checkpoint.checkpoint``
(non-reentrant; RNG state preserved, so dropout masks are the same when the backward pass recomputes
them): activations inside a block are not kept but recomputed, for one extra forward per block. The
block's ``forward`` is replaced on the instance, so parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from archlab.errors import ConfigError

BLOCK_LIST_NAMES = ("blocks", "layers")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """Every element of every ``nn.ModuleList`` named ``blocks`` or ``layers`` in ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            found.extend(module)
    return found


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass; returns the number of blocks wrapped."""
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(
            f"grad_checkpointing=True, but {type(model).__name__} has no nn.ModuleList named "
            f"{' or '.join(BLOCK_LIST_NAMES)} to checkpoint block by block"
        )
    for block in blocks:
        if not getattr(block.forward, "_archlab_checkpointed", False):
            block.forward = _checkpointed(block.forward)
    return len(blocks)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run._archlab_checkpointed = True
    return run
