"""Run-time checks of token-id inputs, shared by every family (raised before any computation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from archlab.errors import ShapeError


def describe(x: Any) -> str:
    """``(2, 7)`` for a tensor, the type name for anything else (for error messages)."""
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def check_token_ids(name: str, ids: Any, vocab_size: int, *, vocab_name: str = "vocab_size") -> None:
    """:class:`ShapeError` unless ``ids`` is a non-empty integer ``[B, N]`` tensor with every id in ``[0, vocab_size)``."""
    if not isinstance(ids, Tensor) or ids.ndim != 2:
        raise ShapeError(f"{name} must be a [B, N] tensor of token ids, got {describe(ids)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ShapeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ShapeError(f"{name} must be [B, N] with B, N >= 1, got shape {tuple(ids.shape)}")
    if ids.is_meta:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ShapeError(
            f"{name} holds token id {bad}, outside the vocabulary: ids must be in [0, {vocab_name}={vocab_size})"
        )
