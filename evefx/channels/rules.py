"""Per-op channel rules: how an op rearranges channels, and what it does to a masked channel.

The channel analysis (:mod:`evefx.channels.analysis`) gives every tensor a :class:`ChannelMap`
(a channel id and a :class:`MaskedValue` per element) and, for each call, runs its rule
``rule(walk, call)``: ``walk`` is the running :class:`~evefx.channels.analysis.ChannelAnalysis`
(its methods read shapes, create ids, merge classes, freeze channels and record the layers
compaction slices), ``call`` the :class:`OpCall` with tensors replaced by their channel maps. A
rule returns the output's :class:`ChannelMap` (a list for several tensors, ``None`` for a non-tensor).

Rules are looked up by module class (the most derived registered class in the MRO wins), by
function object, by a function's qualified name (``"torchvision.ops.stochastic_depth.stochastic_depth"``,
so the library need not be imported), or by tensor-method name (``"relu"``). An op with no rule
raises :class:`~evefx.errors.PruneError`, naming the node and the :func:`register_rule` call that
teaches evefx the op.

Example:
    >>> from evefx.channels import register_rule, rules
    >>> register_rule(torch.square, rules.elementwise)      # channel c -> channel c, 0 -> 0
    >>> register_rule(MyScale, rules.elementwise_to_constant)  # a module mapping 0 to a constant
    >>> @register_rule("my_method")
    ... def my_rule(walk, call):
    ...     return walk.input(call)
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.modules.neurons import SpikingNeuron
from evefx.modules.protocol import EveHooks
from evefx.modules.prune import ChannelPruner
from evefx.modules.quantizer import Quantizer

if TYPE_CHECKING:
    from evefx.channels.analysis import ChannelAnalysis

__all__ = ["MaskedValue", "ChannelMap", "OpCall", "Rule", "RuleRegistry", "DEFAULT_RULES", "register_rule",
           "elementwise", "elementwise_to_constant", "becomes_constant", "after_zero_padding"]


class MaskedValue(IntEnum):
    """What a masked (pruned) channel is worth where a tensor is read. Ordered: combining two
    claims keeps the weaker one (``min``)."""

    DATA = 0  # it depends on the input: removing the channel would change the result
    CONSTANT = 1  # independent of the input (a BatchNorm's shift of the zero): foldable into a consumer's bias
    ZERO = 2  # still the pruner's zero: removing the channel changes nothing


@dataclass
class ChannelMap:
    """Channel ids of one tensor (batch axis of size 1) and, per element, the :class:`MaskedValue`
    (int8) a masked channel has there."""

    ids: np.ndarray
    masked: np.ndarray


def becomes_constant(masked: np.ndarray) -> np.ndarray:
    """After an op that maps 0 to some constant (BatchNorm, sigmoid, ``+ 1``): a zero becomes a constant."""
    return np.minimum(masked, MaskedValue.CONSTANT).astype(np.int8)


def after_zero_padding(masked: np.ndarray) -> np.ndarray:
    """After zero padding: a zero channel stays zero, a constant one is no longer uniform."""
    return np.where(masked == MaskedValue.ZERO, MaskedValue.ZERO, MaskedValue.DATA).astype(np.int8)


@dataclass(frozen=True)
class OpCall:
    """One call a rule is asked about: ``target`` is the module instance, the function or the method
    name; ``args``/``kwargs`` the node's arguments with every tensor evefx follows replaced by its
    :class:`ChannelMap` (``None`` for values it does not follow); the raw ones are on ``node``."""

    node: fx.Node
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> ChannelMap | None:
        """The first argument's channel map, if it is a tensor evefx follows."""
        first = self.args[0] if self.args else None
        return first if isinstance(first, ChannelMap) else None


Rule = Callable[["ChannelAnalysis", OpCall], Any]
"""``rule(walk, call) -> ChannelMap | list[ChannelMap] | None``."""

