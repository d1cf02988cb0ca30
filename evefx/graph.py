"""The shared vocabulary of graph edits that every pass is written with.

All edits work in place on a ``torch.fx.GraphModule``; ``evefx.transform`` owns the copy.
Provenance of every evefx edit lives in ``node.meta["evefx"]`` (see :func:`mark`).

Example:
    >>> block = output_block(gm, layer_nodes(gm)[0])
    >>> insert_after(gm, block.last, nn.Identity(), "probe")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "recorded_inputs",
    "calls_one_of",
    "Block",
    "LAYER_TYPES",
    "ACTIVATION_MODULES",
    "layer_nodes",
    "module_of",
    "is_module_node",
    "output_block",
    "insert_after",
    "insert_before_output",
    "replace_module",
    "remove_node",
    "unique_name",
    "Provenance",
    "Role",
    "mark",
    "marked",
    "provenance",
    "to_networkx",
    "describe_node",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layers passes attach to by default (conv and linear, subclasses included)."""

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, torch.relu, torch.sigmoid, torch.tanh,
    torch.sigmoid, F.sigmoid, F.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Block:
    """A layer's output block: ``layer -> [bn] -> [activation]``; ``last`` is its final node."""

    layer: fx.Node
    bn: fx.Node | None
    act: fx.Node | None

    @property
    def last(self) -> fx.Node:
        return self.act or self.bn or self.layer


def is_module_node(node: fx.Node) -> bool:
    return node.op == "call_module"


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The submodule a ``call_module`` node calls."""
    return gm.get_submodule(str(node.target))


def layer_nodes(gm: fx.GraphModule, types: tuple[type[nn.Module], ...] = LAYER_TYPES) -> list[fx.Node]:
    """``call_module`` nodes whose module is a conv/linear layer, in graph order."""
    return [n for n in gm.graph.nodes if is_module_node(n) and isinstance(module_of(gm, n), types)]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def calls_one_of(gm: fx.GraphModule, node: Any, modules: tuple[type, ...], functions: Any = (),
                 methods: Any = ()) -> bool:
    """Whether ``node`` calls a module of one of the ``modules`` types, one of the ``functions``, or a
    tensor method named in ``methods`` (the three ways one op appears in a traced graph).

    Example:
        >>> calls_one_of(gm, node, (nn.ReLU,), {F.relu, torch.relu}, {"relu", "relu_"})
    """
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(module_of(gm, node), modules)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    return calls_one_of(gm, node, ACTIVATION_MODULES, _ACTIVATION_FUNCTIONS, _ACTIVATION_METHODS)


def output_block(gm: fx.GraphModule, node: fx.Node) -> Block:
    """Follow ``layer -> [BatchNorm] -> [activation]`` along single-user edges.

    Example:
        >>> output_block(gm, conv_node).last  # the ReLU after conv -> bn -> relu
    """
    bn = act = None
    cur = node
    nxt = _only_user(cur)
    if nxt is not None and nxt.op == "call_module" and isinstance(module_of(gm, nxt), _BN_TYPES):
        bn = cur = nxt
        nxt = _only_user(cur)
    if nxt is not None and _is_activation(gm, nxt) and nxt.args and nxt.args[0] is cur:
        act = nxt
    return Block(node, bn, act)


def unique_name(gm: fx.GraphModule, hint: str) -> str:
    """A free attribute name on ``gm`` derived from ``hint`` (dots become underscores)."""
    base = hint.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, hint: str) -> fx.Node:
    """Add ``module`` as a submodule and call it on ``node``'s output; every other user of
    ``node`` now reads the new node. Returns the new node."""
    name = unique_name(gm, hint)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    if "tensor_meta" in node.meta:
        new.meta["tensor_meta"] = node.meta["tensor_meta"]
    return new


def insert_before_output(gm: fx.GraphModule, make_module: Any, hint: str) -> list[fx.Node]:
    """Wrap every node the graph returns with a fresh ``make_module()``; returns the new nodes."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    new_nodes = []
    leaves = [a for a in tree_leaves(output.args[0]) if isinstance(a, fx.Node)]
    for src in dict.fromkeys(leaves):
        name = unique_name(gm, hint)
        gm.add_submodule(name, make_module())
        with gm.graph.inserting_before(output):
            new = gm.graph.call_module(name, (src,))
        output.replace_input_with(src, new)
        new_nodes.append(new)
    return new_nodes


def replace_module(gm: fx.GraphModule, node: fx.Node, new_module: nn.Module) -> None:
    """Swap the submodule ``node`` calls for ``new_module`` (same qualified name)."""
    gm.set_submodule(str(node.target), new_module)


