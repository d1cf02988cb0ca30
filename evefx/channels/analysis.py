"""The channel dependencies of a traced model, found by interpreting its graph on channel ids.

:class:`ChannelAnalysis` is a ``torch.fx.Interpreter`` (as ``ShapeProp`` is) whose values are
:class:`~evefx.channels.rules.ChannelMap` s instead of tensors: an input or a conv/linear output
gets fresh ids, and every other call asks its rule (:mod:`evefx.channels.rules`) what the output's
ids are. Two tensors meeting in an element-wise op (a residual ``+``, an attention ``*``) have
their ids merged with a union-find, so the channels they join become one *channel class* that is
kept or removed as a whole. The bipartite graph layers <-> classes (networkx) gives the coupled
groups: a ResNet stage's residual stream is one group; DenseNet-style concatenation keeps each
producer's classes apart.

When a class cannot be removed safely it is *frozen* (never pruned), with the reason kept for
reports: it reaches the model's output or an input, it is split by a reshape (channel shuffle) or a
channel slice/chunk, it runs through a grouped conv with more outputs than inputs (or the reverse)
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
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from evefx.channels import rules as rules_module
from evefx.channels.rules import ChannelMap, MaskedValue, OpCall, RuleRegistry, qualified_name
from evefx.errors import EvefxError, PruneError
from evefx.graph import describe_node, module_of
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
    "layer_name",
    "pruners_of",
]

_NEEDS_SHAPES = ("pruning needs shapes: pass example_inputs to evefx.transform / prune_step / compact, "
                 "or set trace.input_shape in the spec")


class UnionFind:
    """Channel ids and the classes they were merged into (the root of a class is its smallest id)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(i)) for i in np.asarray(ids).reshape(-1)], dtype=np.int64).reshape(np.shape(ids))


@dataclass(frozen=True)
class Site:
    """A layer whose channels compaction slices: ``ids`` per channel (output channels of a
    producer or pruner, the channels of a depthwise conv or a norm)."""

    node: fx.Node
    module: nn.Module
    ids: np.ndarray


@dataclass(frozen=True)
class ConsumerSite(Site):
    """A layer reading channels (``ids`` per input channel or feature) and, per input, the
    :class:`~evefx.channels.rules.MaskedValue` a masked channel has there."""

    masked: np.ndarray


