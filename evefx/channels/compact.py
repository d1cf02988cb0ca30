"""Physical removal of masked channels (:func:`compact`), and its size report.

Producing layers lose output channels (with their BatchNorm entries), consuming layers lose the
matching input channels (a removed channel they read as a constant goes into their bias),
depthwise convs lose both and their groups, grouped convs the same positions in every group, and
literal sizes in ``view``/``reshape`` calls are rewritten. The result is checked against the
masked model.

Example:
    >>> small = evefx.compact(gm)        # a new, smaller module; gm is untouched
    >>> compact_report(small).params_after
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from evefx.channels.analysis import ConsumerSite, DependencyGraph, Site, analyze, ensure_shapes, pruners_of
from evefx.channels.rules import MaskedValue, RuleRegistry
from evefx.errors import PruneError, ShapeError
from evefx.graph import describe_node, module_of, output_block, recorded_inputs, remove_node
from evefx.layers import as_inputs, count_macs, count_params, eval_mode, runs_torch_forward
from evefx.modules.neurons import SpikingNeuron
from evefx.modules.quant_layers import QUANT_LAYER_TYPES
from evefx.modules.quantizer import Quantizer
from evefx.trace import propagate_shapes

__all__ = ["CompactReport", "compact", "compact_report"]

log = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm


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
    defaults = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.args}
    for name, shape, dtype in recorded_inputs(gm):
        if (shape is None or dtype is None) and name in defaults:
            break  # a defaulted option (scale: float = 1.0, mask=None): it and those after keep their defaults
        if shape is None or dtype is None:
            raise PruneError(f"input {name!r} has no shape; pass example_inputs to evefx.compact")
        if dtype.is_floating_point:
            out.append(torch.randn(tuple(shape), generator=gen).to(dtype))
        else:
            out.append(torch.zeros(tuple(shape), dtype=dtype))
    return tuple(out)


def _param(t: torch.Tensor, like: nn.Parameter | None) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=like.requires_grad if like is not None else True)


class _Side(Enum):
    """Which channels of a layer a cut removes."""

    OUTPUTS = "outputs"  # a producer's filters (and bias)
    INPUTS = "inputs"  # a consumer's input channels or features
    THROUGH = "through"  # a depthwise or grouped conv: output channel c is input channel c
    NORM = "norm"  # a BatchNorm's entries


@dataclass(frozen=True)
class _Cut:
    module: nn.Module
    node: fx.Node
    keep: torch.Tensor  # indices kept
    whole: bool  # nothing removed


class _Slicer:
    """Collects the index sets each module keeps, checks that shared modules agree, then slices."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cuts: dict[tuple[int, _Side], _Cut] = {}

    def add(self, side: _Side, site: Site, keep: np.ndarray) -> None:
        if not keep.all() and not runs_torch_forward(site.module) and not isinstance(site.module, (SpikingNeuron, *QUANT_LAYER_TYPES)):
            raise PruneError(
                f"compact cannot slice {describe_node(self.gm, site.node)}: only torch.nn conv, linear and BatchNorm layers, "
                f"evefx's quantized layers and neurons are sliced (a custom layer may hold per-channel state)"
            )
        idx = torch.as_tensor(np.flatnonzero(keep), dtype=torch.long)
        key = (id(site.module), side)
        prev = self.cuts.get(key)
        if prev is not None and not torch.equal(prev.keep, idx):
            raise PruneError(
                f"{describe_node(self.gm, site.node)} shares its module with {describe_node(self.gm, prev.node)}, but they would lose "
                f"different channels; give each call its own module"
            )
        self.cuts[key] = _Cut(site.module, site.node, idx, bool(keep.all()))

    def apply(self) -> None:
        for (_, side), cut in self.cuts.items():
            if cut.whole:
                continue
            m, idx = cut.module, cut.keep
            with torch.no_grad():
                if side is _Side.OUTPUTS:
                    _slice_out(m, idx)
                elif side is _Side.INPUTS:
                    _slice_in(m, idx)
                elif side is _Side.THROUGH:
                    assert isinstance(m, nn.modules.conv._ConvNd), "only a grouped conv passes channels through (rules.conv)"
                    if m.groups == m.in_channels:
                        _slice_out(m, idx)
                        m.in_channels = m.groups = len(idx)
                        continue
                    # grouped: the same positions go in every group (see rules.conv)
                    width = m.in_channels // m.groups
                    positions = idx[idx < width]
                    if len(idx) != len(positions) * m.groups:
                        raise PruneError(f"{describe_node(self.gm, cut.node)}: its groups would lose different channels; please report this bug")
                    _slice_out(m, idx)
                    m.weight = _param(m.weight.detach()[:, positions], m.weight)
                    m.in_channels = len(idx)
                elif side is _Side.NORM:
                    _slice_norm(m, idx)