Target = Union[type, Callable[..., Any], str]


class RuleRegistry:
    """Channel rules by module class, function or method name (see the module docstring).

    Example:
        >>> mine = DEFAULT_RULES.copy(); mine.register(torch.square, elementwise)
        >>> evefx.channels.analyze(gm, rules=mine)
    """

    def __init__(self) -> None:
        self._modules: dict[type, Rule] = {}
        self._functions: dict[Any, Rule] = {}
        self._methods: dict[str, Rule] = {}

    def register(self, target: Target | tuple[Target, ...] | list[Target] | set[Any], rule: Rule) -> None:
        """Use ``rule`` for ``target``: an ``nn.Module`` subclass, a function, a function's qualified
        name (with a dot) or a tensor-method name (without); several targets as a tuple, list or set."""
        if isinstance(target, (tuple, list, set, frozenset)):
            for t in target:
                self.register(t, rule)
            return
        if isinstance(target, type):  # an nn.Module subclass, or a mixin modules inherit (EveHooks)
            self._modules[target] = rule
        elif isinstance(target, str):
            (self._functions if "." in target else self._methods)[target] = rule
        elif callable(target):
            self._functions[target] = rule
        else:
            raise TypeError(f"register a rule for an nn.Module subclass, a function or a method name (got {target!r})")

    def remove(self, target: Target) -> None:
        """Forget the rule registered for exactly ``target`` (nothing if there is none)."""
        for table in (self._modules, self._functions, self._methods):
            table.pop(target, None)

    def lookup(self, op: str, target: Any) -> Rule | None:
        """The rule for a node's ``op`` and target (a module instance for ``call_module``), or ``None``."""
        if op == "call_module":
            for cls in type(target).__mro__:
                if cls in self._modules:
                    return self._modules[cls]
            return None
        if op == "call_method":
            return self._methods.get(str(target))
        try:
            rule = self._functions.get(target)
        except TypeError:  # unhashable target
            rule = None
        return rule if rule is not None else self._functions.get(qualified_name(target))

    def copy(self) -> RuleRegistry:
        new = RuleRegistry()
        new._modules, new._functions, new._methods = dict(self._modules), dict(self._functions), dict(self._methods)
        return new


def qualified_name(target: Any) -> str:
    """``module.name`` of a function (``torch.softmax``), as :meth:`RuleRegistry.register` takes it."""
    return f"{getattr(target, '__module__', None) or '?'}.{getattr(target, '__name__', target)}"


DEFAULT_RULES = RuleRegistry()
"""The registry :func:`evefx.channels.analyze` (and ``prune_step``, ``compact``) use by default."""


def register_rule(target: Target | tuple[Target, ...] | list[Target], rule: Rule | None = None) -> Any:
    """Teach evefx how an op treats channels, as torch-pruning's ``register_customized_layer`` does.

    ``target`` is an ``nn.Module`` subclass (its subclasses follow unless they have their own
    rule), a function, a function's qualified name or a tensor-method name. ``rule(walk, call)``
    returns the output's :class:`ChannelMap`; the ready ones here cover most element-wise ops.
    Without ``rule`` it returns a decorator. The rule goes into :data:`DEFAULT_RULES`.

    Example:
        >>> register_rule(torch.square, elementwise)      # channel c of the output is channel c of the input, 0 -> 0
        >>> evefx.prune_step(gm)                          # torch.square no longer stops the analysis
        >>> @register_rule(MyGate)                        # a module that maps 0 to a constant
        ... def my_gate(walk, call):
        ...     x = walk.input(call)
        ...     return ChannelMap(x.ids, becomes_constant(x.masked))
    """
    if rule is None:
        def decorate(fn: Rule) -> Rule:
            DEFAULT_RULES.register(target, fn)
            return fn

        return decorate
    DEFAULT_RULES.register(target, rule)
    return rule


