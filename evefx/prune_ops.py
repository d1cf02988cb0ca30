"""Channel dependencies of a traced model, mask updates (``prune_step``) and physical removal (``compact``).

How channels are followed. Every tensor in the graph gets an integer *channel id* per element of its
shape (batch axis collapsed to 1): a conv/linear output creates fresh ids, element-wise ops keep
them, ``view``/``flatten``/``transpose``/``cat`` rearrange them exactly as the tensor is rearranged
(a numpy array of ids undergoes the same op). Two tensors meeting in an element-wise op (a residual
``+``, an attention ``*``) have their ids merged with a union-find, so the channels they join become
one *channel class* that is kept or removed as a whole. A depthwise conv passes ids through (its
output channel ``c`` is its input channel ``c``); a grouped conv with as many inputs as outputs also
merges the same position of every group, so that its groups shrink together. The bipartite graph
layers <-> classes (networkx) gives the coupled groups: a ResNet stage's residual stream is one
group; DenseNet-style concatenation keeps each producer's classes apart.

When a class cannot be removed safely it is *frozen* (never pruned), with the reason kept for
reports: it reaches the model's output or an input, it is split by a reshape (channel shuffle) or a
channel slice/chunk, it runs through a grouped conv with more outputs than inputs (or the reverse) or
a transposed conv, or a consumer reads it as data rather than as the pruner's zero. A masked channel
that a BatchNorm or a sigmoid turns into a constant (DenseNet's concat -> BatchNorm -> ReLU -> conv)
is still removable when the consumer is a linear layer or an unpadded conv: ``compact`` adds the
constant's contribution to that consumer's bias; a padded conv would see it only inside the borders,
so those channels stay. An op whose effect on channels evefx cannot tell raises
:class:`~evefx.errors.PruneError` naming the node.

Example:
    >>> gm = evefx.transform(model, "examples/specs/prune.yaml")
    >>> evefx.prune_step(gm)             # masks from the statistics and ratios
    >>> small = evefx.compact(gm)        # a new, smaller module; gm is untouched
    >>> compact_report(small).params_after
"""
from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch.utils._pytree import tree_leaves
import torch.nn.functional as F
from rich.table import Table
from torch import fx, nn

from evefx.errors import PruneError, ShapeError
from evefx.graph import describe_node, module_of, output_block, remove_node
from evefx.modules.protocol import EveHooks
from evefx.modules.prune import ChannelPruner

__all__ = [
    "ChannelGroup",
    "DependencyGraph",
    "CompactReport",
    "analyze",
    "prune_step",
    "compact",
    "compact_report",
    "count_macs",
    "count_params",
]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# op tables: how an op treats channels, and whether it keeps a masked (zero) channel at zero

_ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh,
    nn.Mish, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_OTHER_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ZeroPad1d, nn.ZeroPad3d,
)
_ZERO_KEEPING_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.hardswish, F.hardtanh, F.mish,
    torch.relu, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.nn.functional.relu_,
    torch.clone, torch.neg, torch.abs,
}
_OTHER_ELEMENTWISE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, F.logsigmoid}
_ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "to",
                         "type_as", "detach", "abs", "neg", "clamp", "clamp_min", "clamp_", "clamp_min_"}
