"""The eve protocol as functions over a transformed model: parameters, observations, state, modes.

Example:
    >>> for p in evefx.eve_parameters(gm): print(p.name, p.low, p.high, p.value)
    >>> obs = evefx.observe(gm, torch.rand(8, 1, 28, 28))
    >>> evefx.set_mode(gm, quantized=False)
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.table import Table
from torch import fx, nn

from evefx.errors import OptionError, UnknownNameError
from evefx.graph import Provenance, layer_nodes, module_of, provenance
from evefx.layers import as_inputs, eval_mode, layer_macs, shape_of
from evefx.modules.protocol import EveHooks, EveRange

__all__ = [
    "EveParameter",
    "Observations",
    "STATIC_COLUMNS",
    "eve_parameters",
    "set_eve_parameter",
    "observe",
    "reset",
    "set_mode",
    "eve_modules",
    "never_pruned",
    "load_checkpoint",
]

STATIC_COLUMNS = (
    "is_conv", "is_linear", "is_depthwise", "in_channels", "out_channels", "kernel", "stride",
    "groups", "params", "macs", "in_size", "weight_l1",
)
"""Observation columns every layer has, derived from the traced graph and its weights."""


@dataclass
class EveParameter:
    """One eve parameter: a per-layer hyper-parameter the upgrader sets (not trained by gradients).

    Example:
        >>> p = evefx.eve_parameters(gm)[0]; p.set(4); p.value
        4.0
    """

    name: str
    layer: str
    kind: str
    role: str
    spec_path: str
    low: float
    high: float
    integer: bool
    module: nn.Module = field(repr=False, compare=False)

    @property
    def range(self) -> EveRange:
        return EveRange(self.low, self.high, self.integer)

    @property
    def value(self) -> float:
        return self.module.get_eve(self.kind)

    def set(self, value: float) -> None:
        """Set the parameter; a value outside ``[low, high]`` (or not whole when ``integer``) raises
        :class:`~evefx.OptionError` naming the range and the section it comes from."""
        try:
            value = self.range.check(value, f"eve parameter {self.name}")
        except OptionError as e:
            raise OptionError(f"{e}; the range comes from {self.spec_path} (layer {self.layer}): widen it there") from None
        self.module.set_eve(self.kind, value)


def eve_modules(gm: fx.GraphModule) -> Iterator[tuple[str, Provenance, EveHooks]]:
    """``(qualified name, provenance, module)`` of every eve-protocol module evefx put in ``gm``."""
    for node in gm.graph.nodes:
        prov = provenance(node)
        if prov is None or node.op != "call_module":
            continue
        root = module_of(gm, node)
        for sub_name, sub in root.named_modules():
            if isinstance(sub, EveHooks):
                yield ".".join(p for p in (str(node.target), sub_name) if p), prov, sub


def eve_parameters(gm: fx.GraphModule) -> list[EveParameter]:
    """Every eve parameter of ``gm`` in graph order, with its layer, range and current value."""
    out = []
    for name, prov, module in eve_modules(gm):
        for kind, rng in module.eve_ranges().items():
            out.append(
                EveParameter(f"{name}.{kind}", prov.layer, kind, prov.role, prov.spec_path,
                             rng.low, rng.high, rng.integer, module)
            )
    return out


def set_eve_parameter(gm: fx.GraphModule, name: str, value: float) -> None:
    """Set eve parameter ``name`` (as listed by :func:`eve_parameters`) to ``value``.

    An unknown name raises :class:`~evefx.UnknownNameError` (a ``KeyError``) listing the known
    ones; a value outside the parameter's range raises :class:`~evefx.OptionError` (a ``ValueError``)
    naming the range: values are never silently clipped.

    Example:
        >>> evefx.set_eve_parameter(gm, "features.0.weight_quantizer.bits", 4)
    """
    params = eve_parameters(gm)
    for p in params:
        if p.name == name:
            p.set(value)
            return
    import difflib

    close = difflib.get_close_matches(name, [p.name for p in params], n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    known = ", ".join(p.name for p in params) or "(none: enable upgrade_bits/upgrade_ratio in the spec)"
    raise UnknownNameError(f"no eve parameter {name!r}; {hint}known: {known}")


@dataclass(frozen=True)
class Observations:
    """One row of float32 features per conv/linear layer, with named columns.

    Example:
        >>> obs = evefx.observe(gm); obs.row("features.0")["macs"]
    """

    layers: tuple[str, ...]
    columns: tuple[str, ...]
    values: np.ndarray

    def row(self, layer: str) -> dict[str, float]:
        if layer not in self.layers:
            import difflib

            close = difflib.get_close_matches(layer, self.layers, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownNameError(f"no layer {layer!r} in these observations; {hint}layers: {', '.join(self.layers)}")
        i = self.layers.index(layer)
        return dict(zip(self.columns, self.values[i].tolist()))

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {layer: self.row(layer) for layer in self.layers}

    def table(self) -> Table:
        t = Table(title="evefx observations")
        t.add_column("layer")
        for c in self.columns:
            t.add_column(c, justify="right")
        for layer, row in zip(self.layers, self.values):
            t.add_row(layer, *(f"{v:.4g}" for v in row))
        return t


def _static_features(gm: fx.GraphModule, node: fx.Node) -> dict[str, float]:
    m = module_of(gm, node)
    weight = getattr(m, "weight", None)
    params = sum(p.numel() for p in m.parameters(recurse=False))
    feats = dict.fromkeys(STATIC_COLUMNS, 0.0)
    feats["params"] = float(params)
    if isinstance(weight, torch.Tensor):
        feats["weight_l1"] = float(weight.detach().abs().mean())
    out_shape = shape_of(node)
    in_shape = shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if isinstance(m, nn.modules.conv._ConvNd):
        kernel = int(np.prod(m.kernel_size))
        feats.update(is_conv=1.0, in_channels=m.in_channels, out_channels=m.out_channels, kernel=kernel,
                     stride=m.stride[0], groups=m.groups,
                     is_depthwise=float(m.groups == m.in_channels and m.groups > 1))
        if in_shape is not None:
            feats["in_size"] = float(np.prod(in_shape[2:]))
    elif isinstance(m, nn.Linear):
        feats.update(is_linear=1.0, in_channels=m.in_features, out_channels=m.out_features, kernel=1, stride=1, groups=1)
        feats["in_size"] = 1.0
    feats["macs"] = float(layer_macs(m, out_shape) or 0)  # 0 without a recorded shape: unknown
    return feats


@torch.no_grad()
def _activation_stats(gm: fx.GraphModule, nodes: list[fx.Node], inputs: tuple[Any, ...]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    hooks = []
    for node in nodes:
        def hook(_m, _i, out, key=str(node.target)):
            out = out.detach().float()
            stats[key] = {"act_mean": float(out.mean()), "act_var": float(out.var()) if out.numel() > 1 else 0.0,
                          "act_max": float(out.abs().max())}
        hooks.append(module_of(gm, node).register_forward_hook(hook))
    try:
        with eval_mode(gm):
            gm(*inputs)
    finally:
        for h in hooks:
            h.remove()
        reset(gm)
    return stats


def observe(gm: fx.GraphModule, example_inputs: torch.Tensor | tuple[Any, ...] | None = None) -> Observations:
    """Per-layer features: static ones from the graph (see ``STATIC_COLUMNS``), the statistics each
    inserted module gathered (columns ``"{role}.{key}"``), and, when ``example_inputs`` are given,
    activation mean/var/max of each layer's output from one eval forward (no state kept).

    Example:
        >>> obs = evefx.observe(gm, torch.rand(16, 1, 28, 28))
        >>> obs.values.shape  # (layers, columns)
    """
    nodes = layer_nodes(gm)
    rows: dict[str, dict[str, float]] = {str(n.target): _static_features(gm, n) for n in nodes}
    inputs = as_inputs(example_inputs)
    if inputs is not None:
        for layer, s in _activation_stats(gm, nodes, inputs).items():
            rows[layer].update(s)
    for _name, prov, module in eve_modules(gm):
        layer = prov.layer
        if layer in rows:
            for key, value in module.observations().items():
                rows[layer][f"{prov.role}.{key}"] = float(value)
    columns = list(STATIC_COLUMNS)
    for r in rows.values():
        columns += [c for c in r if c not in columns]
    values = np.array([[r.get(c, 0.0) for c in columns] for r in rows.values()], dtype=np.float32).reshape(len(rows), len(columns))
    return Observations(tuple(rows), tuple(columns), values)


def reset(gm: nn.Module) -> None:
    """Clear the hidden state of every eve module (membrane potentials and the like)."""
    for m in gm.modules():
        if isinstance(m, EveHooks):
            m.reset_state()


def set_mode(
    gm: nn.Module,
    *,
    spiking: bool | None = None,
    quantized: bool | None = None,
    pruned: bool | None = None,
    step: str | None = None,
) -> None:
    """Switch behaviours without retracing: ``quantized=False`` makes quantizers the identity,
    ``spiking=False`` makes neurons ReLU/LeakyReLU, ``pruned=False`` lifts masks,
    ``step="single"|"multi"`` chooses how neurons take time. ``None`` leaves a flag as it is.

    Example:
        >>> evefx.set_mode(gm, quantized=False)   # now equals the float model
    """
    if step is not None and step not in ("single", "multi"):
        raise OptionError(f"set_mode(step={step!r}): step must be 'single' or 'multi'")
    flags: dict[str, Any] = {k: v for k, v in dict(spiking=spiking, quantized=quantized, pruned=pruned, step=step).items() if v is not None}
    found = False
    for m in gm.modules():
        if isinstance(m, EveHooks):
            m.set_mode(**flags)
            found = True
    if flags and not found:
        import warnings

        from evefx.errors import EvefxWarning

        warnings.warn(f"set_mode({', '.join(f'{k}={v!r}' for k, v in flags.items())}): {type(gm).__name__} has no evefx "
                      "modules, so nothing changed; pass the module evefx.transform returned", EvefxWarning, stacklevel=2)


def never_pruned(gm: nn.Module) -> list[str]:
    """Layers whose channel pruner has never pruned (no :func:`evefx.prune_step` since transform, or a
    checkpoint saved before one): their masks keep every channel, so an export would be the unpruned
    model with no-op ``Mul`` nodes. Empty when every pruner has stepped (or there is none).

    Example:
        >>> gm = evefx.transform(DemoNet(), "examples/specs/prune.yaml")
        >>> evefx.never_pruned(gm)
        ['features.0', 'features.3', 'features.6', 'classifier.1']
    """
    from evefx.modules.prune import ChannelPruner

    layers = []
    if isinstance(gm, fx.GraphModule):
        for _name, prov, module in eve_modules(gm):
            if isinstance(module, ChannelPruner) and int(module.steps_done) == 0 and prov.layer not in layers:
                layers.append(prov.layer)
    else:
        layers = [n for n, m in gm.named_modules() if isinstance(m, ChannelPruner) and int(m.steps_done) == 0]
    return layers


def load_checkpoint(module: nn.Module, path: str | Path, what: str = "checkpoint",
                    saved_from: str = "the model transformed with the same spec (evefx transform --out, or "
                                      "torch.save(gm.state_dict()))") -> None:
    """Load the state_dict saved at ``path`` into ``module``, or raise one :class:`~evefx.EvefxError`
    line saying what does not fit (a missing or unreadable file, not a state_dict, keys of another
    model) and, with ``saved_from``, where a fitting one comes from. A training checkpoint
    ``{"state_dict": ..., "epoch": ...}`` gives its ``state_dict``.

    Example:
        >>> load_checkpoint(gm, "out/demo/demo_w8a8.pt")
    """
    from evefx.errors import EvefxError

    try:
        state = torch.load(path, map_location="cpu")
    except pickle.UnpicklingError as e:  # not a torch file, or one holding objects besides tensors
        raise EvefxError(f"cannot read {what} {path}: torch.load(weights_only=True) refused it; save the model's "
                         "state_dict with torch.save") from e
    except Exception as e:  # missing or unreadable
        raise EvefxError(f"cannot read {what} {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EvefxError(f"{what} {path} holds a {type(state).__name__}, not a state_dict (save model.state_dict())")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0].rstrip(":")
        missing = [k for k in module.state_dict() if k not in state][:3]
        unexpected = [k for k in state if k not in module.state_dict()][:3]
        detail = "; ".join(p for p in (f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "") if p)
        raise EvefxError(f"{what} {path} does not fit this model ({detail or first}): save it from {saved_from}") from e
