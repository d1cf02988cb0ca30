"""What a configuration of eve parameters costs: average bits, weight bytes, MACs, kept channels, latency.

The static costs are computed from the layer table of the traced graph and the chosen values
alone, so the upgrader can price thousands of configurations without running the model.
Latency is measured: the configuration is applied, the model exported to ONNX and timed with
onnxruntime.

Example:
    >>> model = CostModel(gm, "avg_bits")
    >>> model({p.name: 3 for p in evefx.eve_parameters(gm)})
    3.0
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from evefx.api import EveParameter, eve_parameters
from evefx.channels.depgraph import DependencyGraph, layer_name
from evefx.errors import EvefxError, SearchError
from evefx.graph import layer_nodes, module_of
from evefx.layers import layer_macs, out_channels, shape_of

__all__ = ["COST_KINDS", "CHEAP_AT_HIGH", "LayerCost", "CostModel", "cheap_end", "measure_latency"]

log = logging.getLogger(__name__)

COST_KINDS = ("avg_bits", "weight_bytes", "macs", "sparsity", "latency")
"""Budget kinds the upgrader understands (the ``search.budget.kind`` of a spec)."""

CHEAP_AT_HIGH = frozenset({"ratio"})
"""Eve parameter kinds whose cost falls as the value rises (a higher pruning ratio is cheaper);
every other kind (bits, ...) is cheaper when lower."""


def cheap_end(p: EveParameter) -> float:
    """The end of ``p``'s range where it costs least (``low`` for bits, ``high`` for ratios).

    Example:
        >>> [cheap_end(p) for p in evefx.eve_parameters(gm)]
        [2, 2, 0.9]
    """
    return p.high if p.kind in CHEAP_AT_HIGH else p.low


@dataclass(frozen=True)
class LayerCost:
    """Static facts about one conv/linear layer that the costs need."""

    name: str
    weights: int
    biases: int
    channels: int
    macs: int | None
    """Multiply-accumulates per sample (:func:`evefx.layers.layer_macs`); ``None`` without recorded shapes."""
    producer: str | None
    """The conv/linear layer whose output channels feed this one (pruning it shrinks our input)."""
    fixed_weight_bits: int
    """Bit width of the weights when no eve parameter sets it (32 for a float layer)."""
    depthwise: bool = False
    """One input channel per output channel (``groups == in_channels``): its input shrinks with its
    output channels (coupled), so the producer's pruning is not counted again."""


def _producer(gm: fx.GraphModule, node: fx.Node, layers: dict[str, fx.Node]) -> str | None:
    """Walk back through single-input nodes (bn, activation, quantizer, flatten...) to a layer."""
    layer_targets = {n: name for name, n in layers.items()}
    current = node.args[0] if node.args else None
    for _ in range(64):
        if not isinstance(current, fx.Node) or current.op == "placeholder":
            return None
        if current in layer_targets:
            return layer_targets[current]
        inputs = [a for a in current.all_input_nodes]
        if len(inputs) != 1:
            return None  # a join (add, cat): channels are shared, leave them alone
        current = inputs[0]
    return None


@dataclass(frozen=True)
class _CoupledGroup:
    """Channels sharing one mask (:func:`evefx.channels.analyze`): ``prune_step`` prunes the group
    at the least ratio of its ``pruners`` (layer -> ratio when it is not searched, else None),
    ``int(ratio * channels)`` channels, at most ``prunable``; ``layers`` produce its channels."""

    layers: tuple[str, ...]
    channels: int
    prunable: int
    pruners: tuple[tuple[str, float | None], ...]


@dataclass(frozen=True)
class _Coupling:
    """What pruning does to every layer, from the channel analysis: the coupled groups, and for
    each layer reading channels the group of each of its input channels (-1: none, never pruned)."""

    groups: tuple[_CoupledGroup, ...]
    inputs: dict[str, np.ndarray]

    def kept(self, ratios: Mapping[str, float]) -> list[float]:
        """Fraction of each group's channels left with the searched ``ratios`` (layer -> ratio)."""
        out = []
        for g in self.groups:
            least = min(ratios[n] if fixed is None else fixed for n, fixed in g.pruners)
            out.append((g.channels - min(int(least * g.channels + 1e-9), g.prunable)) / g.channels)
        return out


def channel_analysis(gm: fx.GraphModule) -> DependencyGraph | None:
    """:func:`evefx.channels.analyze` of ``gm``, or ``None`` (with a warning) when its channels cannot
    be followed: pruning ratios are then priced layer by layer."""
    from evefx.channels import analyze

    try:
        return analyze(gm)
    except EvefxError as e:
        log.warning("pruning costs priced per layer, not per coupled group: %s", e)
        return None


