"""What every calibration and correction run shares: the batches as model inputs, one call per
batch, a progress bar, and the modes the model runs in (eval, quantizers on or off, restored after).

Example:
    >>> with quantizers_off(gm):
    ...     for batch in inputs_only(loader):
    ...         run_batch(gm, batch)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from evefx.layers import eval_mode
from evefx.modules import Quantizer

__all__ = ["run_batch", "batch_size", "inputs_only", "progress_over", "quantizers_off"]


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(*batch)`` for a tuple or list of inputs, ``model(batch)`` for one."""
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its (first) tensor, 1 for anything else."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def inputs_only(batches: Iterable[Any]) -> list[Any]:
    """Calibration batches as model inputs: ``(x, y)`` pairs from a labelled loader become ``x``.

    Example:
        >>> inputs_only([(x, torch.tensor([1, 0]))]) == [x]
    """
    out = []
    for b in batches:
        if isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], torch.Tensor) and not b[1].is_floating_point():
            b = b[0]
        out.append(b)
    return out


def progress_over(items: list[Any], description: str, enabled: bool) -> Iterable[Any]:
    """``items`` with a transient progress bar on stderr (when ``enabled`` and there are several)."""
    if not enabled or len(items) < 2:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, console=Console(stderr=True), transient=True)


@contextlib.contextmanager
def quantizers_off(model: nn.Module, quantized: bool = False) -> Iterator[nn.Module]:
    """Every module in eval mode and every quantizer off (``quantized=True``: the enabled ones on)
    for the block; modes and quantizers are restored afterwards.

    Example:
        >>> with quantizers_off(gm):
        ...     y_float = gm(x)
    """
    enabled = [(q, q.enabled) for q in model.modules() if isinstance(q, Quantizer)]
    with eval_mode(model):
        for q, on in enabled:
            q.set_mode(quantized=quantized and on)
        try:
            yield model
        finally:
            for q, on in enabled:
                q.set_mode(quantized=on)
