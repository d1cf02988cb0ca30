"""Channel rules for normalisation and attention: LayerNorm/RMSNorm, GroupNorm, softmax, matmul, and
the layers evefx keeps opaque (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, torchvision's
Swin attention function).

**LayerNorm and RMSNorm freeze the channels they normalise.** Their mean and variance count every
channel of the normalised axis, a masked (zero) one included, so the masked model and a model with
the channel removed would differ. evefx keeps the invariant *compact equals masked* (allclose), so
the channels a LayerNorm reads, in a transformer the residual stream, stay whole; the prunable
widths are those no norm reads: the MLP hidden width (``Linear -> GELU -> Linear``) and the
attention heads or ``head_dim``. torch-pruning's ViT examples prune the stream as well and accept
the changed statistics (then fine-tune); evefx reports those channels as frozen instead.

**GroupNorm prunes whole groups.** A group's statistics involve only its own channels: the channels
of a group form one class, a removed group leaves the others unchanged (its output is the affine
shift, a constant the next layer folds), and compaction drops its affine entries and one
``num_groups`` per group.

**Attention.** ``softmax`` normalises along its axis: classes that vary along it are frozen; along
the others it is element-wise (a zero row becomes the constant ``1/n``). ``matmul`` contracts the
last axis of ``a`` with the second-to-last of ``b``: classes on the contracted axis of both (q and k
with ``granularity: channel``) merge and must be the pruner's zero on one side; classes on a batch
axis (the heads, ``granularity: head``) merge between ``a``, ``b`` and the result; the rows of
``a`` and the columns of ``b`` (v's ``head_dim``) carry over to the result.

Example:
    >>> register_rule(MyNorm, attention_rules.layer_norm)     # normalises the last axis like LayerNorm
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evefx.channels.rules import DEFAULT_RULES, ChannelMap, MaskedValue, OpCall, becomes_constant, elementwise_to_constant
from evefx.modules.attention import attention_bias

if TYPE_CHECKING:
    from evefx.channels.analysis import ChannelAnalysis

__all__ = ["layer_norm", "group_norm", "softmax", "matmul", "einsum", "opaque", "patch_merging_pad"]


def _name(call: OpCall) -> str:
    return f"{call.node.target}" if call.node.op == "call_module" else call.node.name


def layer_norm(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """LayerNorm/RMSNorm (module or function) over the last ``len(normalized_shape)`` axes: the
    channels there are frozen (see the module docstring); the output is data."""
    x = walk.input(call)
    if call.node.op == "call_module":
        shape = call.target.normalized_shape
    else:
        shape = call.args[1] if len(call.args) > 1 else call.kwargs.get("normalized_shape")
    count = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    normalised = set(range(x.ids.ndim - count, x.ids.ndim))
    if normalised & set(walk.varying_axes(x)):
        walk.freeze(x.ids, f"normalised together by {_name(call)} (a LayerNorm's statistics count every channel, "
                           f"so removing one would change the others)")
    return ChannelMap(x.ids, np.zeros(x.ids.shape, dtype=np.int8))


def group_norm(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """GroupNorm on axis 1: the channels of a group are one class (whole groups go; see the module docstring)."""
    x = walk.input(call)
    module = call.target if call.node.op == "call_module" else None
    groups = module.num_groups if module is not None else (call.args[1] if len(call.args) > 1 else call.kwargs["num_groups"])
    ids, masked = walk.per_channel(x, 1)
    per_group = ids.reshape(groups, -1)
    walk.union(per_group[:, :1], per_group)
    affine = [a for a in (*call.args[2:], *call.kwargs.values()) if isinstance(a, ChannelMap)]
    if affine:  # F.group_norm with weights that are parameters outside a layer: compaction cannot slice them
        walk.freeze(x.ids, f"{_name(call)} takes its affine weights as arguments")
    if module is not None:
        walk.add_norm(module, ids)
    group_masked = masked.reshape(groups, -1).min(axis=1, keepdims=True)
    # a group that is all zero comes out as its affine shift: a constant
    out = np.where(group_masked == MaskedValue.ZERO, MaskedValue.CONSTANT, MaskedValue.DATA).astype(np.int8)
    return walk.broadcast_channels(ids, np.broadcast_to(out, per_group.shape).reshape(-1), 1)


def softmax(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``softmax``/``log_softmax`` along ``dim``: element-wise along the other axes, a zero row becomes
    the constant ``1/n``; classes that vary along ``dim`` are normalised together and frozen."""
    x = walk.input(call)
    if call.node.op == "call_module":
        dim = call.target.dim
    else:
        dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    if dim is None:
        raise walk.error("softmax without dim")
    dim %= x.ids.ndim
    masked = np.broadcast_to(x.masked, x.ids.shape)
    if dim in walk.varying_axes(x):
        walk.freeze(x.ids, f"normalised together by {_name(call)}")
        return ChannelMap(x.ids, np.zeros(x.ids.shape, dtype=np.int8))
    row = becomes_constant(masked.min(axis=dim, keepdims=True))
    return ChannelMap(x.ids, np.broadcast_to(row, x.ids.shape))


