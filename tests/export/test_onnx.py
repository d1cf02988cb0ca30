"""ONNX export: QDQ round trips for every quantizer variant, parity, metadata, errors, float/spiking/pruned."""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
import torch.nn.functional as F
from torch import nn

import evefx
from evefx.export import check_parity, export_onnx, first_divergence, onnx_accuracy
from evefx.export import onnx as onnx_module
from evefx.export.parity import graph_parity, ort_session
from evefx.data import mnist5k
from evefx.modules import QuantConv2d, Quantizer, levels
from examples.models import DemoNet
from tests.helpers import TokenClassifier

X0 = torch.zeros(1, 1, 28, 28)


def _data(n: int, seed: int) -> torch.Tensor:
    """``n`` real MNIST images (the embedded test split), drawn by ``seed``."""
    x = mnist5k("test").tensors[0]
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


@functools.lru_cache(maxsize=None)
def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    """DemoNet after 60 Adam steps on MNIST: weights and logits like a trained network's (random
    weights at 2 bits collapse to one output for every input, which no parity check can judge)."""
    torch.manual_seed(seed)
    net = DemoNet()
    x, y = mnist5k("train").tensors
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


def _trained(seed: int = 0) -> DemoNet:
    net = DemoNet()
    net.load_state_dict(_trained_state(seed))
    return net.eval()


def _qat(weight: dict | None, activation: dict | None, seed: int = 0) -> evefx.EveModule:
    """Trained DemoNet with quantizers, calibrated by three training-mode batches, in eval mode; the
    logits quantized too (``quantize_output``), so every output is on a grid these tests count steps of."""
    torch.manual_seed(seed)
    section = {"kind": "quantize", "weight": weight, "activation": activation, "quantize_output": True}
    gm = evefx.transform(_trained(seed), {"passes": [section]}, X0)
    gm.train()
    with torch.no_grad():
        for i in range(3):
            gm(_data(32, seed + i))
    return gm.eval()


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _ort(path, x: torch.Tensor) -> np.ndarray:
    s = ort_session(str(path))
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


VARIANTS = {
    "round-pc-sym-s8/a-asym-u8": (dict(bits=8, fn="round", granularity="per_channel", tracker="global"),
                                  dict(bits=8, symmetric=False, signed=False)),
    "lsq-pt-sym-s4/a-lsq-sym-s4": (dict(bits=4, fn="lsq", granularity="per_tensor"),
                                   dict(bits=4, fn="lsq", symmetric=True, signed=True)),
    "llsq-pc-sym-s2/a-llsq-asym-u2": (dict(bits=2, fn="llsq", granularity="per_channel"),
                                      dict(bits=2, fn="llsq", symmetric=False, signed=False)),
    "round-pc-asym-u8/a-asym-s8": (dict(bits=8, granularity="per_channel", symmetric=False, signed=False),
                                   dict(bits=8, symmetric=False, signed=True)),
    "round-pt-asym-s4/a-pc-asym-u8": (dict(bits=4, granularity="per_tensor", symmetric=False, signed=True),
                                      dict(bits=8, granularity="per_channel", symmetric=False, signed=False)),
    "lsq-pc-s8/a-lsq-asym-u8": (dict(bits=8, fn="lsq", granularity="per_channel"),
                                dict(bits=8, fn="lsq", symmetric=False, signed=False)),
    "llsq-pt-asym-u4/a-sym-u4": (dict(bits=4, fn="llsq", granularity="per_tensor", symmetric=False, signed=False),
                                 dict(bits=4, symmetric=True, signed=False)),
    "weights-only-s8": (dict(bits=8, granularity="per_channel"), None),
}