def _slice_out(m: nn.modules.conv._ConvNd | nn.Linear, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight.detach()[idx], m.weight)
    if getattr(m, "bias", None) is not None:
        m.bias = _param(m.bias.detach()[idx], m.bias)
    if isinstance(m, nn.Linear):
        m.out_features = len(idx)
    else:
        m.out_channels = len(idx)
    if isinstance(m, QUANT_LAYER_TYPES):  # its weights' per-channel grid and the BatchNorm folded into it
        _slice_quantizer(m.weight_quantizer, idx)
        if m.bn is not None:
            _slice_norm(m.bn, idx)


def _slice_quantizer(q: Quantizer, idx: torch.Tensor) -> None:
    """A per-channel quantizer's grid (scale or its log ratio and base, zero point, tracked range)
    keeps the channels ``idx``: each kept channel quantizes exactly as before."""
    if q.num_channels is None:
        return
    for name, t in [*q.named_parameters(recurse=False), *q.named_buffers(recurse=False)]:
        if t.dim() == 1 and t.shape[0] == q.num_channels:
            if isinstance(t, nn.Parameter):
                setattr(q, name, _param(t.detach()[idx], t))
            else:
                q.register_buffer(name, t[idx].clone())
    q.options = dataclasses.replace(q.options, num_channels=len(idx))


def _slice_in(m: nn.modules.conv._ConvNd | nn.Linear, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight.detach()[:, idx], m.weight)
    if isinstance(m, nn.Linear):
        m.in_features = len(idx)
    else:
        m.in_channels = len(idx)


def _slice_norm(m: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(m, SpikingNeuron):  # its per-channel threshold and reset (parameters or buffers)
        for name in ("threshold", "reset"):
            t = getattr(m, name)
            if isinstance(t, nn.Parameter):
                setattr(m, name, _param(t.detach()[idx], t))
            elif isinstance(t, torch.Tensor):
                m.register_buffer(name, t[idx].clone())
        m.channels = len(idx)
        return
    assert isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
    if m.weight is not None:
        m.weight = _param(m.weight.detach()[idx], m.weight)
        m.bias = _param(m.bias.detach()[idx], m.bias)
    if isinstance(m, nn.GroupNorm):  # whole groups go (see attention_rules.group_norm)
        m.num_groups = len(idx) * m.num_groups // m.num_channels
        m.num_channels = len(idx)
        return
    if m.running_mean is not None and m.running_var is not None:  # both or neither (track_running_stats)
        m.running_mean = m.running_mean[idx].clone()
        m.running_var = m.running_var[idx].clone()
    m.num_features = len(idx)


@torch.no_grad()
def _fold_constant(gm: fx.GraphModule, site: Site, pos: torch.Tensor, x: torch.Tensor) -> None:
    """Add to ``site``'s bias what its input channels ``pos`` contribute, constants in ``x`` (its input)."""
    m = site.module
    if isinstance(m, nn.Linear):  # features on the last axis: bring them to axis 1
        x = x.reshape(-1, x.shape[-1])
    vals = x[:, pos] if x.dim() > 1 else x[pos]
    k = vals.reshape(vals.shape[0], len(pos), -1)[0, :, 0]
    if not torch.allclose(vals, k.view((1, -1) + (1,) * (vals.dim() - 2)).expand_as(vals), atol=1e-5, rtol=1e-5):
        raise PruneError(f"{describe_node(gm, site.node)} reads removed channels that are not constant; please report this bug")
    if isinstance(m, QUANT_LAYER_TYPES):
        _fold_constant_quantized(m, pos, k)
        return
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


def _fold_constant_quantized(m: nn.Module, pos: torch.Tensor, k: torch.Tensor) -> None:
    """The same for an evefx quantized layer. It reads ``k`` on its input grid (captured after its
    input quantizer) and computes with its eval weight ``Q(W f)`` (BatchNorm folded), so the removed
    channels' share is ``sum Q(W f)[:, pos] k``: a whole number of ``s_x * s_w`` steps, which the
    folded bias takes exactly, on the int32 grid the exported file rounds it to as well."""
    w = m.weight_quantizer(m.folded_weight_bias()[0].detach())[:, pos]
    delta = w.reshape(w.shape[0], len(pos), -1).sum(-1) @ k.to(w.dtype)
    if m.bn is not None:  # b_f = beta + (b - running_mean) f: move b, or the mean when there is no b
        shift = delta / m._fold_factor().detach()
        if m.bias is None:
            m.bn.running_mean.sub_(shift.to(m.bn.running_mean.dtype))
        else:
            m.bias.add_(shift)
        return
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=m.weight.requires_grad)
    m.bias.add_(delta)


