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
from torch import fx, nn

from evefx.errors import EvefxError, OptionError
from evefx.graph import recorded_inputs
from evefx.layers import eval_mode
from evefx.modules import Quantizer
from evefx.trace import explain_failure, shape_text

__all__ = ["run_batch", "batch_size", "inputs_only", "progress_over", "quantizers_off"]


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(*batch)`` for a tuple or list of inputs, ``model(batch)`` for one. Inputs that fail
    in a traced model raise the :class:`~evefx.errors.ShapeError` line naming the layer."""
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    try:
        return model(*args)
    except EvefxError:
        raise
    except Exception:
        if isinstance(model, fx.GraphModule):
            got = ", ".join(shape_text(a) for a in args)
            traced = ", ".join(str(tuple(shape)) for _, shape, _ in recorded_inputs(model) if shape is not None)
            traced = f" traced with {traced}" if traced else ""
            explain_failure(model, args, f"calibration inputs {got} do not fit the model{traced}: "
                                         "give batches of the inputs it takes")
        raise


def batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its (first) tensor, 1 for anything else."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def inputs_only(batches: Iterable[Any], model: nn.Module | None = None) -> list[Any]:
    """Calibration batches as model inputs: labelled batches ``(x, y)`` become ``x``.

    With ``model`` (an fx module that recorded its example inputs) the count decides: a batch of
    one more tensor than the model's inputs whose last is integer drops that last (the labels),
    and a batch of as many tensors is inputs, integer ones too (token ids and a mask, with no
    labels). Without it, a pair whose second tensor is integer is ``(x, labels)``.

    Example:
        >>> inputs_only([(x, torch.tensor([1, 0]))]) == [x]
        >>> inputs_only([(tokens, mask)], text_model)   # two inputs: kept whole
    """
    if batches is None or isinstance(batches, torch.Tensor):
        # a tensor iterates over its samples, one model call per image: almost never what is meant
        raise OptionError(f"calibration batches must be an iterable of batches (a list, a DataLoader), got "
                          f"{'None' if batches is None else 'one tensor'}; e.g. list(x.split(64))")
    count = None
    if isinstance(model, fx.GraphModule):
        count = sum(1 for _, shape, _ in recorded_inputs(model) if shape is not None) or None
    out = []
    for b in batches:
        if isinstance(b, (tuple, list)) and b and _is_labels(b[-1]):
            if count is not None and len(b) == count + 1:
                b = b[0] if count == 1 else tuple(b[:-1])
            elif count is None and len(b) == 2:
                b = b[0]
        out.append(b)
    return out


def _is_labels(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point()


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
