"""Channel pruning on a traced model: which channels are coupled, which to mask, and removing them.

* :mod:`~evefx.channels.rules`: per-op channel rules in a registry users extend with
  :func:`register_rule` (an op evefx does not know is one rule away); the rules for axis moves
  are in :mod:`~evefx.channels.layout_rules`, those for norms and attention in
  :mod:`~evefx.channels.attention_rules`;
* :mod:`~evefx.channels.analysis`: :func:`analyze`, a ``torch.fx.Interpreter`` on channel ids
  giving the coupled groups (:class:`ChannelGroup`) and the channels that cannot go;
* :mod:`~evefx.channels.selection`: :func:`prune_step`, the masks from statistics and ratios;
* :mod:`~evefx.channels.compact`: :func:`compact`, the smaller model, and :func:`compact_report`.

Example:
    >>> gm = evefx.transform(model, "examples/specs/prune.yaml")
    >>> evefx.prune_step(gm)             # masks from the statistics and ratios
    >>> small = evefx.compact(gm)        # a new, smaller module; gm is untouched
    >>> compact_report(small).params_after
"""
from __future__ import annotations

from evefx.channels import attention_rules, layout_rules, rules
from evefx.channels.analysis import ChannelAnalysis, ChannelGroup, DependencyGraph, analyze
from evefx.channels.compact import CompactReport, compact, compact_report
from evefx.channels.rules import ChannelMap, MaskedValue, OpCall, RuleRegistry, register_rule
from evefx.channels.selection import ChannelSelection, prune_step
from evefx.layers import count_macs, count_params  # the size counts compact_report uses

__all__ = [
    "analyze",
    "prune_step",
    "compact",
    "compact_report",
    "count_macs",
    "count_params",
    "register_rule",
    "rules",
    "layout_rules",
    "attention_rules",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelMap",
    "ChannelSelection",
    "CompactReport",
    "DependencyGraph",
    "MaskedValue",
    "OpCall",
    "RuleRegistry",
]
