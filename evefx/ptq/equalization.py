"""Cross-layer equalization (Nagel et al. 2019, "Data-free quantization through weight equalization
and bias correction"): for consecutive layers ``L1 -> [ReLU/pool/flatten/...] -> L2`` where ``L1``'s
output feeds only ``L2``, scale output channel ``i`` of ``L1`` by ``1/s_i`` and the matching input
channel of ``L2`` by ``s_i`` with ``s_i = sqrt(r1_i / r2_i)`` (``r`` = the channel's largest absolute
weight), which leaves the float function unchanged (ReLU is positively homogeneous) and gives both
channels the range ``sqrt(r1_i r2_i)``. Run before calibration.

Example:
    >>> pairs = equalize(gm)
    >>> pairs[0].before, pairs[0].after
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.graph import LAYER_TYPES, calls_one_of, layer_nodes, module_of
from evefx.layers import in_channels, out_channels
from evefx.modules import Quantizer
from evefx.ptq.corrections import bake_batchnorm

__all__ = ["EqualizedPair", "equalization_pairs", "equalize"]

log = logging.getLogger(__name__)

_Layer = nn.modules.conv._ConvNd | nn.Linear  # the layers a pair is made of (quantized ones subclass them)
# ops between two layers through which a positive per-channel scale passes unchanged
_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, Quantizer,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.flatten,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}


@dataclass(frozen=True)
class EqualizedPair:
    """Two consecutive layers equalized together; ``repeat`` input features of ``second`` per
    output channel of ``first`` (a flatten of ``C x H x W`` gives ``H W``); ``before``/``after``:
    the largest ratio between the two layers' per-channel ranges."""

    first: str
    second: str
    repeat: int = 1
    before: float = 1.0
    after: float = 1.0


def _passes_scale(gm: fx.GraphModule, node: fx.Node) -> bool:
    return calls_one_of(gm, node, _HOMOGENEOUS_MODULES, _HOMOGENEOUS_FUNCTIONS, _HOMOGENEOUS_METHODS)


def equalization_pairs(gm: fx.GraphModule) -> list[EqualizedPair]:
    """Consecutive conv/linear pairs ``L1 -> ... -> L2`` that cross-layer equalization can scale:
    every node between them is positively homogeneous per channel (ReLU, LeakyReLU, pooling,
    dropout, flatten, an evefx quantizer) and has one user, and ``L2`` reads ``L1``'s channels
    (``in(L2) = out(L1) * repeat``).

    Example:
        >>> [(p.first, p.second) for p in equalization_pairs(gm)]
        [('features.0', 'features.3'), ...]
    """
    pairs = []
    for node in layer_nodes(gm, LAYER_TYPES):
        first = module_of(gm, node)
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            user = users[0]
            if not user.args or user.args[0] is not cur:
                break
            if user.op == "call_module" and isinstance(module_of(gm, user), LAYER_TYPES):
                second = module_of(gm, user)
                c_out, c_in = out_channels(first), in_channels(second)
                groups = getattr(second, "groups", 1)
                if c_in % c_out == 0 and (c_in == c_out or (isinstance(second, nn.Linear) and groups == 1)):
                    if str(node.target) != str(user.target):
                        pairs.append(EqualizedPair(str(node.target), str(user.target), c_in // c_out))
                break
            if not _passes_scale(gm, user):
                break
            cur = user
    return pairs


def _out_ranges(m: _Layer) -> torch.Tensor:
    return m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(dim=1)


def _grouped(m: _Layer) -> tuple[torch.Tensor, int]:
    """The weight as ``[groups, out/groups, in/groups, K]`` (linear: one group, K = 1)."""
    w = m.weight.detach()
    g = getattr(m, "groups", 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1), g


def _in_ranges(m: _Layer, repeat: int) -> torch.Tensor:
    w, g = _grouped(m)
    r = w.abs().amax(dim=(1, 3)).reshape(-1)  # per input feature
    return r.reshape(-1, repeat).amax(dim=1) if repeat > 1 else r


@torch.no_grad()
def _scale_pair(first: _Layer, second: _Layer, repeat: int) -> float:
    """One equalization step of a pair; returns max |log s|."""
    r1, r2 = _out_ranges(first), _in_ranges(second, repeat)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    shape = [-1] + [1] * (first.weight.dim() - 1)
    first.weight.div_(s.reshape(shape).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.div_(s.to(first.bias.dtype))
    s_in = s.repeat_interleave(repeat) if repeat > 1 else s
    g = getattr(second, "groups", 1)
    w = second.weight
    view = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
    view.mul_(s_in.reshape(g, 1, w.shape[1], 1).to(w.dtype))
    return float(s.log().abs().max())


def _ratio(first: _Layer, second: _Layer, repeat: int) -> float:
    r1, r2 = _out_ranges(first), _in_ranges(second, repeat)
    ok = (r1 > 0) & (r2 > 0)
    if not bool(ok.any()):
        return 1.0
    q = r1[ok] / r2[ok]
    return float(torch.maximum(q, 1 / q).max())


@torch.no_grad()
def equalize(gm: fx.GraphModule, *, layers: Iterable[str] | None = None, iterations: int = 20,
             tol: float = 1e-5) -> list[EqualizedPair]:
    """Cross-layer equalization of every pair from :func:`equalization_pairs` (both layers in
    ``layers`` when given), in place; chains are swept up to ``iterations`` times until no scale
    moves by more than ``tol`` (in log). Preserves the float function; run it before calibration.

    Example:
        >>> pairs = equalize(gm)
        >>> pairs[0].before, pairs[0].after   # largest range ratio between the paired channels
        (41.2, 1.0)
    """
    wanted = None if layers is None else set(layers)
    pairs = [p for p in equalization_pairs(gm) if wanted is None or (p.first in wanted and p.second in wanted)]
    if not pairs:
        return []
    mods = {p.first: gm.get_submodule(p.first) for p in pairs} | {p.second: gm.get_submodule(p.second) for p in pairs}
    for m in mods.values():
        bake_batchnorm(m)
    before = [_ratio(mods[p.first], mods[p.second], p.repeat) for p in pairs]
    for _ in range(iterations):
        moved = max(_scale_pair(mods[p.first], mods[p.second], p.repeat) for p in pairs)
        if moved < tol:
            break
    out = [EqualizedPair(p.first, p.second, p.repeat, b, _ratio(mods[p.first], mods[p.second], p.repeat))
           for p, b in zip(pairs, before)]
    for p in out:
        log.info("equalized %s -> %s: range ratio %.3g -> %.3g", p.first, p.second, p.before, p.after)
    return out
