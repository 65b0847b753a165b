"""Run-time checks of token-id and class-id inputs, shared by every family and loss (raised before any computation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from archlab.errors import ShapeError

#: the index dtypes an embedding lookup (``nn.Embedding``) takes
EMBEDDING_DTYPES = (torch.int64, torch.int32)


def describe(x: Any) -> str:
    """``(2, 7)`` for a tensor, the type name for anything else (for error messages)."""
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_integer(name: str, ids: Tensor, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ShapeError(f"{name} must hold integer {what}, got dtype {ids.dtype}")


def check_embedding_dtype(name: str, ids: Tensor, what: str = "token ids") -> None:
    """:class:`ShapeError` unless ``ids`` (integer already) has a dtype an embedding lookup takes (EMBEDDING_DTYPES):
    uint8 or int16 ids pass an integer check and fail inside ``nn.Embedding``."""
    if ids.dtype not in EMBEDDING_DTYPES:
        raise ShapeError(f"{name} has dtype {ids.dtype}; {what} must be torch.long (int64) or torch.int32")


def check_not_empty(name: str, x: Tensor) -> None:
    """:class:`ShapeError` for an empty batch (``B = 0``): every family refuses one alike (tokens, pixels, features)."""
    if x.shape[0] == 0:
        raise ShapeError(f"{name} is an empty batch (B=0, shape {tuple(x.shape)}): pass at least one example")


def check_token_ids(name: str, ids: Any, vocab_size: int, *, vocab_name: str = "vocab_size") -> None:
    """:class:`ShapeError` unless ``ids`` is a non-empty integer ``[B, N]`` tensor with every id in ``[0, vocab_size)``."""
    if not isinstance(ids, Tensor) or ids.ndim != 2:
        raise ShapeError(f"{name} must be a [B, N] tensor of token ids, got {describe(ids)}")
    _check_integer(name, ids, "token ids")
    check_embedding_dtype(name, ids)
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


def check_class_ids(name: str, ids: Any, n_classes: int, *, ignore_index: int | None = None) -> None:
    """:class:`ShapeError` unless ``ids`` is an integer tensor (any shape) of class ids in ``[0, V = n_classes)``,
    ``ignore_index`` allowed too: the targets of every cross-entropy (a float tensor fails inside ``gather``)."""
    if not isinstance(ids, Tensor):
        raise ShapeError(f"{name} must be an integer tensor of class ids, got {describe(ids)}")
    _check_integer(name, ids, "class ids")
    if ids.is_meta or ids.numel() == 0:
        return
    kept = ids if ignore_index is None else ids.masked_fill(ids == ignore_index, 0)  # 0: a class of any V
    low, high = (int(x) for x in torch.aminmax(kept))
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        ignored = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        raise ShapeError(f"{name} holds class {bad}, outside [0, V={n_classes}){ignored}")
