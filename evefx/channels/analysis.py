"""The channel dependencies of a traced model, found by interpreting its graph on channel ids.

:class:`ChannelAnalysis` is a ``torch.fx.Interpreter`` (as ``ShapeProp`` is) whose values are
:class:`~evefx.channels.rules.ChannelMap` s instead of tensors: an input or a conv/linear output
gets fresh ids, and every other call asks its rule (:mod:`evefx.channels.rules`) what the output's
ids are. Two tensors meeting in an element-wise op (a residual ``+``, an attention ``*``) have
their ids merged with a union-find, so the channels they join become one *channel class* that is
kept or removed as a whole. The bipartite graph layers <-> classes (networkx) gives the coupled
groups: a ResNet stage's residual stream is one group; DenseNet-style concatenation keeps each
producer's classes apart.

A channel map covers the whole tensor, batch axis included, so the channel axis is wherever the
op put it: axis 1 after a conv, the last axis after a Linear, the heads axis inside attention (see
:mod:`~evefx.channels.layout_rules` and :mod:`~evefx.channels.attention_rules`). A consumer reads
its axis with :meth:`ChannelAnalysis.per_channel`, which requires the classes not to vary along
the others; that is what keeps every choice of classes removable by slicing.

When a class cannot be removed safely it is *frozen* (never pruned), with the reason kept for
reports: it reaches the model's output or an input, it is split by a reshape (channel shuffle) or a
channel slice/chunk, a LayerNorm normalises it, a parameter outside a layer joins it, it runs through a grouped conv with more outputs than inputs (or the reverse)
or a transposed conv, or a consumer reads it as data rather than as the pruner's zero. A masked
channel that a BatchNorm or a sigmoid turns into a constant is still removable when its consumer is
a linear layer or an unpadded conv (``compact`` folds the constant into that consumer's bias).

Example:
    >>> dg = analyze(evefx.transform(resnet, "prune.yaml", torch.zeros(1, 3, 64, 64)))
    >>> [g.layers for g in dg.groups() if len(g.layers) > 1][0]
    ('conv1', 'layer1.0.conv2', 'layer1.1.conv2')
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from evefx.channels import rules as rules_module
from evefx.channels.depgraph import (ChannelGroup, ConsumerSite, DependencyGraph, ReshapeSite, Site, UnionFind, can_fold,
                                     layer_name, pruners_of)
from evefx.channels.rules import ChannelMap, OpCall, RuleRegistry, qualified_name
from evefx.errors import EvefxError, PruneError
from evefx.graph import describe_node, module_of
from evefx.layers import as_inputs, shape_of
from evefx.modules.prune import ChannelPruner
from evefx.trace import propagate_shapes

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "ConsumerSite",
    "DependencyGraph",
    "ReshapeSite",
    "Site",
    "analyze",
    "can_fold",
    "layer_name",
    "pruners_of",
    "shape_of",
    "UnionFind",
]

_NEEDS_SHAPES = ("pruning needs shapes: pass example_inputs to evefx.transform / prune_step / compact, "
                 "or set trace.input_shape in the spec")


class ChannelAnalysis(fx.Interpreter):
    """Runs ``gm``'s graph on channel ids and fills a :class:`DependencyGraph`.

    The public methods are the vocabulary of channel rules (:mod:`evefx.channels.rules`); each
    acts on the node being run.

    Example:
        >>> dg = ChannelAnalysis(gm).analyze()
    """

    def __init__(self, gm: fx.GraphModule, rules: RuleRegistry | None = None):
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the node already
        self.gm = gm
        self.rules = rules if rules is not None else rules_module.DEFAULT_RULES
        self.dg = DependencyGraph(gm, UnionFind())
        self.node: fx.Node | None = None
        self.granularity: dict[int, str] = {}  # class root -> the granularity its pruner asks for
        self.constants: set[int] = set()  # ids of parameters and buffers read with get_attr

    def analyze(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            # a placeholder with a default and no recorded tensor is an option (scale: float = 1.0)
            if node.op == "placeholder" and node.users and "tensor_meta" not in node.meta and not node.args:
                raise PruneError(f"input {node.name!r} of {type(self.gm).__name__} has no shape information; {_NEEDS_SHAPES}")
        self.run(enable_io_processing=False)
        return self.dg

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        try:
            return super().run_node(n)
        except EvefxError:
            raise
        except Exception as e:
            raise PruneError(f"channel analysis failed at {describe_node(self.gm, n)}: {e}") from e

    # -- the node kinds -----------------------------------------------------------------------------
    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ChannelMap | None:
        shape = shape_of(self.current)
        if shape is None:
            return None
        return self.fresh(shape[1] if len(shape) > 1 else 1, "model input")

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ChannelMap | None:
        value = self.fetch_attr(str(target))
        if not isinstance(value, torch.Tensor):
            return None
        # a parameter outside a layer (class token, positional embedding, layer scale): compaction does
        # not slice it, so it is one frozen class; an op joining it to a stream freezes that stream
        return self._constant(tuple(value.shape), f"parameter or constant {target} (compaction does not slice it)")

    def _constant(self, shape: tuple[int, ...], why: str) -> ChannelMap:
        """Frozen ids for a constant tensor: one per index of its last axis longer than one (a class
        token's or a layer scale's channels), so that joining it to a stream keeps the stream's channels
        apart in the reports; never one per element (weights handed to a function can be large)."""
        axis = max((a for a, n in enumerate(shape) if n > 1), default=None)
        ids = self.new_ids(shape[axis] if axis is not None else 1)
        self.freeze(ids, why)
        self.constants.update(ids.tolist())
        view = tuple(len(ids) if a == axis else 1 for a in range(len(shape)))
        return ChannelMap(np.broadcast_to(ids.reshape(view), shape), np.broadcast_to(np.int8(0), shape))

    def _is_constant(self, value: Any) -> bool:
        if isinstance(value, ChannelMap):
            return bool(self.constants) and bool(np.isin(value.ids, list(self.constants)).all())
        return True

    def output(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for a in self.current.all_input_nodes:
            self._freeze_value(self.env.get(a), "model output")
        return None

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = OpCall(self.current, module_of(self.gm, self.current), args, kwargs)
        if call.input is None and shape_of(self.current) is None:
            return None  # not a tensor evefx follows
        return self._apply(call)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._call_op(OpCall(self.current, target, args, kwargs))

    def call_method(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._call_op(OpCall(self.current, str(target), args, kwargs))

    def _call_op(self, call: OpCall) -> Any:
        node = call.node
        if call.target is operator.getitem and isinstance(node.args[0], fx.Node) and not isinstance(call.args[0], ChannelMap):
            src = call.args[0]  # one part of a split (a Python list), or nothing evefx follows
            return src[call.args[1]] if isinstance(src, (list, tuple)) else None
        if not any(isinstance(self.env.get(a), ChannelMap) for a in node.all_input_nodes):
            if shape_of(node) is not None and node.all_input_nodes:
                # a tensor made from non-tensors only (torch.zeros(size)): it carries no channel yet
                shape = self.out_shape()
                return self.fresh(shape[1] if len(shape) > 1 else 1, f"tensor created by {node.name}")
            return None
        inputs = [self.env.get(a) for a in node.all_input_nodes]
        try:
            return self._apply(call)
        except PruneError:
            meta = node.meta.get("tensor_meta")
            if not (all(self._is_constant(v) for v in inputs) and hasattr(meta, "shape")):
                raise
            # an op on parameters and buffers only that no rule follows (a relative position bias
            # gathered from its table with an index buffer): its result is another constant
            return self._constant(tuple(int(d) for d in meta.shape), f"constant computed by {node.name}")

    def _apply(self, call: OpCall) -> Any:
        rule = self.rules.lookup(call.node.op, call.target)
        if rule is None:
            raise self.unknown_op(call)
        return rule(self, call)

    def _freeze_value(self, value: Any, why: str) -> None:
        if isinstance(value, ChannelMap):
            self.freeze(value.ids, why)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._freeze_value(v, why)

    # -- the vocabulary of rules --------------------------------------------------------------------
    @property
    def current(self) -> fx.Node:
        """The node being run."""
        assert self.node is not None
        return self.node

    def error(self, why: str) -> PruneError:
        """A :class:`PruneError` naming the current node and what the user can do."""
        return PruneError(f"cannot prune through {describe_node(self.gm, self.current)}: {why}. {self._way_out(self.current)}")

    def _way_out(self, node: fx.Node) -> str:
        feeding = feeding_layers(self.gm, node)
        example = f" (e.g. select: {{exclude: {feeding}}})" if feeding else ""
        return (f"Add the layers feeding it to the prune section's select.exclude{example}, or keep that part opaque "
                f"with trace.leaf_modules.")

    def unknown_op(self, call: OpCall) -> PruneError:
        """The error for an op without a rule: it names the node, the rule to register and ``select.exclude``."""
        if call.node.op == "call_module":
            cls = type(call.target)
            name, spelled = cls.__name__, f"{cls.__module__}.{cls.__qualname__}"
        elif call.node.op == "call_method":
            name, spelled = str(call.target), repr(call.target)
        else:
            name = getattr(call.target, "__name__", str(call.target))
            spelled = qualified_name(call.target)
        return PruneError(
            f"cannot prune through {describe_node(self.gm, call.node)}: evefx does not know how {name} maps "
            f"channels. Register a rule for it, e.g. evefx.channels.register_rule({spelled}, "
            f"evefx.channels.rules.elementwise) if output channel c is input channel c and 0 stays 0 (see "
            f"evefx.channels.rules for the others). {self._way_out(call.node)}"
        )

    def input(self, call: OpCall, why: str | None = None) -> ChannelMap:
        """The call's first argument as a channel map, or an error."""
        x = call.input
        if x is None:
            default = "its input carries no channel information" if call.node.op == "call_module" else \
                "its first argument is not a tensor evefx follows"
            raise self.error(why or default)
        return x

    def shape_of(self, node: fx.Node) -> tuple[int, ...] | None:
        return shape_of(node)

    def out_shape(self) -> tuple[int, ...]:
        """The current node's output shape (an error when shapes were not propagated)."""
        shape = shape_of(self.current)
        if shape is None:
            raise PruneError(f"{describe_node(self.gm, self.current)} has no shape information; {_NEEDS_SHAPES}")
        return shape

    def freeze(self, ids: np.ndarray, why: str) -> None:
        """Never prune the classes of ``ids``; ``why`` goes into the reports."""
        for i in np.unique(self.roots(ids)).tolist():
            self.dg.frozen.setdefault(i, why)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """The class (root id) of every id in ``ids``."""
        return self.dg.uf.roots(ids)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the classes of ``a`` and ``b`` element by element (broadcast)."""
        a, b = np.broadcast_arrays(self.roots(a), self.roots(b))
        differ = a != b
        if not differ.any():
            return
        for x, y in np.unique(np.stack([a[differ], b[differ]], axis=1), axis=0).tolist():
            self.dg.uf.union(x, y)

    def new_ids(self, n: int) -> np.ndarray:
        """``n`` fresh channel ids (one class each)."""
        return self.dg.uf.fresh(n)

    def fresh(self, channels: int, frozen: str | None = None, axis: int = 1) -> ChannelMap:
        """New ids for the current node's output: ``channels`` on ``axis``, constant along the others."""
        shape = self.out_shape()
        ids = self.new_ids(channels)
        if frozen:
            self.freeze(ids, frozen)
        if not shape:
            return ChannelMap(ids[0:1].reshape(()), np.zeros((), dtype=np.int8))
        return self.broadcast_channels(ids, np.zeros(channels, dtype=np.int8), axis)

    def varying_axes(self, x: ChannelMap) -> list[int]:
        """The axes along which the classes of ``x`` change (a conv output: ``[1]``; attention
        queries split into heads: the head or the head-dim axis)."""
        roots = self.roots(x.ids)
        return [a for a in range(roots.ndim) if roots.shape[a] > 1 and not (roots == roots.take([0], axis=a)).all()]

    def per_channel(self, x: ChannelMap, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Class ids and masked values per index of ``axis`` (1 for a conv, -1 for a Linear's features);
        the classes must not vary along the other axes (frozen ones may: they are never removed)."""
        if x.ids.ndim < 2:
            raise self.error(f"expected a tensor with a channel axis, got rank {x.ids.ndim}")
        axis %= x.ids.ndim
        n = x.ids.shape[axis]
        roots = np.moveaxis(self.roots(x.ids), axis, 0).reshape(n, -1)
        varying = roots != roots[:, :1]
        if varying.any():
            frozen = {self.dg.uf.find(i) for i in self.dg.frozen}
            if not set(np.unique(roots[varying.any(axis=1)]).tolist()) <= frozen:
                raise self.error(f"its channels on axis {axis} are mixed with other axes in a way evefx cannot follow")
        masked = np.moveaxis(np.broadcast_to(x.masked, x.ids.shape), axis, 0).reshape(n, -1)
        return roots[:, 0].copy(), (masked.min(axis=1) if masked.size else np.zeros(n, np.int8))

    def broadcast_channels(self, ids: np.ndarray, masked: np.ndarray, axis: int = 1) -> ChannelMap:
        """A map for the current node's output whose ``axis`` holds ``ids`` (a per-channel op)."""
        shape = self.out_shape()
        axis %= max(len(shape), 1)
        if not shape or shape[axis] != len(ids):
            raise self.error(f"its output {shape} does not keep the {len(ids)} input channels on axis {axis}")
        view = tuple(len(ids) if a == axis else 1 for a in range(len(shape)))
        return ChannelMap(np.broadcast_to(ids.reshape(view), shape), np.broadcast_to(np.asarray(masked).reshape(view), shape))

    def add_producer(self, module: nn.Module, ids: np.ndarray) -> None:
        """The current node makes the channels ``ids`` (compaction slices its outputs)."""
        self.dg.producers.append(Site(self.current, module, ids))

    def add_consumer(self, module: nn.Module, ids: np.ndarray, masked: np.ndarray) -> None:
        """The current node reads ``ids`` (compaction slices its inputs; a constant goes into its bias)."""
        self.dg.consumers.append(ConsumerSite(self.current, module, ids, np.asarray(masked)))

    def add_passthrough(self, module: nn.Module, ids: np.ndarray) -> None:
        """A depthwise or grouped conv whose output channel c is its input channel c."""
        self.dg.depthwise.append(Site(self.current, module, ids))

    def add_norm(self, module: nn.Module, ids: np.ndarray) -> None:
        self.dg.norms.append(Site(self.current, module, ids))

    def add_pruner(self, module: ChannelPruner, ids: np.ndarray) -> None:
        self.dg.pruners.append(Site(self.current, module, ids))
        for i in ids.tolist():
            self.granularity.setdefault(i, getattr(module, "granularity", "channel"))

    def granularity_of(self, ids: np.ndarray) -> str | None:
        """The prune granularity (``channel``/``head``) of the pruners that mask ``ids``, if any."""
        by_root = {self.dg.uf.find(i): g for i, g in self.granularity.items()}
        found = {by_root[i] for i in np.unique(self.roots(ids)).tolist() if i in by_root}
        if len(found) > 1:
            raise self.error("it splits channels whose pruners ask for different granularities (channel and head)")
        return found.pop() if found else None

    def add_reshape(self, ids: np.ndarray) -> None:
        """The current ``view``/``reshape``/``unflatten`` has literal sizes compaction may rewrite;
        ``ids`` of its whole output."""
        self.dg.reshapes.append(ReshapeSite(self.current, np.ascontiguousarray(ids)))


def feeding_layers(gm: fx.GraphModule, node: fx.Node, limit: int = 3) -> list[str]:
    """The nearest conv/Linear layers upstream of ``node`` (qualified names, at most ``limit``), for error messages."""
    found: list[str] = []
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo and len(found) < limit:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        m = module_of(gm, n) if n.op == "call_module" else None
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            found.append(str(n.target))
        else:
            todo.extend(n.all_input_nodes)
    return found


def ensure_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Propagate shapes through ``gm`` when example inputs are given."""
    if example_inputs is None:
        return
    propagate_shapes(gm, as_inputs(example_inputs))


def analyze(gm: fx.GraphModule, example_inputs: Any = None, *, rules: RuleRegistry | None = None) -> DependencyGraph:
    """Follow every channel of ``gm`` (see the module docstring) and return the dependencies.

    ``gm`` needs shapes in ``node.meta["tensor_meta"]`` (``evefx.transform`` with example inputs
    stores them), or pass ``example_inputs``. ``rules`` defaults to
    :data:`~evefx.channels.rules.DEFAULT_RULES`.

    Example:
        >>> gm = torch.fx.symbolic_trace(resnet); analyze(gm, torch.zeros(1, 3, 64, 64)).groups()[0]
        ChannelGroup(layers=('conv1', 'layer1.0.conv2', 'layer1.1.conv2'), channels=64, ...)
    """
    ensure_shapes(gm, example_inputs)
    dg = ChannelAnalysis(gm, rules).analyze()
    dg.freeze_unsafe_reads()
    return dg
