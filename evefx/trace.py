"""torch.fx tracing with evefx's rules, and shape propagation with clear errors.

Before tracing, attention is made traceable on the (copied) model: every ``nn.MultiheadAttention``
becomes a :class:`~evefx.modules.attention.DecomposedMultiheadAttention` (q/k/v/out ``nn.Linear``
layers that every pass can select) and ``nn.TransformerEncoder``/``nn.TransformerEncoderLayer`` their
reference-path subclasses, except inside modules the spec keeps opaque (``trace.leaf_modules``;
naming ``MultiheadAttention`` there keeps attention a float leaf).

Example:
    >>> gm = trace(model, TraceOptions(leaf_modules=("MyAttention",)))
    >>> propagate_shapes(gm, (torch.zeros(1, 3, 224, 224),))
"""
from __future__ import annotations

import copy
import fnmatch
import os
import traceback
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from evefx.errors import EvefxError, ShapeError, TraceError
from evefx.graph import LAYER_TYPES
from evefx.layers import eval_mode, runs_torch_forward
from evefx.modules.attention import (
    DecomposedMultiheadAttention,
    TraceableTransformerEncoder,
    TraceableTransformerEncoderLayer,
)
from evefx.plan import type_matches
from evefx.spec import TraceOptions, load_section

__all__ = ["EveTracer", "trace", "propagate_shapes", "decompose_attention"]

_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


class EveTracer(fx.Tracer):
    """A tracer that keeps evefx's own modules and the spec's ``trace.leaf_modules`` as leaves,
    and remembers which module it was tracing when something fails."""

    def __init__(self, leaf_modules: Sequence[str] = ()):
        super().__init__()
        self.leaf_patterns = tuple(leaf_modules)
        self._stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_user_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether the spec's ``trace.leaf_modules`` names this module (by glob or class)."""
        return any(fnmatch.fnmatchcase(module_qualified_name, pattern) or type_matches(m, pattern)
                   for pattern in self.leaf_patterns)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.is_user_leaf(m, module_qualified_name):
            return True
        if getattr(m, "evefx_trace_through", False):
            return False  # evefx's traceable attention: its Linear layers must be in the graph
        if type(m).__module__.startswith("evefx."):
            return True
        if type(m).__module__.split(".")[0] != "torch" and runs_torch_forward(m) and not any(m.children()):
            # a subclass of a torch.nn layer keeping its forward (torchvision's Conv3DSimple): a conv
            # to the passes, not the F.conv3d call fx would trace it into (composite layers are traced)
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


def _is_torch_leaf(m: nn.Module) -> bool:
    """What ``torch.fx.Tracer`` keeps opaque by default: ``torch.nn`` modules other than containers."""
    module = type(m).__module__
    return (module.startswith("torch.nn") or module.startswith("torch.ao.nn")) and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def decompose_attention(model: nn.Module, leaf_modules: Sequence[str] = ()) -> list[str]:
    """Make ``model``'s attention traceable, in place (pass a copy): every ``nn.MultiheadAttention``
    becomes a :class:`DecomposedMultiheadAttention` and every ``nn.TransformerEncoder(Layer)`` its
    reference-path subclass, except within modules that ``leaf_modules`` keeps opaque (there the
    original modules run, fast path included). ``add_bias_kv``/``add_zero_attn`` attention stays a
    float leaf. Returns the qualified names of what changed.

    Example:
        >>> decompose_attention(copy.deepcopy(encoder_net))
        ['encoder', 'encoder.layers.0', 'encoder.layers.0.self_attn', ...]
    """
    tracer = EveTracer(leaf_modules)
    changed: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if tracer.is_user_leaf(child, name):
                continue
            if type(child) is nn.MultiheadAttention:
                if child.bias_k is None and not child.add_zero_attn:
                    setattr(parent, child_name, DecomposedMultiheadAttention.from_float(child))
                    changed.append(name)
                continue
            if type(child) is nn.TransformerEncoderLayer:
                child.__class__ = TraceableTransformerEncoderLayer  # same state, forward without the fast path
                changed.append(name)
            elif type(child) is nn.TransformerEncoder:
                child.__class__ = TraceableTransformerEncoder
                changed.append(name)
            elif _is_torch_leaf(child) or type(child).__module__.startswith("evefx."):
                continue
            visit(child, name + ".")

    for cls, traceable in ((nn.TransformerEncoderLayer, TraceableTransformerEncoderLayer),
                           (nn.TransformerEncoder, TraceableTransformerEncoder)):
        if type(model) is cls:  # the root itself (its children are visited below)
            model.__class__ = traceable
            changed.append("")
    visit(model, "")
    return changed


