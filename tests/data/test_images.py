"""scikit-learn's digits as tensors: shapes, scaling, a stratified, deterministic, disjoint split."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from archlab.data.images import digits
from archlab.errors import ConfigError


def _source_rows(x: torch.Tensor, images: np.ndarray) -> list[int]:
    """The row of load_digits each image came from (images are looked up by their pixels)."""
    index = {}
    for i, img in enumerate(images):
        index.setdefault(img.tobytes(), []).append(i)
    rows = []
    for img in (x.squeeze(1) * 16).round().numpy().astype(images.dtype):
        rows.append(index[img.tobytes()].pop(0))
    return rows


def test_shapes_scaling_and_labels():
    (x_train, y_train), (x_test, y_test) = digits(test_fraction=0.25, seed=0)
    assert x_train.shape[1:] == x_test.shape[1:] == (1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 450
    assert x_train.min() == 0 and x_train.max() == 1
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(10))


def test_split_is_stratified_disjoint_and_exact():
    data = load_digits()
    (x_train, y_train), (x_test, y_test) = digits(test_fraction=0.2, seed=0)
    train_rows, test_rows = _source_rows(x_train, data.images), _source_rows(x_test, data.images)
    assert sorted(train_rows + test_rows) == list(range(1797))  # disjoint, and together everything
    assert y_train.tolist() == data.target[train_rows].tolist() and y_test.tolist() == data.target[test_rows].tolist()
    assert torch.equal(x_test[0, 0], torch.tensor(data.images[test_rows[0]], dtype=torch.float32) / 16)
    counts, test_counts = np.bincount(data.target), np.bincount(y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)  # each class keeps its share


def test_deterministic_in_seed():
    (a, ya), _ = digits(seed=3)
    (b, yb), _ = digits(seed=3)
    (_, yc), _ = digits(seed=4)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)


def test_errors():
    with pytest.raises(ConfigError, match=r"test_fraction=1.5 must be a number in \(0, 1\)"):
        digits(test_fraction=1.5)
    with pytest.raises(ConfigError, match="seed=-1"):
        digits(seed=-1)