def _coupling(dg: DependencyGraph | None, searched: set[str]) -> _Coupling | None:
    """The channel coupling when every searched ratio belongs to a channel pruner the analysis sees;
    ``None`` otherwise (a hand-made gate marked as a pruner, channels that cannot be followed): each
    layer's ratio is then priced alone, its input shrinking with its direct producer."""
    if dg is None:
        return None
    pruners = {layer_name(s.node): s for s in dg.pruners}
    if not searched <= pruners.keys():
        return None
    groups: list[_CoupledGroup] = []
    group_of: dict[int, int] = {}
    for g in dg.groups():
        owners = [n for n in g.layers if n in pruners]
        if not owners:
            continue
        group_of.update(dict.fromkeys(g.roots, len(groups)))
        groups.append(_CoupledGroup(g.layers, g.channels, g.prunable,
                                    tuple((n, None if n in searched else pruners[n].module.target_ratio()) for n in owners)))
    inputs = {layer_name(site.node): np.array([group_of.get(int(r), -1) for r in dg.root(site.ids).reshape(-1).tolist()])
              for site in dg.consumers}
    return _Coupling(tuple(groups), inputs)


def _fixed_weight_bits(module: nn.Module) -> int:
    wq = getattr(module, "weight_quantizer", None)
    bits = getattr(wq, "bits", None)
    return int(bits) if bits is not None else 32


def _table(gm: fx.GraphModule) -> dict[str, LayerCost]:
    nodes = {str(n.target): n for n in layer_nodes(gm)}
    out = {}
    for name, node in nodes.items():
        m = module_of(gm, node)
        bias = getattr(m, "bias", None)
        groups = int(getattr(m, "groups", 1))
        out[name] = LayerCost(name, int(m.weight.numel()), int(bias.numel()) if bias is not None else 0, int(out_channels(m)),
                              layer_macs(m, shape_of(node)), _producer(gm, node, nodes), _fixed_weight_bits(m),
                              depthwise=groups > 1 and groups == int(getattr(m, "in_channels", 0)))
    return out


def measure_latency(gm: nn.Module, inputs: Sequence[torch.Tensor], *, repeats: int = 20) -> float:
    """Median onnxruntime seconds per call of ``gm`` on ``inputs``, timed on the file ``evefx.export_onnx``
    writes (quantizers as real ONNX quantization). The model goes through
    :func:`evefx.export.deploy.deployable` once: pruned channels are removed, since masked channels
    cost as much as kept ones.

    Example:
        >>> measure_latency(gm, (torch.zeros(1, 1, 28, 28),))
        0.00012
    """
    # imported here: timing is the one part of the upgrader that needs onnx and onnxruntime
    from evefx.export import deployable, export_onnx
    from evefx.export.parity import ort_session

    deployed = deployable(gm)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(deployed, tuple(inputs), path, check=False, kernels=False)
        sess = ort_session(str(path), threads=1)
        feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
        sess.run(None, feed)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


