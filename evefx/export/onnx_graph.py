"""Look-ups in an ``onnx.GraphProto`` that the export's later steps share (packing, checks, emulation).

Example:
    >>> prod, users = producers(model.graph), consumers(model.graph)
    >>> scope_of(prod["output"])
    'classifier.3'
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import onnx

__all__ = ["scope_of", "producers", "consumers"]


def scope_of(node: Any) -> str:
    """The qualified name of the innermost PyTorch module the TorchScript exporter put in a node's name
    (``/features/features.0/Conv`` -> ``features.0``); empty for nodes outside any submodule. Takes an
    ``onnx.NodeProto`` or an ``onnx_ir.Node`` (anything with a ``name``).

    Example:
        >>> scope_of(onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="/features/features.0/Conv"))
        'features.0'
    """
    parts = (node.name or "").strip("/").split("/")
    return parts[-2] if len(parts) > 1 else ""


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it.

    Example:
        >>> producers(model.graph)["output"].op_type
        'Gemm'
    """
    return {name: node for node in graph.node for name in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order.

    Example:
        >>> [n.op_type for n in consumers(model.graph)["input"]]
        ['QuantizeLinear']
    """
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users
