"""NIR import: a NIR graph read back into an evefx model, and the spike traces a simulator is compared with.

:func:`import_nir` maps each NIR node to an evefx module (neurons with their per-channel threshold
and reset, conv/linear, flatten, pooling) in an ``fx.GraphModule`` that runs whole sequences;
:func:`spike_traces` runs an evefx model (exported or imported) step by step and returns what every
neuron emits, named as in the NIR graph.

Example:
    >>> back = import_nir("model.nir")
    >>> traces = spike_traces(back, spikes)       # spikes [T, B, 1, 28, 28]
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from evefx.errors import ExportError
from evefx.export.nir_nodes import load_nir, pair
from evefx.modules.encoding import DirectEncoder, MeanDecoder, PoissonEncoder
from evefx.modules.neurons import IFNeuron, LIFNeuron, SpikingNeuron

__all__ = ["import_nir", "spike_traces"]



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
    nir = load_nir()
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
    assert neuron.reset is not None, "both neurons are built with a hard reset"
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
    nir = load_nir()
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
        conv = cls(w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]), stride=tuple(int(v) for v in pair(node.stride, nd)),
                padding=tuple(int(p) for p in pair(pad, nd)), dilation=tuple(int(v) for v in pair(node.dilation, nd)),
                groups=int(node.groups))
        conv.weight.data, conv.bias.data = t(w), t(node.bias)
        return conv
    if isinstance(node, nir.Flatten):
        end = int(node.end_dim)
        return nn.Flatten(int(node.start_dim) + 1, end + 1 if end >= 0 else end)
    if isinstance(node, nir.AvgPool2d):
        return nn.AvgPool2d(tuple(pair(node.kernel_size, 2)), tuple(pair(node.stride, 2)),
                            tuple(pair(node.padding, 2)))
    if isinstance(node, nir.SumPool2d):
        k = tuple(int(v) for v in pair(node.kernel_size, 2))
        return nn.AvgPool2d(k, tuple(pair(node.stride, 2)), tuple(pair(node.padding, 2)), divisor_override=k[0] * k[1])
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
    nir = load_nir()
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
        for d in decoders:  # a step's output is what the decoder averages, times its gain (NIR folds it in)
            handles.append(d.register_forward_pre_hook(
                lambda m, inp: out.__setitem__("output", (inp[0].detach() * m.gain).reshape(T, B, *inp[0].shape[1:]))))
        with torch.no_grad():
            final = gm(x)
        if "output" not in out:
            out["output"] = final.detach().reshape(T, B, *final.shape[1:])
    finally:
        for h in handles:
            h.remove()
    return out
