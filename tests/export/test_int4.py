"""Packed 4-bit weights (``weight_storage: packed``): INT4/UINT4 codes, MatMulNBits, bytes, parity, errors."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import evefx
from evefx.errors import ExportError
from evefx.export import export_onnx
from evefx.export.packed import (int4_codes, int4_tensor, matmulnbits_codes, matmulnbits_weights, weight_bytes)
from evefx.export.parity import ort_session
from evefx.export.onnx_graph import scope_of
from evefx.export.deploy import deployable
from evefx.export.qdq import QuantizedWeightLayer
from evefx.data import mnist5k
from evefx.modules import levels
from tests.export.test_onnx import X0, _data, _trained


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort_session(model.SerializeToString(), optimize=False).run(None, feed)[0]


# ----------------------------------------------------------------------------- codes, per granularity
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("granularity", ["per_channel", "block"])
def test_int4_dequantize_round_trip(granularity, bits, signed):
    """Codes of every 1-4 bit range survive INT4/UINT4 packing, and onnxruntime's DequantizeLinear
    (opset 21; per channel on axis 0, or block-wise with ``block_size``) gives (q - z) * s exactly."""
    rng = np.random.default_rng(bits)
    lo, hi = levels(bits, signed)
    codes = rng.integers(lo, hi + 1, size=(6, 32))
    if granularity == "per_channel":
        shape, attrs = (6,), {"axis": 0}
    else:
        shape, attrs = (6, 2), {"axis": 1, "block_size": 16}
    scale = (rng.random(shape) + 0.5).astype(np.float32)
    zero = rng.integers(lo, hi + 1, size=shape)
    w, z = int4_tensor(codes, signed, "w"), int4_tensor(zero, signed, "z")
    assert w.data_type == (TensorProto.INT4 if signed else TensorProto.UINT4)
    assert len(w.raw_data) == codes.size // 2  # two codes per byte
    assert np.array_equal(int4_codes(w), codes) and np.array_equal(int4_codes(z), zero)
    node = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 32])],
                              [w, numpy_helper.from_array(scale, "s"), z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    s_full = scale if granularity == "per_channel" else np.repeat(scale, 16, axis=1)
    z_full = zero if granularity == "per_channel" else np.repeat(zero, 16, axis=1)
    if granularity == "per_channel":
        s_full, z_full = s_full[:, None], z_full[:, None]
    assert np.array_equal(_run(model, {}), ((codes - z_full) * s_full).astype(np.float32))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_matmulnbits_round_trip(bits, signed):
    """MatMulNBits storage (block-wise, K not a multiple of the block) holds the same codes, and
    onnxruntime computes x @ ((q - z) * s)^T with them."""
    rng = np.random.default_rng(10 + bits)
    lo, hi = levels(bits, signed)
    n, k = 5, 40
    codes = rng.integers(lo, hi + 1, size=(n, k))
    zero = rng.integers(lo, hi + 1, size=n) if not signed else np.zeros(n, np.int64)
    b, zp, block = matmulnbits_weights(codes, zero, signed)
    assert block == 64 and b.shape == (n, 1, 32) and (zp is None) == signed
    assert np.array_equal(matmulnbits_codes(b, zp, k, signed), codes)
    scale = (rng.random(n) + 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scale, "s")]
    inputs = ["x", "b", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp.reshape(-1), "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    w = (codes - zero[:, None]) * scale[:, None]
    np.testing.assert_allclose(_run(model, {"x": x}), x @ w.T.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_int4_tensor_refuses_codes_that_do_not_fit():
    with pytest.raises(ExportError, match=r"w: codes in \[-9, 3\] do not fit INT4 \[-8, 7\]"):
        int4_tensor(np.array([-9, 3]), True, "w")


# ----------------------------------------------------------------------------- exported models
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _trained_mlp() -> MLP:
    torch.manual_seed(0)
    net = MLP()
    x, y = mnist5k("train").tensors
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _quantized(net: nn.Module, bits: int = 4, signed: bool = True, storage: str = "packed", **section) -> evefx.EveModule:
    spec = {"passes": [{"kind": "quantize", "weight_storage": storage,
                        "weight": {"bits": bits, "granularity": "per_channel", "tracker": "global", "signed": signed,
                                   "symmetric": signed},
                        "activation": {"bits": 8, "signed": False, "symmetric": False}, **section}]}
    gm = evefx.transform(net, spec, X0)
    gm.train()
    with torch.no_grad():
        for i in range(3):
            gm(_data(32, i))
    return gm.eval()


def _file_codes(path) -> dict[str, np.ndarray]:
    """Per layer, the weight codes the file holds (INT4/UINT4 behind a DQ, or MatMulNBits)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        layer = scope_of(node)
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
            b = numpy_helper.to_array(inits[node.input[1]])
            signed = zp is None
            out[layer] = matmulnbits_codes(b, zp, attrs["K"], signed)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and \
                inits[node.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4):
            out[layer] = int4_codes(inits[node.input[0]])
    return out


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exported_codes_round_trip(tmp_path, bits, signed):
    """Every weight code of a 1-4 bit model (conv: INT4/UINT4 per channel; Linear: MatMulNBits
    block-wise) reads back from the file equal to the quantizer's codes; sizes are packed."""
    gm = _quantized(_trained(), bits, signed)
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, X0, path, check=False, kernels=False)
    expected = {n: m.codes.numpy().astype(np.int64) for n, m in deployable(gm).model.named_modules()
                if isinstance(m, QuantizedWeightLayer)}
    got = _file_codes(path)
    assert set(got) == set(expected)
    for layer, codes in expected.items():
        assert np.array_equal(got[layer].reshape(codes.shape), codes), layer
    assert {w["form"] for k, w in report.weights.items() if k.startswith("features")} == {"int4"}
    assert {w["form"] for k, w in report.weights.items() if k.startswith("classifier")} == {"matmulnbits"}