def test_float_weights_between_quantized_activations_are_refused(tmp_path):
    # onnxruntime would quantize those float weights itself (seen: 20 steps off on this network)
    gm = _qat(None, dict(bits=8, symmetric=False, signed=False))
    path = tmp_path / "m.onnx"
    with pytest.raises(evefx.ExportError, match=r"layer features\.0 has float weights but a quantized input; "
                       r"onnxruntime would quantize those weights itself .* moved to .*m\.failed\.onnx"):
        export_onnx(gm, X0, path, real_inputs=_data(64, 7), kernels=False)
    assert not path.exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantizer_variants_round_trip(variant, tmp_path):
    wcfg, acfg = VARIANTS[variant]
    gm = _qat(wcfg, acfg)
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, X0, path, real_inputs=_data(256, 7), kernels=False)

    # op by op (each quantizer computed from PyTorch's inputs), every element within one step
    graph = report.graph
    assert report.passed and graph.passed and graph.within_tolerance == 1.0 and graph.samples == 257
    if acfg is not None:  # the output is written by the last activation quantizer
        assert graph.max_steps is not None and graph.max_steps <= 1.0 + 1e-3
    # end to end, ties decided differently upstream may move a few outputs further (see WITHIN_MIN)
    assert report.parity.passed and report.kernel_check.passed
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # one per activation quantizer, one for the network input (quantize_inputs), one per requantization,
    # and one per layer reading a per-channel activation (re-quantized per tensor for the integer kernel)
    per_channel_inputs = 4 if acfg and acfg.get("granularity") == "per_channel" else 0
    assert report.ops.get("QuantizeLinear", 0) == (
        6 + report.rewrites["requantized_data_movement"] + per_channel_inputs if acfg else 0)

    bits = json.loads(_metadata(path)["evefx.bits"])
    inits = _inits(path)
    for layer in ("features.0", "features.3", "features.6", "classifier.1", "classifier.3"):
        expected = {"weight": wcfg["bits"] if wcfg else None, "activation": acfg["bits"] if acfg else None}
        if acfg and (layer == "features.0" or per_channel_inputs):
            expected["input"] = acfg["bits"]
        assert bits[layer] == expected
        if wcfg is None:
            continue
        codes = inits[f"{layer}.weight_quantized"]
        signed = wcfg.get("signed", True)
        qmin, qmax = levels(wcfg["bits"], signed)
        assert codes.dtype == (np.int8 if signed else np.uint8)
        assert qmin <= codes.min() and codes.max() <= qmax
        # the stored codes dequantize to exactly the weights PyTorch computes with
        layer_module = gm.get_submodule(layer)
        with torch.no_grad():
            w_torch = layer_module.weight_quantizer(layer_module.folded_weight_bias()[0])
        scale = inits[f"{layer}.weight_scale"]
        zero = inits[f"{layer}.weight_zero_point"].astype(np.float32)
        shape = (-1,) + (1,) * (codes.ndim - 1)
        w_onnx = (codes.astype(np.float32) - zero.reshape(shape if zero.ndim else ())) * scale.reshape(shape if scale.ndim else ())
        np.testing.assert_array_equal(w_onnx, w_torch.numpy())


def test_w8a8_runs_integer_kernels_and_requantizes_flatten(tmp_path):
    gm = _qat(*VARIANTS["round-pc-sym-s8/a-asym-u8"])
    report = export_onnx(gm, X0, tmp_path / "m.onnx", real_inputs=_data(256, 3))
    # every conv (the first reads the quantized network input) and both linears are integer kernels
    assert report.kernels["QLinearConv"] == 3 and report.kernels["QGemm"] == 2
    assert report.integer_kernels == 5
    assert report.rewrites["requantized_data_movement"] == 1  # Q/DQ after the Flatten feeding the Gemm
    assert report.rewrites["int32_biases"] == 5
    assert report.params["int8"] == sum(gm.get_submodule(n).weight.numel() for n in
                                        ("features.0", "features.3", "features.6", "classifier.1", "classifier.3"))
    assert report.parity.top1_agreement == 100.0
    # the file is at least 3x smaller than the float export of the same network
    float_report = export_onnx(DemoNet().eval(), X0, tmp_path / "f.onnx", kernels=False)
    assert report.file_bytes < float_report.file_bytes / 1.5


