"""Channel rules for ops that move, merge, split, join or index axes.

Every tensor's :class:`~evefx.channels.rules.ChannelMap` holds a channel id per element, so these
rules move the ids exactly as the op moves the values (``np.reshape``, ``np.transpose``,
``np.concatenate``, indexing); what they add is the coupling and the freezing that keep every
choice of classes removable by slicing:

* ``view``/``reshape``/``flatten``: channels may merge with the axes after them (a conv stem
  flattened into tokens, a feature map flattened for a Linear). Features on the last axis split
  into trailing axes, ``(..., C) -> (..., heads, head_dim)``, is how attention reads heads: the
  pruners' ``granularity`` decides the coupling, ``head`` (every ``head_dim`` entry of a head is
  one class: whole heads go) or ``channel`` (entry ``d`` of every head is one class: ``head_dim``
  shrinks uniformly). Any other split of a channel axis (a channel shuffle) freezes its channels.
  Compaction rewrites the literal sizes (``num_heads``, ``hidden``) from the recorded ids.
* ``cat`` along an axis the parts' channels do not vary on (a class token joined to the patch
  tokens): channel ``c`` of every part is one channel of the result, so their classes merge, as
  torch-pruning's DepGraph couples them. Along the channel axis the parts keep their own classes.
* ``permute``/``transpose``/``movedim``, ``expand``: the ids move or broadcast with the values.
* ``chunk``/``split``/``unbind`` and indexing: cutting an axis the channels vary along freezes them.

Example:
    >>> register_rule("my_view", layout_rules.reshape)   # a method that reshapes like view
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from evefx.channels.rules import DEFAULT_RULES, ChannelMap, OpCall

if TYPE_CHECKING:
    from evefx.channels.analysis import ChannelAnalysis

__all__ = ["reshape", "flatten", "move_axes", "concat", "split", "unbind", "index", "expand"]


def _full(x: ChannelMap) -> tuple[np.ndarray, np.ndarray]:
    return x.ids, np.broadcast_to(x.masked, x.ids.shape)


def _axis_intact(in_shape: tuple[int, ...], out: tuple[int, ...], axis: int) -> bool:
    """Whether ``reshape(in_shape -> out)`` keeps axis ``axis`` whole inside one output axis (merged
    with neighbours perhaps, never divided): in the mixed-radix view of the flat index, the digits
    of ``axis`` fall within those of one output axis."""
    before, upto = int(np.prod(in_shape[:axis])), int(np.prod(in_shape[:axis + 1]))
    cum = [int(np.prod(out[:j])) for j in range(len(out) + 1)]
    return any(before % cum[j] == 0 and cum[j + 1] % upto == 0 for j in range(len(out)))


def _head_split(in_shape: tuple[int, ...], out: tuple[int, ...]) -> int | None:
    """``(..., C) -> (..., [3,] heads, head_dim)``: the first output axis of the parts (heads and
    head_dim both above one), or ``None``."""
    if len(out) < 2 or out[-1] < 2 or out[-2] < 2:
        return None
    for j in range(len(out) - 2, -1, -1):
        if tuple(out[:j]) == tuple(in_shape[:-1]) and int(np.prod(out[j:])) == in_shape[-1]:
            return j
    return None


def _reshape(walk: ChannelAnalysis, call: OpCall, record: bool) -> ChannelMap:
    x = walk.input(call)
    ids, masked = _full(x)
    out = walk.out_shape()
    ids, masked = np.ascontiguousarray(ids).reshape(out), np.ascontiguousarray(masked).reshape(out)
    varying = walk.varying_axes(x)
    if not varying:
        return ChannelMap(ids, masked)
    in_shape = x.ids.shape
    last = len(in_shape) - 1
    split_at = _head_split(in_shape, out) if varying == [last] else None
    if split_at is not None:
        # attention's heads: (..., C) -> (..., [3,] heads, head_dim). The classes must vary along one
        # axis only (so that any choice of them is a slice): head keeps the heads axis, channel the
        # head_dim axis, and the others (head_dim or heads, and q/k/v of a fused projection) merge
        keep_axis = len(out) - (2 if walk.granularity_of(x.ids) == "head" else 1)
        for a in range(split_at, len(out)):
            if a != keep_axis:
                walk.union(ids, ids.take([0], axis=a))
    elif len(varying) > 1 or not _axis_intact(in_shape, out, varying[0]):
        walk.freeze(x.ids, f"channels split by {call.node.name} (e.g. a channel shuffle)")
        return ChannelMap(ids, masked)
    if record:
        walk.add_reshape(ids)
    return ChannelMap(ids, masked)


def reshape(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``view``/``reshape``/``unflatten``: channels may merge with the axes after them, or split into
    heads (see the module docstring); compaction rewrites their literal sizes."""
    return _reshape(walk, call, record=True)