def _reshape_sizes(gm: fx.GraphModule, node: fx.Node, kept: np.ndarray) -> tuple[int, ...]:
    """The output shape of a recorded reshape once compacted, from which of its elements stay; the
    kept elements must form a slice (a product of one index set per axis)."""
    per_axis = [kept.any(axis=tuple(b for b in range(kept.ndim) if b != a)) for a in range(kept.ndim)]
    product = per_axis[0]
    for along in per_axis[1:]:
        product = np.multiply.outer(product, along)
    if not np.array_equal(product.reshape(kept.shape), kept):
        raise PruneError(f"{describe_node(gm, node)}: the kept channels do not form a slice of its output; please report this bug")
    return tuple(int(v.sum()) for v in per_axis)


def _rewrite_reshape(gm: fx.GraphModule, node: fx.Node, old: tuple[int, ...], new: tuple[int, ...]) -> list[str]:
    """Write the compacted sizes ``new`` into a ``view``/``reshape``/``unflatten`` call whose output had
    shape ``old``. A size computed at run time is left as it is (read from the compacted tensor it is
    right); the returned notes name them, for the error if the compacted model then fails."""
    if old == new:
        return []
    # the call's own arguments, as the user wrote them: ints, lists or tuples of ints, nodes
    args: list[Any] = list(node.args)
    notes: list[str] = []
    if node.target in ("unflatten", torch.unflatten):
        dim = int(args[1] if len(args) > 1 else node.kwargs["dim"]) % len(old)
        first, sizes, slot = dim, list(args[2]), 2
    elif len(args) == 2 and isinstance(args[1], (list, tuple)):
        first, sizes, slot = 0, list(args[1]), 1
    else:
        first, sizes, slot = 0, args[1:], None
    for k, size in enumerate(sizes):
        axis = first + k
        if old[axis] == new[axis] or size == -1:
            continue
        if not isinstance(size, int):
            notes.append(f"compact cannot rewrite {describe_node(gm, node)}: the size of its axis {axis} ({old[axis]} -> "
                         f"{new[axis]}) is computed at run time ({size}); write it as a literal, -1, or from the layer "
                         f"(e.g. self.num_heads)")
            continue
        sizes[k] = new[axis]
    if slot is None:
        args[1:] = sizes
    else:
        args[slot] = tuple(sizes) if isinstance(node.args[slot], tuple) else list(sizes)  # fx stores either
    node.args = tuple(args)
    return notes


def _size_reads(gm: fx.GraphModule) -> list[str]:
    """Nodes reading a tensor's sizes at run time (``x.size(-1)``, ``x.shape``)."""
    return [n.name for n in gm.graph.nodes if n.target == "size" or (n.target is getattr and n.args[1] == "shape")]


def _explain(gm: fx.GraphModule, notes: list[str], what: str) -> str:
    """Why a compacted model may fail or differ: run-time sizes it could not rewrite, or values computed from sizes."""
    if notes:
        return "; ".join(notes) + f" ({what})"
    reads = _size_reads(gm)
    if reads:
        return (f"{what}: the graph computes values from tensor sizes at run time ({', '.join(reads[:4])}), which change "
                f"when channels go (e.g. a scale 1/sqrt(head_dim) read from q.size(-1)); compute them when the layer is "
                f"built (self.scale), prune with granularity: head, or exclude those layers from select")
    return f"{what}; please report it"


def compact(gm: fx.GraphModule, example_inputs: Any = None, *, verify: bool = True, atol: float = 1e-4,
            rules: RuleRegistry | None = None) -> fx.GraphModule:
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
    new = copy.deepcopy(gm)
    ensure_shapes(new, example_inputs)
    inputs = as_inputs(example_inputs) or _example_inputs(new)
    params_before, macs_before = count_params(new), count_macs(new)
    pruners = pruners_of(new)
    if not pruners:
        log.info("compact: no ChannelPruner in %s; returning a copy", type(gm).__name__)
    dg = analyze(new, rules=rules)
    keep = _Keep(new, dg)
    folds = _constant_folds(new, dg, keep)
    for _node, p in pruners:
        p.enabled = True
    with eval_mode(new):
        reference, captured = _reference_run(new, inputs, folds)
        for site, pos in folds:
            _fold_constant(new, site, torch.as_tensor(pos, dtype=torch.long), captured[id(site.module)])
        channels, notes = _slice(new, dg, keep)
        for node, _p in pruners:
            remove_node(new, node)
        new.graph.lint()
        new.recompile()
    try:
        propagate_shapes(new, inputs)
    except ShapeError as e:
        if notes:
            raise PruneError(_explain(new, notes, f"the compacted model does not run: {e}")) from e
        raise PruneError(f"the compacted model does not run: {e}. This is a bug in evefx's channel analysis; please report it") from e
    if verify:
        _verify(new, inputs, reference, atol, notes)
    new.meta["evefx_compact"] = CompactReport(params_before, count_params(new), macs_before, count_macs(new), channels)
    log.info("compact: params %d -> %d, MACs %d -> %d", params_before, count_params(new), macs_before, count_macs(new))
    return new


