"""Clean-ups of the exported ONNX graph so that onnxruntime fuses Q/DQ into integer kernels, written
as onnx-ir passes (``onnx_ir.passes``): each edits the model in place and reports how many edits it made.

* :class:`ConstantsToInitializers`: ``Constant`` nodes become named initializers
  (``features.0.weight_quantized``, ``features_0_act_quant.scale``...).
* :class:`RequantizeDataMovement`: after ops that only move values (Flatten, Reshape, MaxPool,
  Transpose...), a ``Q -> DQ`` pair with the producer's scale is inserted. The values are already on
  that grid, so this is exact, and it lets the consumer (a Gemm after a Flatten) fuse too.
* :class:`QuantizeBiases`: the float bias of a Conv/Gemm (or the constant added to a MatMul) whose
  input and weight both come from ``DequantizeLinear`` becomes int32 codes with scale ``s_x * s_w``
  behind a ``DequantizeLinear``: PyTorch's eval rounds it so, and onnxruntime's QDQ Conv/Gemm fusion
  needs every input of the node dequantized (its optimizer would round the bias this way anyway).

:func:`rewrite` runs them on the exporter's ``ModelProto``. onnx-ir gives each value its producer
and its uses, so a pass rewires edges directly instead of rebuilding name maps and node lists; it
does not make names unique, which :class:`_Names` does (the names are what the checks and reports
key layers by).

Example:
    >>> model, counts = rewrite(onnx.load("raw.onnx"), int32_bias=True)
    >>> counts
    {'constants_to_initializers': 27, 'requantized_data_movement': 1, 'int32_biases': 5}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from evefx.export.onnx_graph import scope_of

__all__ = ["rewrite", "RewriteResult", "ConstantsToInitializers", "RequantizeDataMovement", "QuantizeBiases",
           "DATA_MOVEMENT_OPS"]

log = logging.getLogger(__name__)

DATA_MOVEMENT_OPS = frozenset({"Flatten", "Reshape", "MaxPool", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
"""Ops whose outputs hold only values of their (first) input, so a dequantized input stays on its grid."""

_INT32 = np.iinfo(np.int32)
_QDQ_ROLES = {0: "quantized", 1: "scale", 2: "zero_point"}  # input slot of QuantizeLinear/DequantizeLinear
_CLIP_ROLES = {1: "qmin", 2: "qmax"}


@dataclass
class RewriteResult(ir.passes.PassResult):
    """A pass's result with the number of edits it made (the export report lists them)."""

    edits: int = 0


