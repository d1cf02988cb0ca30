"""The errors a user can cause. Every one is an :class:`EvefxError`.

Messages name the spec path, the layer and what to do; the original exception is
chained (``raise ... from e``). This module imports no torch.
"""
from __future__ import annotations

__all__ = [
    "EvefxError",
    "SpecError",
    "TraceError",
    "ShapeError",
    "PlanError",
    "PassError",
    "ExportError",
    "PruneError",
    "QuantizationError",
    "SearchError",
    "OptionError",
    "UnknownNameError",
    "EvefxWarning",
]


class EvefxError(Exception):
    """Base class of every error evefx raises because of its input.

    Example:
        >>> try:
        ...     evefx.load_spec("passes: [{kind: nope}]")
        ... except evefx.EvefxError as err:
        ...     print(err)
    """


class SpecError(EvefxError, ValueError):
    """A spec failed validation. ``errors`` holds ``(path, message)`` pairs.

    ``str(err)`` lists one problem a line, as ``passes[1].weight.bits: must be
    between 1 and 16 (got 0)``, prefixed by the file name when loaded from a file.
    """

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        super().__init__(self._render())

    @staticmethod
    def format_path(path: tuple[str | int, ...]) -> str:
        out = ""
        for part in path:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += f".{part}" if out else str(part)
        return out or "<spec>"

    def _render(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        lines = [f"{prefix}{self.format_path(p)}: {m}" for p, m in self.errors]
        head = f"invalid evefx spec ({len(lines)} problem{'s' if len(lines) != 1 else ''})"
        return "\n".join([head, *lines])


class TraceError(EvefxError):
    """torch.fx could not trace the model. The message names the module and the source line."""


class ShapeError(EvefxError, ValueError):
    """Example inputs do not fit the model (wrong count or shape)."""


class PlanError(EvefxError):
    """A selector or override matched no layer, or matched a layer it cannot apply to."""


class PassError(EvefxError):
    """A pass failed while editing the graph. Names the pass, the node and the spec path."""


class QuantizationError(EvefxError, FloatingPointError):
    """A quantizer met NaN/Inf or an impossible configuration. Names the layer."""


class PruneError(EvefxError, ValueError):
    """Pruning cannot be done safely (unknown channel coupling, empty layer). Names the node."""


class ExportError(EvefxError):
    """ONNX export failed or the exported file disagrees with the PyTorch module."""


class SearchError(EvefxError):
    """The upgrade search was misconfigured or its run folder is unusable."""


class OptionError(EvefxError, ValueError):
    """An argument of an evefx function or module is out of its range or not one of its choices.

    The message names the argument, the valid values and the value given. It is a ``ValueError``
    too, so code written against the builtin keeps working.

    Example:
        >>> evefx.set_mode(gm, step="x")
        Traceback (most recent call last):
        evefx.errors.OptionError: set_mode(step='x'): step must be 'single' or 'multi'
    """


class UnknownNameError(EvefxError, KeyError):
    """A name (eve parameter, layer, class) that does not exist; the message lists the close matches.

    A ``KeyError`` too, but ``str(err)`` is the plain message (a bare ``KeyError`` would quote it).

    Example:
        >>> evefx.set_eve_parameter(gm, "nosuch", 4)
        Traceback (most recent call last):
        evefx.errors.UnknownNameError: no eve parameter 'nosuch'; known: features.0.weight_quantizer.bits, ...
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EvefxWarning(UserWarning):
    """Something evefx accepted but assumed for you (a spec without ``schema_version``, an export of
    pruners that never pruned). Turn it into an error with ``warnings.simplefilter("error", EvefxWarning)``."""
