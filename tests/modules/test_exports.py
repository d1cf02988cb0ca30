"""evefx.modules exports every public module class of its files, and they know nothing of specs."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

from torch import nn

import evefx.modules


def _submodules():
    return [importlib.import_module(f"evefx.modules.{m.name}") for m in pkgutil.iter_modules(evefx.modules.__path__)]


def test_every_public_module_class_is_exported():
    exported = [getattr(evefx.modules, name) for name in evefx.modules.__all__]
    for mod in _submodules():
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__:
                assert obj in exported, f"{mod.__name__}.{name} is missing from evefx.modules.__all__"


def test_modules_import_nothing_of_specs_passes_or_tracing():
    """Only evefx.errors and each other: a user can build them by hand and a saved model needs only them."""
    for path in Path(evefx.modules.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("evefx"):
                    assert name == "evefx.errors" or name.startswith("evefx.modules"), f"{path.name} imports {name}"
