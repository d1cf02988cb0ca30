"""evefx: a declarative graph compiler for PyTorch models.

``evefx.transform(model, spec)`` traces a plain ``nn.Module`` with torch.fx and lets the spec's
passes insert spiking neurons, quantizers or pruners. Importing ``evefx`` is light: torch is
imported only when a name that needs it is first used (so ``evefx validate`` stays instant).

Example:
    >>> import evefx
    >>> gm = evefx.transform(model, "examples/specs/demo.yaml", torch.zeros(1, 1, 28, 28))
    >>> evefx.set_mode(gm, quantized=False)
"""
from __future__ import annotations

import importlib
from typing import Any

from evefx import errors as _errors
from evefx.errors import *  # noqa: F403 - every error class, as listed in evefx.errors.__all__
from evefx.spec import Spec, dump_spec, load_spec

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562)
_LAZY = {
    "transform": "evefx.pipeline",
    "EveModule": "evefx.pipeline",
    "TransformReport": "evefx.report",
    "eve_parameters": "evefx.api",
    "set_eve_parameter": "evefx.api",
    "observe": "evefx.api",
    "reset": "evefx.api",
    "set_mode": "evefx.api",
    "never_pruned": "evefx.api",
    "EveParameter": "evefx.api",
    "Observations": "evefx.api",
    "prune_step": "evefx.channels",
    "compact": "evefx.channels",
    "compact_report": "evefx.channels",
    "export_onnx": "evefx.export",
    "export_nir": "evefx.export.nir",
    "import_nir": "evefx.export.nir",
    "calibrate": "evefx.ptq",
    "CalibrationReport": "evefx.ptq",
    "post_training_quantize": "evefx.ptq",
    "reestimate_bn": "evefx.ptq",
    "PTQReport": "evefx.ptq",
    "sensitivity": "evefx.ptq",
    "SensitivityReport": "evefx.ptq",
}

__all__ = [
    "__version__",
    "Spec",
    "load_spec",
    "dump_spec",
    *_errors.__all__,
    *_LAZY,
]


# submodules reachable as attributes after a plain ``import evefx`` (``evefx.data.loaders()``)
_SUBMODULES = ("data", "train", "upgrade", "export")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"evefx.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evefx' has no attribute {name!r}")