def _along(walk: ChannelAnalysis, x: ChannelMap, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes and masked values per index of ``axis`` of a tensor whose classes vary along it only."""
    roots = np.moveaxis(walk.roots(x.ids), axis, 0)
    masked = np.moveaxis(np.broadcast_to(x.masked, x.ids.shape), axis, 0)
    n = roots.shape[0]
    return roots.reshape(n, -1)[:, 0].copy(), masked.reshape(n, -1).min(axis=1)


def matmul(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``a @ b`` (``matmul``, ``bmm``) on tensors whose classes each vary along one axis at most (see
    the module docstring); anything else (a weight matrix that is a parameter) freezes both sides."""
    a, b = (v if isinstance(v, ChannelMap) else None for v in call.args[:2])
    out = walk.out_shape()
    if a is None or b is None or a.ids.ndim < 2 or b.ids.ndim < 2:
        for v in (a, b):
            if v is not None:
                walk.freeze(v.ids, f"multiplied by {call.node.name} with a value evefx does not follow")
        return walk.fresh(out[1] if len(out) > 1 else 1, f"computed by {call.node.name}")
    va, vb = walk.varying_axes(a), walk.varying_axes(b)
    ra, rb, ro = a.ids.ndim, b.ids.ndim, len(out)
    if len(va) > 1 or len(vb) > 1:
        walk.freeze(a.ids, f"multiplied by {call.node.name} (its classes vary along several axes)")
        walk.freeze(b.ids, f"multiplied by {call.node.name} (its classes vary along several axes)")
        return walk.fresh(out[1] if len(out) > 1 else 1, f"computed by {call.node.name}")
    carried: list[tuple[int, np.ndarray, np.ndarray]] = []  # (output axis, classes, masked) it inherits
    # contracted axis: a's last, b's second-to-last
    ka, kb = ra - 1 in va, rb - 2 in vb
    if ka and kb:
        ia, za = _along(walk, a, ra - 1)
        ib, zb = _along(walk, b, rb - 2)
        walk.union(ia, ib)
        data = (za != MaskedValue.ZERO) & (zb != MaskedValue.ZERO)
        if data.any():
            walk.freeze(np.concatenate([ia[data], ib[data]]), f"read as data by {call.node.name} (contracted)")
    elif ka or kb:
        walk.freeze(a.ids if ka else b.ids, f"contracted by {call.node.name} with a value that has no such channels")
    # batch axes (right-aligned with the output's)
    for axis_a in (x for x in va if x < ra - 2):
        carried.append((ro - 2 - (ra - 2) + axis_a, *_along(walk, a, axis_a)))
    for axis_b in (x for x in vb if x < rb - 2):
        carried.append((ro - 2 - (rb - 2) + axis_b, *_along(walk, b, axis_b)))
    if ra - 2 in va:
        carried.append((ro - 2, *_along(walk, a, ra - 2)))
    if rb - 1 in vb:
        carried.append((ro - 1, *_along(walk, b, rb - 1)))
    axes = {c[0] for c in carried}
    if len(axes) > 1:
        for v in (a, b):
            walk.freeze(v.ids, f"its classes and another operand's meet on different axes of {call.node.name}")
        return walk.fresh(out[1] if len(out) > 1 else 1, f"computed by {call.node.name}")
    if not carried:
        # no channel survives the product (attention scores in channel granularity): one new class, never pruned
        return ChannelMap(np.broadcast_to(walk.new_ids(1).reshape((1,) * ro), out), np.zeros(out, dtype=np.int8))
    axis, ids, masked = carried[0]
    if len(carried) == 2:  # a batch axis both operands carry (a head): one class, zero if either side is
        walk.union(carried[0][1], carried[1][1])
        masked = np.maximum(carried[0][2], carried[1][2])
    masked = np.where(masked == MaskedValue.ZERO, MaskedValue.ZERO, MaskedValue.DATA).astype(np.int8)
    return walk.broadcast_channels(ids, masked, axis)


def _labels(spec: str, count: int) -> tuple[list[list[str]], list[str]]:
    """``"b h i d, b h j d -> b h i j"`` (letters or space-separated names) as axis labels per operand and of the output."""
    if "->" not in spec or "..." in spec:
        raise ValueError(spec)
    ins, out = spec.split("->")

    def split(term: str) -> list[str]:
        term = term.strip()
        return term.split() if " " in term else list(term)

    operands = [split(t) for t in ins.split(",")]
    if len(operands) != count:
        raise ValueError(spec)
    return operands, split(out)


def einsum(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``torch.einsum`` with an explicit output: as :func:`matmul`, by axis label. Classes on a
    summed label merge across the operands (and must be the pruner's zero in one); classes on an
    output label merge and carry over; anything else freezes."""
    spec, *rest = call.args
    maps = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    out = walk.out_shape()
    try:
        labels, out_labels = _labels(str(spec), len(maps))
    except ValueError:
        raise walk.error(f"einsum equation {spec!r} is not of the form 'ab,bc->ac' with every operand labelled") from None
    if any(not isinstance(m, ChannelMap) for m in maps) or any(len(lab) != m.ids.ndim for lab, m in zip(labels, maps)):
        raise walk.error("an operand is not a tensor evefx follows")
    by_label: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for m, lab in zip(maps, labels):
        varying = walk.varying_axes(m)
        if len(varying) > 1:
            for v in maps:
                walk.freeze(v.ids, f"multiplied by {call.node.name} (its classes vary along several axes)")
            return walk.fresh(out[1] if len(out) > 1 else 1, f"computed by {call.node.name}")
        for axis in varying:
            by_label.setdefault(lab[axis], []).append(_along(walk, m, axis))
    carried = [(label, sides) for label, sides in by_label.items() if label in out_labels]
    for label, sides in by_label.items():
        if label in out_labels:
            continue
        for ids, _ in sides[1:]:
            walk.union(sides[0][0], ids)
        zero = np.any([z == MaskedValue.ZERO for _, z in sides], axis=0)
        if len(sides) < 2 or not zero.all():
            walk.freeze(np.concatenate([ids for ids, _ in sides]), f"read as data by {call.node.name} (summed over)")
    if len(carried) > 1:
        for v in maps:
            walk.freeze(v.ids, f"its classes and another operand's meet on different axes of {call.node.name}")
        return walk.fresh(out[1] if len(out) > 1 else 1, f"computed by {call.node.name}")
    if not carried:
        return ChannelMap(np.broadcast_to(walk.new_ids(1).reshape((1,) * len(out)), out), np.zeros(out, dtype=np.int8))
    label, sides = carried[0]
    for ids, _ in sides[1:]:
        walk.union(sides[0][0], ids)
    masked = np.max([z for _, z in sides], axis=0)
    masked = np.where(masked == MaskedValue.ZERO, MaskedValue.ZERO, MaskedValue.DATA).astype(np.int8)
    return walk.broadcast_channels(sides[0][0], masked, out_labels.index(label))


def opaque(walk: ChannelAnalysis, call: OpCall) -> Any:
    """A layer evefx does not see into (``nn.MultiheadAttention``: its projections are not Linear calls
    in the graph): what it reads is frozen, what it returns is new frozen channels on the last axis."""
    why = f"read inside {_name(call)}, which evefx does not see into (its weights are not sliced)"
    for v in (*call.args, *call.kwargs.values()):
        if isinstance(v, ChannelMap):
            walk.freeze(v.ids, why)
    meta = call.node.meta.get("tensor_meta")
    made = f"made inside {_name(call)}, which evefx does not see into"

    def fresh_like(m: Any) -> ChannelMap | None:
        if not hasattr(m, "shape"):
            return None
        shape = tuple(int(d) for d in m.shape)
        ids = walk.new_ids(shape[-1] if shape else 1)
        walk.freeze(ids, made)
        view = ids.reshape((1,) * (len(shape) - 1) + (-1,)) if shape else ids[0:1].reshape(())
        return ChannelMap(np.broadcast_to(view, shape), np.zeros(shape, dtype=np.int8))

    if isinstance(meta, (list, tuple)):
        return [fresh_like(m) for m in meta]
    if meta is None:
        raise walk.error("no shape information for its output")
    return fresh_like(meta)


def patch_merging_pad(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """torchvision Swin's ``_patch_merging_pad``: pads H and W to even sizes and joins the four
    2x2 neighbours on the channel axis (channels last): the channels, four times."""
    x = walk.input(call)
    ids, masked = walk.per_channel(x, -1)
    masked = np.where(masked == MaskedValue.ZERO, MaskedValue.ZERO, MaskedValue.DATA).astype(np.int8)
    return walk.broadcast_channels(np.tile(ids, 4), np.tile(masked, 4), -1)


_default = DEFAULT_RULES.register
_default((nn.LayerNorm, F.layer_norm, torch.layer_norm), layer_norm)
if hasattr(nn, "RMSNorm"):
    _default((nn.RMSNorm, F.rms_norm), layer_norm)
_default((nn.GroupNorm, F.group_norm, torch.group_norm), group_norm)
_default((nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"),
         softmax)
_default((torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__"), matmul)
_default((torch.einsum, "torch.functional.einsum"), einsum)
_default((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer,
          nn.TransformerDecoder, nn.Transformer, "torchvision.models.swin_transformer.shifted_window_attention"), opaque)
_default("torchvision.models.swin_transformer._patch_merging_pad", patch_merging_pad)
# a decomposed attention's masks added to the scores: per token, the same for every channel (0 -> the mask)
_default(attention_bias, elementwise_to_constant)
del _default