def test_packed_bytes_match_expectation(tmp_path):
    """Bytes per layer (codes + float scales + zero points), in the report and the metadata."""
    gm = _quantized(_trained())
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, X0, path, check=False, kernels=False)
    expected = {}
    for name, m in deployable(gm).model.named_modules():
        if isinstance(m, QuantizedWeightLayer):
            c_out = m.codes.shape[0]
            if m.is_linear:  # MatMulNBits: blocks of 128 (or the next power of two >= K) along K
                k = m.codes.shape[1]
                block = 16
                while block < min(k, 128):
                    block *= 2
                blocks = -(-k // block)
                expected[name] = c_out * blocks * block // 2 + 4 * c_out * blocks
            else:  # INT4 codes, float32 scale and INT4 zero point per output channel
                expected[name] = -(-m.codes.numel() // 2) + 4 * c_out + -(-c_out // 2)
    assert {k: v["bytes"] for k, v in report.weights.items()} == expected
    assert json.loads(_metadata(path)["evefx.weight_bytes"]) == report.weights
    assert _metadata(path)["evefx.format"] == "qdq-packed"
    int8 = export_onnx(gm, X0, tmp_path / "i8.onnx", check=False, kernels=False, weight_storage="int8")
    assert {w["form"] for w in int8.weights.values()} == {"int8"}
    deploy = deployable(gm).model
    for layer, w in int8.weights.items():  # int8: one byte per code and per zero point
        codes = deploy.get_submodule(layer).codes
        assert w["bytes"] == codes.numel() + 5 * codes.shape[0]
    assert report.file_bytes < int8.file_bytes
    assert weight_bytes(onnx.load(str(path))) == report.weights


@pytest.mark.parametrize("linear_form", ["matmulnbits", "qdq"])
def test_w4a8_cnn_packed_parity(tmp_path, linear_form):
    """A trained W4A8 CNN exported packed passes every check (graph op by op, kernels vs graph,
    end to end, AVX2 emulation) on 256 held-out images, with both forms of its Linear layers."""
    gm = _quantized(_trained())
    report = export_onnx(gm, X0, tmp_path / "m.onnx", real_inputs=_data(256, 7), linear_form=linear_form)
    assert report.passed and report.graph.passed and report.kernel_check.passed and not report.failing
    assert report.opset == 21 and report.packed
    assert report.parity.samples == 257 and report.parity.within_tolerance >= 0.95
    ops = report.ops
    assert ops.get("MatMulNBits", 0) == (2 if linear_form == "matmulnbits" else 0)
    assert ops.get("Gemm", 0) == (0 if linear_form == "matmulnbits" else 2)


def test_mlp_packed_parity_unsigned_weights(tmp_path):
    """An MLP with unsigned asymmetric 4-bit weights (MatMulNBits with packed zero points) matches PyTorch."""
    gm = _quantized(_trained_mlp(), signed=False)
    report = export_onnx(gm, X0, tmp_path / "mlp.onnx", real_inputs=_data(256, 3))
    assert report.passed, report.failing
    assert {w["form"] for w in report.weights.values()} == {"matmulnbits"}
    model = onnx.load(str(tmp_path / "mlp.onnx"))
    assert all(len(n.input) > 3 and n.input[3] for n in model.graph.node if n.op_type == "MatMulNBits")


def test_mixed_precision_packs_only_4_bit_layers(tmp_path):
    """Overrides give 8-bit features and 4-bit classifier layers: only the latter are packed, and
    the 8-bit convs still run as onnxruntime integer kernels."""
    gm = _quantized(_trained(), overrides=[{"names": ["features.*"], "weight": {"bits": 8}}])
    report = export_onnx(gm, X0, tmp_path / "mixed.onnx", real_inputs=_data(256, 5))
    assert report.passed
    forms = {k: v["form"] for k, v in report.weights.items()}
    assert forms == {"features.0": "int8", "features.3": "int8", "features.6": "int8",
                     "classifier.1": "matmulnbits", "classifier.3": "matmulnbits"}
    assert report.kernels.get("QLinearConv", 0) == 3
    # the AVX2 u8s8 emulation replays the int8 convs; no integer kernel reads the 4-bit weights
    assert sorted(r.layer for r in report.avx2_u8s8) == ["features.0", "features.3", "features.6"]


def test_storage_from_spec_overrides_and_argument(tmp_path):
    """Per layer from the spec (an override keeps one layer int8); the export argument wins over it."""
    gm = _quantized(_trained(), overrides=[{"names": ["classifier.3"], "weight_storage": "int8"}])
    report = export_onnx(gm, X0, tmp_path / "a.onnx", check=False, kernels=False)
    assert report.weights["classifier.3"]["form"] == "int8" and report.weights["classifier.1"]["form"] == "matmulnbits"
    plain = export_onnx(gm, X0, tmp_path / "b.onnx", check=False, kernels=False, weight_storage="int8")
    assert plain.opset == 17 and {w["form"] for w in plain.weights.values()} == {"int8"}
    default = _quantized(_trained(), storage="int8")
    assert {w["form"] for w in export_onnx(default, X0, tmp_path / "c.onnx", check=False, kernels=False).weights.values()} == {"int8"}


def test_packed_below_opset_21_is_refused(tmp_path):
    gm = _quantized(_trained())
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(gm, X0, path, opset=17)
    assert str(err.value) == (
        "passes[0].weight_storage: layer features.0 has 4-bit weights stored packed (INT4), which needs ONNX "
        "opset >= 21 (got opset 17); export with opset=21 (or leave opset unset), or set weight_storage: int8 "
        "for this layer")
    assert not path.exists()
    with pytest.raises(ExportError, match=r"export_onnx\(weight_storage=...\): layer features.0 .* opset 20"):
        export_onnx(_quantized(_trained(), storage="int8"), X0, path, opset=20, weight_storage="packed")


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv1(x)) + x


def test_nested_modules_are_packed_by_qualified_name(tmp_path):
    """Two blocks with a child of the same attribute name (``conv1``, as in torchvision's ResNet):
    each is found by its qualified name (``blocks.0.conv1``, ``blocks.1.conv1``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Sequential(_Block(4), _Block(4)), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()
    report = export_onnx(_quantized(net), X0, tmp_path / "nested.onnx", check=False, kernels=False)
    assert {k: v["form"] for k, v in report.weights.items()} == {
        "0": "int4", "2.0.conv1": "int4", "2.1.conv1": "int4", "4": "matmulnbits"}


def test_resnet_blocks_are_packed_by_qualified_name(tmp_path):
    """torchvision's BasicBlock (conv1/conv2 in every block, a Sequential downsample): every conv
    is found and packed, and the fc runs as MatMulNBits."""
    import torchvision

    net = torchvision.models.resnet._resnet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], None, False,
                                            num_classes=10).eval()
    spec = {"passes": [{"kind": "quantize", "weight_storage": "packed", "weight": {"bits": 4, "granularity": "per_channel"},
                        "activation": {"bits": 8, "signed": False, "symmetric": False}}]}
    x = torch.rand(2, 3, 32, 32)
    gm = evefx.transform(net, spec, x[:1])
    evefx.export.calibrate(gm, [x])
    report = export_onnx(gm, x[:1], tmp_path / "r.onnx", check=False, kernels=False)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12 and {report.weights[n]["form"] for n in convs} == {"int4"}
    assert report.weights["fc"]["form"] == "matmulnbits"


def test_unknown_linear_form_is_refused_and_no_file_left(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"linear_form must be 'matmulnbits' or 'qdq' \(got 'fast'\); the unfinished "
                                          r"file was moved to .*m.failed.onnx"):
        export_onnx(_quantized(_trained()), X0, path, linear_form="fast", check=False)
    assert not path.exists()


@pytest.mark.parametrize("linear_form, form", [("matmulnbits", "matmulnbits"), ("qdq", "int4")])
def test_linears_on_tokens_pack_into_matmulnbits_too(tmp_path, linear_form, form):
    # a Linear on [B, N, C] exports as MatMul(x, Transpose(DQ(W))) + Add: it stayed INT4 Q/DQ + MatMul
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(64, 6, 16, generator=torch.Generator().manual_seed(1))
    gm = evefx.transform(model, {"passes": [{"kind": "quantize", "weight": {"bits": 4}, "weight_storage": "packed",
                                             "exclude_last": False}]}, x[:2])
    evefx.calibrate(gm, [x], progress=False)
    report = export_onnx(gm.eval(), x[:2], tmp_path / "tokens.onnx", real_inputs=x, kernels=False, linear_form=linear_form)
    assert report.parity.passed and {w["form"] for w in report.weights.values()} == {form}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "tokens.onnx")).graph.node]
    if form == "matmulnbits":
        assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops and "Transpose" not in ops
    else:
        assert "MatMulNBits" not in ops and ops.count("MatMul") == 2
