"""A small, deterministic trainer for transformed (or plain) models, with a rich progress bar.

Example:
    >>> history = evefx.train.fit(gm, train, test, epochs=3, lr=1e-3)
    >>> history[-1]["val_accuracy"]
"""
from __future__ import annotations

import contextlib
import csv
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from evefx.errors import OptionError
from evefx.layers import eval_mode

__all__ = ["fit", "evaluate", "seed_everything", "extra_losses"]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch globally, for a script's first line (model initialisation); evefx's
    library code never calls it (:func:`fit` takes a generator instead).

    Example:
        >>> seed_everything(0); model = DemoNet()   # the same initial weights every run
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _random_stream(generator: torch.Generator | None) -> Iterator[None]:
    """Inside the block, torch's default RNG (dropout, a DataLoader without its own generator,
    stochastic rounding) draws from a state taken from ``generator``; outside nothing changed, so a
    caller's own random streams (an RL agent's exploration noise) go on where they were.
    ``None``: draw from the global state as it is."""
    if generator is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it would queue a seed for CUDA too
        if devices:
            torch.cuda.manual_seed_all(seed)
        yield


def extra_losses(model: nn.Module) -> torch.Tensor | float:
    """Sum of the regularisers modules declare through a ``regularization_loss()`` method (e.g. llsq)."""
    total: torch.Tensor | float = 0.0
    for m in model.modules():
        fn = getattr(m, "regularization_loss", None)
        if callable(fn):
            total = total + fn()
    return total


def split_batch(batch: Any) -> tuple[tuple[Any, ...], torch.Tensor]:
    """``(inputs, labels)`` of a labelled batch: the labels are its last item, the model's inputs
    the rest (``(x, y)``, or ``(token_ids, mask, y)`` for a model of two inputs).

    Example:
        >>> split_batch((x, y))
        ((x,), y)
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise OptionError(f"a training or evaluation batch is (inputs..., labels); got {type(batch).__name__}"
                          f"{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}: give a loader "
                          f"over (x, y) pairs (e.g. a TensorDataset of images and labels)")
    return tuple(batch[:-1]), batch[-1]


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, loss_fn: Callable | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean loss over ``data``; the model's train/eval mode is restored."""
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="sum")
    correct = total = 0
    loss_sum = 0.0
    with eval_mode(model):
        for batch in data:
            inputs, y = split_batch(batch)
            out = model(*inputs)
            loss_sum += float(loss_fn(out, y))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    if total == 0:  # 0% from an empty loader would read as a broken model
        raise OptionError("evaluate: the data gave no batches (an empty loader or split); give a loader over (x, y) pairs")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total}


def _optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise OptionError(f"unknown optimizer {name!r}; use 'adam' or 'sgd' or pass a torch.optim.Optimizer")


def fit(
    model: nn.Module,
    train: Iterable,
    val: Iterable | None = None,
    epochs: int = 1,
    *,
    optimizer: str | torch.optim.Optimizer = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss_fn: Callable | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    log_csv: str | Path | None = None,
    max_steps: int | None = None,
    description: str = "train",
    log_level: int = logging.INFO,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs``; return one dict of metrics per epoch (also written to ``log_csv``).

    The training's randomness (dropout, the order of a loader without its own generator) comes
    from ``generator`` (each call draws from it, so one generator gives a reproducible sequence of
    runs), else from ``torch.Generator().manual_seed(seed)``: runs with the same seed are identical
    on CPU, and fit leaves the global RNGs of Python, NumPy and torch as they were.
    ``seed=None`` without a generator draws from torch's global RNG instead. ``max_steps`` stops
    early (for fine-tuning in a search). ``log_level``: of the line logged per epoch (a search's
    evaluator logs them at ``logging.DEBUG``: its progress bar says enough).

    Example:
        >>> fit(gm, train, val, epochs=2, generator=torch.Generator().manual_seed(1))
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    with _random_stream(generator):
        return _fit(model, train, val, epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay, loss_fn=loss_fn,
                    progress=progress, log_csv=log_csv, max_steps=max_steps, description=description, log_level=log_level)


def _fit(model: nn.Module, train: Iterable, val: Iterable | None, epochs: int, *, optimizer: str | torch.optim.Optimizer,
         lr: float, weight_decay: float, loss_fn: Callable | None, progress: bool, log_csv: str | Path | None,
         max_steps: int | None, description: str, log_level: int) -> list[dict[str, Any]]:
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else _optimizer(optimizer, model.parameters(), lr, weight_decay)
    history: list[dict[str, Any]] = []
    steps = 0
    n_batches = len(train) if hasattr(train, "__len__") else None
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=(n_batches or 0) * epochs, status="")
        for epoch in range(1, epochs + 1):
            model.train()
            start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            for batch in train:
                inputs, y = split_batch(batch)
                opt.zero_grad(set_to_none=True)
                out = model(*inputs)
                loss = loss_fn(out, y) + extra_losses(model)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
                steps += 1
                bar.update(task, advance=1, status=f"epoch {epoch} loss {loss_sum / seen:.4f}")
                if max_steps is not None and steps >= max_steps:
                    break
            if seen == 0:
                raise OptionError("fit: the training data gave no batches (an empty loader or split); give a loader "
                                  "over (x, y) pairs")
            row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                                   "train_accuracy": 100.0 * correct / max(seen, 1),
                                   "seconds": time.perf_counter() - start}
            if val is not None:
                metrics = evaluate(model, val)
                row.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
            history.append(row)
            log.log(log_level, "%s epoch %d/%d: loss %.4f, train accuracy %.2f%%%s (%.1f s)", description, epoch, epochs,
                     row["train_loss"], row["train_accuracy"],
                     f", val accuracy {row['val_accuracy']:.2f}%" if "val_accuracy" in row else "", row["seconds"])
            if max_steps is not None and steps >= max_steps:
                break
    if log_csv is not None:
        with open(log_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]) if history else ["epoch"])
            writer.writeheader()
            writer.writerows(history)
    return history