def test_dynamic_batch(tmp_path):
    gm = _qat(*VARIANTS["round-pc-sym-s8/a-asym-u8"])
    path = tmp_path / "m.onnx"
    export_onnx(gm, X0, path, kernels=False)
    x = _data(5, 11)
    got = _ort(path, x)
    assert got.shape == (5, 10)
    step = float(gm.classifier_3_act_quant.qparams()[0])
    assert np.abs(got - gm(x).detach().numpy()).max() <= step * 1.001


class _Residual(nn.Module):
    """Hand-built evefx modules (no tracing): an input quantizer, conv-relu, a residual add, max pooling."""

    def __init__(self):
        super().__init__()
        q = lambda: Quantizer(8, symmetric=False, signed=False, tracker="global")  # noqa: E731
        self.inq = q()
        c1, c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        # weights on the portable grid (what the quantize pass builds by default)
        w = lambda: Quantizer(8, granularity="per_channel", num_channels=8, tracker="global", code_range=(-64, 63))  # noqa: E731
        self.conv1 = QuantConv2d.from_float(c1, w())
        self.q1 = q()
        self.conv2 = QuantConv2d.from_float(c2, w())
        self.q2 = q()
        self.qadd = q()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        a = self.q1(torch.relu(self.conv1(self.inq(x))))
        b = self.q2(self.conv2(a))
        y = self.qadd(torch.relu(a + b))
        return self.fc(self.pool(y).flatten(1))


def test_residual_add_and_pool_fuse_into_integer_kernels(tmp_path):
    torch.manual_seed(0)
    model = _Residual().train()
    with torch.no_grad():
        for i in range(3):
            model(_data(16, i))
    model.eval()
    report = export_onnx(model, X0, tmp_path / "r.onnx", real_inputs=_data(128, 5))
    assert report.parity.passed
    assert report.parity.rule.startswith("0.05")  # float output (the Linear has no output quantizer)
    assert report.kernels["QLinearConv"] == 2
    assert report.kernels.get("QLinearAdd", 0) == 1
    assert report.rewrites["requantized_data_movement"] == 2  # after the MaxPool and after the Flatten
    assert {"inq", "conv1", "q1", "qadd"} <= set(report.bits)