class _Names:
    """Fresh value names for one graph: ``base``, else ``base_1``, ``base_2``..."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for v in graph.inputs} | set(graph.initializers)
        self.taken |= {v.name for node in graph for v in node.outputs}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _array(value: ir.Value | None) -> np.ndarray | None:
    """The constant a value holds (an initializer), or None."""
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _through_identities(value: ir.Value | None) -> ir.Value | None:
    """The value behind a chain of ``Identity`` nodes: the TorchScript exporter stores equal
    tensors once and hands each other reader an ``Identity`` of it (the biases of cloned layers)."""
    while value is not None and value.producer() is not None and value.producer().op_type == "Identity":
        value = value.producer().inputs[0]
    return value


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class ConstantsToInitializers(ir.passes.InPlacePass):
    """Move ``Constant`` nodes into initializers, named after the layer and the role of their reader.

    Example:
        >>> ConstantsToInitializers()(ir_model).edits
        27
    """

    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        before = set(graph.initializers)
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        names = _Names(graph)
        values, new_names = [], []
        for value in list(graph.initializers.values()):
            uses = list(value.uses()) if value.name not in before else []
            if not uses:
                continue
            user, slot = uses[0]
            scope = scope_of(user) or "tensor"
            if all(u.op_type in ("QuantizeLinear", "DequantizeLinear") for u, _ in uses):
                weight = user.op_type == "DequantizeLinear" and user.inputs[0].is_initializer()
                values.append(value)
                new_names.append(names(f"{scope}.{'weight_' if weight else ''}{_QDQ_ROLES.get(slot, 'value')}"))
            elif all(u.op_type == "Clip" for u, _ in uses) and slot in _CLIP_ROLES:
                values.append(value)
                new_names.append(names(f"{scope}.{_CLIP_ROLES[slot]}"))
        if values:
            ir.convenience.rename_values(values, new_names)
        moved = len(graph.initializers) - len(before)
        return RewriteResult(model, modified=bool(moved), edits=moved)


class RequantizeDataMovement(ir.passes.InPlacePass):
    """After every data-movement op fed by a per-tensor ``DequantizeLinear``, add ``Q -> DQ`` with the
    same scale and zero point (exact: the values are already on the grid).

    Example:
        >>> RequantizeDataMovement()(ir_model).edits   # after the Flatten that feeds the Gemm
        1
    """

    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        names = _Names(graph)
        added = 0
        for node in list(graph):
            if node.op_type not in DATA_MOVEMENT_OPS or not node.inputs or node.inputs[0] is None:
                continue
            if node.op_type == "MaxPool" and len(node.outputs) > 1:
                continue  # the indices output is not a quantized value
            src = node.inputs[0].producer()
            if src is None or src.op_type != "DequantizeLinear" or src.inputs[0].is_initializer() or len(src.inputs) < 3:
                continue  # not a dequantized activation (a weight's DQ reads an initializer)
            scale = _array(src.inputs[1])
            if scale is None or scale.size != 1:
                continue
            out = node.outputs[0]
            users = list(out.uses())
            if out.is_graph_output() or not users or all(u.op_type == "QuantizeLinear" for u, _ in users):
                continue
            q = ir.node("QuantizeLinear", [out, src.inputs[1], src.inputs[2]], name=f"{node.name}_requant_q")
            dq = ir.node("DequantizeLinear", [q.outputs[0], src.inputs[1], src.inputs[2]],
                         name=f"{node.name}_requant_dq")
            q.outputs[0].name = names(f"{out.name}_requantized")
            dq.outputs[0].name = names(f"{out.name}_dequantized")
            graph.insert_after(node, [q, dq])
            for user, i in users:
                user.replace_input_with(i, dq.outputs[0])
            added += 1
        return RewriteResult(model, modified=bool(added), edits=added)


def _plain_gemm(node: ir.Node) -> bool:
    """``Y = X @ W.T + b``: the form onnxruntime's QDQ Gemm fusion takes."""
    a = node.attributes
    return (not a.get_int("transA", 0) and bool(a.get_int("transB", 0)) and a.get_float("alpha", 1.0) == 1.0
            and a.get_float("beta", 1.0) == 1.0)


class QuantizeBiases(ir.passes.InPlacePass):
    """Store the float bias of a layer whose input and weight are dequantized (the input per tensor) as
    int32 codes (scale ``s_x * s_w``) behind a ``DequantizeLinear``: the bias of a Conv/Gemm, and the
    constant added to a ``MatMul`` (a Linear on inputs of more than two dimensions, as in a
    transformer's projections).

    A quantized layer rounds its bias to that grid in PyTorch's eval (see
    ``QuantizedWeightLayer.set_input_quantizer``) and onnxruntime's optimizer makes the same rounding
    for a Conv/Gemm, so the file states what runs; the rounding moves a bias by at most
    ``0.5 * s_x * s_w``. Left in float after a MatMul, it shifted every output channel of a 4-bit
    transformer's projections by up to half a unit, enough to flip roundings that grew end to end.

    Example:
        >>> QuantizeBiases()(ir_model).edits
        5
    """

    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        names = _Names(graph)
        done = 0
        for node in list(graph):
            site = _bias_site(node)
            if site is None:
                continue
            slot, dq_x, dq_w = site
            s_x, s_w = _array(dq_x.inputs[1]), _array(dq_w.inputs[1])
            bias = node.inputs[slot]
            b = _array(_through_identities(bias))
            if s_x is None or s_w is None or b is None or s_x.size != 1 or s_w.size not in (1, b.size):
                continue  # a per-channel input has no single bias scale
            scale = (s_x.astype(np.float64).reshape(()) * s_w.astype(np.float64)).astype(np.float32)
            full = np.broadcast_to(scale, b.shape).astype(np.float32)
            codes = np.round(b.astype(np.float64) / full.astype(np.float64))
            if np.any(np.abs(codes) > _INT32.max):
                log.warning("%s: bias too large for int32 codes at scale s_x*s_w; it stays in float", node.name)
                continue
            per_channel = scale.size > 1
            q = _initializer(graph, names(f"{bias.name}_quantized"), codes.astype(np.int32))
            s = _initializer(graph, names(f"{bias.name}_scale"), full if per_channel else scale.reshape(()))
            z = _initializer(graph, names(f"{bias.name}_zero_point"),
                             np.zeros(scale.shape if per_channel else (), np.int32))
            dq = ir.node("DequantizeLinear", [q, s, z], {"axis": 0} if per_channel else None,
                         name=f"{node.name}_bias_dq")
            dq.outputs[0].name = names(f"{bias.name}_dequantized")
            graph.insert_before(node, dq)
            node.replace_input_with(slot, dq.outputs[0])
            _drop_unused(graph, bias)
            done += 1
        return RewriteResult(model, modified=bool(done), edits=done)


