"""``deployable``: the one step that turns a transformed model into the module that gets exported.

Every exporter and every latency measurement goes through it, once:

1. copy the model (the user's module is never edited), in eval mode, on the CPU;
2. remove pruned channels for real (:func:`evefx.compact`) when some pruner masks channels, so
   the file is smaller and faster (quantized layers too); where compact cannot slice (a custom
   layer), the masks stay and export as multiplications;
3. swap quantizers, quantized layers, spiking neurons and Poisson encoders for the export
   stand-ins of :mod:`evefx.export.qdq` and :mod:`evefx.export.spiking`.

Example:
    >>> deployed = deployable(gm)                 # gm is untouched
    >>> deployed.channels_removed, deployed.quantized
    (0, True)
    >>> torch.allclose(deployed.model(x), gm.eval()(x))
    True
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from evefx.errors import ExportError, PruneError
from evefx.export.qdq import swap_stand_ins
from evefx.modules import Quantizer

__all__ = ["Deployed", "deployable", "is_quantized", "safe_deepcopy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Deployed:
    """The module to export and what :func:`deployable` did to get it.

    Example:
        >>> deployed = deployable(pruned_gm)
        >>> deployed.channels_removed, deployed.stand_ins[:2]
        (12, ('features.0', 'features.0_act_quant'))
    """

    model: nn.Module
    """The copy to export: eval mode, on the CPU, stand-ins in place."""
    source: nn.Module
    """The user's model, untouched: bit widths, the spec and the parity reference are read from it."""
    channels_removed: int
    """Masked channels that compact removed (0 when nothing was pruned or the masks stay as multiplications)."""
    stand_ins: tuple[str, ...]
    """Qualified names of the modules swapped for export stand-ins."""
    quantized: bool
    """True when some quantizer is enabled (the file is int8 QDQ)."""
    compacted: nn.Module | None = None
    """The compacted model before its stand-ins (same graph as the file, quantizers in place): the
    op-by-op reference of a pruned and quantized model; None when nothing was compacted."""

    @property
    def graph_reference(self) -> nn.Module:
        """What the file's graph is compared with op by op: the compacted model, else the user's."""
        return self.compacted if self.compacted is not None else self.source


def is_quantized(model: nn.Module) -> bool:
    """True when some quantizer of ``model`` is enabled.

    Example:
        >>> is_quantized(evefx.transform(net, {"passes": [{"kind": "quantize"}]}))
        True
    """
    return any(isinstance(m, Quantizer) and m.enabled for m in model.modules())


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding non-leaf tensors from their last training
    forward (a spiking neuron's membrane potential): those are copied detached. Quantizers need
    none of this (they drop their llsq regulariser when copied), other stateful modules may.

    Example:
        >>> safe_deepcopy(gm) is not gm
        True
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:
        raise ExportError(f"cannot copy {type(model).__name__} for export (the model is never edited in place): {e}") from e


def _without_pruned_channels(gm: nn.Module) -> tuple[nn.Module | None, int]:
    """``evefx.compact(gm)`` (a new module) and the channels it removed, or ``(None, 0)`` when nothing is
    masked or compact cannot slice this model (the masks then export as multiplications)."""
    from evefx.channels import compact
    from evefx.modules.prune import ChannelPruner

    masked = sum(int((m.mask == 0).sum()) for m in gm.modules() if isinstance(m, ChannelPruner) and m.enabled)
    if not masked or not isinstance(gm, fx.GraphModule):
        return None, 0
    try:
        return compact(gm), masked
    except PruneError as e:
        log.warning("masks export as multiplications: %s", e)
        return None, 0


def deployable(gm: nn.Module) -> Deployed:
    """The module that gets exported for ``gm``: a CPU eval-mode copy, pruned channels removed,
    quantizers and spiking modules replaced by their export stand-ins; ``gm`` is not modified.

    Quantizers switched off (``set_mode(quantized=False)``) become identities; quantized layers whose
    weight quantizer is off become float layers with their BatchNorm folded.

    Example:
        >>> deployed = deployable(gm)
        >>> type(deployed.model.get_submodule("features.0")).__name__
        'QuantizedWeightLayer'
    """
    if not isinstance(gm, nn.Module):
        raise ExportError(f"export needs a torch.nn.Module (got {type(gm).__name__})")
    compacted, removed = _without_pruned_channels(gm)
    work = compacted if compacted is not None else safe_deepcopy(gm)  # compact already returned a new module
    work = work.eval().cpu()  # exported and checked on the CPU, wherever the model trains
    # the stand-ins replace the quantizers in place; a quantized compacted model keeps a copy with them
    reference = safe_deepcopy(work) if compacted is not None and is_quantized(gm) else None
    stand_ins = swap_stand_ins(work)
    return Deployed(model=work, source=gm, channels_removed=removed, stand_ins=stand_ins, quantized=is_quantized(gm),
                    compacted=reference)