def test_float_model_exports_plain_onnx(tmp_path):
    torch.manual_seed(0)
    model = DemoNet().eval()
    path = tmp_path / "f.onnx"
    report = export_onnx(model, X0, path, real_inputs=_data(64, 1), kernels=False)
    assert not report.quantized
    assert "QuantizeLinear" not in report.ops and "DequantizeLinear" not in report.ops
    # BatchNorm is folded into the convs by the exporter: its affine parameters disappear
    not_bn = [p for m in model.modules() if not isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)]
    assert report.params["int8"] == 0 and report.params["float"] == sum(p.numel() for p in not_bn)
    assert "BatchNormalization" not in report.ops
    x = _data(8, 2)
    np.testing.assert_allclose(_ort(path, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-4)
    assert _metadata(path)["evefx.format"] == "float"


def test_quantizers_switched_off_export_float_with_bn_folded(tmp_path):
    gm = _qat(*VARIANTS["round-pc-sym-s8/a-asym-u8"])
    evefx.set_mode(gm, quantized=False)
    path = tmp_path / "off.onnx"
    report = export_onnx(gm, X0, path, real_inputs=_data(64, 1), kernels=False)
    assert "QuantizeLinear" not in report.ops and "BatchNormalization" not in report.ops
    x = _data(8, 4)
    np.testing.assert_allclose(_ort(path, x), gm(x).detach().numpy(), atol=1e-5, rtol=1e-4)


def test_metadata_carries_version_spec_and_bits(tmp_path):
    gm = _qat(*VARIANTS["lsq-pt-sym-s4/a-lsq-sym-s4"])
    path = tmp_path / "m.onnx"
    export_onnx(gm, X0, path, check=False, kernels=False)
    meta = _metadata(path)
    model = onnx.load(str(path))
    assert meta["evefx.version"] == evefx.__version__ == model.producer_version
    assert model.producer_name == "evefx" and meta["evefx.format"] == "qdq"
    assert evefx.load_spec(meta["evefx.spec"]) == gm.spec
    assert json.loads(meta["evefx.bits"])["classifier.3"] == {"weight": 4, "activation": 4}


def test_export_leaves_the_model_untouched(tmp_path):
    gm = _qat(*VARIANTS["round-pc-sym-s8/a-asym-u8"])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    export_onnx(gm, X0, tmp_path / "m.onnx", real_inputs=_data(32, 1), kernels=False)
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(gm.get_submodule("features.0"), QuantConv2d) and gm.training is False


def test_unsupported_construct_names_the_node(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.erfinv(self.fc(x).tanh() * 0.5)

    gm = evefx.transform(Odd(), {"passes": []}, torch.zeros(1, 4))
    with pytest.raises(evefx.ExportError, match=r"aten::erfinv.*node 'erfinv' \(call_function erfinv\)"):
        export_onnx(gm, torch.zeros(2, 4), tmp_path / "odd.onnx")


def test_uncalibrated_quantizer_is_an_error(tmp_path):
    torch.manual_seed(0)
    gm = evefx.transform(DemoNet(), "examples/specs/demo.yaml").eval()
    with pytest.raises(evefx.ExportError, match=r"features\.0.*never calibrated"):
        export_onnx(gm, X0, tmp_path / "m.onnx")


def test_more_than_8_bits_is_an_error(tmp_path):
    gm = _qat(dict(bits=10, granularity="per_channel"), None)
    with pytest.raises(evefx.ExportError, match=r"features\.0.*10 bits.*at most 8"):
        export_onnx(gm, X0, tmp_path / "m.onnx")


def test_parity_failure_names_the_first_diverging_node(tmp_path, monkeypatch):
    gm = _qat(*VARIANTS["round-pc-sym-s8/a-asym-u8"])
    original = onnx_module.name_weight_nodes

    def corrupt(model, layer_codes):  # wrong weights in the middle of the network: features.3 writes features_3_act_quant
        named = original(model, layer_codes)
        for init in model.graph.initializer:
            if init.name == "features.3.weight_quantized":
                codes = numpy_helper.to_array(init).astype(np.int32)
                init.CopyFrom(numpy_helper.from_array(np.clip(-codes, -127, 127).astype(np.int8), init.name))
        return named

    monkeypatch.setattr(onnx_module, "name_weight_nodes", corrupt)
    with pytest.raises(evefx.ExportError, match=r"QDQ graph \(onnxruntime, optimizations off\) vs PyTorch: "
                       r"features_3_act_quant \(computed from PyTorch's inputs\): 1\d\d\.00 quantization steps.*"
                       r"moved to .*bad\.failed\.onnx") as info:
        export_onnx(gm, X0, tmp_path / "bad.onnx", real_inputs=_data(64, 2), kernels=False)
    report = info.value.report
    assert report.passed is False and report.parity.passed is False and "graph" in report.failing
    # nothing wrong is left at the requested path; the failed file is kept aside for inspection
    bad = tmp_path / "bad.failed.onnx"
    assert not (tmp_path / "bad.onnx").exists() and bad.exists() and report.path == str(bad)
    par = check_parity(gm, str(bad), [_data(64, 2)])
    assert not par.passed and par.max_steps > 1
    # comparing every module's output (not only quantizers) pins it on the conv itself
    assert first_divergence(gm, str(bad), _data(8, 3)).startswith("features.3 (ONNX node /features.3/Conv)")


def test_spiking_model_exports_unrolled_with_same_signature(tmp_path):
    torch.manual_seed(0)
    spec = {"passes": [{"kind": "spike", "timesteps": 4, "encoder": "direct", "neuron": {"type": "lif", "threshold": 0.05}}]}
    snn = evefx.transform(DemoNet(), spec, X0).eval()
    x = _data(32, 1) * 3
    out = snn(x)
    rates = [n.observations()["firing_rate"] for n in snn.modules() if hasattr(n, "channel_firing_rates")]
    assert len(rates) == 4 and all(r > 0 for r in rates)  # neurons fire: the comparison is not vacuous
    path = tmp_path / "snn.onnx"
    report = export_onnx(snn, torch.zeros(2, 1, 28, 28), path, real_inputs=x, kernels=False)
    assert report.ops["GreaterOrEqual"] == 4 * 4  # one threshold test per neuron layer and step
    assert report.parity.passed and report.parity.max_abs_diff < 1e-5
    assert _ort(path, x).shape == tuple(out.shape) == (32, 10)


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class _DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.l1(x))
        return _Output(logits=self.l2(h), hidden=h)


@pytest.mark.parametrize("quantized", [False, True])
def test_a_dataclass_output_exports_its_fields_as_named_outputs(quantized, tmp_path):
    # it was "the model returns no tensor": neither pytree nor the exporter reads dataclasses
    torch.manual_seed(0)
    model, x = _DataclassOut().eval(), torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    if quantized:
        model = evefx.transform(model, {"passes": [{"kind": "quantize"}]}, x[:2])
        evefx.calibrate(model, [x], progress=False)
        model.eval()
    report = export_onnx(model, x[:2], tmp_path / "dc.onnx", real_inputs=x, kernels=False)
    assert report.parity.passed
    session = ort_session(str(tmp_path / "dc.onnx"), 1)
    assert [o.name for o in session.get_outputs()] == ["logits", "hidden"]
    logits, hidden = session.run(None, {"x": x.numpy()})
    out = model(x)
    assert isinstance(out, _Output)  # the user's model still returns its dataclass
    np.testing.assert_allclose(logits, out.logits.detach().numpy(), atol=1e-5 if not quantized else 0.05)
    np.testing.assert_allclose(hidden, out.hidden.detach().numpy(), atol=1e-5 if not quantized else 0.05)


def test_spiking_text_model_exports_with_its_integer_inputs_repeated(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tokens, keep = torch.randint(0, 20, (16, 5), generator=g), torch.rand(16, 5, generator=g) > 0.3
    snn = evefx.transform(TokenClassifier(), {"passes": [{"kind": "spike", "timesteps": 3, "encoder": "direct"}]},
                          (tokens[:2], keep[:2]))
    with pytest.raises(evefx.ExportError, match=r"fc1_neuron: the data-dependent threshold \(threshold_std\) was "
                                                r"never set .* run it once on real inputs, before exporting"):
        export_onnx(snn, (tokens[:2], keep[:2]), tmp_path / "early.onnx", kernels=False)
    assert not (tmp_path / "early.onnx").exists()
    snn(tokens, keep)  # sets the thresholds
    path = tmp_path / "text.onnx"
    report = export_onnx(snn.eval(), (tokens[:2], keep[:2]), path, real_inputs=(tokens, keep), kernels=False)
    assert report.parity.passed and report.parity.max_abs_diff < 1e-5
    # the op-by-op walk exposes the repeated int64 token ids as outputs: declared with their own type
    assert first_divergence(snn, str(path), (tokens, keep)) is None


def test_poisson_encoder_exports_random_and_is_documented(tmp_path):
    torch.manual_seed(0)
    spec = {"passes": [{"kind": "spike", "timesteps": 4, "encoder": "poisson"}]}
    snn = evefx.transform(DemoNet(), spec, X0).eval()
    snn(_data(8, 1))  # sets the data-dependent thresholds
    report = export_onnx(snn, X0, tmp_path / "p.onnx", kernels=False)
    assert report.ops["RandomUniformLike"] == 1
    assert report.parity.rule.startswith("not checked") and report.parity.samples == 0


def test_pruned_model_exports_with_channels_removed(tmp_path):
    torch.manual_seed(0)
    pruned = evefx.transform(DemoNet(), "examples/specs/prune.yaml", X0)
    evefx.prune_step(pruned)
    pruned.eval()
    report = export_onnx(pruned, X0, tmp_path / "pruned.onnx", real_inputs=_data(64, 1), kernels=False)
    dense = export_onnx(DemoNet().eval(), X0, tmp_path / "dense.onnx", kernels=False)
    # the masked channels are gone from the file, not multiplied by zero
    assert report.parity.passed and report.ops.get("Mul", 0) == 0
    assert report.rewrites["pruned_channels_removed"] == sum(int((m.mask == 0).sum()) for m in pruned.modules() if hasattr(m, "mask"))
    assert report.params["float"] < dense.params["float"] / 2  # BatchNorm folded in both files
    # pruned, then quantized: the int8 layers are sliced too (they were not, and the masks exported as
    # multiplications over full-size layers); the op-by-op check compares the file with the compacted model
    both = evefx.transform(DemoNet(), {"passes": [{"kind": "prune"}, {"kind": "quantize"}]}, X0)
    evefx.prune_step(both)
    from evefx.export import calibrate

    calibrate(both, [_data(32, 2)])
    mixed = export_onnx(both, X0, tmp_path / "both.onnx", real_inputs=_data(64, 1), kernels=False)
    removed = sum(int((m.mask == 0).sum()) for m in both.modules() if hasattr(m, "mask"))
    assert mixed.parity.passed and mixed.ops.get("Mul", 0) == 0 and mixed.rewrites["pruned_channels_removed"] == removed > 0
    assert mixed.passed  # the op-by-op check too
    int8 = {i.name: list(i.dims) for i in onnx.load(tmp_path / "both.onnx").graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert int8["features.3.weight_quantized"][0] == both.get_submodule("features.3").out_channels - int(
        (both.get_submodule("features_5_pruner").mask == 0).sum())


def test_report_table_dict_and_onnx_accuracy(tmp_path):
    gm = _qat(*VARIANTS["round-pc-sym-s8/a-asym-u8"])
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, X0, path, real_inputs=_data(64, 1))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["parity"]["passed"] and d["file_bytes"] == path.stat().st_size and d["integer_kernels"] == 5
    table = report.table()
    assert "top-1 agreement" in [str(c) for c in table.columns[0]._cells]
    x = _data(40, 9)
    y = gm(x).argmax(1)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    assert onnx_accuracy(path, loader) == 100.0  # labels are PyTorch's own decisions


def test_calibrate_then_export_leaves_batchnorm_statistics_alone(tmp_path):
    from evefx.export import calibrate

    torch.manual_seed(0)
    gm = evefx.transform(DemoNet(), "examples/specs/demo.yaml", X0)
    bn_before = gm.get_submodule("features.0").bn.running_mean.clone()
    calibrate(gm, [_data(16, i) for i in range(2)])
    assert not gm.training and torch.equal(gm.get_submodule("features.0").bn.running_mean, bn_before)
    report = export_onnx(gm, X0, tmp_path / "c.onnx", real_inputs=_data(64, 5), kernels=False)
    assert report.parity.passed and report.quantized


def test_the_default_float_logits_export_and_pass_every_check(tmp_path):
    """The spec defaults (quantize_output false): the last layer reads quantized inputs and weights and
    its result leaves the file as float; parity, the op-by-op graph check and this CPU's kernels pass."""
    torch.manual_seed(0)
    gm = evefx.transform(_trained(0), {"passes": [{"kind": "quantize"}]}, X0).train()
    with torch.no_grad():
        for i in range(3):
            gm(_data(32, i))
    gm.eval()
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, X0, path, real_inputs=_data(256, 7))
    assert report.passed and report.graph.passed and report.parity.passed and report.kernel_check.passed
    model = onnx.load(str(path))
    last = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    assert last.op_type != "DequantizeLinear", last.op_type  # not rounded to an output grid
    # the image input, four activations (none on the logits) and the requantizations after data movement
    assert report.ops["QuantizeLinear"] == 5 + report.rewrites["requantized_data_movement"]
    assert json.loads(_metadata(path)["evefx.bits"])["classifier.3"] == {"weight": 8, "activation": None}


class _Tokens(nn.Module):
    """Linear layers on (batch, tokens, features), as a transformer's projections: each exports as
    MatMul + Add, not Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _tokens_w4a4(samples: int) -> tuple[evefx.EveModule, torch.Tensor]:
    """``_Tokens`` with biases of about a unit, W4A4 lsq (logits quantized), calibrated on ``samples``
    random token sequences; the model and those inputs."""
    torch.manual_seed(0)
    net = _Tokens()
    with torch.no_grad():
        net.fc1.bias.uniform_(-1, 1), net.fc2.bias.uniform_(-1, 1)
    section = {"kind": "quantize", "weight": {"bits": 4, "fn": "lsq", "granularity": "per_channel"},
               "activation": {"bits": 4, "fn": "lsq", "symmetric": False, "signed": False}, "quantize_output": True}
    x = torch.randn(samples, 12, 16, generator=torch.Generator().manual_seed(1))
    gm = evefx.transform(net, {"passes": [section]}, x[:1])
    evefx.calibrate(gm, [x[:samples // 2], x[samples // 2:]])
    return gm, x


def test_a_linear_on_tokens_has_its_bias_rounded_as_in_pytorch(tmp_path):
    """PyTorch's eval rounds a quantized layer's bias to s_x * s_w; the file must too, also where the
    Linear becomes MatMul + Add (left in float, 4-bit outputs flipped by a step wherever the bias
    rounding crossed a rounding boundary, and the flips grow through a transformer)."""
    gm, x = _tokens_w4a4(64)
    report = export_onnx(gm, x[:1], tmp_path / "tokens.onnx", real_inputs=x)
    assert report.rewrites["int32_biases"] == 2
    with torch.no_grad():
        expected = gm(x).numpy()
    graph_as_written = ort_session(str(tmp_path / "tokens.onnx"), optimize=False).run(None, {"x": x.numpy()})[0]
    step = float(gm.get_submodule("fc2_act_quant").qparams()[0].max())
    assert np.abs(graph_as_written - expected).max() < 1e-3 * step  # every output on PyTorch's code
    assert np.abs(_ort(tmp_path / "tokens.onnx", x) - expected).max() < 1e-3 * step
    # op by op on this CPU's kernels every code is PyTorch's, the clipped ones included (below 8 bits
    # QuantizeLinear's codes are clipped to the quantizer's range by the Clip after it)
    ops = graph_parity(gm, str(tmp_path / "tokens.onnx"), [x], kernels=True)
    assert ops.passed and ops.max_steps == 0.0


def test_codes_one_step_off_more_often_than_ties_fail_and_name_the_quantizer(tmp_path, monkeypatch):
    """A file that computes an op slightly differently (here: the bias after a MatMul left in float,
    as before the fix above) moves each code by at most one step, but also where PyTorch's value is
    far from a rounding tie; the op-by-op check refuses it and names the first quantizer where it shows."""
    from evefx.export import rewrite as rewrite_module

    site = rewrite_module._bias_site
    monkeypatch.setattr(rewrite_module, "_bias_site", lambda node: None if node.op_type == "Add" else site(node))
    gm, x = _tokens_w4a4(256)
    with pytest.raises(evefx.ExportError, match=r"QDQ graph \(onnxruntime, optimizations off\) vs PyTorch: "
                       r"fc1_act_quant \(computed from PyTorch's inputs\): \d+\.\d{3}% of its codes one step off where "
                       r"PyTorch's value is not at a rounding tie \(at most 0\.1% allowed\)") as info:
        export_onnx(gm, x[:1], tmp_path / "tokens.onnx", real_inputs=x)
    assert info.value.report.graph.off_by_one > 1e-3 and info.value.report.graph.max_steps < 1.001


class _TwoInputs(nn.Module):
    """Image and table inputs, a defaulted non-tensor parameter, a dict output (a user's model)."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(16, 8))
        self.tab = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, image, table, scale: float = 2.0):
        logits = self.head(torch.cat([self.img(image), self.tab(table)], dim=-1)) * scale
        return {"logits": logits, "probs": logits.softmax(-1)}


@pytest.mark.parametrize("quantized", [False, True])
def test_defaulted_parameters_become_constants_and_dict_outputs_keep_their_keys(quantized, tmp_path):
    # the TorchScript exporter made `scale` a graph input that nothing feeds, and the file could not run
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 1, 8, 8, generator=g), torch.randn(8, 5, generator=g)) for _ in range(4)]
    if quantized:
        model = evefx.transform(model, {"passes": [{"kind": "quantize"}]}, batches[0])
        evefx.calibrate(model, batches)
        model.eval()
    path = tmp_path / "two.onnx"
    export_onnx(model, batches[0], path, real_inputs=(torch.cat([b[0] for b in batches]),
                                                      torch.cat([b[1] for b in batches])), kernels=False)
    session = ort_session(str(path), 1)
    assert [i.name for i in session.get_inputs()] == ["image", "table"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    image, table = batches[1]
    logits, probs = session.run(None, {"image": image.numpy(), "table": table.numpy()})
    expected = model(image, table)  # scale at its default, 2.0
    np.testing.assert_allclose(probs, expected["probs"].detach().numpy(), atol=1e-2 if quantized else 1e-5)
    if not quantized:
        np.testing.assert_allclose(logits, expected["logits"].detach().numpy(), atol=1e-5, rtol=1e-4)
    assert "scale" in str(inspect.signature(model.forward))  # the user's model keeps its parameter


class _ClonedTokenLayers(nn.Module):
    """Two Linear layers on tokens built as clones (nn.TransformerEncoder deep-copies its layer)."""

    def __init__(self):
        super().__init__()
        first = nn.Linear(8, 8)
        self.a, self.b, self.head = first, copy.deepcopy(first), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)))).mean(1))


