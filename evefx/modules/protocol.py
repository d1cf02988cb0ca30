"""The eve protocol: what every module evefx inserts offers to the rest of the library.

A module takes part by subclassing :class:`EveHooks` next to ``nn.Module`` and overriding what it
needs. Nothing here knows about specs, passes or tracing, and no state is global: everything
lives on the module instance (buffers for eve parameters, so they travel with ``state_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["EveRange", "EveHooks", "is_eve_module"]


@dataclass(frozen=True)
class EveRange:
    """Admissible values of one eve parameter.

    Example:
        >>> EveRange(2, 8, integer=True).clip(9.4)
        8
    """

    low: float
    high: float
    integer: bool = False

    def clip(self, value: float) -> float | int:
        value = min(max(float(value), self.low), self.high)
        return int(round(value)) if self.integer else value

    def from_unit(self, action: float) -> float | int:
        """Map ``action`` in [-1, 1] onto the range (integers rounded)."""
        a = min(max(float(action), -1.0), 1.0)
        return self.clip(self.low + (a + 1.0) / 2.0 * (self.high - self.low))

    def to_unit(self, value: float) -> float:
        """Inverse of :meth:`from_unit`."""
        if self.high == self.low:
            return 0.0
        return 2.0 * (float(value) - self.low) / (self.high - self.low) - 1.0


class EveHooks:
    """Mixin of the eve protocol. Defaults do nothing, so a module overrides only what it has.

    * ``eve_ranges()``: the eve parameters (set by the upgrader, not by gradients) and their ranges.
    * ``get_eve(name)`` / ``set_eve(name, value)``: read and write one of them.
    * ``observations()``: scalar statistics gathered while the model runs (for ``evefx.observe``).
    * ``reset_state()``: clear hidden state (membrane potentials, running statistics of a step).
    * ``set_mode(**flags)``: react to ``spiking=``, ``quantized=``, ``pruned=``, ``step=``; ignore the rest.

    Example:
        >>> class Gate(EveHooks, nn.Module): ...
    """

    def eve_ranges(self) -> dict[str, EveRange]:
        return {}

    def get_eve(self, name: str) -> float:
        value = getattr(self, name)
        if isinstance(value, torch.Tensor):
            return float(value.detach().float().mean()) if value.numel() != 1 else float(value.item())
        return float(value)

    def set_eve(self, name: str, value: float) -> None:
        if name not in self.eve_ranges():
            raise KeyError(f"{type(self).__name__} has no eve parameter {name!r}; it has {sorted(self.eve_ranges())}")
        value = self.eve_ranges()[name].clip(value)
        current = getattr(self, name)
        if isinstance(current, torch.Tensor):
            with torch.no_grad():
                current.fill_(value)
        else:
            setattr(self, name, value)

    def observations(self) -> dict[str, float]:
        return {}

    def reset_state(self) -> None:
        return None

    def set_mode(self, **flags: Any) -> None:
        return None


def is_eve_module(module: Any) -> bool:
    """True for modules that follow the eve protocol."""
    return isinstance(module, EveHooks)
