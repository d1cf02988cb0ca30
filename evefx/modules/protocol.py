"""The eve protocol: what every module evefx inserts offers to the rest of the library.

A module takes part by subclassing :class:`EveHooks` next to ``nn.Module`` and overriding what it
needs. Nothing here knows about specs, passes or tracing, and no state is global: everything
lives on the module instance (buffers for eve parameters, so they travel with ``state_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from evefx.errors import OptionError, UnknownNameError

__all__ = ["EveRange", "EveHooks"]


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

    def check(self, value: float, what: str = "value") -> float | int:
        """``value`` if it lies in the range (a whole number when ``integer``), else :class:`OptionError`.

        Values within float32 rounding of a bound count as inside (a buffer read back as a Python
        float may exceed ``high`` by 1e-8) and come back clipped.

        Example:
            >>> EveRange(2, 8, integer=True).check(4.0)
            4
            >>> EveRange(2, 8, integer=True).check(99, "bits")
            Traceback (most recent call last):
            evefx.errors.OptionError: bits must be a whole number between 2 and 8 (got 99)
        """
        v = float(value)
        tol = 1e-6 * max(1.0, abs(self.low), abs(self.high))
        whole = "a whole number " if self.integer else ""
        bad = not (self.low - tol <= v <= self.high + tol) or (self.integer and abs(v - round(v)) > 1e-6)
        if bad:
            raise OptionError(f"{what} must be {whole}between {self.low:g} and {self.high:g} (got {value!r})")
        return self.clip(v)

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
        try:
            value = getattr(self, name)
        except AttributeError:
            raise UnknownNameError(
                f"{type(self).__name__} has no eve parameter {name!r}; it has {sorted(self.eve_ranges()) or 'none'}"
            ) from None
        if isinstance(value, torch.Tensor):
            return float(value.detach().float().mean()) if value.numel() != 1 else float(value.item())
        return float(value)

    def set_eve(self, name: str, value: float) -> None:
        """Set eve parameter ``name``; a value outside its range raises :class:`OptionError`."""
        if name not in self.eve_ranges():
            raise UnknownNameError(
                f"{type(self).__name__} has no eve parameter {name!r}; it has {sorted(self.eve_ranges()) or 'none'}"
            )
        value = self.eve_ranges()[name].check(value, f"{type(self).__name__}.{name}")
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