class CostModel:
    """Prices a configuration ``{eve parameter name: value}`` under one budget kind.

    * ``avg_bits``: mean of the chosen bit widths (every ``bits`` eve parameter counts once);
    * ``weight_bytes``: bytes of the conv/linear weights at their bit widths, kept channels only;
    * ``macs``: fraction of the dense model's multiply-accumulates left after pruning (a layer
      loses its pruned output channels and the input channels its producer pruned; layers whose
      channels are coupled, e.g. a residual stream, are pruned together at the least of their
      ratios, as :func:`evefx.prune_step` does);
    * ``sparsity``: fraction of output channels kept (1 - sparsity);
    * ``latency``: onnxruntime seconds per call on ``latency_inputs`` (measured, so the
      configuration must be applied to ``gm`` first: :meth:`measure`).

    Parameters missing from a configuration take their current value. ``tied`` names, per layer of a
    searched ratio, the layers whose ratio takes the same value (the search ties coupled layers);
    ``analysis``: ``gm``'s :func:`channel_analysis` when the caller has it already.

    Example:
        >>> CostModel(gm, "macs")({"features.0.pruner.ratio": 0.5})
        0.83
    """

    def __init__(self, gm: fx.GraphModule, kind: str, *, latency_inputs: Sequence[torch.Tensor] | None = None,
                 parameters: Sequence[EveParameter] | None = None, tied: Mapping[str, Sequence[str]] | None = None,
                 analysis: DependencyGraph | None = None):
        if kind not in COST_KINDS:
            raise SearchError(f"search.budget.kind: unknown cost {kind!r}; use one of {', '.join(COST_KINDS)}")
        self.gm = gm
        self.kind = kind
        self.parameters = list(parameters) if parameters is not None else eve_parameters(gm)
        self.layers = _table(gm)
        self.latency_inputs = tuple(latency_inputs) if latency_inputs is not None else None
        if kind == "latency" and self.latency_inputs is None:
            raise SearchError("search.budget.kind: latency needs example inputs to time the model; "
                              "pass example_inputs= (or set trace.input_shape in the spec)")
        bits = [p for p in self.parameters if p.kind == "bits"]
        ratios = [p for p in self.parameters if p.kind == "ratio"]
        if kind == "avg_bits" and not bits:
            raise SearchError("search.budget.kind: avg_bits needs bit widths to search; "
                              "set upgrade_bits: true in a quantize section")
        if kind in ("macs", "sparsity") and not ratios:
            raise SearchError(f"search.budget.kind: {kind} needs pruning ratios to search; "
                              "set upgrade_ratio: true in a prune section")
        if kind == "macs":
            unknown = [name for name, lc in self.layers.items() if lc.macs is None]
            if unknown:
                raise SearchError(f"search.budget.kind: macs needs the layers' output shapes ({unknown[0]} has none): "
                                  "transform with example inputs (or set trace.input_shape in the spec)")
        self._dense_macs = sum(lc.macs or 0 for lc in self.layers.values()) or 1.0
        self._dense_channels = sum(lc.channels for lc in self.layers.values()) or 1
        # tied: {layer of a searched ratio: layers whose ratio follows it} (coupled layers, UpgradeEnv)
        self.tied = {lead: list(fs) for lead, fs in (tied or {}).items()}
        followers = {f for fs in self.tied.values() for f in fs}
        if ratios:
            self._coupling = _coupling(analysis if analysis is not None else channel_analysis(gm), {p.layer for p in ratios} | followers)
        else:
            self._coupling = None

    @property
    def static(self) -> bool:
        """True when the cost follows from the values alone (everything but latency)."""
        return self.kind != "latency"

    def _resolve(self, values: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float], dict[str, float], list[float]]:
        w_bits = {name: float(lc.fixed_weight_bits) for name, lc in self.layers.items()}
        keep = dict.fromkeys(self.layers, 1.0)
        bits = []
        ratio: dict[str, float] = {}
        for p in self.parameters:
            v = float(values[p.name]) if p.name in values else p.value
            if p.kind == "bits":
                bits.append(v)
                if p.role == "weight" and p.layer in w_bits:
                    w_bits[p.layer] = v
            elif p.kind == "ratio" and p.layer in keep:
                for layer in (p.layer, *self.tied.get(p.layer, ())):
                    ratio[layer] = v
                    # channel counts are integers: round as a pruner would, never below one channel
                    ch = self.layers[layer].channels
                    keep[layer] = max(1, ch - int(math.floor(v * ch))) / ch
        k_in = {name: keep[lc.producer] if lc.producer is not None and not lc.depthwise else 1.0
                for name, lc in self.layers.items()}
        if self._coupling is not None:
            # one mask per coupled group, at the least ratio of its pruners (what prune_step does)
            kept = self._coupling.kept(ratio)
            for g, f in zip(self._coupling.groups, kept):
                for n in g.layers:
                    if n in keep:
                        keep[n] = f
            f_of = np.array(kept + [1.0])  # index -1: channels no pruner removes
            for name, groups in self._coupling.inputs.items():
                if name in k_in:
                    # a depthwise conv's input is its own (coupled) output: counted once, in keep
                    k_in[name] = 1.0 if self.layers[name].depthwise else float(f_of[groups].mean()) if len(groups) else 1.0
        return w_bits, keep, k_in, bits

    def __call__(self, values: Mapping[str, float]) -> float:
        """The static cost of ``values`` (raises for ``latency``: use :meth:`measure`)."""
        if self.kind == "latency":
            raise SearchError("latency is measured, not computed: call CostModel.measure(gm) after applying the values")
        w_bits, keep, k_in, bits = self._resolve(values)
        if self.kind == "avg_bits":
            return float(np.mean(bits)) if bits else 32.0
        if self.kind == "sparsity":
            return sum(lc.channels * keep[n] for n, lc in self.layers.items()) / self._dense_channels
        total = 0.0
        for name, lc in self.layers.items():
            if self.kind == "macs":
                total += (lc.macs or 0) * keep[name] * k_in[name]
            else:  # weight_bytes: weights at their bits, biases in float32
                total += lc.weights * keep[name] * k_in[name] * w_bits[name] / 8.0 + 4.0 * lc.biases * keep[name]
        return total / self._dense_macs if self.kind == "macs" else total

    def measure(self, gm: nn.Module | None = None) -> float:
        """Cost of the configuration currently applied to ``gm`` (the only way to price latency)."""
        if self.kind != "latency":
            return self({p.name: p.value for p in self.parameters})
        return measure_latency(gm if gm is not None else self.gm, self.latency_inputs or ())

    def layer_values(self, values: Mapping[str, float]) -> dict[str, Any]:
        """Per layer ``{w_bits, keep}`` for reports."""
        w_bits, keep, _, _ = self._resolve(values)
        return {n: {"w_bits": w_bits[n], "keep": keep[n]} for n in self.layers}

