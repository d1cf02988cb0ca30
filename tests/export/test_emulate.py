"""AVX2 u8s8 emulation and the deployment target: a portable file never saturates, a full-range
file is caught on any machine, and on an AVX2 machine the emulation agrees with the real kernels."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import evefx
from evefx.export import export_onnx
from evefx.export.emulate import local_cpu_class, u8s8_saturation
from evefx.export.parity import check_parity
from tests.export.test_onnx import X0, _data, _qat

AVX2_ONLY = local_cpu_class() == "x86-avx2"
W8 = dict(bits=8, granularity="per_channel", tracker="global")
A8 = dict(bits=8, symmetric=False, signed=False)


def _gemm_file(k: int, n: int, w_code: int) -> onnx.ModelProto:
    """x (uint8 codes, scale 1) @ W^T with every weight code ``w_code``, output re-quantized."""
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(np.full((n, k), w_code, np.int8), "w"),
        numpy_helper.from_array(np.ones(n, np.float32), "sw"), numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
        numpy_helper.from_array(np.array(k * 255 * 127 / 200.0, np.float32), "sy"),
        numpy_helper.from_array(np.array(0, np.uint8), "zy"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="/fc/dq_x"),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=1, name="/fc/Gemm"),
        helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_emulation_counts_saturated_pairs_exactly():
    # every pair 255*127 + 255*127 = 64770 > 32767: all k/2 pairs of all n outputs saturate
    rows = u8s8_saturation(_gemm_file(8, 3, 127), [torch.full((2, 8), 255.0)])
    assert len(rows) == 1
    row = rows[0]
    assert (row.layer, row.op, row.pairs_checked, row.pairs_saturated, row.outputs_changed) == ("fc", "Gemm", 24, 24, 1.0)
    # exact 8*32385 = 259080, saturated 4*32767 = 131068: 128012 units = 98.8 output steps of 2630.6
    assert row.max_error_steps == pytest.approx((8 * 255 * 127 - 4 * 32767) / (8 * 255 * 127 / 200.0), rel=1e-5)
    # at weight code 64 (the portable limit) no pair can leave int16
    assert not u8s8_saturation(_gemm_file(8, 3, 64), [torch.full((2, 8), 255.0)])[0].saturated


def test_portable_default_never_saturates_and_says_so(tmp_path):
    gm = _qat(W8, A8)
    qmin, qmax = gm.get_submodule("features.0").weight_quantizer.quant_range()
    assert (qmin, qmax) == (-64, 63)
    path = tmp_path / "p.onnx"
    report = export_onnx(gm, X0, path, real_inputs=_data(256, 1), kernels=False)
    assert report.passed and report.target == "portable"
    assert len(report.avx2_u8s8) == 5 and not any(r.saturated for r in report.avx2_u8s8)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["evefx.target"] == "portable"
    codes = numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer
                                       if i.name == "features.3.weight_quantized"))
    assert codes.min() >= -64 and codes.max() <= 63


def _vnni_model() -> evefx.EveModule:
    torch.manual_seed(0)
    from tests.export.test_onnx import _trained

    spec = {"passes": [{"kind": "quantize", "target": "x86-vnni", "weight": W8, "activation": A8}]}
    gm = evefx.transform(_trained(0), spec, X0).train()
    with torch.no_grad():
        for i in range(3):
            gm(_data(32, i))
    return gm.eval()


def test_full_range_file_is_flagged_by_the_emulation_on_any_cpu(tmp_path):
    gm = _vnni_model()
    assert gm.get_submodule("features.0").weight_quantizer.quant_range() == (-128, 127)
    path = tmp_path / "v.onnx"
    export_onnx(gm, X0, path, check=False, kernels=False)
    rows = {r.layer: r for r in u8s8_saturation(str(path), [_data(256, 1)])}
    assert rows["features.0"].saturated and rows["features.0"].max_error_steps > 1
    assert json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["evefx.bits"])


@pytest.mark.skipif(not AVX2_ONLY, reason="needs an x86 CPU without VNNI (its u8s8 kernels saturate)")
def test_on_avx2_the_kernels_differ_exactly_where_the_emulation_says(tmp_path):
    gm = _vnni_model()
    path = tmp_path / "v.onnx"
    export_onnx(gm, X0, path, check=False, kernels=False)
    x = _data(256, 1)
    assert any(r.saturated for r in u8s8_saturation(str(path), [x]))
    assert not check_parity(None, str(path), [x], within_min=1.0).passed  # kernels vs graph differ here
    portable = tmp_path / "p.onnx"
    export_onnx(_qat(W8, A8), X0, portable, check=False, kernels=False)
    assert not any(r.saturated for r in u8s8_saturation(str(portable), [x]))
    assert check_parity(None, str(portable), [x]).passed


@pytest.mark.skipif(not AVX2_ONLY, reason="needs an x86 CPU without VNNI")
def test_vnni_target_exported_on_avx2_checks_the_graph_only(tmp_path, caplog):
    report = export_onnx(_vnni_model(), X0, tmp_path / "v.onnx", real_inputs=_data(128, 2), kernels=False)
    assert report.passed and report.target == "x86-vnni" and report.graph.passed
    assert any(r.saturated for r in report.avx2_u8s8)
    assert "targets x86-vnni; this CPU (x86-avx2) runs other kernels" in caplog.text


def test_degenerate_outputs_are_refused(tmp_path):
    gm = _qat(W8, A8)
    with torch.no_grad():
        for m in gm.modules():
            if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.nn.Parameter):
                m.weight.zero_()
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.nn.Parameter):
                m.bias.zero_()
    path = tmp_path / "z.onnx"
    with pytest.raises(evefx.ExportError, match=r"cannot check the file: the model's output 0 is "
                       r"(zero|the same) for every sample.*z\.failed\.onnx"):
        export_onnx(gm, X0, path, real_inputs=_data(64, 1), kernels=False)
    assert not path.exists()


def test_without_real_inputs_parity_runs_on_64_samples(tmp_path, caplog):
    report = export_onnx(_qat(W8, A8), X0, tmp_path / "m.onnx", kernels=False)
    assert report.parity.samples == 65 and report.graph.samples == 65
    assert "no real_inputs; parity is checked on 64 random samples" in caplog.text


def test_kernels_op_by_op_feed_pytorch_codes_and_stay_within_one_step(tmp_path):
    from evefx.export.parity import graph_parity

    gm = _qat(W8, A8)
    path = tmp_path / "p.onnx"
    export_onnx(gm, X0, path, check=False, kernels=False)
    ops = graph_parity(gm, str(path), [_data(128, 3)], kernels=True)
    assert ops.passed and ops.first_divergence is None and ops.max_steps <= 1
    assert ops.rule.endswith("(this CPU's integer kernels)")


@pytest.mark.skipif(not AVX2_ONLY, reason="needs an x86 CPU without VNNI (its u8s8 kernels saturate)")
def test_kernels_op_by_op_name_the_saturating_layer(tmp_path):
    from evefx.export.parity import graph_parity

    gm = _vnni_model()
    path = tmp_path / "v.onnx"
    export_onnx(gm, X0, path, check=False, kernels=False)
    x = _data(256, 1)
    assert graph_parity(gm, str(path), [x]).passed  # the graph as written is right
    ops = graph_parity(gm, str(path), [x], kernels=True)
    saturated = [r.layer for r in u8s8_saturation(str(path), [x]) if r.saturated]
    assert not ops.passed and ops.first_divergence.startswith(saturated[0].replace(".", "_"))
    assert "this CPU's kernels, from PyTorch's codes" in ops.first_divergence