_OTHER_ELEMENTWISE_METHODS = {"sigmoid", "sigmoid_", "exp"}
_SPATIAL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.interpolate, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten}
_PERMUTE = {torch.transpose, torch.permute, torch.swapaxes, torch.movedim, "transpose", "permute", "swapaxes", "movedim"}
_SPLIT = {torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement"}
_BN = nn.modules.batchnorm._BatchNorm


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    return describe_node(gm, node)


# What a masked channel is worth where it is read: 2 = zero (nothing to do), 1 = a constant that does
# not depend on the input (a BatchNorm's shift after the mask: folded into a consumer's bias), 0 = data.
ZERO, CONST, DATA = 2, 1, 0


@dataclass
class _T:
    """Channel ids of one tensor (batch axis of size 1) and, per element, what a masked channel is
    worth there (``zero``: ZERO / CONST / DATA)."""

    ids: np.ndarray
    zero: np.ndarray


def _const(state: np.ndarray) -> np.ndarray:
    """After an op that maps 0 to some constant (BatchNorm, sigmoid, + 1): zero becomes constant."""
    return np.minimum(state, CONST)


def _padded(state: np.ndarray) -> np.ndarray:
    """After zero padding: a zero channel stays zero, a constant one is no longer uniform."""
    return np.where(state == ZERO, ZERO, DATA).astype(np.int8)


class _UnionFind:
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
class _Site:
    """One place where a module's channels are read or written: ``ids`` per channel/feature."""

    node: fx.Node
    module: nn.Module
    ids: np.ndarray


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose channels are coupled (one shared mask), as found by :func:`analyze`.

    ``layers`` are the qualified names of the conv/linear layers producing the group's channels
    (depthwise convs included); ``channels`` the number of channel classes; ``prunable`` how many
    of them may be removed; ``frozen`` the reasons the others may not.
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
    uf: _UnionFind
    producers: list[_Site] = field(default_factory=list)
    consumers: list[_Site] = field(default_factory=list)
    depthwise: list[_Site] = field(default_factory=list)
    norms: list[_Site] = field(default_factory=list)
    pruners: list[_Site] = field(default_factory=list)
    reshapes: list[tuple[fx.Node, np.ndarray]] = field(default_factory=list)
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
                name = _layer_name(site.node)
                g.add_node(("layer", name), kind=kind)
                for r in set(self.root(site.ids).tolist()):
                    g.add_edge(("layer", name), ("class", r))
        return g

    def groups(self) -> list[ChannelGroup]:
        """Coupled groups of producer layers, in graph order of their first layer."""
        g = self.layer_graph()
        frozen = self.frozen_roots()
        pruned_by = {r for s in self.pruners for r in self.root(s.ids).tolist()}
        order = {_layer_name(s.node): i for i, s in enumerate(self.producers + self.depthwise)}
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


def _layer_name(node: fx.Node) -> str:
    prov = node.meta.get("evefx")
    if prov is not None and prov.get("role") == "pruner":
        return prov["layer"]
    return str(node.target)


def _shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


class _Analyzer:
    """Walks the graph once in topological order and fills a :class:`DependencyGraph`."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.dg = DependencyGraph(gm, _UnionFind())
        self.env: dict[fx.Node, Any] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def error(self, node: fx.Node, why: str) -> PruneError:
        return PruneError(
            f"cannot prune through {_where(self.gm, node)}: {why}. Exclude the layers feeding it from the "
            f"prune section's select, or keep that part opaque with trace.leaf_modules."
        )

    def freeze(self, ids: np.ndarray, why: str) -> None:
        for i in np.unique(ids):
            self.dg.frozen.setdefault(int(i), why)

    def out_shape(self, node: fx.Node) -> tuple[int, ...]:
        shape = _shape(self.gm, node)
        if shape is None:
            raise PruneError(
                f"{_where(self.gm, node)} has no shape information; pruning needs shapes: pass example_inputs "
                f"to evefx.transform / prune_step / compact, or set trace.input_shape in the spec"
            )
        return shape

    def fresh(self, node: fx.Node, channel_axis_len: int, frozen: str | None = None) -> _T:
        shape = (1, *self.out_shape(node)[1:])
        ids = self.dg.uf.fresh(channel_axis_len)
        if frozen:
            self.freeze(ids, frozen)
        view = ids.reshape((1, channel_axis_len) + (1,) * (len(shape) - 2)) if len(shape) >= 2 else ids
        return _T(np.broadcast_to(view, shape), np.zeros(shape, dtype=np.int8))

    def per_channel(self, node: fx.Node, t: _T) -> tuple[np.ndarray, np.ndarray]:
        """Ids and zero flags per index of axis 1; the ids must not vary along the other axes."""
        if t.ids.ndim < 2:
            raise self.error(node, f"expected a tensor with a channel axis, got rank {t.ids.ndim}")
        ids = t.ids[0].reshape(t.ids.shape[1], -1)
        if ids.shape[1] and not (ids == ids[:, :1]).all():
            raise self.error(node, "its channels were rearranged in a way evefx cannot follow (mixed with other axes)")
        zero = t.zero[0].reshape(t.zero.shape[1], -1).min(axis=1) if t.zero.size else np.zeros(ids.shape[0], np.int8)
        return ids[:, 0].copy(), zero

    def broadcast_channels(self, node: fx.Node, ids: np.ndarray, zero: np.ndarray) -> _T:
        shape = (1, *self.out_shape(node)[1:])
        if len(shape) < 2 or shape[1] != len(ids):
            raise self.error(node, f"its output {shape} does not keep the {len(ids)} input channels on axis 1")
        view = (1, len(ids)) + (1,) * (len(shape) - 2)
        return _T(np.broadcast_to(ids.reshape(view), shape), np.broadcast_to(zero.reshape(view), shape))

    def tensor_arg(self, a: Any) -> _T | None:
        if isinstance(a, fx.Node):
            v = self.env.get(a)
            return v if isinstance(v, _T) else None
        return None

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        pairs = np.unique(np.stack([a.reshape(-1), b.reshape(-1)], axis=1), axis=0)
        for x, y in pairs:
            self.dg.uf.union(int(x), int(y))

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.users and "tensor_meta" not in node.meta:
                raise PruneError(
                    f"input {node.name!r} of {type(self.gm).__name__} has no shape information; pruning needs shapes: "
                    f"pass example_inputs to evefx.transform / prune_step / compact, or set trace.input_shape in the spec"
                )
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)
        return self.dg

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = _shape(self.gm, node)
            if shape is None:
                return None
            return self.fresh(node, shape[1] if len(shape) > 1 else 1, "model input")
        if node.op == "get_attr":
            value = _get_attr(self.gm, str(node.target))
            if not isinstance(value, torch.Tensor):
                return None
            ids = self.dg.uf.fresh(max(value.numel(), 1)).reshape(value.shape) if value.dim() else self.dg.uf.fresh(1)[0:1]
            self.freeze(ids, f"constant tensor {node.target}")
            return _T(ids if value.dim() else ids.reshape(()), np.zeros(value.shape, dtype=np.int8))
        if node.op == "output":
            for a in node.all_input_nodes:
                self._freeze_value(self.env.get(a), "model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, module_of(self.gm, node))
        return self.visit_function(node)

    def _freeze_value(self, value: Any, why: str) -> None:
        if isinstance(value, _T):
            self.freeze(value.ids, why)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._freeze_value(v, why)

    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        x = self.tensor_arg(node.args[0]) if node.args else None
        if isinstance(m, ChannelPruner):
            if x is None:
                raise self.error(node, "a ChannelPruner needs a tensor input with known shape")
            ids, _ = self._channels_of(node, x, m.dim)
            self.dg.pruners.append(_Site(node, m, ids))
            return _T(x.ids, np.full(np.shape(x.zero), ZERO, dtype=np.int8))
        if isinstance(m, nn.modules.conv._ConvNd):
            return self._conv(node, m, x)
        if isinstance(m, nn.Linear):
            return self._linear(node, m, x)
        if x is None:
            if _shape(self.gm, node) is not None:
                raise self.error(node, "its input carries no channel information")
            return None
        if isinstance(m, _BN):
            ids, zero = self.per_channel(node, x)
            if m.num_features != len(ids):
                raise self.error(node, f"{m.num_features} features but {len(ids)} input channels")
            self.dg.norms.append(_Site(node, m, ids))
            return _T(x.ids, _const(x.zero))
        if isinstance(m, _ZERO_KEEPING_MODULES):
            return x
        if isinstance(m, nn.PReLU):
            if m.num_parameters != 1:
                raise self.error(node, "a per-channel PReLU is not supported")
            return x
        if isinstance(m, _OTHER_ELEMENTWISE_MODULES):
            return _T(x.ids, _const(x.zero))
        if isinstance(m, _SPATIAL_MODULES):
            ids, zero = self.per_channel(node, x)
            padding = getattr(m, "padding", 0)
            if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)) or (
                    "Avg" in type(m).__name__ and any(np.atleast_1d(padding))):
                zero = _padded(zero)
            return self.broadcast_channels(node, ids, zero)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, x, record=False)
        if isinstance(m, EveHooks):
            # another evefx module (quantizer, neuron): element-wise, but it may map 0 elsewhere and a
            # stateful neuron turns a constant into a spike train: what comes out is data
            c = x.ids.shape[1] if x.ids.ndim > 1 else 0
            per_channel = [n for n, b in (*m.named_parameters(), *m.named_buffers()) if b.dim() and b.shape[0] == c and c > 1]
            if per_channel:
                raise self.error(node, f"{type(m).__name__} keeps per-channel state ({', '.join(per_channel)})")
            return _T(x.ids, np.zeros_like(x.zero))
        raise self.error(node, f"evefx does not know how {type(m).__name__} maps channels")

    def _channels_of(self, node: fx.Node, x: _T, dim: int) -> tuple[np.ndarray, np.ndarray]:
        if x.ids.ndim < 2 or dim % x.ids.ndim != 1:
            raise self.error(node, f"channel axis {dim} of a rank-{x.ids.ndim} tensor is not supported (axis 1 only)")
        return self.per_channel(node, x)

    def _conv(self, node: fx.Node, m: nn.modules.conv._ConvNd, x: _T | None) -> _T:
        if x is None:
            raise self.error(node, "its input carries no channel information")
        ids, zero = self.per_channel(node, x)
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        if not transposed and m.groups == 1:
            self.dg.consumers.append(_Site(node, m, np.stack([ids, zero.astype(np.int64)])))
            out = self.fresh(node, m.out_channels)
            self.dg.producers.append(_Site(node, m, out.ids[0].reshape(m.out_channels, -1)[:, 0].copy()))
            return out
        if not transposed and m.groups == m.in_channels == m.out_channels:
            self.dg.depthwise.append(_Site(node, m, ids))
            return self.broadcast_channels(node, ids, np.zeros_like(zero))
        if not transposed and m.in_channels == m.out_channels:
            # grouped conv, in = out: channel c is in and out channel c, and every group must keep the
            # same width, so position p of each group is one class (the groups shrink together)
            per_group = ids.reshape(m.groups, -1)
            for p in range(per_group.shape[1]):
                for other in per_group[1:, p]:
                    self.dg.uf.union(int(per_group[0, p]), int(other))
            self.dg.depthwise.append(_Site(node, m, ids))
            return self.broadcast_channels(node, ids, np.zeros_like(zero))
        why = f"{'transposed' if transposed else 'grouped (inputs != outputs)'} conv {node.target}"
        self.freeze(ids, why)
        return self.fresh(node, m.out_channels, why)

    def _linear(self, node: fx.Node, m: nn.Linear, x: _T | None) -> _T:
        if x is None:
            raise self.error(node, "its input carries no channel information")
        if x.ids.ndim != 2:
            raise self.error(node, f"a Linear on a rank-{x.ids.ndim} input is not supported (rank 2 only)")
        self.dg.consumers.append(_Site(node, m, np.stack([x.ids[0].copy(), x.zero[0].astype(np.int64)])))
        out = self.fresh(node, m.out_features)
        self.dg.producers.append(_Site(node, m, out.ids[0].copy()))
        return out

    def _reshape(self, node: fx.Node, x: _T, record: bool = True) -> _T:
        in_shape = (1, *x.ids.shape[1:])
        out = self.out_shape(node)
        meta_in = _shape(self.gm, node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if meta_in is not None and meta_in[0] != out[0]:
            raise self.error(node, "it reshapes the batch axis")
        new_shape = (1, *out[1:])
        ids = np.ascontiguousarray(x.ids).reshape(new_shape)
        zero = np.ascontiguousarray(x.zero).reshape(new_shape)
        if len(in_shape) >= 2 and len(new_shape) >= 2:
            c = in_shape[1]
            per_channel_const = (x.ids[0].reshape(c, -1) == x.ids[0].reshape(c, -1)[:, :1]).all()
            merged = [c * int(np.prod(in_shape[2:2 + k])) for k in range(len(in_shape) - 1)]
            if not (per_channel_const and new_shape[1] in merged):
                self.freeze(x.ids, f"channels split by {node.name} (e.g. a channel shuffle)")
            elif record:
                self.dg.reshapes.append((node, ids))
        return _T(ids, zero)

    def visit_function(self, node: fx.Node) -> Any:
        target = node.target
        key = target if node.op == "call_function" else str(target)
        args = node.args
        if node.op == "call_method" and key in _NON_TENSOR_METHODS or target is getattr and args[1] in ("shape", "dtype", "device"):
            return None
        if target is operator.getitem:
            return self._getitem(node)
        tensors = [self.tensor_arg(a) for a in node.all_input_nodes]
        if not any(t is not None for t in tensors):
            if _shape(self.gm, node) is not None and node.all_input_nodes:
                # a tensor made from non-tensors only (torch.zeros(size)): it carries no channel yet
                shape = self.out_shape(node)
                return self.fresh(node, shape[1] if len(shape) > 1 else 1, f"tensor created by {node.name}")
            return None
        x = self.tensor_arg(args[0]) if args else None
        if key in _ADD or key in _SUB or key in _MUL or key in _DIV:
            return self._binary(node, key)
        if key in _CAT:
            return self._cat(node)
        if x is None:
            raise self.error(node, "its first argument is not a tensor evefx follows")
        if key in _ZERO_KEEPING_FUNCTIONS or key in _ZERO_KEEPING_METHODS or _is_stochastic_depth(target):
            return x
        if key in _OTHER_ELEMENTWISE_FUNCTIONS or key in _OTHER_ELEMENTWISE_METHODS:
            return _T(x.ids, _const(x.zero))
        if key in _SPATIAL_FUNCTIONS or key is F.pad:
            ids, zero = self.per_channel(node, x)
            if key is F.pad:
                pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
                if len(pad) > 2 * (x.ids.ndim - 2):
                    raise self.error(node, "it pads the channel axis")
                zero = _padded(zero)
            elif "avg_pool" in getattr(key, "__name__", "") and any(
                    np.atleast_1d(args[4] if len(args) > 4 else node.kwargs.get("padding", 0))):
                zero = _padded(zero)
            return self.broadcast_channels(node, ids, zero)
        if key in _REDUCTIONS:
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            if dims is None:
                raise self.error(node, "it reduces over every axis, channels included")
            dims = (dims,) if isinstance(dims, int) else tuple(dims)
            if any(d % x.ids.ndim in (0, 1) for d in dims):
                raise self.error(node, "it reduces over the channel (or batch) axis")
            ids, zero = self.per_channel(node, x)
            return self.broadcast_channels(node, ids, zero)
        if key in _RESHAPE_METHODS or key in _RESHAPE_FUNCTIONS:
            return self._reshape(node, x, record=key in ("view", "reshape", torch.reshape))
        if key in _PERMUTE:
            return self._permute(node, key, x)
        if key in _SPLIT:
            return self._split(node, key, x)
        raise self.error(node, f"evefx does not know how {getattr(target, '__name__', target)} maps channels")

    def _binary(self, node: fx.Node, key: Any) -> _T:
        a_node, b_node = (list(node.args) + [node.kwargs.get("other")])[:2]
        a, b = self.tensor_arg(a_node), self.tensor_arg(b_node)
        if a is not None and b is not None:
            self.union(a.ids, b.ids)
            ids = np.broadcast_arrays(a.ids, b.ids)[0]
            za, zb = np.broadcast_arrays(a.zero, b.zero)
            if key in _MUL:
                zero = np.where(np.maximum(za, zb) == ZERO, ZERO, np.minimum(za, zb))
            elif key in _DIV:
                zero = np.where(za == ZERO, ZERO, np.minimum(za, zb))
            else:
                zero = np.minimum(za, zb)
            return _T(ids, zero.astype(np.int8))
        t = a if a is not None else b
        other = b_node if a is not None else a_node
        assert t is not None
        if isinstance(other, fx.Node):
            # a python number computed in the graph: treat as an unknown scalar
            other = None
        if key in _MUL or (key in _DIV and a is not None):
            return t
        if (key in _ADD or key in _SUB) and other == 0:
            return t
        return _T(t.ids, _const(t.zero))

    def _cat(self, node: fx.Node) -> _T:
        seq = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [self.tensor_arg(a) for a in seq]
        if any(p is None for p in parts):
            raise self.error(node, "it concatenates a tensor evefx does not follow")
        rank = parts[0].ids.ndim
        if dim % rank == 0:
            raise self.error(node, "it concatenates along the batch axis")
        return _T(np.concatenate([p.ids for p in parts], axis=dim % rank),
                  np.concatenate([np.broadcast_to(p.zero, p.ids.shape) for p in parts], axis=dim % rank))

    def _permute(self, node: fx.Node, key: Any, x: _T) -> _T:
        rest = list(node.args[1:])
        if any(isinstance(a, fx.Node) for a in rest):
            raise self.error(node, "its axes are computed at run time")
        rank = x.ids.ndim
        if key in (torch.permute, "permute"):
            axes = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
            axes = tuple(a % rank for a in axes)
        else:
            d0, d1 = rest[0] % rank, rest[1] % rank
            axes_l = list(range(rank))
            if key in (torch.movedim, "movedim"):
                axes_l.remove(d0)
                axes_l.insert(d1, d0)
            else:
                axes_l[d0], axes_l[d1] = axes_l[d1], axes_l[d0]
            axes = tuple(axes_l)
        if axes[0] != 0:
            raise self.error(node, "it moves the batch axis")
        return _T(np.transpose(x.ids, axes), np.transpose(np.broadcast_to(x.zero, x.ids.shape), axes))

    def _split(self, node: fx.Node, key: Any, x: _T) -> list[_T]:
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, (list, tuple)):
            raise self.error(node, "no shape information for its parts")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        rank = x.ids.ndim
        if dim % rank == 0:
            raise self.error(node, "it splits the batch axis")
        if dim % rank == 1:
            self.freeze(x.ids, f"channels split by {node.name}")
        sizes = [int(m.shape[dim % rank]) for m in meta]
        cuts = np.cumsum(sizes)[:-1]
        zero = np.broadcast_to(x.zero, x.ids.shape)
        return [_T(i, z) for i, z in zip(np.split(x.ids, cuts, axis=dim % rank), np.split(zero, cuts, axis=dim % rank))]

    def _getitem(self, node: fx.Node) -> Any:
        src, idx = node.args
        value = self.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(value, (list, tuple)):
            return value[idx]
        if not isinstance(value, _T):
            return None
        index = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
            raise self.error(node, "it indexes with a tensor or a run-time value")
        if not index or not (index[0] == slice(None) or index[0] is Ellipsis and len(index) == 1):
            raise self.error(node, "it indexes the batch axis")
        # which input axis does each index entry address? (enough to detect channel indexing)
        hits_channel = len(index) > 1 and index[1] is not Ellipsis and index[1] != slice(None)
        if hits_channel:
            self.freeze(value.ids, f"channels sliced by {node.name}")
        return _T(value.ids[index], np.broadcast_to(value.zero, value.ids.shape)[index])


def _is_stochastic_depth(target: Any) -> bool:
    # torchvision's stochastic depth scales whole samples (or rows): zero stays zero, channels untouched
    return getattr(target, "__module__", "") == "torchvision.ops.stochastic_depth" and getattr(target, "__name__", "") == "stochastic_depth"


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _ensure_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    if example_inputs is None:
        return
    from evefx.trace import propagate_shapes

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    propagate_shapes(gm, inputs)


def analyze(gm: fx.GraphModule, example_inputs: Any = None) -> DependencyGraph:
    """Follow every channel of ``gm`` (see the module docstring) and return the dependencies.

    ``gm`` needs shapes in ``node.meta["tensor_meta"]`` (``evefx.transform`` with example inputs
    stores them), or pass ``example_inputs``.

    Example:
        >>> gm = torch.fx.symbolic_trace(resnet); analyze(gm, torch.zeros(1, 3, 64, 64)).groups()[0]
        ChannelGroup(layers=('conv1', 'layer1.0.conv2', 'layer1.1.conv2'), channels=64, ...)
    """
    _ensure_shapes(gm, example_inputs)
    dg = _Analyzer(gm).run()
    # a consumer that sees a class's channel unmasked would change if the channel were removed; a
    # constant it can take into its bias only when every output sees the same inputs (no padding)
    for site in dg.consumers:
        ids, zero = site.ids
        foldable = _can_fold(site.module)
        for i, z in zip(ids.tolist(), zero.tolist()):
            if z == DATA:
                dg.frozen.setdefault(i, f"read by {site.node.target} without passing a pruner")
            elif z == CONST and not foldable:
                dg.frozen.setdefault(i, f"read by padded {site.node.target} as a non-zero constant")
    return dg


# ------------------------------------------------------------------------------------------------
# prune_step


def _can_fold(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    padding = m.padding
    return padding == "valid" or (not isinstance(padding, str) and not any(padding))


def _normalised(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().double().abs()
    mean = v.mean()
    return v / mean if float(mean) > 0 else torch.ones_like(v)


def _weight_l1(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w.abs().reshape(w.shape[0], -1).mean(1)


def _pruners(gm: fx.GraphModule) -> list[tuple[fx.Node, ChannelPruner]]:
    return [(n, module_of(gm, n)) for n in gm.graph.nodes if n.op == "call_module" and isinstance(module_of(gm, n), ChannelPruner)]


def prune_step(gm: fx.GraphModule, example_inputs: Any = None) -> dict[str, tuple[int, int]]:
    """Recompute every pruner's mask from its statistics and ratio (one step of its schedule).

    Coupled channels (residual additions, depthwise convs, element-wise products) are ranked
    and masked together: a class's importance is the mean, over the pruners that see it, of the
    pruner's statistic (``l1_norm``: the producing layers' weight magnitude), each normalised by
    its layer's mean. ``scope: layer`` prunes ``ratio`` of each coupled group; ``scope: global``
    prunes as many channels in all (``ratio`` of each group, summed) from one list ranked by
    importance per resource removed (parameters and MACs, each relative to the candidates' mean),
    a group losing at most ``(1 + ratio) / 2`` of its channels. Already masked channels go first,
    ``min_channels`` holds for every layer, and frozen channels (see :func:`analyze`) are never masked.
    Returns ``{layer: (kept, total)}`` per pruner.

    Example:
        >>> evefx.prune_step(gm)["features.0"]
        (2, 4)
    """
    pruners = _pruners(gm)
    if not pruners:
        log.info("prune_step: %s has no ChannelPruner; nothing to do", type(gm).__name__)
        return {}
    dg = analyze(gm, example_inputs)
    uf = dg.uf
    frozen = dg.frozen_roots()
    # importance contributions per class root
    contrib: dict[int, list[float]] = {}
    weight_l1: dict[int, list[float]] = {}
    for site in dg.producers + dg.depthwise:
        for r, v in zip(dg.root(site.ids).tolist(), _normalised(_weight_l1(site.module)).tolist()):
            weight_l1.setdefault(r, []).append(v)
    for site in dg.pruners:
        p: ChannelPruner = site.module
        roots = dg.root(site.ids).tolist()
        if p.criterion == "l1_norm":
            values = [float(np.mean(weight_l1.get(r, [1.0]))) for r in roots]
        else:
            imp = p.importance()
            if imp is None:
                raise PruneError(
                    f"pruner of layer {_layer_name(site.node)} ({site.node.name}, criterion {p.criterion}) has no "
                    f"statistics yet: run forwards in training mode{' with backward' if p.criterion == 'taylor' else ''} "
                    f"before prune_step"
                )
            values = _normalised(imp).tolist()
        for r, v in zip(roots, values):
            contrib.setdefault(r, []).append(v)
    importance = {r: float(np.mean(v)) for r, v in contrib.items()}
    masked_before = {r for site in dg.pruners for r, m in zip(dg.root(site.ids).tolist(), site.module.mask.tolist()) if m < 0.5}

    # channel counts per member layer (pruners and producers), for min_channels
    members: list[tuple[str, list[int], int]] = []
    for site in dg.pruners:
        members.append((site.node.name, dg.root(site.ids).tolist(), site.module.min_channels))
    for site in dg.producers + dg.depthwise:
        members.append((site.node.name, dg.root(site.ids).tolist(), 1))
    member_of: dict[int, list[int]] = {}
    for k, (_, roots, _) in enumerate(members):
        for r in set(roots):
            member_of.setdefault(r, []).append(k)
    remaining = [len(roots) for _, roots, _ in members]
    count_in = [dict(zip(*np.unique(roots, return_counts=True))) for _, roots, _ in members]

    # groups: connected components of the layer <-> class graph
    g = dg.layer_graph()
    pruner_names = {_layer_name(s.node): s for s in dg.pruners}
    pruned: set[int] = set()
    global_pool: list[tuple[list[int], int, int]] = []  # (candidate classes, target count, cap)
    for comp in nx.connected_components(g):
        classes = sorted(n[1] for n in comp if n[0] == "class")
        sites = [pruner_names[n[1]] for n in comp if n[0] == "layer" and n[1] in pruner_names]
        if not sites:
            continue
        ratio = min(s.module.target_ratio() for s in sites)
        target = int(ratio * len(classes) + 1e-9)
        candidates = [r for r in classes if r in importance and r not in frozen]
        if all(s.module.scope == "global" for s in sites):
            # a group whose channels are frozen does not hand its share to the others
            global_pool.append((candidates, min(target, len(candidates)), int((1 + ratio) / 2 * len(classes) + 1e-9)))
        else:
            _greedy(candidates, target, importance, masked_before, member_of, members, remaining, count_in, pruned)
    if global_pool:
        _global(dg, global_pool, importance, masked_before, member_of, members, remaining, count_in, pruned)

    out: dict[str, tuple[int, int]] = {}
    for site in dg.pruners:
        roots = set(dg.root(site.ids).tolist())
        if site.module.target_ratio() > 0 and roots and roots <= frozen.keys():
            log.warning("prune_step: no channel of layer %s can be pruned (%s)", _layer_name(site.node),
                        "; ".join(sorted({frozen[r] for r in roots})))
        keep = torch.tensor([r not in pruned for r in dg.root(site.ids).tolist()])
        site.module.set_mask(keep)
        with torch.no_grad():
            site.module.steps_done += 1
        out[_layer_name(site.node)] = (int(keep.sum()), keep.numel())
    log.info("prune_step: %s", {k: f"{a}/{b}" for k, (a, b) in out.items()})
    return out


def _cost_per_class(dg: DependencyGraph) -> dict[int, tuple[float, float]]:
    """``(parameters, MACs per sample)`` that removing each channel class deletes: its slices of the
    producers' weights and biases, of depthwise convs and norms, and of the consumers' input weights
    (a weight slice costs its size times the layer's output positions in MACs)."""
    cost: dict[int, tuple[float, float]] = {}

    def add(site: _Site, ids: np.ndarray, params: float, weights: float) -> None:
        shape = _shape(dg.gm, site.node)
        if shape is None:
            positions = 0
        elif isinstance(site.module, nn.Linear):
            positions = int(np.prod(shape[1:-1]))
        else:
            positions = int(np.prod(shape[2:]))
        for r in dg.root(ids).tolist():
            p, m = cost.get(r, (0.0, 0.0))
            cost[r] = (p + params, m + weights * positions)

    for site in dg.producers + dg.depthwise:
        m, n = site.module, len(site.ids)
        add(site, site.ids, (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) / n, m.weight.numel() / n)
    for site in dg.norms:
        n = len(site.ids)
        site_params = sum(p.numel() for p in site.module.parameters(recurse=False)) / n
        for r in dg.root(site.ids).tolist():
            p, m = cost.get(r, (0.0, 0.0))
            cost[r] = (p + site_params, m)
    for site in dg.consumers:
        ids = site.ids[0]
        per = site.module.weight.numel() / len(ids)
        add(site, ids, per, per)
    return cost


def _global(dg, pool, importance, masked_before, member_of, members, remaining, count_in, pruned) -> None:
    """``scope: global``: prune the sum of the groups' targets from one ranking of every group's
    channels by importance per resource removed, ``importance / (params / mean + MACs / mean) * 2``
    (means over the candidates): of two equally important channels the one whose removal saves more
    goes first. No group loses more than its cap (half-way between its own ratio and all of it)."""
    target = sum(t for _, t, _ in pool)
    candidates = [r for c, _, _ in pool for r in c]
    if target <= 0 or not candidates:
        return
    cost = _cost_per_class(dg)
    params = np.array([cost.get(r, (1.0, 1.0))[0] for r in candidates])
    macs = np.array([cost.get(r, (1.0, 1.0))[1] for r in candidates])
    rel = params / max(params.mean(), 1e-12) + macs / max(macs.mean(), 1e-12)
    score = {r: importance[r] * 2 / max(c, 1e-12) for r, c in zip(candidates, rel.tolist())}
    group_of = {r: k for k, (c, _, _) in enumerate(pool) for r in c}
    taken = [0] * len(pool)
    caps = [cap for _, _, cap in pool]
    done = 0
    for r in _order(candidates, score, masked_before):
        if done >= target:
            break
        k = group_of[r]
        if taken[k] >= caps[k] or not _take(r, member_of, members, remaining, count_in, pruned):
            continue
        taken[k] += 1
        done += 1


def _order(candidates, importance, masked_before) -> list[int]:
    """Candidates, already masked first, then by increasing importance (stable: ties keep order)."""
    imp = torch.tensor([importance[r] for r in candidates], dtype=torch.float64)
    before = torch.tensor([r in masked_before for r in candidates])
    order = torch.sort(torch.where(before, torch.full_like(imp, -math.inf), imp), stable=True).indices.tolist()
    return [candidates[i] for i in order]


def _take(r, member_of, members, remaining, count_in, pruned) -> bool:
    """Prune class ``r`` unless a layer that has it would drop below its ``min_channels``."""
    ks = member_of.get(r, [])
    if any(remaining[k] - count_in[k][r] < max(members[k][2], 1) for k in ks):
        return False
    for k in ks:
        remaining[k] -= count_in[k][r]
    pruned.add(r)
    return True


def _greedy(candidates, target, importance, masked_before, member_of, members, remaining, count_in, pruned) -> None:
    """Prune up to ``target`` of ``candidates``, least important (and already masked) first,
    skipping a class when a layer that has it would drop below its ``min_channels``."""
    if target <= 0 or not candidates:
        return
    done = 0
    for r in _order(candidates, importance, masked_before):
        if done >= target:
            break
        if _take(r, member_of, members, remaining, count_in, pruned):
            done += 1


# ------------------------------------------------------------------------------------------------
# compact


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers excluded).

    Example:
        >>> count_params(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of the conv/linear layers, from the shapes in ``node.meta`` (per sample).

    Example:
        >>> count_macs(evefx.transform(DemoNet(), {}, torch.zeros(1, 1, 28, 28)))
        43856
    """
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = module_of(gm, node)
        shape = _shape(gm, node)
        if shape is None:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            total += int(np.prod(shape[1:])) * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
        elif isinstance(m, nn.Linear):
            total += int(np.prod(shape[1:-1])) * m.in_features * m.out_features
    return total


@dataclass(frozen=True)
class CompactReport:
    """Size of a model before and after :func:`compact` (MACs per sample).

    Example:
        >>> r = compact_report(small); f"{r.params_ratio:.2f}x fewer parameters"
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Output channels per producing layer: ``(before, after)``."""

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def table(self) -> Table:
        t = Table(title="evefx compact")
        for col in ("", "before", "after", "ratio"):
            t.add_column(col, justify="right")
        t.add_row("parameters", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.params_ratio:.2f}x")
        t.add_row("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", f"{self.macs_ratio:.2f}x")
        return t


def compact_report(gm: fx.GraphModule) -> CompactReport:
    """The :class:`CompactReport` that :func:`compact` attached to the module it returned."""
    report = gm.meta.get("evefx_compact") if hasattr(gm, "meta") else None
    if report is None:
        raise PruneError("this module was not made by evefx.compact (no compaction report)")
    return report


def _example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise PruneError(f"input {n.name!r} has no shape; pass example_inputs to evefx.compact")
        if meta.dtype.is_floating_point:
            out.append(torch.randn(tuple(meta.shape), generator=gen).to(meta.dtype))
        else:
            out.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(out)


def _param(t: torch.Tensor, like: nn.Parameter | None) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=like.requires_grad if like is not None else True)


class _Slicer:
    """Collects the index sets each module keeps, checks that shared modules agree, then slices."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.plans: dict[tuple[int, str], tuple[nn.Module, fx.Node, torch.Tensor, bool]] = {}

    def add(self, role: str, site: _Site, keep: np.ndarray) -> None:
        if not keep.all() and not type(site.module).__module__.startswith("torch.nn."):
            raise PruneError(
                f"compact cannot slice {_where(self.gm, site.node)}: only torch.nn conv, linear and BatchNorm layers "
                f"are sliced (a quantized or custom layer may hold per-channel state); prune and compact before quantizing"
            )
        idx = torch.as_tensor(np.flatnonzero(keep), dtype=torch.long)
        key = (id(site.module), role)
        prev = self.plans.get(key)
        if prev is not None and not torch.equal(prev[2], idx):
            raise PruneError(
                f"{_where(self.gm, site.node)} shares its module with {_where(self.gm, prev[1])}, but they would lose "
                f"different channels; give each call its own module"
            )
        self.plans[key] = (site.module, site.node, idx, bool(keep.all()))

    def apply(self) -> None:
        for (_, role), (m, _node, idx, full) in self.plans.items():
            if full:
                continue
            with torch.no_grad():
                if role == "out":
                    _slice_out(m, idx)
                elif role == "in":
                    _slice_in(m, idx)
                elif role == "dw" and m.groups == m.in_channels:
                    _slice_out(m, idx)
                    m.in_channels = m.groups = len(idx)
                elif role == "dw":
                    # grouped: the same positions go in every group (see _Analyzer._conv)
                    width = m.in_channels // m.groups
                    positions = idx[idx < width]
                    if len(idx) != len(positions) * m.groups:
                        raise PruneError(f"{_where(self.gm, _node)}: its groups would lose different channels; please report this bug")
                    _slice_out(m, idx)
                    m.weight = _param(m.weight.detach()[:, positions], m.weight)
                    m.in_channels = len(idx)
                elif role == "norm":
                    _slice_norm(m, idx)


def _slice_out(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight.detach()[idx], m.weight)
    if getattr(m, "bias", None) is not None:
        m.bias = _param(m.bias.detach()[idx], m.bias)
    if isinstance(m, nn.Linear):
        m.out_features = len(idx)
    else:
        m.out_channels = len(idx)


def _slice_in(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight.detach()[:, idx], m.weight)
    if isinstance(m, nn.Linear):
        m.in_features = len(idx)
    else:
        m.in_channels = len(idx)


def _slice_norm(m: nn.Module, idx: torch.Tensor) -> None:
    if m.weight is not None:
        m.weight = _param(m.weight.detach()[idx], m.weight)
        m.bias = _param(m.bias.detach()[idx], m.bias)
    if m.running_mean is not None:
        m.running_mean = m.running_mean[idx].clone()
        m.running_var = m.running_var[idx].clone()
    m.num_features = len(idx)


@torch.no_grad()
def _fold_constant(gm: fx.GraphModule, site: _Site, pos: torch.Tensor, x: torch.Tensor) -> None:
    """Add to ``site``'s bias what its input channels ``pos`` contribute, constants in ``x`` (its input)."""
    m = site.module
    vals = x[:, pos] if x.dim() > 1 else x[pos]
    k = vals.reshape(vals.shape[0], len(pos), -1)[0, :, 0]
    if not torch.allclose(vals, k.view((1, -1) + (1,) * (vals.dim() - 2)).expand_as(vals), atol=1e-5, rtol=1e-5):
        raise PruneError(f"{_where(gm, site.node)} reads removed channels that are not constant; please report this bug")
    w = m.weight.detach()[:, pos]
    delta = (w.reshape(w.shape[0], len(pos), -1).sum(-1) @ k.to(w.dtype))
    if m.bias is None:
        # a BatchNorm right after takes a constant shift for free (exact with running or batch statistics)
        bn = output_block(gm, site.node).bn
        norm = module_of(gm, bn) if bn is not None else None
        if isinstance(norm, _BN) and norm.running_mean is not None and norm.num_features == len(delta) and sum(
                1 for n in gm.graph.nodes if n.op == "call_module" and n.target == bn.target) == 1:
            norm.running_mean.sub_(delta.to(norm.running_mean.dtype))
            return
        m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=m.weight.requires_grad)
    m.bias.add_(delta)


def _rewrite_reshape(node: fx.Node, old: int, new: int) -> None:
    """Replace the literal size ``old`` of axis 1 in a ``view``/``reshape`` call by ``new``."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        sizes = list(args[1])
        if len(sizes) > 1 and sizes[1] == old:
            sizes[1] = new
            args[1] = type(args[1])(sizes)
    elif len(args) > 2 and args[2] == old:
        args[2] = new
    node.args = tuple(args)


def compact(gm: fx.GraphModule, example_inputs: Any = None, *, verify: bool = True, atol: float = 1e-4) -> fx.GraphModule:
    """A new, smaller module: masked channels physically removed, pruners gone; ``gm`` is untouched.

    Producing layers lose output channels (with their BatchNorm entries), consuming layers lose
    the matching input channels (``in_features`` of a linear after a flatten: the channel's whole
    block of positions; a removed channel they read as a constant goes into their bias), depthwise
    convs lose both and their groups, grouped convs the same positions in every group, and literal
    sizes in ``view``/``reshape`` calls are updated. With ``verify`` the result is
    run once (eval mode, fixed random input) against the masked model and must agree within
    ``atol``. The sizes before and after are in :func:`compact_report`.

    Example:
        >>> small = evefx.compact(gm)
        >>> torch.allclose(small(x), gm.eval()(x), atol=1e-5)
        True
    """
    from evefx.trace import propagate_shapes

    new = copy.deepcopy(gm)
    _ensure_shapes(new, example_inputs)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else None)
    if inputs is None:
        inputs = _example_inputs(new)
    params_before, macs_before = count_params(new), count_macs(new)
    pruners = _pruners(new)
    if not pruners:
        log.info("compact: no ChannelPruner in %s; returning a copy", type(gm).__name__)
    dg = analyze(new)
    frozen = dg.frozen_roots()
    keep_root: dict[int, bool] = {}
    owner: dict[int, fx.Node] = {}
    for site in dg.pruners:
        for r, m in zip(dg.root(site.ids).tolist(), (site.module.mask > 0.5).tolist()):
            if r in keep_root and keep_root[r] != m:
                raise PruneError(
                    f"{site.node.name} and {owner[r].name} disagree on a coupled channel (one masks it, the other "
                    f"keeps it): run evefx.prune_step, which masks coupled channels together"
                )
            keep_root[r], owner[r] = m, site.node
            if not m and r in frozen:
                raise PruneError(
                    f"{_where(new, site.node)} masks a channel that cannot be removed ({frozen[r]}); "
                    f"unmask it or let evefx.prune_step choose the masks"
                )

    def keep_of(ids: np.ndarray) -> np.ndarray:
        return np.array([keep_root.get(r, True) for r in dg.root(ids).reshape(-1).tolist()], dtype=bool)

    # consumers that read a removed channel as a non-zero constant take it into their bias: record
    # their inputs during the reference run
    folds = []
    for site in dg.consumers:
        need = ~keep_of(site.ids[0]) & (site.ids[1] == CONST)
        if need.any():
            if sum(1 for n in new.graph.nodes if n.op == "call_module" and n.target == site.node.target) > 1:
                raise PruneError(f"{_where(new, site.node)} is called more than once and would need a bias fold")
            folds.append((site, np.flatnonzero(need)))
    captured: dict[int, torch.Tensor] = {}
    hooks = [site.module.register_forward_pre_hook(
        lambda _m, args, key=id(site.module): captured.__setitem__(key, args[0].detach())) for site, _ in folds]
    modes = [(m, m.training) for m in new.modules()]
    for _n, p in pruners:
        p.enabled = True
    new.eval()
    try:
        with torch.no_grad():
            reference = new(*inputs)
    finally:
        for h in hooks:
            h.remove()
    for site, pos in folds:
        _fold_constant(new, site, torch.as_tensor(pos, dtype=torch.long), captured[id(site.module)])

    channels: dict[str, tuple[int, int]] = {}
    slicer = _Slicer(new)
    for site in dg.producers:
        k = keep_of(site.ids)
        slicer.add("out", site, k)
        channels[str(site.node.target)] = (len(k), int(k.sum()))
    for site in dg.depthwise:
        k = keep_of(site.ids)
        slicer.add("dw", site, k)
        channels[str(site.node.target)] = (len(k), int(k.sum()))
    for site in dg.consumers:
        slicer.add("in", site, keep_of(site.ids[0]))
    for site in dg.norms:
        slicer.add("norm", site, keep_of(site.ids))
    for node, ids in dg.reshapes:
        per_index = ids[0].reshape(ids.shape[1], -1)[:, 0]
        _rewrite_reshape(node, int(ids.shape[1]), int(keep_of(per_index).sum()))
    slicer.apply()
    for node, _p in pruners:
        remove_node(new, node)
    new.graph.lint()
    new.recompile()
    for m, mode in modes:
        m.training = mode
    try:
        propagate_shapes(new, inputs)
    except ShapeError as e:
        raise PruneError(f"the compacted model does not run: {e}. This is a bug in evefx's channel analysis; please report it") from e
    if verify:
        was = new.training
        new.eval()
        with torch.no_grad():
            got = new(*inputs)
        new.train(was)
        for a, b in zip(_tensors(reference), _tensors(got)):
            if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=1e-4):
                err = (a - b).abs().max() if a.shape == b.shape else f"shape {tuple(b.shape)} != {tuple(a.shape)}"
                raise PruneError(f"the compacted model disagrees with the masked one (max error {err}); please report it")
    new.meta["evefx_compact"] = CompactReport(params_before, count_params(new), macs_before, count_macs(new), channels)
    log.info("compact: params %d -> %d, MACs %d -> %d", params_before, count_params(new), macs_before, count_macs(new))
    return new


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
