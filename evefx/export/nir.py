"""NIR export and import of spiking evefx models (the Neuromorphic Intermediate Representation).

A spiking model becomes a :class:`nir.NIRGraph` of continuous-time nodes that other simulators
(norse, snntorch, spikingjelly, sinabs, rockpool, lava-dl) and neuromorphic chips read. The
evefx neurons are discrete-time; with a step of ``dt`` seconds, forward Euler integration of
NIR's equations gives evefx's recurrence exactly when (docs/nir.md derives it)::

    LIF/PLIF (tau in steps, hard reset r)  ->  nir.LIF(tau = tau * dt, r = 1, v_leak = r,
                                                      v_reset = r, v_threshold = threshold)
    IF (hard reset r)                      ->  nir.IF(r = 1 / dt, v_reset = r, v_threshold = threshold)
    Conv2d/Conv1d (+ BatchNorm folded)     ->  nir.Conv2d / nir.Conv1d (zero bias when none)
    Linear (+ BatchNorm1d folded)          ->  nir.Affine (nir.Linear without a bias)
    Flatten, AvgPool2d, add                ->  nir.Flatten, nir.AvgPool2d, two edges into one node

Per-channel thresholds and resets are broadcast to the neurons' shape (NIR parameters are per
neuron). The encoder and the mean decoder are outside the graph: the NIR ``Input`` receives one
time step (the spike train of a Poisson encoder, or the analog input repeated by a direct
encoder), the ``Output`` emits one step, and the graph's metadata records ``timesteps``,
``encoder``, ``decoder`` and ``dt``. What NIR cannot express (soft reset, analog spikes,
max pooling, an analog activation between layers, quantizers) raises :class:`ExportError`
naming the node and what to do.

Example:
    >>> gm = evefx.transform(DemoNet(), "examples/specs/spiking.yaml")
    >>> report = evefx.export_nir(gm.eval(), "demo.nir", dt=1e-3)
    >>> [type(n).__name__ for n in report.graph.nodes.values()][:3]
    ['Input', 'Conv2d', 'LIF']
    >>> back = evefx.import_nir("demo.nir")       # the evefx model again, steps in, steps out
"""
from __future__ import annotations

import copy
import logging
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from evefx.errors import ExportError
from evefx.graph import recorded_inputs
from evefx.modules.encoding import DirectEncoder, MeanDecoder, PoissonEncoder
from evefx.modules.neurons import IFNeuron, LIFNeuron, PLIFNeuron, SpikingNeuron

__all__ = ["export_nir", "to_nir", "import_nir", "spike_traces", "NIRReport", "DEFAULT_DT"]

log = logging.getLogger(__name__)

DEFAULT_DT = 1e-3
"""Seconds per evefx time step when none is given (1 ms, the usual neuromorphic step)."""


