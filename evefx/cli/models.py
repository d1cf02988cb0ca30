"""How the commands get a model: ``--model`` references, ``--model-kwargs`` and ``--input-shape``.

A ``package.module:attr`` reference whose package is a folder (or file) under the current
directory, as ``examples.models`` is in a checkout of evefx, is loaded from that file; ``sys.path``
is never edited.

Example:
    >>> load_model("examples.models:DemoNet", {"num_classes": 10})
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from evefx.errors import EvefxError
from evefx.spec import load_spec

__all__ = ["import_module", "load_model", "parse_kwargs", "parse_shape", "transform_model"]


def _local_package(name: str, folder: Path) -> ModuleType | None:
    """Load the top-level package or module ``name`` from ``folder`` (``folder/name/`` or
    ``folder/name.py``) and register it in ``sys.modules``; ``None`` when neither is there."""
    package, module = folder / name, folder / f"{name}.py"
    if package.is_dir():
        init = package / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(package)])
        else:  # a namespace package: its submodules are found through __path__
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(package)]
    elif module.is_file():
        spec = importlib.util.spec_from_file_location(name, module)
    else:
        return None
    assert spec is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # before running it, as the import system does (for its own imports)
    try:
        if spec.loader is not None:
            spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise
    return loaded


def import_module(name: str, folder: Path | None = None) -> ModuleType:
    """Import ``name`` (dotted), looking first in ``folder`` (default: the current directory) for its
    top-level package, then where Python looks. The package's own ``__path__`` finds its submodules.

    Example:
        >>> import_module("examples.demo").main
    """
    top = name.split(".")[0]
    if top not in sys.modules:
        _local_package(top, Path.cwd() if folder is None else folder)
    return importlib.import_module(name)


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs``: a JSON or YAML mapping of constructor arguments (``'{"num_classes": 10}'``)."""
    if text is None:
        return {}
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EvefxError(f"--model-kwargs must be a JSON/YAML mapping like '{{\"num_classes\": 10}}' (got {text!r}: {e})") from None
    if not isinstance(value, dict):
        raise EvefxError(f"--model-kwargs must be a JSON/YAML mapping like '{{\"num_classes\": 10}}' (got {text!r})")
    return value


def _build(ref: str, obj: Any, kwargs: dict[str, Any]) -> Any:
    """Call a class or factory with ``kwargs``, first checking that they bind (a clear error if not)."""
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as e:
        raise EvefxError(
            f"cannot build {ref}: {e}; pass its arguments as JSON with --model-kwargs '{{\"name\": value}}', "
            f"or point --model at a factory function that needs none"
        ) from None
    except ValueError:  # no signature (some builtins): let the call say it
        pass
    try:
        return obj(**kwargs)
    except Exception as e:
        raise EvefxError(f"building {ref}(**{kwargs}) failed: {type(e).__name__}: {e}") from e


def load_model(ref: str, kwargs: dict[str, Any] | None = None) -> Any:
    """``torchvision:resnet18`` (no weights) or ``package.module:attr`` (a class, factory or instance,
    from the current directory or an installed package), called with ``kwargs`` (``--model-kwargs``).

    Example:
        >>> load_model("examples.models:DemoNet", {"num_classes": 10})
    """
    import torch

    kwargs = dict(kwargs or {})
    if ":" not in ref:
        raise EvefxError(f"--model must look like 'package.module:attr' or 'torchvision:NAME' (got {ref!r})")
    mod_name, attr = ref.split(":", 1)
    if mod_name == "torchvision":
        import torchvision

        if not hasattr(torchvision.models, attr):
            raise EvefxError(f"torchvision has no model {attr!r}; see torchvision.models.list_models()")
        obj = getattr(torchvision.models, attr)
        kwargs.setdefault("weights", None)
    else:
        try:
            obj = getattr(import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise EvefxError(f"cannot load model {ref!r}: {e}") from e
    if isinstance(obj, torch.nn.Module):
        if kwargs:
            raise EvefxError(f"{ref!r} is a model instance; --model-kwargs only applies to a class or a factory")
        model = obj
    else:
        model = _build(ref, obj, kwargs) if callable(obj) else obj
    if not isinstance(model, torch.nn.Module):
        raise EvefxError(f"{ref!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 1,3,224,224`` as a tuple (``None`` when not given)."""
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise EvefxError(f"--input-shape must be comma-separated integers like 1,3,224,224 (got {text!r})") from None
    if not shape or min(shape) < 1:
        raise EvefxError(f"--input-shape sizes must be positive (got {text!r})")
    return shape


def transform_model(model: str, spec: Any, input_shape: str | None, model_kwargs: str | None = None,
                    example: Any = None):
    """The ``--model`` transformed with ``--spec`` (shapes from ``example`` inputs, else from
    ``--input-shape`` when given)."""
    import torch

    import evefx

    shape = parse_shape(input_shape)
    inputs = example if example is not None else (torch.zeros(shape) if shape else None)
    return evefx.transform(load_model(model, parse_kwargs(model_kwargs)), load_spec(spec), inputs)