def elementwise(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """Channel ``c`` of the output is channel ``c`` of the input, and a zero stays zero (ReLU, dropout, ``to``)."""
    return walk.input(call)


def elementwise_to_constant(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """Element-wise, but a zero becomes a constant (sigmoid, exp, softplus)."""
    x = walk.input(call)
    return ChannelMap(x.ids, becomes_constant(x.masked))


def not_a_tensor(walk: ChannelAnalysis, call: OpCall) -> None:
    """``x.size()``, ``x.dim()``: a Python value that carries no channel."""
    return None


def tensor_attribute(walk: ChannelAnalysis, call: OpCall) -> None:
    """``getattr(x, "shape")`` (and ``dtype``, ``device``); another attribute is an unknown op."""
    if call.args[1] in ("shape", "dtype", "device"):
        return None
    raise walk.unknown_op(call)


def channel_pruner(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """A pruner masks its channel axis (``dim``: 1 after a conv, the last after a Linear): a masked channel is zero."""
    x = walk.input(call, "a ChannelPruner needs a tensor input with known shape")
    ids, _ = walk.per_channel(x, call.target.dim)
    walk.add_pruner(call.target, ids)
    return ChannelMap(x.ids, np.full(x.ids.shape, MaskedValue.ZERO, dtype=np.int8))


def conv(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """A plain conv reads channels and makes fresh ones; a depthwise conv passes them through; a
    grouped conv with as many inputs as outputs ties the same position of every group; anything
    else (widening grouped, transposed) freezes both sides."""
    m, x = call.target, walk.input(call)
    ids, masked = walk.per_channel(x)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    if not transposed and m.groups == 1:
        walk.add_consumer(m, ids, masked)
        out = walk.fresh(m.out_channels)
        walk.add_producer(m, out.ids[0].reshape(m.out_channels, -1)[:, 0].copy())
        return out
    if not transposed and m.in_channels == m.out_channels:
        if m.groups != m.in_channels:
            # grouped, in = out: channel c is in and out channel c, and every group must keep the same
            # width, so position p of each group is one class (the groups shrink together)
            per_group = ids.reshape(m.groups, -1)
            walk.union(per_group[:1], per_group[1:])
        walk.add_passthrough(m, ids)
        return walk.broadcast_channels(ids, np.zeros_like(masked))
    why = f"{'transposed' if transposed else 'grouped (inputs != outputs)'} conv {call.node.target}"
    walk.freeze(ids, why)
    return walk.fresh(m.out_channels, frozen=why)


def linear(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """A Linear reads the features on the last axis (any rank: tokens and heads are batch-like axes)
    and makes fresh ones there."""
    m, x = call.target, walk.input(call)
    ids, masked = walk.per_channel(x, -1)
    walk.add_consumer(m, ids, masked)
    out = walk.new_ids(m.out_features)
    walk.add_producer(m, out)
    return walk.broadcast_channels(out, np.zeros(len(out), dtype=np.int8), -1)


def embedding(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """An Embedding looks vectors up by integer ids: fresh features on the last axis, frozen, since
    compaction does not slice its table (a text model's residual width stays; its MLPs prune)."""
    return walk.fresh(call.target.embedding_dim, frozen=f"embedding {call.node.target} (compaction does not slice "
                                                        f"its table)", axis=-1)


def batch_norm(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    m, x = call.target, walk.input(call)
    ids, _ = walk.per_channel(x)
    if m.num_features != len(ids):
        raise walk.error(f"{m.num_features} features but {len(ids)} input channels")
    walk.add_norm(m, ids)
    return ChannelMap(x.ids, becomes_constant(x.masked))


def prelu(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    if call.target.num_parameters != 1:
        raise walk.error("a per-channel PReLU is not supported")
    return walk.input(call)


def spatial_module(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """Pooling, upsampling, zero padding: each channel stays a channel (zero padding, and average
    pooling with padding, make a constant channel non-uniform)."""
    m = call.target
    ids, masked = walk.per_channel(walk.input(call))
    if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)) or (
            "Avg" in type(m).__name__ and any(np.atleast_1d(getattr(m, "padding", 0)))):
        masked = after_zero_padding(masked)
    return walk.broadcast_channels(ids, masked)


def eve_module(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """Another evefx module (quantizer, neuron): element-wise, but it may map 0 elsewhere and a
    stateful neuron turns a constant into a spike train: what comes out is data."""
    m, x = call.target, walk.input(call)
    sizes = {x.ids.shape[1], x.ids.shape[-1]} - {1} if x.ids.ndim > 1 else set()
    per_channel = [n for n, b in (*m.named_parameters(), *m.named_buffers()) if b.dim() and b.shape[0] in sizes]
    if per_channel:
        raise walk.error(f"{type(m).__name__} keeps per-channel state ({', '.join(per_channel)})")
    return ChannelMap(x.ids, np.zeros_like(x.masked))


def quantizer(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """A fake quantizer of activations: element-wise, and a pruned channel stays what it was: its
    zero point is always a code, so 0 comes out as exactly 0, and a constant as a constant."""
    eve_module(walk, call)  # a per-channel quantizer of activations is refused as any eve module
    x = walk.input(call)
    return ChannelMap(x.ids, x.masked)


def spiking_neuron(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """A spiking neuron: channel c in, channel c out. Per-channel thresholds and resets
    (``neuron_wise``) are sliced with the channels. A pruned (zero) channel stays zero while its
    resting membrane (the reset value, 0 with a soft reset) is below its threshold: it never fires;
    a constant one becomes a spike train over the steps, which is data."""
    m, x = call.target, walk.input(call)
    if m.neuron_wise:
        ids, _ = walk.per_channel(x, m.channel_axis)
        if m.channels != len(ids):
            raise walk.error(f"{m.channels} per-channel thresholds but {len(ids)} input channels")
        walk.add_norm(m, ids)
    rest = m.reset.detach() if m.reset is not None else torch.zeros(())
    silent = bool((rest < m.threshold.detach()).all())
    zero = (x.masked == MaskedValue.ZERO) & silent
    return ChannelMap(x.ids, np.where(zero, MaskedValue.ZERO, MaskedValue.DATA).astype(np.int8))


def _binary(kind: str) -> Rule:
    def rule(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
        a, b = [v if isinstance(v, ChannelMap) else None for v in (list(call.args) + [call.kwargs.get("other")])[:2]]
        raw = (list(call.node.args) + [call.node.kwargs.get("other")])[:2]
        if a is not None and b is not None:
            walk.union(a.ids, b.ids)
            ids = np.broadcast_arrays(a.ids, b.ids)[0]
            ma, mb = np.broadcast_arrays(a.masked, b.masked)
            if kind == "mul":  # a zero times anything is zero
                masked = np.where(np.maximum(ma, mb) == MaskedValue.ZERO, MaskedValue.ZERO, np.minimum(ma, mb))
            elif kind == "div":
                masked = np.where(ma == MaskedValue.ZERO, MaskedValue.ZERO, np.minimum(ma, mb))
            else:
                masked = np.minimum(ma, mb)
            return ChannelMap(ids, masked.astype(np.int8))
        tensor = a if a is not None else b
        other = raw[1] if a is not None else raw[0]
        if tensor is None:
            raise walk.error("none of its operands is a tensor evefx follows")
        if isinstance(other, fx.Node):
            other = None  # a Python number computed in the graph: an unknown scalar
        if kind == "mul" or (kind == "div" and a is not None):
            return tensor
        if kind in ("add", "sub") and other == 0:
            return tensor
        return ChannelMap(tensor.ids, becomes_constant(tensor.masked))

    rule.__name__ = rule.__qualname__ = kind
    rule.__doc__ = f"``{kind}``: two followed tensors have their channels merged (one class); a scalar keeps them."
    return rule


add, sub, mul, div = _binary("add"), _binary("sub"), _binary("mul"), _binary("div")


def spatial_function(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    ids, masked = walk.per_channel(walk.input(call))
    if "avg_pool" in getattr(call.target, "__name__", "") and any(
            np.atleast_1d(call.args[4] if len(call.args) > 4 else call.kwargs.get("padding", 0))):
        masked = after_zero_padding(masked)
    return walk.broadcast_channels(ids, masked)


def pad(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    x = walk.input(call)
    ids, masked = walk.per_channel(x)
    widths = call.args[1] if len(call.args) > 1 else call.kwargs.get("pad")
    if len(widths) > 2 * (x.ids.ndim - 2):
        raise walk.error("it pads the channel axis")
    return walk.broadcast_channels(ids, after_zero_padding(masked))


def reduction(walk: ChannelAnalysis, call: OpCall) -> ChannelMap:
    """``x.mean(dims)`` and friends over axes the channels do not vary along (spatial positions, tokens)."""
    x = walk.input(call)
    dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    if dims is None:
        raise walk.error("it reduces over every axis, channels included")
    rank = x.ids.ndim
    dims = sorted({d % rank for d in ((dims,) if isinstance(dims, int) else tuple(dims))})
    if set(dims) & set(walk.varying_axes(x)):
        raise walk.error("it reduces over the channel axis")
    keepdim = bool(call.args[2] if len(call.args) > 2 else call.kwargs.get("keepdim", False))
    ids, masked = x.ids, np.broadcast_to(x.masked, x.ids.shape)
    for d in reversed(dims):
        ids, masked = ids.take([0], axis=d), masked.min(axis=d, keepdims=True)
        if not keepdim:
            ids, masked = ids.squeeze(d), masked.squeeze(d)
    return ChannelMap(ids, masked)


# the defaults
_default = DEFAULT_RULES.register
_default(ChannelPruner, channel_pruner)
_default(nn.modules.conv._ConvNd, conv)
_default(nn.Linear, linear)
_default(nn.Embedding, embedding)
_default(nn.modules.batchnorm._BatchNorm, batch_norm)
_default(nn.PReLU, prelu)
_default(EveHooks, eve_module)
_default(Quantizer, quantizer)
_default(SpikingNeuron, spiking_neuron)
_default((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh,
    nn.Mish, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), elementwise)
_default((nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid), elementwise_to_constant)
_default((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ZeroPad1d, nn.ZeroPad3d), spatial_module)

_default((F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.hardswish, F.hardtanh, F.mish,
    torch.relu, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.relu_,
    torch.clone, torch.neg, torch.abs,
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "to",
    "type_as", "detach", "abs", "neg", "clamp", "clamp_min", "clamp_", "clamp_min_",
    # torchvision's stochastic depth scales whole samples (or rows): zero stays zero, channels untouched
    "torchvision.ops.stochastic_depth.stochastic_depth"), elementwise)
_default((torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, F.logsigmoid, "sigmoid", "sigmoid_", "exp"),
    elementwise_to_constant)
_default((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.interpolate, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d),
    spatial_function)
_default(F.pad, pad)
_default(("mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin), reduction)
_default((operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"), add)
_default((operator.sub, operator.isub, torch.sub, "sub", "sub_"), sub)
_default((operator.mul, operator.imul, torch.mul, "mul", "mul_"), mul)
_default((operator.truediv, operator.itruediv, torch.div, "div", "div_"), div)
_default(("size", "dim", "numel", "nelement"), not_a_tensor)
_default(builtins.getattr, tensor_attribute)
del _default

# the rules for axis moves (reshape, permute, cat, index) and for norms and attention register themselves
from evefx.channels import attention_rules, layout_rules  # noqa: E402, F401  (imported last, for their registrations)
