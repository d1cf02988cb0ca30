"""Clean-ups of the exported ONNX graph so that onnxruntime fuses Q/DQ into integer kernels.

Each function edits an ``onnx.ModelProto`` in place and returns how many edits it made:

* :func:`constants_to_initializers`: ``Constant`` nodes become named initializers
  (``features.0.weight_quantized``, ``features_0_act_quant.scale``...).
* :func:`quantize_biases`: the float bias of a Conv/Gemm whose input and weight both come from
  ``DequantizeLinear`` becomes int32 codes with scale ``s_x * s_w`` behind a ``DequantizeLinear``;
  onnxruntime's QDQ Conv/Gemm fusion needs every input of the node to be dequantized (and its
  optimizer would round the bias this way anyway).
* :func:`requantize_data_movement`: after ops that only move values (Flatten, Reshape, MaxPool,
  Transpose...), a ``Q -> DQ`` pair with the producer's scale is inserted. The values are already on
  that grid, so this is exact, and it lets the consumer (a Gemm after a Flatten) fuse too.

Example:
    >>> constants_to_initializers(model); quantize_biases(model); requantize_data_movement(model)
"""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "scope_of",
    "producers",
    "consumers",
    "constants_to_initializers",
    "quantize_biases",
    "requantize_data_movement",
    "DATA_MOVEMENT_OPS",
]

log = logging.getLogger(__name__)