class _Keep:
    """Which channel classes stay, from the pruners' masks; refuses masks that disagree on a coupled
    channel or mask a frozen one."""

    def __init__(self, gm: fx.GraphModule, dg: DependencyGraph):
        self.dg = dg
        frozen = dg.frozen_roots()
        self.by_root: dict[int, bool] = {}
        owner: dict[int, fx.Node] = {}
        for site in dg.pruners:
            for r, m in zip(dg.root(site.ids).tolist(), (site.module.mask > 0.5).tolist()):
                if r in self.by_root and self.by_root[r] != m:
                    raise PruneError(
                        f"{site.node.name} and {owner[r].name} disagree on a coupled channel (one masks it, the other "
                        f"keeps it): run evefx.prune_step, which masks coupled channels together"
                    )
                self.by_root[r], owner[r] = m, site.node
                if not m and r in frozen:
                    raise PruneError(
                        f"{describe_node(gm, site.node)} masks a channel that cannot be removed ({frozen[r]}); "
                        f"unmask it or let evefx.prune_step choose the masks"
                    )

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Per id (any shape): whether its channel stays."""
        roots, inverse = np.unique(self.dg.root(ids), return_inverse=True)
        stays = np.array([self.by_root.get(r, True) for r in roots.tolist()], dtype=bool)
        return stays[inverse].reshape(np.shape(ids))


def _constant_folds(gm: fx.GraphModule, dg: DependencyGraph, keep: _Keep) -> list[tuple[ConsumerSite, np.ndarray]]:
    """Consumers that read a removed channel as a non-zero constant (they take it into their bias),
    with the positions of those input channels."""
    folds = []
    for site in dg.consumers:
        need = ~keep(site.ids) & (site.masked == MaskedValue.CONSTANT)
        if need.any():
            if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == site.node.target) > 1:
                raise PruneError(f"{describe_node(gm, site.node)} is called more than once and would need a bias fold")
            folds.append((site, np.flatnonzero(need)))
    return folds


def _reference_run(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                   folds: list[tuple[ConsumerSite, np.ndarray]]) -> tuple[Any, dict[int, torch.Tensor]]:
    """The masked model's output, and the inputs of the consumers that fold constants."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [site.module.register_forward_pre_hook(
        lambda _m, args, key=id(site.module): captured.__setitem__(key, args[0].detach())) for site, _ in folds]
    try:
        with torch.no_grad():
            reference = gm(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return reference, captured


def _slice(gm: fx.GraphModule, dg: DependencyGraph, keep: _Keep) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Slice every recorded layer and rewrite literal reshape sizes; ``{layer: (before, after)}`` output
    channels, and notes on the sizes computed at run time."""
    channels: dict[str, tuple[int, int]] = {}
    slicer = _Slicer(gm)
    for side, sites in ((_Side.OUTPUTS, dg.producers), (_Side.THROUGH, dg.depthwise)):
        for site in sites:
            k = keep(site.ids)
            slicer.add(side, site, k)
            channels[str(site.node.target)] = (len(k), int(k.sum()))
    for consumer in dg.consumers:
        slicer.add(_Side.INPUTS, consumer, keep(consumer.ids))
    for site in dg.norms:
        slicer.add(_Side.NORM, site, keep(site.ids))
    notes = []
    for reshape in dg.reshapes:
        kept = keep(reshape.ids)
        notes += _rewrite_reshape(gm, reshape.node, reshape.ids.shape, _reshape_sizes(gm, reshape.node, kept))
    slicer.apply()
    return channels, notes


def _verify(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], reference: Any, atol: float, notes: list[str]) -> None:
    """The compacted model must agree with the masked one (eval mode)."""
    with eval_mode(gm), torch.no_grad():
        got = gm(*inputs)
    for a, b in zip(_tensors(reference), _tensors(got)):
        if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=1e-4):
            err = (a - b).abs().max() if a.shape == b.shape else f"shape {tuple(b.shape)} != {tuple(a.shape)}"
            raise PruneError(_explain(gm, notes, f"the compacted model disagrees with the masked one (max error {err})"))


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