def _nir():
    try:
        import nir
    except ImportError as e:  # pragma: no cover - nir is a dependency
        raise ExportError("NIR export needs the 'nir' package: pip install nir nirtorch") from e
    return nir


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
@dataclass
class NIRReport:
    """What :func:`export_nir` wrote: the graph, where, its size, and one row per NIR node.

    Example:
        >>> report = export_nir(gm, "model.nir")
        >>> report.size_bytes, report.node_types()["LIF"]
        (31512, 4)
    """

    graph: Any
    path: Path | None
    size_bytes: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def node_types(self) -> dict[str, int]:
        """How many nodes of each NIR type the graph has."""
        out: dict[str, int] = {}
        for node in self.graph.nodes.values():
            out[type(node).__name__] = out.get(type(node).__name__, 0) + 1
        return out

    def table(self):
        """The nodes as a rich table (name, NIR type, output shape, evefx source, mapping)."""
        from rich.table import Table

        size = f", {self.size_bytes:,} bytes" if self.size_bytes is not None else ""
        md = self.graph.metadata
        table = Table(title=f"NIR graph: {len(self.graph.nodes)} nodes, {len(self.graph.edges)} edges{size}; "
                            f"T={md.get('timesteps')}, dt={md.get('dt')}, encoder={md.get('encoder')}")
        for col in ("node", "NIR type", "shape", "from", "mapping"):
            table.add_column(col)
        for row in self.rows:
            table.add_row(row["name"], row["type"], str(row["shape"]), row["source"], row["note"])
        return table


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------
class _Shapes(fx.Interpreter):
    """Records every node's output (shape, whether a tensor) on one example forward, as ShapeProp does."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            raise ExportError(f"NIR export: running node {n.format_node()} on the example input failed: {e}") from e
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _example_input(gm: fx.GraphModule, example_input: Any) -> tuple:
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    args = []
    for name, shape, dtype in recorded_inputs(gm):
        if shape is None:
            raise ExportError(
                f"NIR export needs the input shape: input {name} has no recorded shape; pass example_input="
                f"torch.zeros(1, ...) (or transform the model with example inputs)"
            )
        args.append(torch.zeros((1, *tuple(shape)[1:]), dtype=dtype))
    return tuple(args)


# --------------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------------
def _np(t: torch.Tensor | float, shape: tuple[int, ...] | None = None, dtype=np.float32, axis: int = 0) -> np.ndarray:
    """``t`` as an array, broadcast to ``shape``; a per-channel ``[C]`` lies along ``axis`` of ``shape``."""
    a = t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
    if shape is not None:
        if a.ndim == 1 and len(shape) > 1:  # per-channel [C] -> [C, 1, 1, ...] (axis 0) or [C] (last axis)
            a = a.reshape(a.shape[0], *([1] * (len(shape) - 1 - axis % len(shape))))
        a = np.broadcast_to(a, shape)
    return np.ascontiguousarray(a, dtype=dtype)


def _pair(v: Any, n: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64).reshape(-1)
    return np.ascontiguousarray(np.broadcast_to(a, (n,)) if a.size == 1 else a)


_SKIP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_SUPPORTED = ("Conv1d", "Conv2d", "Linear", "BatchNorm1d/2d (folded into the conv/linear before it)", "Flatten",
              "AvgPool2d", "AdaptiveAvgPool2d (evenly divisible)", "IFNeuron", "LIFNeuron", "PLIFNeuron",
              "Identity/Dropout", "add", "flatten/view/reshape that flattens")


class _Builder:
    """Walks the fx graph in order and emits NIR nodes; ``src[node]`` is the list of NIR nodes
    whose outputs sum to that fx node's value (two after an ``add``)."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...] | None], dt: float,
                 rules: dict[type, Callable[[nn.Module, tuple[int, ...]], Any]] | None = None):
        self.nir = _nir()
        self.rules = dict(rules or {})
        self.gm, self.shapes, self.dt = gm, shapes, float(dt)
        self.modules = dict(gm.named_modules())
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        self.src: dict[fx.Node, list[str]] = {}
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {"producer": "evefx", "dt": self.dt, "decoder": "none", "encoder": "none",
                                     "timesteps": 1, "spike_condition": "v >= v_threshold"}
        self.owner: dict[str, fx.Node] = {}  # NIR node -> the fx node that produced it
        self.timesteps: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------------
    def step_shape(self, n: fx.Node) -> tuple[int, ...]:
        shape = self.shapes.get(n)
        if shape is None:
            raise ExportError(f"NIR export: node {n.name} ({n.format_node()}) is not a tensor; NIR edges carry tensors")
        return tuple(int(s) for s in shape[1:])  # drop the (time-folded) batch dim

    def name_for(self, n: fx.Node) -> str:
        base = str(n.target) if n.op == "call_module" else n.name
        name, i = base, 1
        while name in self.nodes or name in ("input", "output"):
            name, i = f"{base}_{i}", i + 1
        return name

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if self.shapes.get(a) is not None]

    def sources(self, n: fx.Node, arg: fx.Node) -> list[str]:
        if arg not in self.src:
            raise ExportError(f"NIR export: node {n.name} reads {arg.name}, which has no NIR counterpart; "
                              f"report a bug with this message")
        return self.src[arg]

    def emit(self, n: fx.Node, node: Any, note: str, *, name: str | None = None, arg: fx.Node | None = None) -> str:
        name = name or self.name_for(n)
        self.nodes[name] = node
        self.owner[name] = n
        if arg is not None:
            self.edges += [(s, name) for s in self.sources(n, arg)]
        self.src[n] = [name]
        out = node.output_type.get("output") if isinstance(node.output_type, dict) else None
        self.rows.append({"name": name, "type": type(node).__name__,
                          "shape": tuple(int(s) for s in out) if out is not None else None,
                          "source": str(n.target) if n.op == "call_module" else n.name, "note": note})
        return name

    def only_input(self, n: fx.Node) -> fx.Node:
        ins = self.inputs(n)
        if len(ins) != 1:
            raise ExportError(f"NIR export: node {n.name} ({n.format_node()}) takes {len(ins)} tensors; "
                              f"NIR nodes of this kind take one")
        return ins[0]

    # -- the walk --------------------------------------------------------------------------------
    def build(self) -> Any:
        nir = self.nir
        n_inputs = 0
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if self.shapes.get(n) is None:
                    continue  # a non-tensor option
                n_inputs += 1
                if n_inputs > 1:
                    raise ExportError(f"NIR export: input {n.name} is a second tensor input; NIR graphs read by "
                                      f"nirtorch-based simulators take one input")
                self.emit(n, nir.Input(input_type={"input": np.array(self.step_shape(n))}),
                          "one step (encoder output)", name="input")
            elif n.op == "output":
                outs = [a for a in n.all_input_nodes if self.shapes.get(a) is not None]
                if len(outs) != 1:
                    raise ExportError(f"NIR export: the model returns {len(outs)} tensors; NIR graphs read by "
                                      f"nirtorch-based simulators have one output")
                self.emit(n, nir.Output(output_type={"output": np.array(self.step_shape(outs[0]))}),
                          "one step (decoder input)", name="output", arg=outs[0])
            elif n.op == "call_module":
                self.module(n, self.modules[n.target])
            elif n.op in ("call_function", "call_method"):
                self.function(n)
            elif n.op == "get_attr":
                if self.shapes.get(n) is not None and any(u.op != "output" for u in n.users):
                    raise ExportError(f"NIR export: node {n.name} reads the tensor attribute {n.target}; NIR has no "
                                      f"constants: fold it into a layer's weights")
        if n_inputs == 0:
            raise ExportError("NIR export: the model has no tensor input")
        if len(self.timesteps) > 1:
            raise ExportError(f"NIR export: the model mixes timesteps {sorted(self.timesteps)}")
        if self.timesteps:
            self.meta["timesteps"] = self.timesteps.pop()
        if not any(isinstance(v, (nir.IF, nir.LIF)) for v in self.nodes.values()):
            raise ExportError("NIR export: the model has no spiking neurons; run a `kind: spike` section first "
                              "(export an ANN to ONNX instead)")
        try:
            return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=self.meta)
        except Exception as e:
            raise ExportError(f"NIR export: nir rejected the graph ({e}); report a bug with this message") from e

    def module(self, n: fx.Node, m: nn.Module) -> None:
        nir = self.nir
        where = f"{n.target} ({type(m).__name__})"
        if isinstance(m, (PoissonEncoder, DirectEncoder)):
            if not m.spiking:
                raise ExportError(f"NIR export: {where} is in non-spiking mode; call evefx.set_mode(gm, spiking=True)")
            self.meta["encoder"] = "poisson" if isinstance(m, PoissonEncoder) else "direct"
            self.timesteps.add(m.timesteps)
            self.src[n] = self.sources(n, self.only_input(n))  # outside the graph: the Input is one step
            return
        if isinstance(m, MeanDecoder):
            self.meta["decoder"] = "mean"
            self.timesteps.add(m.timesteps)
            self.src[n] = self.sources(n, self.only_input(n))
            return
        if isinstance(m, _SKIP_MODULES):
            self.src[n] = self.sources(n, self.only_input(n))
            return
        x = self.only_input(n)
        rule = next((fn for cls, fn in self.rules.items() if isinstance(m, cls)), None)
        if rule is not None:
            try:
                node = rule(m, self.step_shape(x))
            except Exception as e:
                raise ExportError(f"NIR export: the rule for {where} failed: {e}") from e
            self.emit(n, node, "user rule", arg=x)
        elif isinstance(m, SpikingNeuron):
            self.neuron(n, m, x)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m) in (nn.Conv1d, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ExportError(f"NIR export: {where} has padding {m.padding!r} ({m.padding_mode}); NIR convolutions "
                                  f"take zero padding in numbers: use padding=<int> with padding_mode='zeros'")
            nd = 2 if isinstance(m, nn.Conv2d) else 1
            w = _np(m.weight)
            b = _np(m.bias) if m.bias is not None else np.zeros(w.shape[0], np.float32)
            in_shape = self.step_shape(x)[1:]
            cls = nir.Conv2d if nd == 2 else nir.Conv1d
            node = cls(input_shape=in_shape if nd == 2 else in_shape[0], weight=w, stride=_pair(m.stride, nd),
                       padding=_pair(m.padding, nd), dilation=_pair(m.dilation, nd), groups=int(m.groups), bias=b)
            self.emit(n, node, "weights as trained", arg=x)
        elif type(m) is nn.Linear:
            if len(self.step_shape(x)) != 1:
                raise ExportError(f"NIR export: {n.target} (Linear) reads {self.step_shape(x)} per sample (tokens or "
                                  f"channels-last features); NIR's Affine maps one vector: flatten before the layer, "
                                  f"or export the model to ONNX instead")
            w = _np(m.weight)
            node = nir.Affine(weight=w, bias=_np(m.bias)) if m.bias is not None else nir.Linear(weight=w)
            self.emit(n, node, "weights as trained", arg=x)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.fold_bn(n, m, x)
        elif type(m) is nn.Flatten:
            self.flatten(n, x, m.start_dim, m.end_dim)
        elif type(m) is nn.AvgPool2d:
            if m.ceil_mode or m.divisor_override is not None or (not m.count_include_pad and np.any(_pair(m.padding, 2))):
                raise ExportError(f"NIR export: {where} uses ceil_mode/divisor_override/count_include_pad=False; NIR's "
                                  f"AvgPool2d is the plain average: use AvgPool2d(kernel, stride, padding)")
            self.pool(n, x, m.kernel_size, m.stride if m.stride is not None else m.kernel_size, m.padding)
        elif type(m) is nn.AdaptiveAvgPool2d:
            h, w = self.step_shape(x)[-2:]
            oh, ow = (m.output_size, m.output_size) if isinstance(m.output_size, int) else m.output_size
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise ExportError(f"NIR export: {where} maps {h}x{w} to {oh}x{ow}, not an even division; NIR has only "
                                  f"fixed-window pooling: use AvgPool2d or an input size divisible by the output size")
            self.pool(n, x, (h // oh, w // ow), (h // oh, w // ow), 0)
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            raise ExportError(f"NIR export: {where}: NIR has no max pooling (neuromorphic hardware sums spikes); "
                              f"replace it with nn.AvgPool2d (same kernel and stride) and retrain or fine-tune")
        elif type(m).__module__.startswith("torch.nn.modules.activation"):
            raise ExportError(f"NIR export: {where} is an analog activation; a NIR graph carries spikes between "
                              f"layers: select its layer in the spike section so a neuron replaces it")
        else:
            raise ExportError(f"NIR export: {where} has no NIR counterpart; supported: {', '.join(_SUPPORTED)}. "
                              f"Pass rules={{{type(m).__name__}: fn}} to export_nir (fn(module, input_shape) returns "
                              f"a nir node), or replace the module (quantized models export to ONNX)")

    def neuron(self, n: fx.Node, m: SpikingNeuron, x: fx.Node) -> None:
        nir = self.nir
        where = f"{n.target} ({type(m).__name__})"
        if not m.spiking:
            raise ExportError(f"NIR export: {where} is in non-spiking (ANN) mode; call evefx.set_mode(gm, spiking=True)")
        if not m.binary:
            raise ExportError(f"NIR export: {where} emits analog spikes (binary=False); NIR neurons emit unit events: "
                              f"train with neuron.binary: true")
        if m.reset is None:
            raise ExportError(f"NIR export: {where} has a soft reset (subtract the threshold); NIR's IF/LIF reset the "
                              f"membrane to v_reset: train with a hard reset (neuron.reset: 0.0)")
        if type(m) not in (IFNeuron, LIFNeuron, PLIFNeuron):
            raise ExportError(f"NIR export: {where} is not one of IFNeuron/LIFNeuron/PLIFNeuron")
        self.timesteps.add(m.timesteps)
        shape = self.step_shape(n)
        axis = m.channel_axis - 1 if m.channel_axis > 0 else m.channel_axis  # an axis of one sample, not [B, ...]
        th = _np(m.threshold, shape, axis=axis)
        reset = _np(m.reset, shape, axis=axis)
        if m.leaky:
            k = float(m.leak().detach()) if isinstance(m.leak(), torch.Tensor) else float(m.leak())
            tau_steps = 1.0 / k
            node = nir.LIF(tau=np.full(shape, tau_steps * self.dt), r=np.ones(shape, np.float32), v_leak=reset,
                           v_threshold=th, v_reset=reset.copy())
            note = f"tau={tau_steps:.4g}*dt{' (learned)' if isinstance(m, PLIFNeuron) else ''} r=1 v_leak=v_reset={_summary(reset)}"
        else:
            node = nir.IF(r=np.full(shape, 1.0 / self.dt), v_threshold=th, v_reset=reset)
            note = f"r=1/dt v_reset={_summary(reset)}"
        self.emit(n, node, note + f" v_th={_summary(th)}", arg=x)

    def fold_bn(self, n: fx.Node, m: nn.Module, x: fx.Node) -> None:
        nir = self.nir
        names = self.src.get(x, [])
        prev = self.nodes.get(names[0]) if len(names) == 1 else None
        if (not isinstance(prev, (nir.Conv1d, nir.Conv2d, nir.Affine, nir.Linear)) or len(x.users) != 1
                or self.owner.get(names[0]) is not x):
            raise ExportError(f"NIR export: {n.target} ({type(m).__name__}) does not directly follow a conv/linear "
                              f"layer, so it cannot be folded; NIR has no BatchNorm node: put it right after a layer")
        if m.running_mean is None:
            raise ExportError(f"NIR export: {n.target} keeps no running statistics (track_running_stats=False), so "
                              f"it cannot be folded into {x.target}")
        var, mean = m.running_var.double(), m.running_mean.double()
        gamma = m.weight.detach().double() if m.weight is not None else torch.ones_like(var)
        beta = m.bias.detach().double() if m.bias is not None else torch.zeros_like(var)
        scale = (gamma / torch.sqrt(var + m.eps)).numpy()
        shift = (beta - mean * torch.from_numpy(scale)).numpy()
        w = prev.weight.astype(np.float64) * scale.reshape(-1, *([1] * (prev.weight.ndim - 1)))
        b = getattr(prev, "bias", None)
        b = (np.zeros(w.shape[0]) if b is None else b.astype(np.float64)) * scale + shift
        name = names[0]
        if isinstance(prev, (nir.Conv1d, nir.Conv2d)):
            cls = type(prev)
            new = cls(input_shape=prev.input_shape, weight=w.astype(np.float32), stride=prev.stride,
                      padding=prev.padding, dilation=prev.dilation, groups=prev.groups, bias=b.astype(np.float32))
        else:
            new = nir.Affine(weight=w.astype(np.float32), bias=b.astype(np.float32))
        self.nodes[name] = new
        self.owner[name] = n
        self.src[n] = [name]
        for row in self.rows:
            if row["name"] == name:
                row["type"] = type(new).__name__
                row["source"] += f" + {n.target}"
                row["note"] = f"{n.target} folded in"

    def flatten(self, n: fx.Node, x: fx.Node, start: int, end: int) -> None:
        shape = self.step_shape(x)
        full = len(shape) + 1
        start = start % full
        end = end % full
        if start < 1:
            raise ExportError(f"NIR export: {n.name} flattens the batch (and time) dimension; flatten from dim 1")
        self.emit(n, self.nir.Flatten(input_type={"input": np.array(shape)}, start_dim=start - 1,
                                      end_dim=end - 1 if end < full - 1 else -1),
                  "dims without the batch", arg=x)

    def pool(self, n: fx.Node, x: fx.Node, kernel, stride, padding) -> None:
        node = self.nir.AvgPool2d(kernel_size=_pair(kernel, 2), stride=_pair(stride, 2), padding=_pair(padding, 2))
        self.emit(n, node, "mean over the window", arg=x)

    def function(self, n: fx.Node) -> None:
        if self.shapes.get(n) is None:
            return  # x.size(0) and similar: consumed by a view/reshape below
        target = n.target
        ins = self.inputs(n)
        if target in (operator.add, torch.add, "add") and len(ins) == 2 and not n.kwargs:
            a, b = ins
            if self.shapes[a] != self.shapes[n] or self.shapes[b] != self.shapes[n]:
                raise ExportError(f"NIR export: {n.name} adds tensors of shapes {self.shapes[a]} and {self.shapes[b]}; "
                                  f"NIR sums edges of equal shape only")
            self.src[n] = self.sources(n, a) + self.sources(n, b)  # both edges go into the consumer
            return
        if target in (torch.flatten, "flatten"):
            x = self.only_input(n)
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            self.flatten(n, x, start, end)
            return
        if target in ("view", "reshape", torch.reshape) and len(ins) == 1:
            x = ins[0]
            before, after = self.shapes[x], self.shapes[n]
            if after[0] == before[0] and len(after) == 2:
                self.flatten(n, x, 1, -1)
                return
            if after == before:
                self.src[n] = self.sources(n, x)
                return
        if target in ("contiguous", "clone", "detach") and len(ins) == 1:
            self.src[n] = self.sources(n, ins[0])
            return
        fname = getattr(target, "__name__", str(target))
        raise ExportError(f"NIR export: node {n.name} calls {fname} ({n.format_node()}), which has no NIR node; "
                          f"supported: {', '.join(_SUPPORTED)}")


def _summary(a: np.ndarray) -> str:
    lo, hi = float(a.min()), float(a.max())
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"


def to_nir(gm: nn.Module, example_input: Any = None, *, dt: float = DEFAULT_DT,
           rules: dict[type, Callable[[nn.Module, tuple[int, ...]], Any]] | None = None) -> Any:
    """The spiking model as a :class:`nir.NIRGraph` (no file); see :func:`export_nir`.

    Example:
        >>> graph = to_nir(gm, torch.zeros(1, 1, 28, 28), dt=1e-3)
        >>> graph.metadata["timesteps"]
        8
    """
    return _build(gm, example_input, dt, rules)[0]


def _build(gm: nn.Module, example_input: Any, dt: float, rules=None) -> tuple[Any, list[dict[str, Any]]]:
    if not dt > 0:
        raise ExportError(f"NIR export: dt must be > 0 seconds per step (got {dt})")
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"NIR export takes the fx.GraphModule evefx.transform returns, not a {type(gm).__name__}")
    args = _example_input(gm, example_input)
    work = copy.deepcopy(gm).eval()  # copy once: the shape run must not touch the user's statistics
    for m in work.modules():
        if isinstance(m, SpikingNeuron) and m.step_mode != "multi":
            m.set_mode(step="multi")
    shapes = _Shapes(work)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a Poisson encoder must not move the user's RNG
        shapes.run(*args)
    builder = _Builder(work, shapes.shapes, dt, rules)  # BatchNorm folds with the running statistics (eval)
    graph = builder.build()
    return graph, builder.rows


def export_nir(gm: nn.Module, path: str | os.PathLike | None = None, example_input: Any = None, *,
               dt: float = DEFAULT_DT,
               rules: dict[type, Callable[[nn.Module, tuple[int, ...]], Any]] | None = None) -> NIRReport:
    """Write a spiking evefx model as a NIR graph (``nir.write``, HDF5) and return a report.

    ``dt`` is the duration of one evefx time step in seconds: NIR's time constants are
    continuous-time, so ``tau`` and IF's ``r`` are scaled by it (docs/nir.md). The model should
    be in eval mode (BatchNorm is folded with its running statistics). ``example_input`` (one
    input, any batch size) gives the shapes; by default they come from the shapes recorded when
    the model was transformed with example inputs.

    ``rules`` maps a module type evefx does not know to ``fn(module, input_shape) -> nir node``
    (``input_shape`` without the batch dim); rules are tried before the built-in mapping.

    Raises :class:`~evefx.errors.ExportError` naming the node for anything NIR cannot express.

    Example:
        >>> report = export_nir(gm.eval(), "model.nir", torch.zeros(1, 1, 28, 28), dt=1e-3)
        >>> report.node_types()
        {'Input': 1, 'Conv2d': 3, 'LIF': 4, 'Flatten': 1, 'Affine': 2, 'Output': 1}
    """
    graph, rows = _build(gm, example_input, dt, rules)
    size = None
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)  # as export_onnx does
        try:
            _nir().write(str(path), graph)
        except OSError as e:
            raise ExportError(f"NIR export: cannot write {path}: {e}") from e
        size = path.stat().st_size
        log.info("wrote %s (%d nodes, %d bytes)", path, len(graph.nodes), size)
    return NIRReport(graph=graph, path=path, size_bytes=size, rows=rows)


# --------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------
def _uniform(a: np.ndarray, what: str, where: str) -> float:
    a = np.asarray(a, dtype=np.float64)
    if a.size and not np.allclose(a, a.flat[0], rtol=1e-6, atol=0.0):
        raise ExportError(f"import_nir: {where}: {what} differs between neurons; evefx neurons share one {what} "
                          f"per layer")
    return float(a.flat[0]) if a.size else 0.0


def _per_channel(a: np.ndarray, what: str, where: str) -> tuple[torch.Tensor, bool, int]:
    """A per-neuron parameter as evefx's ``[C]`` (per channel) or scalar, and the neuron's channel axis:
    1 when it varies along the first axis of a sample (``[C, H, W]``), -1 along the last (``[N, C]``)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0 or np.all(a == a.flat[0]):
        return torch.tensor(float(a.flat[0]), dtype=torch.float32), False, 1
    per = a.reshape(a.shape[0], -1)
    if np.all(per == per[:, :1]):
        return torch.from_numpy(per[:, 0].astype(np.float32)), True, 1
    last = a.reshape(-1, a.shape[-1])
    if np.all(last == last[:1]):  # channels-last neurons (after a Linear on tokens)
        return torch.from_numpy(last[0].astype(np.float32)), True, -1
    raise ExportError(f"import_nir: {where}: {what} varies within a channel; evefx holds one per channel")


def _neuron_from_nir(name: str, node: Any, dt: float, timesteps: int) -> SpikingNeuron:
    nir = _nir()
    where = f"node {name!r} ({type(node).__name__})"
    th, th_wise, th_axis = _per_channel(node.v_threshold, "v_threshold", where)
    reset, r_wise, r_axis = _per_channel(node.v_reset, "v_reset", where)
    shape = np.asarray(node.v_threshold).shape
    wise = th_wise or r_wise
    axis = th_axis if th_wise else r_axis
    if th_wise and r_wise and th_axis != r_axis:
        raise ExportError(f"import_nir: {where}: v_threshold and v_reset vary along different axes")
    channels = (int(shape[0]) if axis == 1 else int(shape[-1])) if shape else None
    if isinstance(node, nir.LIF):
        if not np.allclose(node.v_leak, node.v_reset, rtol=1e-6, atol=1e-7):
            raise ExportError(f"import_nir: {where}: v_leak differs from v_reset; an evefx LIF leaks toward its reset "
                              f"value")
        r = _uniform(node.r, "r", where)
        if not np.isclose(r, 1.0, rtol=1e-6):
            raise ExportError(f"import_nir: {where}: r = {r:g}; evefx's LIF has r = 1 (scale the weights before it "
                              f"by r instead)")
        tau = _uniform(node.tau, "tau", where) / dt
        if tau < 1.0:
            raise ExportError(f"import_nir: {where}: tau / dt = {tau:g} < 1 step; evefx's Euler step needs tau >= dt "
                              f"(pass the dt the file was written with)")
        neuron: SpikingNeuron = LIFNeuron(timesteps, 1.0, 0.0, tau=tau, channels=channels, neuron_wise=wise,
                                          channel_axis=axis)
    elif isinstance(node, nir.IF):
        r = _uniform(node.r, "r", where) * dt
        if not np.isclose(r, 1.0, rtol=1e-6):
            raise ExportError(f"import_nir: {where}: r * dt = {r:g}; evefx's IF adds its input once per step "
                              f"(r = 1/dt): pass the dt the file was written with")
        neuron = IFNeuron(timesteps, 1.0, 0.0, channels=channels, neuron_wise=wise, channel_axis=axis)
    else:  # pragma: no cover - callers dispatch
        raise ExportError(f"import_nir: {where} is not a neuron")
    with torch.no_grad():
        neuron.threshold.copy_(th.expand_as(neuron.threshold) if neuron.threshold.dim() else th.reshape(()))
        neuron.reset.copy_(reset.expand_as(neuron.reset) if neuron.reset.dim() else reset.reshape(()))
    return neuron.eval()


class _SumInputs(nn.Module):
    """Adds the outputs of several NIR nodes (NIR sums the edges into a node)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


def _module_from_nir(name: str, node: Any) -> nn.Module | None:
    nir = _nir()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    if isinstance(node, nir.Affine):
        m = nn.Linear(node.weight.shape[1], node.weight.shape[0])
        m.weight.data, m.bias.data = t(node.weight), t(node.bias)
        return m
    if isinstance(node, nir.Linear):
        m = nn.Linear(node.weight.shape[1], node.weight.shape[0], bias=False)
        m.weight.data = t(node.weight)
        return m
    if isinstance(node, (nir.Conv1d, nir.Conv2d)):
        cls = nn.Conv2d if isinstance(node, nir.Conv2d) else nn.Conv1d
        nd = 2 if isinstance(node, nir.Conv2d) else 1
        pad = node.padding
        if isinstance(pad, str):
            raise ExportError(f"import_nir: node {name!r}: string padding {pad!r} is not supported; write numbers")
        w = node.weight
        m = cls(w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]), stride=tuple(int(v) for v in _pair(node.stride, nd)),
                padding=tuple(int(p) for p in _pair(pad, nd)), dilation=tuple(int(v) for v in _pair(node.dilation, nd)),
                groups=int(node.groups))
        m.weight.data, m.bias.data = t(w), t(node.bias)
        return m
    if isinstance(node, nir.Flatten):
        end = int(node.end_dim)
        return nn.Flatten(int(node.start_dim) + 1, end + 1 if end >= 0 else end)
    if isinstance(node, nir.AvgPool2d):
        return nn.AvgPool2d(tuple(_pair(node.kernel_size, 2)), tuple(_pair(node.stride, 2)),
                            tuple(_pair(node.padding, 2)))
    if isinstance(node, nir.SumPool2d):
        k = tuple(int(v) for v in _pair(node.kernel_size, 2))
        return nn.AvgPool2d(k, tuple(_pair(node.stride, 2)), tuple(_pair(node.padding, 2)), divisor_override=k[0] * k[1])
    return None