def remove_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node``; its users read its first input instead (for BN folding, identity removal)."""
    src = node.args[0]
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)
    if node.op == "call_module":
        # the submodule may be shared with other nodes; drop it only when nothing calls it
        if not any(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
            gm.delete_submodule(str(node.target))


Role = Literal["weight", "activation", "input", "neuron", "encoder", "decoder", "pruner"]
"""The roles evefx's passes give their nodes: a quantized layer (``weight``), the quantizer after it
(``activation``) or before it (``input``), a spiking ``neuron``, the ``encoder``/``decoder`` around
a spiking network, or a channel ``pruner``. A pass of your own may name its own role."""


@dataclass(frozen=True)
class Provenance:
    """Which pass put a node in the graph, for which layer and spec section (``node.meta["evefx"]``).

    ``channel_axis`` is the axis of the node's input that holds the layer's channels (1 after a
    conv, -1 after a Linear; ``None`` where it does not apply). Read the fields by name; the
    mapping form (``prov["layer"]``, ``prov["pass"]``) is kept for code written against the
    earlier dict.

    Example:
        >>> prov = provenance(node)
        >>> (prov.pass_name, prov.layer, prov.role, prov.channel_axis)
        ('spike', 'fc1', 'neuron', -1)
    """

    pass_name: str
    layer: str
    spec_path: str
    role: Role | str
    channel_axis: int | None = None

    def __post_init__(self) -> None:
        if not self.role or not isinstance(self.role, str):
            raise ValueError(f"a provenance role is a non-empty string such as {get_args(Role)} (got {self.role!r})")

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, "pass_name" if key == "pass" else key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def mark(node: fx.Node, *, pass_name: str, layer: str, spec_path: str, role: Role | str,
         channel_axis: int | None = None) -> None:
    """Record a node's :class:`Provenance` in ``node.meta["evefx"]``.

    Example:
        >>> mark(node, pass_name="spike", layer="fc1", spec_path="passes[0]", role="neuron", channel_axis=-1)
        >>> provenance(node).channel_axis
        -1
    """
    node.meta["evefx"] = Provenance(pass_name, layer, spec_path, role, channel_axis)


def provenance(node: fx.Node) -> Provenance | None:
    """The node's :class:`Provenance`, or None for nodes evefx did not put or change."""
    return node.meta.get("evefx")


def marked(
    gm: fx.GraphModule, pass_name: str | None = None, layer: str | None = None, role: str | None = None
) -> list[fx.Node]:
    """Nodes evefx put (or changed) in the graph, filtered by pass, layer and role."""
    out = []
    for n in gm.graph.nodes:
        p = provenance(n)
        if p is None:
            continue
        if (pass_name and p.pass_name != pass_name) or (layer and p.layer != layer) or (role and p.role != role):
            continue
        out.append(n)
    return out


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """``node 'features_0' (features.0: Conv2d)``: a node as error messages name it."""
    if node.op == "call_module":
        return f"node {node.name!r} ({node.target}: {type(module_of(gm, node)).__name__})"
    target = getattr(node.target, "__name__", node.target)
    return f"node {node.name!r} ({node.op} {target})"


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph as a ``networkx.DiGraph`` keyed by node name.

    Node attributes: ``node`` (the fx node), ``op``, ``module_type`` (class name or None).
    Edge ``u -> v`` means ``v`` reads ``u``'s output; ``arg_index`` says in which argument slot.

    Example:
        >>> nx.ancestors(to_networkx(gm), "classifier_1")
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        mtype = type(module_of(gm, n)).__name__ if n.op == "call_module" else None
        g.add_node(n.name, node=n, op=n.op, module_type=mtype)
    for n in gm.graph.nodes:
        for i, a in enumerate(n.all_input_nodes):
            g.add_edge(a.name, n.name, arg_index=i)
    return g


def recorded_inputs(gm: fx.GraphModule) -> list[tuple[str, torch.Size | None, torch.dtype | None]]:
    """Each input (placeholder) of ``gm`` with the shape and dtype shape propagation recorded for it
    (``None`` where nothing was recorded: the model was transformed without example inputs).

    Example:
        >>> recorded_inputs(evefx.transform(DemoNet(), spec, torch.zeros(1, 1, 28, 28)))
        [('x', torch.Size([1, 1, 28, 28]), torch.float32)]
    """
    out: list[tuple[str, torch.Size | None, torch.dtype | None]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            out.append((node.name, shape, getattr(meta, "dtype", None) if shape is not None else None))
    return out