@dataclass(frozen=True)
class ReshapeSite:
    """A ``view``/``reshape`` whose literal channel size compaction rewrites; ``ids`` of its output."""

    node: fx.Node
    ids: np.ndarray


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose channels are coupled (one shared mask), as found by :func:`analyze`.

    ``layers`` are the qualified names of the conv/linear layers producing the group's channels
    (depthwise convs included); ``channels`` the number of channel classes; ``prunable`` how many
    of them may be removed; ``frozen`` the reasons the others may not.

    Example:
        >>> analyze(gm).groups()[0]
        ChannelGroup(layers=('stem.0', 'b1.1', 'b2.1'), channels=8, prunable=8, frozen=())
    """

    layers: tuple[str, ...]
    channels: int
    prunable: int
    frozen: tuple[str, ...] = ()


@dataclass
class DependencyGraph:
    """The channel dependencies of a traced model (see the module docstring). Built by :func:`analyze`.

    Example:
        >>> dg = analyze(gm)
        >>> [g.layers for g in dg.groups() if len(g.layers) > 1]
        [('conv1', 'layer1.0.conv2', 'layer1.1.conv2'), ...]
    """

    gm: fx.GraphModule
    uf: UnionFind
    producers: list[Site] = field(default_factory=list)
    consumers: list[ConsumerSite] = field(default_factory=list)
    depthwise: list[Site] = field(default_factory=list)
    norms: list[Site] = field(default_factory=list)
    pruners: list[Site] = field(default_factory=list)
    reshapes: list[ReshapeSite] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)

    def root(self, ids: np.ndarray) -> np.ndarray:
        return self.uf.roots(ids)

    def frozen_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for i, why in self.frozen.items():
            out.setdefault(self.uf.find(i), why)
        return out

    def layer_graph(self) -> nx.Graph:
        """Bipartite graph: ``("layer", name)`` -- ``("class", root)`` for every producer, depthwise conv and pruner."""
        g = nx.Graph()
        for kind, sites in (("producer", self.producers), ("depthwise", self.depthwise), ("pruner", self.pruners)):
            for site in sites:
                name = layer_name(site.node)
                g.add_node(("layer", name), kind=kind)
                for r in set(self.root(site.ids).tolist()):
                    g.add_edge(("layer", name), ("class", r))
        return g

    def groups(self) -> list[ChannelGroup]:
        """Coupled groups of producer layers, in graph order of their first layer."""
        g = self.layer_graph()
        frozen = self.frozen_roots()
        pruned_by = {r for s in self.pruners for r in self.root(s.ids).tolist()}
        order = {layer_name(s.node): i for i, s in enumerate(self.producers + self.depthwise)}
        out = []
        for comp in nx.connected_components(g):
            layers = sorted((n[1] for n in comp if n[0] == "layer" and n[1] in order), key=order.__getitem__)
            if not layers:
                continue
            classes = [n[1] for n in comp if n[0] == "class"]
            reasons = sorted({frozen[c] for c in classes if c in frozen})
            prunable = sum(1 for c in classes if c not in frozen and c in pruned_by)
            out.append(ChannelGroup(tuple(layers), len(classes), prunable, tuple(reasons)))
        out.sort(key=lambda grp: order[grp.layers[0]])
        return out

    def freeze_unsafe_reads(self) -> None:
        """A consumer that sees a class's channel unmasked would change if the channel were removed;
        a constant it can take into its bias only when every output sees the same inputs (no padding)."""
        for site in self.consumers:
            foldable = can_fold(site.module)
            for i, z in zip(site.ids.tolist(), site.masked.tolist()):
                if z == MaskedValue.DATA:
                    self.frozen.setdefault(i, f"read by {site.node.target} without passing a pruner")
                elif z == MaskedValue.CONSTANT and not foldable:
                    self.frozen.setdefault(i, f"read by padded {site.node.target} as a non-zero constant")


def can_fold(m: nn.Module) -> bool:
    """Whether a consumer can take a constant input channel into its bias (linear, unpadded conv)."""
    if isinstance(m, nn.Linear):
        return True
    padding = m.padding
    return padding == "valid" or (not isinstance(padding, str) and not any(padding))


def layer_name(node: fx.Node) -> str:
    """The layer a node stands for: a pruner's own layer, else the node's target."""
    prov = node.meta.get("evefx")
    if prov is not None and prov.get("role") == "pruner":
        return prov["layer"]
    return str(node.target)


def pruners_of(gm: fx.GraphModule) -> list[tuple[fx.Node, ChannelPruner]]:
    """The ``ChannelPruner`` calls of ``gm``, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(m := module_of(gm, n), ChannelPruner):
            out.append((n, m))
    return out


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ``node`` had when shapes were propagated, or ``None``."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


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

    def analyze(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.users and "tensor_meta" not in node.meta:
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
        uf = self.dg.uf
        ids = uf.fresh(max(value.numel(), 1)).reshape(value.shape) if value.dim() else uf.fresh(1)[0:1]
        self.freeze(ids, f"constant tensor {target}")
        return ChannelMap(ids if value.dim() else ids.reshape(()), np.zeros(value.shape, dtype=np.int8))

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
        return self._apply(call)

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
        return PruneError(
            f"cannot prune through {describe_node(self.gm, self.current)}: {why}. Exclude the layers feeding it "
            f"from the prune section's select, or keep that part opaque with trace.leaf_modules."
        )

    def unknown_op(self, call: OpCall) -> PruneError:
        """The error for an op without a rule: it names the node and the rule to register."""
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
            f"evefx.channels.rules for the others), exclude the layers feeding it from the prune section's select, "
            f"or keep that part opaque with trace.leaf_modules."
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
        for i in np.unique(ids):
            self.dg.frozen.setdefault(int(i), why)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the classes of ``a`` and ``b`` element by element (broadcast)."""
        a, b = np.broadcast_arrays(a, b)
        pairs = np.unique(np.stack([a.reshape(-1), b.reshape(-1)], axis=1), axis=0)
        for x, y in pairs:
            self.dg.uf.union(int(x), int(y))

    def fresh(self, channels: int, frozen: str | None = None) -> ChannelMap:
        """New ids for the current node's output: ``channels`` on axis 1, constant along the others."""
        shape = (1, *self.out_shape()[1:])
        ids = self.dg.uf.fresh(channels)
        if frozen:
            self.freeze(ids, frozen)
        view = ids.reshape((1, channels) + (1,) * (len(shape) - 2)) if len(shape) >= 2 else ids
        return ChannelMap(np.broadcast_to(view, shape), np.zeros(shape, dtype=np.int8))

    def per_channel(self, x: ChannelMap) -> tuple[np.ndarray, np.ndarray]:
        """Ids and masked values per index of axis 1; the ids must not vary along the other axes."""
        if x.ids.ndim < 2:
            raise self.error(f"expected a tensor with a channel axis, got rank {x.ids.ndim}")
        ids = x.ids[0].reshape(x.ids.shape[1], -1)
        if ids.shape[1] and not (ids == ids[:, :1]).all():
            raise self.error("its channels were rearranged in a way evefx cannot follow (mixed with other axes)")
        masked = x.masked[0].reshape(x.masked.shape[1], -1).min(axis=1) if x.masked.size else np.zeros(ids.shape[0], np.int8)
        return ids[:, 0].copy(), masked

    def broadcast_channels(self, ids: np.ndarray, masked: np.ndarray) -> ChannelMap:
        """A map for the current node's output whose axis 1 holds ``ids`` (a per-channel op)."""
        shape = (1, *self.out_shape()[1:])
        if len(shape) < 2 or shape[1] != len(ids):
            raise self.error(f"its output {shape} does not keep the {len(ids)} input channels on axis 1")
        view = (1, len(ids)) + (1,) * (len(shape) - 2)
        return ChannelMap(np.broadcast_to(ids.reshape(view), shape), np.broadcast_to(masked.reshape(view), shape))

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

    def add_reshape(self, ids: np.ndarray) -> None:
        """The current ``view``/``reshape`` has a literal channel size to rewrite; ``ids`` of its output."""
        self.dg.reshapes.append(ReshapeSite(self.current, ids))


def ensure_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Propagate shapes through ``gm`` when example inputs are given."""
    if example_inputs is None:
        return
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    propagate_shapes(gm, inputs)


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