def import_nir(source: str | os.PathLike | Any, *, dt: float | None = None, timesteps: int | None = None) -> fx.GraphModule:
    """Read a NIR graph (a file or a :class:`nir.NIRGraph`) back into an evefx model.

    The result runs whole sequences as evefx models do: its input is the time-folded steps
    ``[T*B, ...]`` that the NIR ``Input`` sees one at a time (the encoder's output), its output
    the ``T`` steps of the NIR ``Output`` (average them for evefx's mean decoder). ``dt`` and
    ``timesteps`` default to the values in the graph's metadata (evefx writes both).

    Supported nodes: Input, Output, Affine, Linear, Conv1d, Conv2d, Flatten, AvgPool2d, SumPool2d,
    IF, LIF (``v_leak == v_reset``, uniform ``tau`` and ``r``); anything else raises
    :class:`~evefx.errors.ExportError` naming the node.

    Example:
        >>> back = import_nir("model.nir")
        >>> steps = back(spikes.reshape(8 * B, 1, 28, 28))   # [8*B, 10]
    """
    nir = _nir()
    if isinstance(source, (str, os.PathLike)):
        try:
            graph = nir.read(str(source))
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(f"import_nir: cannot read {source}: {e}") from e
    else:
        graph = source
    md = dict(getattr(graph, "metadata", {}) or {})
    if dt is None:
        dt = float(md["dt"]) if "dt" in md else None
        if dt is None:
            raise ExportError("import_nir: the graph does not record dt (not written by evefx); pass dt=<seconds per step>")
    if timesteps is None:
        if "timesteps" not in md:
            raise ExportError("import_nir: the graph does not record timesteps; pass timesteps=T")
        timesteps = int(md["timesteps"])
    root = nn.Module()
    fxg = fx.Graph()
    inputs = [k for k, v in graph.nodes.items() if isinstance(v, nir.Input)]
    outputs = [k for k, v in graph.nodes.items() if isinstance(v, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"import_nir: evefx reads graphs with one Input and one Output (found {len(inputs)} and "
                          f"{len(outputs)})")
    preds: dict[str, list[str]] = {k: [] for k in graph.nodes}
    for a, b in graph.edges:
        if a not in graph.nodes or b not in graph.nodes:
            raise ExportError(f"import_nir: edge ({a!r}, {b!r}) names a node the graph does not have")
        preds[b].append(a)
    values: dict[str, fx.Node] = {inputs[0]: fxg.placeholder("x")}
    pending = [k for k in graph.nodes if k not in values]
    used: set[str] = set()
    names: dict[str, str] = {}  # submodule -> NIR node

    def attr(name: str) -> str:
        base = "".join(c if c.isalnum() else "_" for c in name) or "node"
        if base[0].isdigit():
            base = "n_" + base
        out, i = base, 1
        while out in used:
            out, i = f"{base}_{i}", i + 1
        used.add(out)
        return out

    while pending:
        ready = [k for k in pending if all(p in values for p in preds[k])]
        if not ready:
            raise ExportError(f"import_nir: nodes {pending} form a cycle or miss inputs; evefx imports feed-forward "
                              f"graphs only")
        for k in ready:
            pending.remove(k)
            node = graph.nodes[k]
            if not preds[k]:
                raise ExportError(f"import_nir: node {k!r} has no input edge")
            ins = [values[p] for p in preds[k]]
            x = ins[0]
            if len(ins) > 1:
                name = attr(f"{k}_sum")
                root.add_module(name, _SumInputs())
                x = fxg.call_module(name, tuple(ins))
            if isinstance(node, nir.Output):
                values[k] = x
                continue
            if isinstance(node, (nir.IF, nir.LIF)):
                module: nn.Module | None = _neuron_from_nir(k, node, dt, timesteps)
            else:
                module = _module_from_nir(k, node)
            if module is None:
                raise ExportError(f"import_nir: node {k!r} is a {type(node).__name__}, which evefx does not import "
                                  f"(supported: Affine, Linear, Conv1d, Conv2d, Flatten, AvgPool2d, SumPool2d, IF, LIF)")
            name = attr(k)
            names[name] = k
            root.add_module(name, module)
            values[k] = fxg.call_module(name, (x,))
    fxg.output(values[outputs[0]])
    gm = fx.GraphModule(root, fxg)
    gm.meta.update({"nir": md, "nir_names": names})
    return gm.eval()


# --------------------------------------------------------------------------------------------------
# spike traces: what each NIR node emits, from the evefx side
# --------------------------------------------------------------------------------------------------
def spike_traces(gm: fx.GraphModule, steps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run an evefx model on the per-step inputs its NIR graph's ``Input`` sees and return what
    every neuron (and the ``Output``) emits, as ``{NIR node name: [T, B, ...]}``.

    ``steps`` is ``[T, B, ...]``: the encoder's output (a Poisson encoder's spike trains are
    replaced by ``steps``; a direct encoder needs the same input at every step; a model from
    :func:`import_nir`, which has no encoder, reads them as they are). This is the reference a
    simulator running the NIR file is compared with, layer by layer.

    Example:
        >>> traces = spike_traces(gm, spikes)        # spikes [8, B, 1, 28, 28]
        >>> traces["features.0.neuron"].shape, traces["output"].shape
        (torch.Size([8, B, 4, 14, 14]), torch.Size([8, B, 10]))
    """
    T, B = steps.shape[:2]
    names = getattr(gm, "meta", {}).get("nir_names", {})  # an imported model: report NIR node names
    neurons = {n.target: n for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(gm.get_submodule(n.target), SpikingNeuron)}
    encoders = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), (PoissonEncoder, DirectEncoder))]
    out: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str) -> Callable:
        def hook(_m, _inp, o):
            out[name] = o.detach().reshape(T, B, *o.shape[1:]).clone()
        return hook

    try:
        for name in neurons:
            handles.append(gm.get_submodule(name).register_forward_hook(keep(names.get(name, name))))
        if any(isinstance(e, DirectEncoder) for e in encoders):
            if not torch.equal(steps, steps[:1].expand_as(steps)):
                raise ExportError("spike_traces: the model has a direct encoder, so every step must be the same input")
            x = steps[0]
        elif not encoders:  # an imported model: it reads the steps themselves
            x = steps.reshape(T * B, *steps.shape[2:])
        else:
            x = torch.zeros_like(steps[0])
            for e in encoders:  # the encoder's spike trains become the given steps
                handles.append(e.register_forward_hook(lambda _m, _i, _o: steps.reshape(T * B, *steps.shape[2:])))
        decoders = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
                    and isinstance(gm.get_submodule(n.target), MeanDecoder)]
        for d in decoders:
            handles.append(d.register_forward_pre_hook(
                lambda _m, inp: out.__setitem__("output", inp[0].detach().reshape(T, B, *inp[0].shape[1:]).clone())))
        with torch.no_grad():
            final = gm(x)
        if "output" not in out:
            out["output"] = final.detach().reshape(T, B, *final.shape[1:])
    finally:
        for h in handles:
            h.remove()
    return out