def flatten(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``flatten``/``nn.Flatten``: as :func:`reshape`, with no literal size to rewrite."""
    return _reshape(walk, call, record=False)


def move_axes(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``permute``/``transpose``/``swapaxes``/``movedim`` with static axes: the ids move as the tensor does
    (the batch axis too: ``qkv.permute(2, 0, 3, 1, 4)`` puts q, k and v first)."""
    x = walk.input(call)
    rest: list[Any] = list(call.node.args[1:])  # ints (or a list of them), checked below
    rank = x.ids.ndim
    if not rest:
        rest = [call.node.kwargs[k] for k in ("dims", "dim0", "dim1", "source", "destination") if k in call.node.kwargs]
    if any(isinstance(a, fx.Node) for a in rest):
        raise walk.error("its axes are computed at run time")
    name = call.target if isinstance(call.target, str) else call.target.__name__
    if name == "permute":
        axes = [a % rank for a in (rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)]
    else:
        d0, d1 = rest[0] % rank, rest[1] % rank
        axes = list(range(rank))
        if name == "movedim":
            axes.remove(d0)
            axes.insert(d1, d0)
        else:
            axes[d0], axes[d1] = axes[d1], axes[d0]
    ids, masked = _full(x)
    return ChannelMap(np.transpose(ids, axes), np.transpose(masked, axes))


def concat(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``torch.cat``: the ids are concatenated exactly as the tensors are; along an axis the parts'
    channels do not vary on (tokens), channel ``c`` of every part becomes one class."""
    seq = call.args[0]
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    parts = [p if isinstance(p, ChannelMap) else None for p in seq]
    if any(p is None for p in parts):
        raise walk.error("it concatenates a tensor evefx does not follow")
    maps: list[ChannelMap] = parts  # type: ignore[assignment]
    axis = dim % maps[0].ids.ndim
    if axis == 0:
        raise walk.error("it concatenates along the batch axis")
    varying = [walk.varying_axes(p) for p in maps]
    if all(v and axis not in v for v in varying):
        first = maps[0].ids.take([0], axis=axis)
        for p in maps[1:]:
            walk.union(first, p.ids.take([0], axis=axis))
    return ChannelMap(np.concatenate([p.ids for p in maps], axis=axis),
                      np.concatenate([np.broadcast_to(p.masked, p.ids.shape) for p in maps], axis=axis))


def _parts(walk: ChannelAnalysis, call: OpCall, axis: int) -> list[tuple[np.ndarray, np.ndarray]]:
    x = walk.input(call)
    meta = call.node.meta.get("tensor_meta")
    if not isinstance(meta, (list, tuple)):
        raise walk.error("no shape information for its parts")
    axis %= x.ids.ndim
    if axis in walk.varying_axes(x):
        walk.freeze(x.ids, f"channels split by {call.node.name}")
    ids, masked = _full(x)
    sizes = [int(m.shape[axis]) if len(m.shape) == ids.ndim else 1 for m in meta]
    cuts = np.cumsum(sizes)[:-1]
    return list(zip(np.split(ids, cuts, axis=axis), np.split(masked, cuts, axis=axis)))


def split(walk: ChannelAnalysis, call: OpCall) -> list[ChannelMap]:
    """``chunk``/``split``: splitting the axis the channels vary along freezes them (the parts' sizes are fixed)."""
    dim = call.args[2] if len(call.args) > 2 else call.kwargs.get("dim", 0)
    return [ChannelMap(i, z) for i, z in _parts(walk, call, dim)]


def unbind(walk: ChannelAnalysis, call: OpCall) -> list[ChannelMap]:
    """``unbind``: as :func:`split` into parts of one, the axis removed (``q, k, v = qkv.unbind(0)``)."""
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    axis = dim % walk.input(call).ids.ndim
    return [ChannelMap(i.squeeze(axis), z.squeeze(axis)) for i, z in _parts(walk, call, axis)]


def index(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``x[:, 0]``, ``x[..., ::2, :]``: static indexing; cutting an axis the channels vary along freezes them."""
    x = walk.input(call)
    idx = call.node.args[1]
    key: tuple[Any, ...] = idx if isinstance(idx, tuple) else (idx,)
    static = (int, type(None), type(Ellipsis))
    if any(not isinstance(i, static) and not (isinstance(i, slice) and all(
            isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step))) for i in key):
        raise walk.error("it indexes with a tensor or a run-time value")
    rank = x.ids.ndim
    used = sum(1 for i in key if i is not None and i is not Ellipsis)
    axes: list[Any] = []  # the input axis each key entry applies to (None for a new axis)
    pos = 0
    for i in key:
        if i is Ellipsis:
            pos += rank - used
        elif i is None:
            axes.append(None)
        else:
            axes.append((pos, i))
            pos += 1
    varying = set(walk.varying_axes(x))
    for entry in axes:
        if entry is not None and entry[0] in varying and entry[1] != slice(None):
            walk.freeze(x.ids, f"channels sliced by {call.node.name}")
            break
    ids, masked = _full(x)
    return ChannelMap(ids[key], masked[key])


def expand(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``expand``/``expand_as``/``broadcast_to``: the ids broadcast as the values do (a class token over the batch)."""
    x = walk.input(call)
    ids, masked = _full(x)
    out = walk.out_shape()
    return ChannelMap(np.broadcast_to(ids, out), np.broadcast_to(masked, out))


_default = DEFAULT_RULES.register
_default(nn.Flatten, flatten)
_default((torch.cat, torch.concat, torch.concatenate), concat)
_default(("view", "reshape", "unflatten", torch.reshape, torch.unflatten), reshape)
_default(("flatten", torch.flatten), flatten)
_default((torch.permute, torch.transpose, torch.swapaxes, torch.movedim, "permute", "transpose", "swapaxes", "movedim"),
         move_axes)
_default((torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"), split)
_default((torch.unbind, "unbind"), unbind)
_default(operator.getitem, index)
_default(("expand", "expand_as", torch.broadcast_to, "broadcast_to"), expand)
del _default
