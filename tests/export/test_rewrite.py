"""The onnx-ir rewrite passes (evefx/export/rewrite.py) on small hand-built graphs: what each edits,
the names it gives, that the file still computes the same, and that a float graph is left alone."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from evefx.export.parity import ort_session
from evefx.export.rewrite import rewrite

S_X, S_W = 0.05, 0.01
W = np.arange(-12, 12, dtype=np.int8).reshape(3, 8)  # weight codes, [out, in]
BIAS = np.array([0.123, -0.456, 0.789], np.float32)


def _const(name: str, array: np.ndarray, scope: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"/{scope}/Constant_{name}",
                            value=numpy_helper.from_array(array))


def _qdq_model() -> onnx.ModelProto:
    """x -> Q -> DQ -> Flatten -> Gemm(DQ(int8 codes), float bias), as the TorchScript exporter writes it."""
    nodes = [
        _const("s", np.array(S_X, np.float32), "act_quant"),
        _const("z", np.array(128, np.uint8), "act_quant"),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="/act_quant/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="/act_quant/DequantizeLinear"),
        helper.make_node("Flatten", ["xd"], ["flat"], name="/flatten/Flatten"),
        _const("wq", W, "fc"),
        _const("ws", np.full(3, S_W, np.float32), "fc"),
        _const("wz", np.zeros(3, np.int8), "fc"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="/fc/DequantizeLinear", axis=0),
        _const("b", BIAS, "fc"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["y"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(model.SerializeToString(), optimize=False).run(None, {"x": x})[0]


def test_passes_name_requantize_and_quantize_the_bias():
    before = _qdq_model()
    after, counts = rewrite(before, int32_bias=True)
    onnx.checker.check_model(after, full_check=True)
    assert counts == {"constants_to_initializers": 6, "requantized_data_movement": 1, "int32_biases": 1}
    assert not any(n.op_type == "Constant" for n in after.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    assert {"act_quant.scale", "act_quant.zero_point", "fc.weight_quantized", "fc.weight_scale",
            "fc.weight_zero_point"} <= set(inits)
    assert not any(v.name in inits for v in after.graph.value_info)
    # Flatten -> Q -> DQ -> Gemm, and the Gemm's bias is int32 codes at s_x * s_w behind its own DQ
    ops = [n.op_type for n in after.graph.node]
    assert ops[ops.index("Flatten") + 1:ops.index("Flatten") + 3] == ["QuantizeLinear", "DequantizeLinear"]
    gemm = next(n for n in after.graph.node if n.op_type == "Gemm")
    bias_dq = next(n for n in after.graph.node if n.output[0] == gemm.input[2])
    assert bias_dq.op_type == "DequantizeLinear" and bias_dq.name == "/fc/Gemm_bias_dq"
    codes = inits[bias_dq.input[0]]
    assert codes.dtype == np.int32 and np.array_equal(codes, np.round(BIAS / np.float32(S_X * S_W)))
    assert "b" not in inits  # the float bias is gone
    x = np.random.default_rng(0).uniform(-3, 3, (2, 2, 4)).astype(np.float32)
    diff = np.abs(_run(after, x) - _run(before, x))
    assert diff.max() <= 0.5 * S_X * S_W + 1e-6  # only the bias rounding moves the output
    _, no_bias = rewrite(_qdq_model(), int32_bias=False)
    assert no_bias["int32_biases"] == 0 and no_bias["requantized_data_movement"] == 1


def test_a_float_graph_has_nothing_to_rewrite():
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="/flatten/Flatten"),
             helper.make_node("Gemm", ["flat", "w", "b"], ["y"], name="/fc/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(W.astype(np.float32), "w"), numpy_helper.from_array(BIAS, "b")])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    after, counts = rewrite(before)
    assert counts == {"constants_to_initializers": 0, "requantized_data_movement": 0, "int32_biases": 0}
    assert [(n.op_type, list(n.input), list(n.output)) for n in after.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in before.graph.node]
    assert {i.name for i in after.graph.initializer} == {"w", "b"}


def _quantized_input() -> list[onnx.NodeProto]:
    """x -> Q -> DQ (per tensor, scale ``S_X``): ``xd``."""
    return [
        _const("s", np.array(S_X, np.float32), "act_quant"),
        _const("z", np.array(128, np.uint8), "act_quant"),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="/act_quant/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="/act_quant/DequantizeLinear"),
    ]


def _token_model(nodes: list[onnx.NodeProto], features: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul_model(s_w: np.ndarray, add: list[onnx.NodeProto]) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(., Transpose(DQ(int8 codes, per channel s_w))) -> ``add`` -> y, as the
    TorchScript exporter writes a Linear on (batch, tokens, features); ``add`` reads ``mm``."""
    return _token_model([
        *_quantized_input(),
        _const("wq", W, "fc"),
        _const("ws", s_w, "fc"),
        _const("wz", np.zeros(3, np.int8), "fc"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="/fc/DequantizeLinear", axis=0),
        helper.make_node("Transpose", ["w"], ["wt"], name="/fc/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["xd", "wt"], ["mm"], name="/fc/MatMul"),
        *add,
    ], features=8)


def test_the_constant_added_to_a_matmul_becomes_int32_codes():
    """A Linear on a 3-D input exports as MatMul(DQ x, Transpose(DQ w)) + bias: its bias is rounded
    to ``s_x * s_w`` as PyTorch's eval rounds it (per output channel, the weight's axis)."""
    s_w = np.array([0.01, 0.02, 0.03], np.float32)
    before = _matmul_model(s_w, add=[_const("b", BIAS, "fc"), helper.make_node("Add", ["b", "mm"], ["y"], name="/fc/Add")])
    after, counts = rewrite(before)
    onnx.checker.check_model(after, full_check=True)
    assert counts["int32_biases"] == 1
    add = next(n for n in after.graph.node if n.op_type == "Add")
    bias_dq = next(n for n in after.graph.node if n.output[0] == add.input[0])
    assert bias_dq.name == "/fc/Add_bias_dq" and bias_dq.attribute[0].i == 0
    inits = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    codes, scale = inits[bias_dq.input[0]], inits[bias_dq.input[1]]
    assert codes.dtype == np.int32 and np.array_equal(codes, np.round(BIAS / (S_X * s_w)))
    assert np.allclose(scale, S_X * s_w)
    x = np.random.default_rng(0).uniform(-3, 3, (2, 5, 8)).astype(np.float32)
    expected = _run(before, x) - BIAS + codes * (S_X * s_w)  # the same graph with the rounded bias
    assert np.allclose(_run(after, x), expected, atol=1e-5)



def test_a_constant_added_after_the_layer_is_not_its_bias():
    """Only the Add of the Linear's own call (same module scope as its MatMul) holds its bias; a
    constant a user adds afterwards stays in float, as PyTorch computes it."""
    offset = [_const("offset", BIAS, "model"), helper.make_node("Add", ["mm", "offset"], ["y"], name="/Add")]
    after, counts = rewrite(_matmul_model(np.full(3, S_W, np.float32), add=offset))
    assert counts["int32_biases"] == 0
    add = next(n for n in after.graph.node if n.op_type == "Add")
    inits = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    assert np.array_equal(inits[add.input[1]], BIAS)


def test_a_matmul_weight_scaled_along_its_inputs_keeps_a_float_bias():
    """A MatMul weight ``[in, out]`` quantized per channel along ``in`` (axis 0, no Transpose) has no
    per-output bias scale, even when ``in == out``: the bias stays float; along ``out`` it is rounded."""
    def model(axis: int) -> onnx.ModelProto:
        return _token_model([
            *_quantized_input(),
            _const("wq", np.arange(-4, 5, dtype=np.int8).reshape(3, 3), "fc"),
            _const("ws", np.array([0.01, 0.02, 0.03], np.float32), "fc"),
            _const("wz", np.zeros(3, np.int8), "fc"),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="/fc/DequantizeLinear", axis=axis),
            helper.make_node("MatMul", ["xd", "w"], ["mm"], name="/fc/MatMul"),
            _const("b", BIAS, "fc"),
            helper.make_node("Add", ["mm", "b"], ["y"], name="/fc/Add"),
        ], features=3)

    assert rewrite(model(axis=0))[1]["int32_biases"] == 0
    assert rewrite(model(axis=1))[1]["int32_biases"] == 1
