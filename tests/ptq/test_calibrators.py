"""Calibrators against hand-computed references, and evefx.calibrate on a tiny model."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import evefx
from evefx.errors import QuantizationError
from evefx.modules import Quantizer
from evefx.ptq import Grid, Histogram, RangeObserver, calibrate, entropy_range, mse_range, percentile_range
from evefx.ptq.batches import inputs_only
from examples.models import DemoNet
from tests.helpers import TokenClassifier
from tests.ptq.models import batches, tiny, transformed


def test_percentile_on_magnitudes_is_the_smallest_edge_keeping_the_share():
    # 1000 values at the centres of 1000 unit bins: 990 of them lie below 990
    h = Histogram.of(torch.arange(1000.0) + 0.5, lo=0.0, hi=1000.0, bins=1000)
    lo, hi = percentile_range(h, 99.0, magnitude=True)
    assert float(lo) == 0.0 and float(hi) == 990.0
    assert float(percentile_range(h, 100.0, magnitude=True)[1]) == 1000.0


def test_percentile_two_sided_cuts_half_of_the_rest_from_each_tail():
    # values -499.5 .. 499.5 at bin centres; 98% keeps 1% on each side: [-490, 490]
    h = Histogram.of(torch.arange(1000.0) - 499.5, lo=-500.0, hi=500.0, bins=1000)
    lo, hi = percentile_range(h, 98.0, magnitude=False)
    assert (float(lo), float(hi)) == (-490.0, 490.0)


def test_mse_range_trades_the_outlier_for_the_bulk():
    # 10000 ones and one 100 on a 2-bit unsigned grid (codes 0..3), ranges [0, k] for k = 1..100:
    #   k=100: the ones round to 0                    -> error 10000 * 1^2          = 10000
    #   k=1:   ones exact, 100 clips to 1             -> 99^2                       =  9801
    #   k=2:   step 2/3, ones -> 4/3, 100 -> 2        -> 10000/9 + 98^2             = 10715
    #   k=3:   step 1, ones exact, 100 -> 3           -> 97^2                       =  9409 (least)
    #   k=4:   step 4/3, ones -> 4/3, 100 -> 4        -> 10000/9 + 96^2             = 10327
    x = torch.cat([torch.ones(10000), torch.tensor([100.0])])
    lo, hi = mse_range(Histogram.of(x, 0.0, 100.0, 2048), Grid(0, 3, symmetric=True, signed=False))
    assert (float(lo), float(hi)) == (0.0, 3.0)


def test_mse_range_keeps_the_full_range_without_outliers():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0] * 10)  # exactly on the grid of [0, 3] at 2 bits
    assert float(mse_range(Histogram.of(x, 0.0, 3.0, 64), Grid(0, 3, True, False))[1]) == 3.0


def test_entropy_range_matches_the_hand_computed_kl_search():
    # magnitudes 0.5 x4, 1.5 x2, 3.5 x1 in 4 unit bins; 2 levels (2-bit signed: codes 0, 1 on [0, t]).
    # i=2: P=[4,3]/7, Q=[4,2]/6: KL = 4/7 ln(6/7) + 3/7 ln(9/7) = 0.0196
    # i=3: P=[4,2,1]/7 but Q=[4,2,0]/6 has no mass in bin 2; smoothed (onnxruntime's eps = 1e-4 moved
    #      into the empty bin) Q=[4/6-5e-5, 2/6-5e-5, 1e-4]: KL = 0.906
    # i=4: P=[4,2,0,1]/7, Q=[3,3,0,1]/7 (both smoothed alike in bin 2): KL ~ 4/7 ln(4/3) + 2/7 ln(2/3) = 0.0485
    kl2 = 4 / 7 * math.log(6 / 7) + 3 / 7 * math.log(9 / 7)
    q3 = [4 / 6 - 5e-5, 2 / 6 - 5e-5, 1e-4]
    kl3 = sum(p * math.log(p / q) for p, q in zip([4 / 7, 2 / 7, 1 / 7], q3))
    kl4 = 4 / 7 * math.log(4 / 3) + 2 / 7 * math.log(2 / 3)
    assert kl2 < kl4 < kl3 and kl3 == pytest.approx(0.906, abs=1e-3)
    x = torch.tensor([0.5] * 4 + [1.5] * 2 + [3.5])
    lo, hi = entropy_range(Histogram.of(x, 0.0, 4.0, 4), Grid(-2, 1, symmetric=True, signed=True))
    assert (float(lo), float(hi)) == (0.0, 2.0)


def test_entropy_clips_a_long_tail_and_keeps_a_uniform_range():
    gen = torch.Generator().manual_seed(0)
    outliers = torch.cat([torch.randn(50000, generator=gen).abs(), torch.full((5,), 50.0)])
    h = Histogram.of(outliers, 0.0, 50.0, 2048)
    assert 2.0 < float(entropy_range(h, Grid(-128, 127, True, True))[1]) < 10.0
    flat = torch.rand(50000, generator=gen)
    h = Histogram.of(flat, 0.0, 1.0, 2048)
    assert float(entropy_range(h, Grid(-128, 127, True, True))[1]) > 0.95


def test_observer_per_channel_percentile_and_symmetric_range():
    q = Quantizer(bits=8, granularity="per_channel", num_channels=2, ch_axis=1, symmetric=True, signed=True)
    x = torch.stack([torch.arange(1000.0) - 500.0, torch.linspace(-1, 1, 1000)], dim=1)  # [N, 2]
    obs = RangeObserver(q, "percentile", percentile=100.0, bins=512)
    obs.observe_extremes(x)
    obs.observe(x)
    lo, hi = obs.range()
    assert lo.shape == (2,) and torch.allclose(hi, torch.tensor([500.0, 1.0])) and torch.equal(lo, -hi)
    q.set_range(lo, hi)
    assert torch.allclose(q.scale, hi / 127)


def test_unknown_method_is_an_error_naming_the_methods():
    with pytest.raises(QuantizationError, match="minmax, percentile, mse, entropy"):
        RangeObserver(Quantizer(), "kl")  # type: ignore[arg-type]


def test_calibrate_minmax_sets_the_observed_ranges_in_eval_mode():
    model = tiny()
    gm = transformed(model)
    gm.train()  # calibrate must still run BatchNorm and dropout in eval mode
    data = batches()
    bn_state = {k: v.clone() for k, v in gm.state_dict().items() if "running" in k}
    report = calibrate(gm, data, progress=False)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in bn_state.items())
    assert not gm.training and {r.method for r in report.rows} == {"minmax"}
    # the activation quantizer after fc1 (+ReLU) saw the float model's ReLU outputs
    with torch.no_grad():  # noqa: E501
        feats = [model.relu3(model.fc1(model.flatten(model.pool(model.relu2(model.conv2(model.relu1(model.bn1(model.conv1(x))))))))) for x in data]
    hi = max(float(f.max()) for f in feats)
    row = next(r for r in report.rows if r.layer == "fc1" and r.role == "activation")
    assert row.hi == pytest.approx(hi, rel=1e-6) and row.lo == 0.0
    assert report.samples == 64 and report.batches == 4 and report.seconds > 0
    assert all(r.sqnr_db is not None and r.sqnr_db > 20 for r in report.rows)


def test_calibrate_follows_the_spec_with_per_layer_overrides():
    gm = transformed(tiny(), quantize_output=True, calibration={"method": "entropy", "batches": 2},
                     overrides=[{"names": ["fc2"], "calibration": {"method": "percentile", "percentile": 99.0}}])
    report = calibrate(gm, batches(), progress=False)
    methods = {(r.layer, r.role): r.method for r in report.rows}
    assert methods[("fc2", "activation")] == "percentile" and methods[("fc1", "activation")] == "entropy"
    assert methods[("fc1", "weight")] == "minmax"
    assert report.batches == 2


def test_calibrate_keyword_overrides_the_spec_and_weights_can_use_mse():
    gm = transformed(tiny(), weight={"bits": 3})
    report = calibrate(gm, batches(), progress=False, method="mse", weight_method="mse")
    assert {r.method for r in report.rows} == {"mse"}
    w_rows = [r for r in report.rows if r.role == "weight"]
    assert any(r.hi < r.observed_hi - 1e-6 for r in w_rows)  # some 3-bit weight range is clipped


def test_calibrate_leaves_the_trained_model_and_switched_off_quantizers_alone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = transformed(model)
    evefx.set_mode(gm, quantized=False)
    calibrate(gm, batches(), progress=False)
    assert all(not q.enabled for q in gm.modules() if isinstance(q, Quantizer))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_calibrate_without_quantizers_or_data_is_an_error():
    with pytest.raises(QuantizationError, match="no evefx quantizer"):
        calibrate(tiny(), batches(), progress=False)
    with pytest.raises(QuantizationError, match="no calibration batches"):
        calibrate(transformed(tiny()), [], progress=False)


def test_top_level_alias():
    assert evefx.calibrate is calibrate


def test_set_range_sets_scale_and_zero_point_and_refuses_bad_ranges():
    q = Quantizer(bits=8, symmetric=False, signed=False)
    q.set_range(-1.0, 3.0)
    assert bool(q.initialized) and float(q.scale) == pytest.approx(4.0 / 255) and int(q.zero_point) == 64
    assert float(q.range_min) == -1.0 and float(q.range_max) == 3.0
    with pytest.raises(QuantizationError, match="finite lo <= hi"):
        q.set_range(2.0, 1.0)
    pc = Quantizer(bits=4, granularity="per_channel", num_channels=3)
    pc.set_range(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(pc.scale, torch.tensor([1.0, 2.0, 3.0]) / 7)


def test_adaround_beta_must_anneal_down():
    with pytest.raises(evefx.SpecError, match="beta"):
        evefx.load_spec({"passes": [{"kind": "quantize", "adaround": {"beta": [2, 20]}}]})


def test_asymmetric_grids_on_one_sided_data_search_the_upper_end_only():
    x = torch.cat([torch.ones(10000), torch.tensor([100.0])])
    grid = Grid(0, 3, symmetric=False, signed=False)
    assert [float(v) for v in mse_range(Histogram.of(x, 0.0, 100.0, 2048), grid)] == [0.0, 3.0]
    gen = torch.Generator().manual_seed(0)
    relu = torch.cat([torch.randn(50000, generator=gen).clamp_min(0), torch.full((5,), 50.0)])
    lo, hi = entropy_range(Histogram.of(relu, 0.0, 50.0, 2048), Grid(0, 255, symmetric=False, signed=False))
    assert float(lo) == 0.0 and 2.0 < float(hi) < 10.0


def test_entropy_ignores_the_spike_of_exact_zeros_after_a_relu():
    gen = torch.Generator().manual_seed(0)
    relu = torch.randn(100000, generator=gen).clamp_min(0)  # half of the values are exactly 0
    h = Histogram.of(relu, 0.0, float(relu.max()), 2048)
    assert float(h.zeros) == float((relu == 0).sum())
    _, hi = entropy_range(h, Grid(0, 255, symmetric=False, signed=False))
    assert float((relu > float(hi)).float().mean()) < 0.01  # the spike at 0 used to pull it down to ~25% clipped


def test_calibrate_a_hand_built_model_without_provenance():
    from torch import nn

    from evefx.modules import QuantLinear

    torch.manual_seed(0)
    fc = nn.Linear(4, 3)
    model = nn.Sequential(QuantLinear.from_float(fc, Quantizer(bits=8, granularity="per_channel", num_channels=3)),
                          Quantizer(bits=8, symmetric=False, signed=False))
    x = torch.randn(16, 4)
    report = calibrate(model, [x], progress=False, method="percentile", percentile=100.0)
    roles = {r.name: (r.role, r.method) for r in report.rows}
    assert roles == {"0.weight_quantizer": ("weight", "minmax"), "1": ("activation", "percentile")}
    assert torch.allclose(model[0].weight_quantizer.range_max, fc.weight.detach().abs().amax(dim=1))  # symmetric


def test_entropy_on_two_sided_data_with_an_asymmetric_grid_clips_both_outliers():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50000, generator=gen), torch.tensor([-40.0, 40.0])])
    lo, hi = entropy_range(Histogram.of(x, -40.0, 40.0, 2048), Grid(0, 255, symmetric=False, signed=False))
    assert -10.0 < float(lo) < -2.0 and 2.0 < float(hi) < 10.0


def test_batches_of_a_model_with_integer_inputs_are_told_from_labelled_ones():
    # (token ids, mask) looked like (x, labels): the mask was dropped and the model called without it
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tokens, keep = torch.randint(0, 20, (32, 5), generator=g), torch.rand(32, 5, generator=g) > 0.2
    keep[:, 0] = True
    labels = torch.randint(0, 3, (32,), generator=g)
    gm = evefx.transform(TokenClassifier(), {"passes": [{"kind": "quantize"}]}, (tokens[:2], keep[:2]))
    assert inputs_only([(tokens, keep)], gm)[0] == (tokens, keep)
    dropped = inputs_only([(tokens, keep, labels)], gm)[0]
    assert len(dropped) == 2 and dropped[1] is keep
    calibrated = [evefx.calibrate(copy.deepcopy(gm), batches, progress=False).rows
                  for batches in ([(tokens, keep)], [(tokens, keep, labels)])]
    assert calibrated[0] == calibrated[1]
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 0, 3, 2])
    demo = evefx.transform(DemoNet(), {"passes": [{"kind": "quantize"}]}, x[:1])
    assert inputs_only([(x, y)], demo)[0] is x and inputs_only([(x, y)])[0] is x


def test_batches_that_do_not_fit_are_one_line_errors_and_leave_no_grid_from_them():
    """calibrate with batches of the wrong shape or count raised torch's RuntimeError / TypeError,
    and None or one tensor a TypeError or one call per sample."""
    gm = transformed(tiny())
    with pytest.raises(evefx.ShapeError) as e:
        calibrate(gm, [torch.zeros(2, 3, 8, 8)])
    assert str(e.value) == ("layer conv1 (QuantConv2d) got an input of shape (2, 3, 8, 8) but expects (N, 1, H, W); "
                            "calibration inputs (2, 3, 8, 8) do not fit the model traced with (1, 1, 8, 8): give "
                            "batches of the inputs it takes")
    with pytest.raises(evefx.ShapeError) as e:
        calibrate(gm, [(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))])
    assert str(e.value) == ("the model takes 1 input (x), got 3 inputs in a batch; give batches of one tensor per "
                            "argument of forward (labels are dropped only when the batch is (inputs..., labels))")
    for wrong, what in ((None, "None"), (torch.zeros(4, 1, 8, 8), "one tensor")):
        with pytest.raises(evefx.OptionError) as e:
            evefx.post_training_quantize(gm, wrong, progress=False)
        assert str(e.value) == (f"calibration batches must be an iterable of batches (a list, a DataLoader), got {what}; "
                                "e.g. list(x.split(64))")
    calibrate(gm, batches(2))  # the same model calibrates afterwards