def trace(model: nn.Module, options: TraceOptions | dict[str, Any] | None = None,
          cls: type[fx.GraphModule] = fx.GraphModule) -> fx.GraphModule:
    """Trace ``model`` (not copied: pass a copy) into a ``cls`` GraphModule, or raise :class:`TraceError`.

    ``options`` is a :class:`TraceOptions` or the dict a spec's ``trace:`` holds.

    Example:
        >>> gm = trace(copy.deepcopy(model), {"leaf_modules": ["MyAttention"]})
    """
    options = load_section(TraceOptions, options or {}, "trace")
    decompose_attention(model, options.leaf_modules)
    tracer = EveTracer(options.leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=options.concrete_args)
    except Exception as e:
        path = tracer.failed_in[-1] if tracer.failed_in else ("", type(model).__name__)
        where = f"module {path[0]!r} ({path[1]})" if path[0] else f"the top-level module ({path[1]})"
        line = _user_frame(e)
        if path[0]:
            hint = (f"add {path[1]!r} to trace.leaf_modules in the spec to keep it opaque, "
                    "or fix the data-dependent input with trace.concrete_args.")
        else:
            # the root is traced through whatever leaf_modules says: naming it there cannot help
            hint = (f"the top-level module cannot be a leaf (evefx must see its layers): move the untraceable "
                    f"code of {path[1]}.forward into a submodule and add that class to trace.leaf_modules, "
                    "or fix the data-dependent input with trace.concrete_args.")
        raise TraceError(
            f"torch.fx cannot trace {where}: {type(e).__name__}: {e}\n"
            + (f"  at {line}\n" if line else "")
            + f"  hint: {hint}"
        ) from e
    gm = cls(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    # conv/linear layers fx traced into (a subclass overriding forward): the plan names them in a warning
    # (a layer inside a called module, a leaf kept opaque, is meant: one of its parents is called)
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    gm.meta["evefx_traced_into"] = {
        name: type(m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)
        and not any(".".join(name.split(".")[:i]) in called for i in range(1, name.count(".") + 2))}
    return gm


_SPATIAL = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def shape_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return type(value).__name__


def _expected_input(module: nn.Module) -> str | None:
    """What ``module`` takes, as a shape pattern (``(N, 1, H, W)``), when evefx knows it."""
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        return f"(N, {module.in_channels}, {', '.join(_SPATIAL.get(dims, ('*',) * dims))})"
    if isinstance(module, nn.Linear):
        return f"(..., {module.in_features})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"(N, {module.num_features}, ...)"
    return None


class _ShapeRecorder(ShapeProp):
    """ShapeProp that fails with one :class:`ShapeError` line (the layer, the shape it got, the shape
    it expects) instead of printing a traceback and dumping ``node.meta``."""

    hint: str = ""
    """What the error tells the user to do (set by :func:`propagate_shapes`)."""
    record: bool = True
    """Store each node's shape in ``node.meta`` (False: only find the failing layer)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except EvefxError:
            raise  # a module's own error (a quantizer meeting NaN) already names the layer
        except Exception as e:
            args, _ = self.fetch_args_kwargs_from_env(n)
            got = ", ".join(shape_text(a) for a in args if isinstance(a, torch.Tensor)) or "no tensor"
            if n.op == "call_module":
                module = self.module.get_submodule(str(n.target))
                where = f"layer {n.target} ({type(module).__name__})"
                expected = _expected_input(module)
            else:
                where = f"node {n.name} ({getattr(n.target, '__name__', n.target)})"
                expected = None
            if expected is not None:
                detail = f"{where} got an input of shape {got} but expects {expected}"
            else:
                first = (str(e).strip().splitlines() or [""])[0]
                detail = f"{where} fails on inputs of shape {got}: {type(e).__name__}: {first}"
            raise ShapeError(f"{detail}; {self.hint}") from e
        if not self.record:
            return result
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        tm = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tm
        n.meta["type"] = type(result)
        return result


def _check_input_count(gm: fx.GraphModule, given: int, what: str, fix: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with a default have args
    if not (len(required) <= given <= len(placeholders)):
        count = f"{len(required)}" if len(required) == len(placeholders) else f"{len(required)} to {len(placeholders)}"
        raise ShapeError(f"the model takes {count} input{'s' if len(placeholders) != 1 else ''} "
                         f"({', '.join(n.name for n in placeholders)}), got {given} {what}; {fix}")


def explain_failure(gm: fx.GraphModule, inputs: Sequence[Any], hint: str) -> None:
    """Raise the :class:`ShapeError` line that names the layer where ``inputs`` fail in ``gm``
    (the layer, the shape it got and the one it expects, then ``hint``); return when they run. It
    runs on a copy in eval mode: the model's statistics and observers stay as they were.

    Example:
        >>> explain_failure(gm, (torch.zeros(2, 3, 28, 28),), "give batches of the traced shape")
        ShapeError: layer features.0 (Conv2d) got an input of shape (2, 3, 28, 28) but expects (N, 1, H, W); give ...
    """
    _check_input_count(gm, len(inputs), "inputs in a batch", "give batches of one tensor per argument of forward "
                       "(labels are dropped only when the batch is (inputs..., labels))")
    twin = copy.deepcopy(gm)
    recorder = _ShapeRecorder(twin)
    recorder.extra_traceback, recorder.record, recorder.hint = False, False, hint
    with eval_mode(twin), torch.no_grad():
        recorder.run(*inputs)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` once (eval mode, no grad) to store shapes in ``node.meta['tensor_meta']``.

    Module training flags are restored and no statistic is updated; a mismatch raises :class:`ShapeError`.
    """
    _check_input_count(gm, len(example_inputs), "example inputs", "give one example input per argument of forward")
    shapes = ", ".join(shape_text(x) for x in example_inputs)
    recorder = _ShapeRecorder(gm)
    recorder.extra_traceback = False  # fx.Interpreter would append the node's text and "Original traceback"
    recorder.hint = (f"example inputs {shapes} do not fit the model: give inputs of the shape it takes "
                     "(example_inputs, trace.input_shape, --input-shape)")
    with eval_mode(gm), torch.no_grad():
        recorder.propagate(*example_inputs)