DATA_MOVEMENT_OPS = frozenset({"Flatten", "Reshape", "MaxPool", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
"""Ops whose outputs hold only values of their (first) input, so a dequantized input stays on its grid."""

_INT32 = np.iinfo(np.int32)


def scope_of(node: onnx.NodeProto) -> str:
    """The qualified name of the innermost PyTorch module the TorchScript exporter put in a node's name
    (``/features/features.0/Conv`` -> ``features.0``); empty for nodes outside any submodule."""
    parts = node.name.strip("/").split("/")
    return parts[-2] if len(parts) > 1 else ""


def _rename_everywhere(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for i, name in enumerate(node.output):
            if name in names:
                node.output[i] = names[name]
    for init in graph.initializer:
        if init.name in names:
            init.name = names[init.name]
    for out in graph.output:
        if out.name in names:
            out.name = names[out.name]


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move tensor ``Constant`` nodes into named initializers; returns how many moved."""
    graph = model.graph
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node, i))
    taken = {i.name for i in graph.initializer} | {n for node in graph.node for n in node.output}
    taken |= {i.name for i in graph.input}
    keep, moved, renames = [], 0, {}
    roles = {0: "quantized", 1: "scale", 2: "zero_point"}
    clip_roles = {1: "qmin", 2: "qmax"}
    constants = _constant_outputs(graph)
    for node in graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            keep.append(node)
            continue
        array = numpy_helper.to_array(node.attribute[0].t)
        name = node.output[0]
        users = consumers.get(name, [])
        if users and all(u.op_type in ("QuantizeLinear", "DequantizeLinear") for u, _ in users):
            user, slot = users[0]
            scope = scope_of(user) or "tensor"
            weight = user.op_type == "DequantizeLinear" and user.input[0] in constants
            prefix = f"{scope}.weight_" if weight else f"{scope}."
            renames[name] = _unique(prefix + roles.get(slot, "value"), taken)
        elif users and all(u.op_type == "Clip" for u, _ in users) and users[0][1] in clip_roles:
            user, slot = users[0]
            renames[name] = _unique(f"{scope_of(user) or 'tensor'}.{clip_roles[slot]}", taken)
        graph.initializer.append(numpy_helper.from_array(array, name))
        moved += 1
    del graph.node[:]
    graph.node.extend(keep)
    _rename_everywhere(graph, renames)
    return moved


def _constant_outputs(graph: onnx.GraphProto) -> set[str]:
    return {n.output[0] for n in graph.node if n.op_type == "Constant"} | {i.name for i in graph.initializer}


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def _inits(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in graph.initializer}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def quantize_biases(model: onnx.ModelProto) -> int:
    """Store Conv/Gemm biases as int32 codes (scale ``s_x * s_w``) where input and weight are dequantized
    (the input per tensor). Returns the number of biases converted.

    onnxruntime's graph optimizer makes the same rounding itself for such nodes, so the file states
    what runs; the rounding moves a bias by at most ``0.5 * s_x * s_w``.
    """
    graph = model.graph
    prod, inits = producers(graph), _inits(graph)
    new_nodes: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    taken = set(inits) | {n for node in graph.node for n in node.output}
    done = 0
    for idx, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
        dq_x, dq_w = prod.get(node.input[0]), prod.get(node.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        if dq_x.input[1] not in inits or dq_w.input[1] not in inits:
            continue
        s_x = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64)
        s_w = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
        if s_x.size != 1:
            continue  # a per-channel input has no single bias scale
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        scale = (s_x.reshape(()) * s_w).astype(np.float32)
        scale_full = np.broadcast_to(scale, bias.shape).astype(np.float32)
        codes = np.round(bias / scale_full.astype(np.float64))
        if np.any(np.abs(codes) > _INT32.max):
            log.warning("%s: bias too large for int32 codes at scale s_x*s_w; it stays in float", node.name)
            continue
        base = node.input[2]
        q_name = _unique(f"{base}_quantized", taken)
        s_name = _unique(f"{base}_scale", taken)
        z_name = _unique(f"{base}_zero_point", taken)
        out_name = _unique(f"{base}_dequantized", taken)
        graph.initializer.extend([
            numpy_helper.from_array(codes.astype(np.int32), q_name),
            numpy_helper.from_array(scale_full if scale.size > 1 else scale.reshape(()), s_name),
            numpy_helper.from_array(np.zeros(scale.shape if scale.size > 1 else (), np.int32), z_name),
        ])
        attrs = {"axis": 0} if scale.size > 1 else {}
        dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out_name],
                              name=f"{node.name}_bias_dq", **attrs)
        new_nodes[idx].append(dq)
        node.input[2] = out_name
        done += 1
    if done:
        _insert_before(graph, new_nodes)
        used = {n for node in graph.node for n in node.input}
        unused = [i for i in graph.initializer if i.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    return done


def _insert_before(graph: onnx.GraphProto, new_nodes: dict[int, list[onnx.NodeProto]]) -> None:
    nodes = list(graph.node)
    del graph.node[:]
    for idx, node in enumerate(nodes):
        graph.node.extend(new_nodes.get(idx, []))
        graph.node.append(node)


def requantize_data_movement(model: onnx.ModelProto) -> int:
    """After every data-movement op fed by a per-tensor ``DequantizeLinear``, add ``Q -> DQ`` with the
    same scale and zero point (exact: the values are already on the grid). Returns the pairs added."""
    graph = model.graph
    inits = _inits(graph)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    taken = set(inits) | {n for node in graph.node for n in node.output} | {i.name for i in graph.input}
    dq_of: dict[str, onnx.NodeProto] = {}  # tensor name -> the DQ node that produced it
    nodes_out: list[onnx.NodeProto] = []
    added = 0
    for node in list(graph.node):
        nodes_out.append(node)
        if node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            dq_of[node.output[0]] = node
            continue
        if node.op_type not in DATA_MOVEMENT_OPS or not node.input or node.input[0] not in dq_of:
            continue
        if node.op_type == "MaxPool" and len(node.output) > 1:
            continue  # the indices output is not a quantized value
        src = dq_of[node.input[0]]
        if len(src.input) < 3 or src.input[1] not in inits or numpy_helper.to_array(inits[src.input[1]]).size != 1:
            continue
        out = node.output[0]
        users = consumers.get(out, [])
        if out in graph_outputs or (users and all(u.op_type == "QuantizeLinear" for u in users)) or not users:
            continue
        q_out = _unique(f"{out}_requantized", taken)
        dq_out = _unique(f"{out}_dequantized", taken)
        q = helper.make_node("QuantizeLinear", [out, src.input[1], src.input[2]], [q_out], name=f"{node.name}_requant_q")
        dq = helper.make_node("DequantizeLinear", [q_out, src.input[1], src.input[2]], [dq_out], name=f"{node.name}_requant_dq")
        for user in users:
            for i, name in enumerate(user.input):
                if name == out:
                    user.input[i] = dq_out
        nodes_out.extend([q, dq])
        dq_of[dq_out] = dq
        added += 1
    del graph.node[:]
    graph.node.extend(nodes_out)
    return added
