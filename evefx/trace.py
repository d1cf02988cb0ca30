"""torch.fx tracing with evefx's rules, and shape propagation with clear errors.

Example:
    >>> gm = trace(model, TraceOptions(leaf_modules=("MyAttention",)))
    >>> propagate_shapes(gm, (torch.zeros(1, 3, 224, 224),))
"""
from __future__ import annotations

import fnmatch
import os
import traceback
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from evefx.errors import ShapeError, TraceError
from evefx.plan import type_matches
from evefx.spec import TraceOptions, load_section

__all__ = ["EveTracer", "trace", "propagate_shapes"]

_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


class EveTracer(fx.Tracer):
    """A tracer that keeps evefx's own modules and the spec's ``trace.leaf_modules`` as leaves,
    and remembers which module it was tracing when something fails."""

    def __init__(self, leaf_modules: Sequence[str] = ()):
        super().__init__()
        self.leaf_patterns = tuple(leaf_modules)
        self._stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__module__.startswith("evefx."):
            return True
        for pattern in self.leaf_patterns:
            if fnmatch.fnmatchcase(module_qualified_name, pattern) or type_matches(m, pattern):
                return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self._stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self._stack)
            raise
        finally:
            self._stack.pop()


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame in the user's code (not torch, not evefx)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_LIBRARY_DIRS)]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def trace(model: nn.Module, options: TraceOptions | dict[str, Any] | None = None,
          cls: type[fx.GraphModule] = fx.GraphModule) -> fx.GraphModule:
    """Trace ``model`` (not copied: pass a copy) into a ``cls`` GraphModule, or raise :class:`TraceError`.

    ``options`` is a :class:`TraceOptions` or the dict a spec's ``trace:`` holds.

    Example:
        >>> gm = trace(copy.deepcopy(model), {"leaf_modules": ["MyAttention"]})
    """
    options = load_section(TraceOptions, options or {}, "trace")
    tracer = EveTracer(options.leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=options.concrete_args)
    except Exception as e:
        path = tracer.failed_in[-1] if tracer.failed_in else ("", type(model).__name__)
        where = f"module {path[0]!r} ({path[1]})" if path[0] else f"the top-level module ({path[1]})"
        line = _user_frame(e)
        raise TraceError(
            f"torch.fx cannot trace {where}: {type(e).__name__}: {e}\n"
            + (f"  at {line}\n" if line else "")
            + f"  hint: add {path[1]!r} to trace.leaf_modules in the spec to keep it opaque, "
            "or fix the data-dependent input with trace.concrete_args."
        ) from e
    gm = cls(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` once (eval mode, no grad) to store shapes in ``node.meta['tensor_meta']``.

    Module training flags are restored and no statistic is updated; a mismatch raises :class:`ShapeError`.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with a default have args
    if not (len(required) <= len(example_inputs) <= len(placeholders)):
        raise ShapeError(
            f"the model takes {len(required)} to {len(placeholders)} inputs "
            f"({', '.join(n.name for n in placeholders)}), got {len(example_inputs)} example inputs"
        )
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        cause = e.__cause__ or e
        raise ShapeError(
            f"example inputs of shape {shapes} do not fit the model: {str(e).splitlines()[0]}\n"
            f"  {type(cause).__name__}: {cause}\n  hint: check trace.input_shape / example_inputs"
        ) from e
    finally:
        for m, mode in modes:
            m.training = mode
