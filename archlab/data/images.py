r"""The 8x8 handwritten digits that scikit-learn ships (1797 images, 10 classes): nothing is downloaded.

``digits()`` returns ``(x_train, y_train), (x_test, y_test)``::

    x   float32 [N, 1, 8, 8]   pixel / 16, so in [0, 1]    (C = 1 channel, H = W = 8)
    y   int64   [N]            the digit, 0..9

The split is stratified (each class keeps its share in both parts) and deterministic in ``seed``
(``sklearn.model_selection.train_test_split(stratify=y, random_state=seed)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from archlab.errors import ConfigError, DataError

N_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)  # [C, H, W]
MAX_PIXEL = 16.0  # the dataset's pixel values are integers 0..16


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))`` of scikit-learn's digits (see the module docstring)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction!r} must be a number in (0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("the digits images ship with scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div_(MAX_PIXEL).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=test_fraction, stratify=data.target, random_state=seed
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
