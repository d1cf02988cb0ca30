"""evefx.sensitivity on a tiny model: rows, restoration, the chart and the bit allocation."""
from __future__ import annotations

import pytest
import torch

import evefx
from evefx.errors import QuantizationError
from evefx.modules import Quantizer
from evefx.ptq import SensitivityReport, calibrate, sensitivity
from tests.ptq.models import batches, tiny, transformed


def _setup():
    model = tiny()
    gm = transformed(model)
    data = batches()
    calibrate(gm, data, progress=False)
    x = torch.cat(data)
    y = model(x).detach()

    def evaluate(m):  # higher is better: minus the output's squared error against the float model
        with torch.no_grad():
            return -float((m(x) - y).square().mean())

    return gm, evaluate, x


def _state(gm):
    return {k: v.clone() for k, v in gm.state_dict().items()}


def test_sensitivity_rows_drops_and_restoration(tmp_path):
    gm, evaluate, x = _setup()
    before = _state(gm)
    baseline = evaluate(gm)
    report = sensitivity(gm, evaluate, bits=(8, 4, 2), inputs=x)
    assert report.layers == ["conv1", "conv2", "fc1", "fc2"] and report.bits == (8, 4, 2)
    assert len(report.rows) == 12 and report.baseline == pytest.approx(baseline)
    assert report.float_metric == pytest.approx(0.0, abs=1e-12)
    for layer in report.layers:
        assert report.drop(layer, 8) == pytest.approx(0.0, abs=1e-9)  # 8 bits is the configuration
        assert report.drop(layer, 2) > report.drop(layer, 4) >= -1e-9
        w = {r.bits: r.weight_sqnr for r in report.rows if r.layer == layer}
        assert w[8] > w[4] > w[2]
    assert all(r.output_sqnr is not None for r in report.rows)
    after = _state(gm)
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # every quantizer restored
    assert evaluate(gm) == pytest.approx(baseline)
    assert set(report.ranking()) == set(report.layers)
    png = report.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.table().row_count == 4 and report.to_dict()["rows"]


def test_to_overrides_respects_the_budget_and_gives_the_sensitive_layer_more_bits():
    report = SensitivityReport(
        layers=["a", "b", "c"], bits=(8, 4, 2), what="weight", baseline=90.0, float_metric=90.5,
        params={"a": 100, "b": 100, "c": 200}, current_bits={"a": 8, "b": 8, "c": 8},
    )
    from evefx.ptq.sensitivity import SensitivityRow

    drops = {"a": (0.0, 0.1, 5.0), "b": (0.0, 2.0, 20.0), "c": (0.0, 0.05, 0.3)}
    report.rows = [SensitivityRow(layer, b, 90.0 - d, d, None, None)
                   for layer, ds in drops.items() for b, d in zip((8, 4, 2), ds)]
    alloc = report.allocate(4.0)
    avg = sum(report.params[k] * b for k, b in alloc.items()) / 400
    assert avg <= 4.0
    # c is cheapest to lower (per bit saved), then a; b, the most sensitive, keeps the most bits
    assert alloc == {"a": 4, "b": 8, "c": 2}
    overrides = report.to_overrides(4.0)
    assert overrides == ({"names": ["a"], "weight": {"bits": 4}}, {"names": ["c"], "weight": {"bits": 2}})
    spec = evefx.load_spec({"passes": [{"kind": "quantize", "overrides": list(overrides)}]})
    assert spec.passes[0].for_layer("c").weight.bits == 2
    assert report.to_overrides(8.0) == ()
    with pytest.raises(QuantizationError, match="below the lowest reachable"):
        report.allocate(1.0)


def test_activation_sensitivity_and_overrides():
    gm, evaluate, _ = _setup()
    report = sensitivity(gm, evaluate, bits=(4, 2), what="both")
    assert all(r.drop >= -1e-9 for r in report.rows)
    for patch in report.to_overrides(3.0):
        assert patch["weight"]["bits"] == patch["activation"]["bits"]


def test_sensitivity_needs_calibrated_quantizers_and_a_known_mode():
    gm = transformed(tiny())
    with pytest.raises(QuantizationError, match="not calibrated"):
        sensitivity(gm, lambda m: 0.0)
    with pytest.raises(QuantizationError, match="what must be"):
        sensitivity(gm, lambda m: 0.0, what="bias")  # type: ignore[arg-type]
    assert evefx.sensitivity is sensitivity
    assert not any(q.training for q in gm.modules() if isinstance(q, Quantizer))


def test_knapsack_allocation_is_exact_where_greedy_is_not():
    from evefx.ptq.sensitivity import SensitivityRow

    # a: lowering 8 -> 4 costs 1.0, 4 -> 2 then only 0.1 more (non-convex); b: 0.6 per step
    report = SensitivityReport(layers=["a", "b"], bits=(8, 4, 2), what="weight", baseline=0.0, float_metric=0.0,
                               params={"a": 100, "b": 100}, current_bits={"a": 8, "b": 8})
    drops = {"a": (0.0, 1.0, 1.1), "b": (0.0, 0.6, 1.2)}
    report.rows = [SensitivityRow(layer, b, -d, d, None, None) for layer, ds in drops.items() for b, d in zip((8, 4, 2), ds)]
    # budget 5 average bits (1000 bit-params): {a: 2, b: 8} drops 1.1 < greedy's {a: 4, b: 4} 1.6
    assert report.allocate(5.0, method="knapsack") == {"a": 2, "b": 8}
    assert sum(drops[k][(8, 4, 2).index(v)] for k, v in report.allocate(5.0).items()) >= 1.1
    with pytest.raises(QuantizationError, match="greedy or knapsack"):
        report.allocate(5.0, method="dp")  # type: ignore[arg-type]
