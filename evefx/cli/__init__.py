"""The ``evefx`` command: a thin face over the library. Nothing in evefx imports this package.

* :mod:`evefx.cli.app`: the Typer app, consoles, one-line errors;
* :mod:`evefx.cli.models`: ``--model`` references (loaded from the current folder without editing
  ``sys.path``), ``--model-kwargs``, ``--input-shape``;
* :mod:`evefx.cli.graph`: ``validate``, ``schema`` (no torch), ``transform``, ``inspect``, ``export``;
* :mod:`evefx.cli.search`: ``search``, ``demo``;
* :mod:`evefx.cli.ptq`: ``quantize``, ``sensitivity``.

Example:
    $ evefx validate examples/specs/*.yaml
    $ evefx transform --model torchvision:resnet18 --spec examples/specs/w8a8.yaml --input-shape 1,3,224,224
"""
from __future__ import annotations

from evefx.cli import graph, ptq, search  # noqa: F401 - importing them registers their commands on app
from evefx.cli.app import app

__all__ = ["app"]
