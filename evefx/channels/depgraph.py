"""The dependency graph the channel analysis fills: channel classes (a union-find on channel ids),
the layers that compaction slices, and the coupled groups.

Example:
    >>> dg = evefx.channels.analyze(gm)
    >>> [g.layers for g in dg.groups() if len(g.layers) > 1]
    [('conv1', 'layer1.0.conv2', 'layer1.1.conv2'), ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from torch import fx, nn

from evefx.channels.rules import MaskedValue
from evefx.graph import module_of
from evefx.modules.prune import ChannelPruner

__all__ = ["UnionFind", "Site", "ConsumerSite", "ReshapeSite", "ChannelGroup", "DependencyGraph",
           "can_fold", "layer_name", "pruners_of"]


class UnionFind:
    """Channel ids and the classes they were merged into (the root of a class is its smallest id).

    Ids live in a NumPy array so that :meth:`roots` of a whole tensor's ids is a few vector steps."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)
        self.size = 0

    def fresh(self, n: int) -> np.ndarray:
        start = self.size
        if start + n > len(self.parent):
            grown = np.zeros(max(2 * len(self.parent), start + n, 1024), dtype=np.int64)
            grown[:start] = self.parent[:start]
            self.parent = grown
        self.parent[start:start + n] = np.arange(start, start + n)
        self.size = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = int(i)
        while parent[root] != root:
            root = int(parent[root])
        while parent[i] != root:
            parent[i], i = root, int(parent[i])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        r = self.parent[ids.reshape(-1)]
        while True:
            nxt = self.parent[r]
            if np.array_equal(nxt, r):
                return r.reshape(ids.shape)
            r = nxt


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
    """A ``view``/``reshape``/``unflatten`` whose literal sizes compaction rewrites; ``ids`` of its
    whole output (every element), from which compaction reads the new size of each axis."""

    node: fx.Node
    ids: np.ndarray


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose channels are coupled (one shared mask), as found by :func:`analyze`.

    ``layers`` are the qualified names of the conv/linear layers producing the group's channels
    (depthwise convs included); ``channels`` the number of channel classes; ``prunable`` how many
    of them may be removed; ``frozen`` the reasons the others may not; ``roots`` the classes' ids
    (:meth:`DependencyGraph.root` of a site's ``ids`` says which group a channel belongs to).

    Example:
        >>> analyze(gm).groups()[0]
        ChannelGroup(layers=('stem.0', 'b1.1', 'b2.1'), channels=8, prunable=8, frozen=())
    """

    layers: tuple[str, ...]
    channels: int
    prunable: int
    frozen: tuple[str, ...] = ()
    roots: tuple[int, ...] = field(default=(), repr=False, compare=False)


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
            out.append(ChannelGroup(tuple(layers), len(classes), prunable, tuple(reasons), tuple(classes)))
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
