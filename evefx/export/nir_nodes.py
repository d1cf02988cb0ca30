"""NIR export, node by node: the walk over the fx graph that emits one NIR node per evefx layer.

:class:`NodeBuilder` visits the nodes in order: modules go through the user's ``rules``, then the
built-in mapping (neurons, conv/linear with BatchNorm folded, flatten, pooling), functions through
``add`` and the reshapes that flatten; anything else raises :class:`~evefx.errors.ExportError`
naming the node and listing what is supported. :func:`evefx.export.nir.export_nir` drives it.

Example:
    >>> graph = NodeBuilder(gm, shapes, dt=1e-3).build()
    >>> type(graph.nodes["input"]).__name__
    'Input'
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from evefx.errors import ExportError
from evefx.modules.encoding import DirectEncoder, MeanDecoder, PoissonEncoder
from evefx.modules.neurons import IFNeuron, LIFNeuron, PLIFNeuron, SpikingNeuron

__all__ = ["NodeBuilder", "load_nir", "pair", "SUPPORTED"]


def load_nir():
    """The ``nir`` package (a dependency), with an :class:`ExportError` saying how to install it if missing."""
    try:
        import nir
    except ImportError as e:  # pragma: no cover - nir is a dependency
        raise ExportError("NIR export needs the 'nir' package: pip install nir nirtorch") from e
    return nir


def _np(t: torch.Tensor | float, shape: tuple[int, ...] | None = None, dtype=np.float32, axis: int = 0) -> np.ndarray:
    """``t`` as an array, broadcast to ``shape``; a per-channel ``[C]`` lies along ``axis`` of ``shape``."""
    a = t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
    if shape is not None:
        if a.ndim == 1 and len(shape) > 1:  # per-channel [C] -> [C, 1, 1, ...] (axis 0) or [C] (last axis)
            a = a.reshape(a.shape[0], *([1] * (len(shape) - 1 - axis % len(shape))))
        a = np.broadcast_to(a, shape)
    return np.ascontiguousarray(a, dtype=dtype)


def pair(v: Any, n: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64).reshape(-1)
    return np.ascontiguousarray(np.broadcast_to(a, (n,)) if a.size == 1 else a)


_SKIP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
SUPPORTED = ("Conv1d", "Conv2d", "Linear", "BatchNorm1d/2d (folded into the conv/linear before it)", "Flatten",
              "AvgPool2d", "AdaptiveAvgPool2d (evenly divisible)", "IFNeuron", "LIFNeuron", "PLIFNeuron",
              "Identity/Dropout", "add", "flatten/view/reshape that flattens", "mean over H and W")


class NodeBuilder:
    """Walks the fx graph in order and emits NIR nodes; ``src[node]`` is the list of NIR nodes
    whose outputs sum to that fx node's value (two after an ``add``)."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...] | None], dt: float,
                 rules: dict[type, Callable[[nn.Module, tuple[int, ...]], Any]] | None = None):
        self.nir = load_nir()
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
    def full_shape(self, n: fx.Node) -> tuple[int, ...]:
        shape = self.shapes.get(n)
        if shape is None:
            raise ExportError(f"NIR export: node {n.name} ({n.format_node()}) is not a tensor; NIR edges carry tensors")
        return tuple(int(s) for s in shape)

    def step_shape(self, n: fx.Node) -> tuple[int, ...]:
        return self.full_shape(n)[1:]  # drop the (time-folded) batch dim

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
            if float(m.gain) != 1.0:
                self.fold_gain(n, float(m.gain), self.only_input(n))
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
            node = _conv(cls, input_shape=in_shape if nd == 2 else in_shape[0], weight=w, stride=pair(m.stride, nd),
                         padding=pair(m.padding, nd), dilation=pair(m.dilation, nd), groups=int(m.groups), bias=b)
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
            if m.ceil_mode or m.divisor_override is not None or (not m.count_include_pad and np.any(pair(m.padding, 2))):
                raise ExportError(f"NIR export: {where} uses ceil_mode/divisor_override/count_include_pad=False; NIR's "
                                  f"AvgPool2d is the plain average: use AvgPool2d(kernel, stride, padding)")
            self.pool(n, x, m.kernel_size, m.stride if m.stride is not None else m.kernel_size, m.padding)
        elif type(m) is nn.AdaptiveAvgPool2d:
            height, width = self.step_shape(x)[-2:]
            size = m.output_size  # an int or a pair (torch types it Optional too); None keeps that input size
            oh, ow = (size, size) if size is None or isinstance(size, int) else size
            oh, ow = oh or height, ow or width
            if height % oh or width % ow:
                raise ExportError(f"NIR export: {where} maps {height}x{width} to {oh}x{ow}, not an even division; NIR has only "
                                  f"fixed-window pooling: use AvgPool2d or an input size divisible by the output size")
            self.pool(n, x, (height // oh, width // ow), (height // oh, width // ow), 0)
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            raise ExportError(f"NIR export: {where}: NIR has no max pooling (neuromorphic hardware sums spikes); "
                              f"replace it with nn.AvgPool2d (same kernel and stride) and retrain or fine-tune")
        elif type(m).__module__.startswith("torch.nn.modules.activation"):
            raise ExportError(f"NIR export: {where} is an analog activation; a NIR graph carries spikes between "
                              f"layers: select its layer in the spike section so a neuron replaces it")
        else:
            raise ExportError(f"NIR export: {where} has no NIR counterpart; supported: {', '.join(SUPPORTED)}. "
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
        if float(m.input_gain) != 1.0:
            self.fold_gain(n, float(m.input_gain), x)
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

    def weighted_source(self, x: fx.Node) -> tuple[str, Any]:
        """The name and NIR node of the one conv/linear node ``x`` maps to (``("", None)`` when it
        maps to anything else): what a BatchNorm or a gain folds into."""
        nir = self.nir
        names = self.src.get(x, [])
        prev = self.nodes.get(names[0]) if len(names) == 1 else None
        if isinstance(prev, (nir.Conv1d, nir.Conv2d, nir.Affine, nir.Linear)):
            return names[0], prev
        return "", None

    def row(self, name: str) -> dict[str, Any]:
        """The export table's row of the NIR node ``name``."""
        return next(r for r in self.rows if r["name"] == name)

    def fold_gain(self, n: fx.Node, gain: float, x: fx.Node) -> None:
        """A neuron's ``input_gain`` or a decoder's ``gain`` goes into the weights of the layer it
        reads (NIR has no scaling node; the spike pass sets a gain only right after such a layer)."""
        name, prev = self.weighted_source(x)
        if prev is None or any(a == name for a, _ in self.edges):
            raise ExportError(f"NIR export: {n.target} scales its input by {gain:g} but does not read a conv/linear "
                              f"layer to fold it into; transform with weight_scale_no_bn: 1")
        prev.weight = (prev.weight.astype(np.float64) * gain).astype(np.float32)
        if getattr(prev, "bias", None) is not None:
            prev.bias = (prev.bias.astype(np.float64) * gain).astype(np.float32)
        self.row(name)["note"] += f", x{gain:.4g} (the gain of {n.target})"

    def fold_bn(self, n: fx.Node, m: nn.Module, x: fx.Node) -> None:
        nir = self.nir
        name, prev = self.weighted_source(x)
        if prev is None or len(x.users) != 1 or self.owner.get(name) is not x:
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
        if isinstance(prev, (nir.Conv1d, nir.Conv2d)):
            cls = type(prev)
            new = _conv(cls, input_shape=prev.input_shape, weight=w.astype(np.float32), stride=prev.stride,
                        padding=prev.padding, dilation=prev.dilation, groups=prev.groups, bias=b.astype(np.float32))
        else:
            new = nir.Affine(weight=w.astype(np.float32), bias=b.astype(np.float32))
        self.nodes[name] = new
        self.owner[name] = n
        self.src[n] = [name]
        row = self.row(name)
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
        node = self.nir.AvgPool2d(kernel_size=pair(kernel, 2), stride=pair(stride, 2), padding=pair(padding, 2))
        self.emit(n, node, "mean over the window", arg=x)

    def global_mean(self, n: fx.Node, x: fx.Node) -> None:
        """``x.mean((2, 3))`` of a (C, H, W) map: global average pooling, as NIR's AvgPool2d over the
        whole map (then Flatten to C values unless ``keepdim``)."""
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keepdim = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        shape = self.full_shape(x)
        spatial = {d % len(shape) for d in ((dims,) if isinstance(dims, int) else tuple(dims or ()))}
        if len(shape) != 4 or spatial != {2, 3}:
            raise ExportError(f"NIR export: node {n.name} ({n.format_node()}) averages over dims {dims} of a "
                              f"{len(shape)}-D tensor; NIR has global average pooling only over the two spatial dims "
                              f"of a (N, C, H, W) map")
        height, width = shape[2:]
        pool = self.emit(n, self.nir.AvgPool2d(kernel_size=pair((height, width), 2), stride=pair((height, width), 2),
                                               padding=pair(0, 2)), "mean over every position", arg=x)
        if not keepdim:
            flat = self.nir.Flatten(input_type={"input": np.array((shape[1], 1, 1))}, start_dim=0, end_dim=-1)
            self.edges.append((pool, self.emit(n, flat, "the 1x1 map as C values", name=f"{pool}_flatten")))

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
            before, after = self.full_shape(x), self.full_shape(n)
            if after[0] == before[0] and len(after) == 2:
                self.flatten(n, x, 1, -1)
                return
            if after == before:
                self.src[n] = self.sources(n, x)
                return
        if target in ("mean", torch.mean) and len(ins) == 1:
            self.global_mean(n, ins[0])
            return
        if target in ("contiguous", "clone", "detach") and len(ins) == 1:
            self.src[n] = self.sources(n, ins[0])
            return
        fname = getattr(target, "__name__", str(target))
        raise ExportError(f"NIR export: node {n.name} calls {fname} ({n.format_node()}), which has no NIR node; "
                          f"supported: {', '.join(SUPPORTED)}")


def _conv(cls: Any, **fields: Any) -> Any:
    """A nir Conv1d/Conv2d whose input type counts every input channel: nir 1.0 infers it as
    ``weight.shape[1]``, which a grouped conv has ``groups`` times over, and its own type check then
    rejects a depthwise conv's graph."""
    node = cls(**fields)
    declared = node.input_type.get("input")
    if fields["groups"] > 1 and declared is not None:
        node.input_type = {"input": np.array([fields["weight"].shape[1] * fields["groups"], *np.atleast_1d(declared)[1:]])}
    return node


def _summary(a: np.ndarray) -> str:
    lo, hi = float(a.min()), float(a.max())
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