def test_equal_biases_the_exporter_shares_through_identity_are_rounded_for_every_layer(tmp_path):
    # the TorchScript exporter stores equal tensors once and gives the second reader an Identity:
    # b's bias stayed float after its MatMul, 0.98% of a 4-bit BERT's codes one step off
    torch.manual_seed(0)
    x = torch.randn(64, 6, 8, generator=torch.Generator().manual_seed(1))
    gm = evefx.transform(_ClonedTokenLayers().eval(), {"passes": [{"kind": "quantize", "weight": {"bits": 4}}]}, x[:2])
    evefx.calibrate(gm, [x], progress=False)
    report = export_onnx(gm.eval(), x[:2], tmp_path / "clones.onnx", real_inputs=x, kernels=False)
    assert report.parity.passed and report.rewrites["int32_biases"] == 3
    graph = onnx.load(str(tmp_path / "clones.onnx")).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    bias_adds = [n for n in graph.node if n.op_type == "Add" and any(producers.get(i) == "MatMul" for i in n.input)]
    assert len(bias_adds) == 2 and all("DequantizeLinear" in (producers.get(i) for i in n.input) for n in bias_adds)


def test_a_failed_export_leaves_the_previous_file_at_its_path(tmp_path):
    # the exporter wrote over the user's earlier file before the checks refused the new one
    path = tmp_path / "model.onnx"
    path.write_bytes(b"yesterday's good export")
    silent = nn.Linear(4, 2)
    nn.init.zeros_(silent.weight)
    nn.init.zeros_(silent.bias)
    with pytest.raises(evefx.ExportError, match="cannot check the file"):
        export_onnx(silent.eval(), torch.randn(2, 4), path, kernels=False)
    assert path.read_bytes() == b"yesterday's good export"
    assert (tmp_path / "model.failed.onnx").exists() and not (tmp_path / ".model.onnx.previous").exists()
    export_onnx(nn.Linear(4, 2).eval(), torch.randn(2, 4), path, kernels=False)
    assert onnx.load(str(path)).graph.node and sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.onnx",
                                                                                               "model.onnx"]