def _drop_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove ``value`` once nothing reads it: an initializer, or an ``Identity`` (and what it read)."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if value.name in graph.initializers:
            graph.initializers.pop(value.name)
            return
        if producer is None or producer.op_type != "Identity":
            return
        graph.remove(producer, safe=True)
        value = producer.inputs[0]


def _dequantized(value: ir.Value | None) -> ir.Node | None:
    """The ``DequantizeLinear`` that produces ``value``, or None."""
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _bias_site(node: ir.Node) -> tuple[int, ir.Node, ir.Node] | None:
    """``(bias input slot, input's DQ, weight's DQ)`` of a layer with a constant bias whose input and
    weight are dequantized: ``Conv``/plain ``Gemm``, or ``Add(bias, MatMul(DQ x, [Transpose] DQ w))``."""
    if node.op_type in ("Conv", "Gemm"):
        if (len(node.inputs) < 3 or _array(_through_identities(node.inputs[2])) is None
                or (node.op_type == "Gemm" and not _plain_gemm(node))):
            return None
        dq_x, dq_w = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
        return (2, dq_x, dq_w) if dq_x is not None and dq_w is not None else None
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for slot in (0, 1):
        bias, product = node.inputs[slot], node.inputs[1 - slot]
        b = _array(_through_identities(bias))
        matmul = None if product is None else product.producer()
        if b is None or b.ndim != 1 or matmul is None or matmul.op_type != "MatMul" or len(product.uses()) != 1:
            continue
        if not scope_of(node) or scope_of(node) != scope_of(matmul):
            continue  # a constant added outside the layer (not its bias): PyTorch does not round it
        weight = matmul.inputs[1]
        moved = None if weight is None else weight.producer()
        transposed = moved is not None and moved.op_type == "Transpose"
        if transposed:
            weight = moved.inputs[0]  # Linear's W.T: per channel along axis 0 of W, the outputs
        dq_x, dq_w = _dequantized(matmul.inputs[0]), _dequantized(weight)
        if dq_x is None or dq_w is None or dq_w.inputs[0] is None or not dq_w.inputs[0].is_initializer():
            continue
        s_w = _array(dq_w.inputs[1])
        if s_w is not None and s_w.size > 1 and dq_w.attributes.get_int("axis", 1) != (0 if transposed else 1):
            continue  # scales along the inputs: no per-output bias scale
        return slot, dq_x, dq_w
    return None


def _edits(rewrite_pass: ir.passes.InPlacePass, model: ir.Model) -> int:
    """Run ``rewrite_pass`` on ``model``; how many edits it made (onnx-ir types ``__call__`` as a plain PassResult)."""
    result = rewrite_pass(model)
    assert isinstance(result, RewriteResult), f"{type(rewrite_pass).__name__}.call must return a RewriteResult"
    return result.edits


def rewrite(model: onnx.ModelProto, *, int32_bias: bool = True) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The exporter's file with the passes above applied (``QuantizeBiases`` only with ``int32_bias``),
    and how many edits each made.

    Example:
        >>> model, counts = rewrite(onnx.load("raw.onnx"))
        >>> counts["int32_biases"]
        5
    """
    ir_model = ir.from_proto(model)
    counts = {
        "constants_to_initializers": _edits(ConstantsToInitializers(), ir_model),
        "requantized_data_movement": _edits(RequantizeDataMovement(), ir_model),
        "int32_biases": _edits(QuantizeBiases(), ir_model) if int32_bias else 0,
    }
    out = ir.to_proto(ir_model)
    # onnx-ir records the types of the constants it lifted as value_info; the initializers state them already
    initializers = {i.name for i in out.graph.initializer}
    kept = [v for v in out.graph.value_info if v.name not in initializers]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out, counts
