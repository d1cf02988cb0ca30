"""Which channels one :func:`prune_step` masks: importance, cost, and the layer or global choice.

Example:
    >>> gm = evefx.transform(model, "examples/specs/prune.yaml")
    >>> evefx.prune_step(gm)             # masks from the statistics and ratios
    {'features.0': (2, 4), ...}
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from evefx.channels.analysis import DependencyGraph, Site, analyze, layer_name, pruners_of
from evefx.channels.rules import RuleRegistry
from evefx.errors import PruneError
from evefx.layers import output_positions, shape_of
from evefx.modules.prune import ChannelPruner

__all__ = ["ChannelSelection", "prune_step"]

log = logging.getLogger(__name__)


def _normalised(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().double().abs()
    mean = v.mean()
    return v / mean if float(mean) > 0 else torch.ones_like(v)


def _weight_l1(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w.abs().reshape(w.shape[0], -1).mean(1)


@dataclass
class _Member:
    """A layer (pruner or producer) holding channels of some classes: it keeps at least ``min_channels``."""

    roots: list[int]
    min_channels: int
    remaining: int
    count_in: dict[int, int]


@dataclass(frozen=True)
class _GlobalShare:
    """One coupled group's part in ``scope: global``: its candidate classes, how many it adds to the
    total, and the most it may lose."""

    candidates: list[int]
    target: int
    cap: int


class ChannelSelection:
    """The choice of channel classes to mask in one step, with the state it needs.

    ``importance`` per class root is the mean, over the pruners that see the class, of each
    pruner's statistic normalised by its layer's mean (``l1_norm``: the producing layers' weight
    magnitude). :meth:`choose` ranks and takes classes group by group (``scope: layer``) or from
    one ranking by importance per resource removed (``scope: global``), already masked classes
    first, never below a layer's ``min_channels`` and never a frozen class.

    Example:
        >>> pruned = ChannelSelection(analyze(gm)).choose()   # class roots to mask
    """

    def __init__(self, dg: DependencyGraph):
        self.dg = dg
        self.frozen = dg.frozen_roots()
        self.importance = self._importance()
        self.masked_before = {r for site in dg.pruners
                              for r, m in zip(dg.root(site.ids).tolist(), site.module.mask.tolist()) if m < 0.5}
        self.members: list[_Member] = []
        for site, min_channels in [(s, s.module.min_channels) for s in dg.pruners] + [(s, 1) for s in dg.producers + dg.depthwise]:
            roots = dg.root(site.ids).tolist()
            self.members.append(_Member(roots, min_channels, len(roots), dict(zip(*np.unique(roots, return_counts=True)))))
        self.member_of: dict[int, list[_Member]] = {}
        for member in self.members:
            for r in set(member.roots):
                self.member_of.setdefault(r, []).append(member)
        self.pruned: set[int] = set()

    def _importance(self) -> dict[int, float]:
        dg = self.dg
        weight_l1: dict[int, list[float]] = {}
        for site in dg.producers + dg.depthwise:
            for r, v in zip(dg.root(site.ids).tolist(), _normalised(_weight_l1(site.module)).tolist()):
                weight_l1.setdefault(r, []).append(v)
        contrib: dict[int, list[float]] = {}
        for site in dg.pruners:
            p = site.module
            roots = dg.root(site.ids).tolist()
            if p.criterion == "l1_norm":
                values = [float(np.mean(weight_l1.get(r, [1.0]))) for r in roots]
            else:
                imp = p.importance()
                if imp is None:
                    raise PruneError(
                        f"pruner of layer {layer_name(site.node)} ({site.node.name}, criterion {p.criterion}) has no "
                        f"statistics yet: run forwards in training mode{' with backward' if p.criterion == 'taylor' else ''} "
                        f"before prune_step"
                    )
                values = _normalised(imp).tolist()
            for r, v in zip(roots, values):
                contrib.setdefault(r, []).append(v)
        return {r: float(np.mean(v)) for r, v in contrib.items()}

    def choose(self) -> set[int]:
        """The class roots to mask (groups are the connected components of the layer <-> class graph)."""
        pruner_sites = {layer_name(s.node): s for s in self.dg.pruners}
        shares: list[_GlobalShare] = []
        for comp in nx.connected_components(self.dg.layer_graph()):
            classes = sorted(n[1] for n in comp if n[0] == "class")
            sites = [pruner_sites[n[1]] for n in comp if n[0] == "layer" and n[1] in pruner_sites]
            if not sites:
                continue
            ratio = min(s.module.target_ratio() for s in sites)
            target = int(ratio * len(classes) + 1e-9)
            candidates = [r for r in classes if r in self.importance and r not in self.frozen]
            if all(s.module.scope == "global" for s in sites):
                # a group whose channels are frozen does not hand its share to the others
                shares.append(_GlobalShare(candidates, min(target, len(candidates)), int((1 + ratio) / 2 * len(classes) + 1e-9)))
            else:
                self._greedy(candidates, target)
        if shares:
            self._global(shares)
        return self.pruned

    def _greedy(self, candidates: list[int], target: int) -> None:
        """Prune up to ``target`` of ``candidates``, least important (and already masked) first,
        skipping a class when a layer that has it would drop below its ``min_channels``."""
        if target <= 0 or not candidates:
            return
        done = 0
        for r in self._order(candidates, self.importance):
            if done >= target:
                break
            if self._take(r):
                done += 1

    def _global(self, shares: list[_GlobalShare]) -> None:
        """``scope: global``: prune the sum of the groups' targets from one ranking of every group's
        channels by importance per resource removed, ``importance / (params / mean + MACs / mean) * 2``
        (means over the candidates): of two equally important channels the one whose removal saves more
        goes first. No group loses more than its cap (half-way between its own ratio and all of it)."""
        target = sum(s.target for s in shares)
        candidates = [r for s in shares for r in s.candidates]
        if target <= 0 or not candidates:
            return
        cost = self.cost_per_class()
        params = np.array([cost.get(r, (1.0, 1.0))[0] for r in candidates])
        macs = np.array([cost.get(r, (1.0, 1.0))[1] for r in candidates])
        rel = params / max(params.mean(), 1e-12) + macs / max(macs.mean(), 1e-12)
        score = {r: self.importance[r] * 2 / max(c, 1e-12) for r, c in zip(candidates, rel.tolist())}
        share_of = {r: k for k, s in enumerate(shares) for r in s.candidates}
        taken = [0] * len(shares)
        done = 0
        for r in self._order(candidates, score):
            if done >= target:
                break
            k = share_of[r]
            if taken[k] >= shares[k].cap or not self._take(r):
                continue
            taken[k] += 1
            done += 1

    def _order(self, candidates: list[int], score: dict[int, float]) -> list[int]:
        """Candidates, already masked first, then by increasing score (stable: ties keep order)."""
        imp = torch.tensor([score[r] for r in candidates], dtype=torch.float64)
        before = torch.tensor([r in self.masked_before for r in candidates])
        order = torch.sort(torch.where(before, torch.full_like(imp, -math.inf), imp), stable=True).indices.tolist()
        return [candidates[i] for i in order]

    def _take(self, r: int) -> bool:
        """Prune class ``r`` unless a layer that has it would drop below its ``min_channels``."""
        members = self.member_of.get(r, [])
        if any(m.remaining - m.count_in[r] < max(m.min_channels, 1) for m in members):
            return False
        for m in members:
            m.remaining -= m.count_in[r]
        self.pruned.add(r)
        return True

    def cost_per_class(self) -> dict[int, tuple[float, float]]:
        """``(parameters, MACs per sample)`` that removing each channel class deletes: its slices of the
        producers' weights and biases, of depthwise convs and norms, and of the consumers' input weights
        (a weight slice costs its size times the layer's output positions in MACs)."""
        dg = self.dg
        cost: dict[int, tuple[float, float]] = {}

        def add(site: Site, ids: np.ndarray, params: float, weights: float) -> None:
            positions = output_positions(site.module, shape_of(site.node)) or 0
            for r in dg.root(ids).tolist():
                p, m = cost.get(r, (0.0, 0.0))
                cost[r] = (p + params, m + weights * positions)

        for site in dg.producers + dg.depthwise:
            m, n = site.module, len(site.ids)
            add(site, site.ids, (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) / n, m.weight.numel() / n)
        for site in dg.norms:
            per = sum(p.numel() for p in site.module.parameters(recurse=False)) / len(site.ids)
            for r in dg.root(site.ids).tolist():
                p, macs = cost.get(r, (0.0, 0.0))
                cost[r] = (p + per, macs)
        for consumer in dg.consumers:
            per = consumer.module.weight.numel() / len(consumer.ids)
            add(consumer, consumer.ids, per, per)
        return cost


def prune_step(gm: fx.GraphModule, example_inputs: Any = None, *, rules: RuleRegistry | None = None) -> dict[str, tuple[int, int]]:
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
    if not isinstance(gm, fx.GraphModule):
        raise PruneError(f"prune_step takes the fx.GraphModule evefx.transform returns (with a prune section), "
                         f"not a {type(gm).__name__}: transform the model first")
    if not pruners_of(gm):
        log.info("prune_step: %s has no ChannelPruner; nothing to do", type(gm).__name__)
        return {}
    dg = analyze(gm, example_inputs, rules=rules)
    selection = ChannelSelection(dg)
    pruned = selection.choose()
    frozen = selection.frozen
    out: dict[str, tuple[int, int]] = {}
    for site in dg.pruners:
        pruner = site.module
        assert isinstance(pruner, ChannelPruner), "analysis records only ChannelPruners as pruner sites"
        roots = dg.root(site.ids).tolist()
        if pruner.target_ratio() > 0 and roots and set(roots) <= frozen.keys():
            log.warning("prune_step: no channel of layer %s can be pruned (%s)", layer_name(site.node),
                        "; ".join(sorted({frozen[r] for r in roots})))
        keep = torch.tensor([r not in pruned for r in roots])
        pruner.set_mask(keep)
        with torch.no_grad():
            pruner.steps_done += 1
        out[layer_name(site.node)] = (int(keep.sum()), keep.numel())
    log.info("prune_step: %s", {k: f"{a}/{b}" for k, (a, b) in out.items()})
    return out
