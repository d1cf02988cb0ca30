"""Equalization preserves the float function and equalizes ranges; bias correction zeroes the mean
output error; AdaRound never does worse than nearest rounding on its own objective."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import evefx
from evefx.errors import QuantizationError
from evefx.modules import Quantizer
from evefx.ptq import (
    adaround,
    bake_batchnorm,
    bias_correction,
    calibrate,
    equalization_pairs,
    equalize,
    float_reference,
    post_training_quantize,
)
from evefx.ptq.corrections import _mean_outputs
from evefx.ptq.equalization import _in_ranges, _out_ranges
from evefx.spec import AdaRoundConfig
from tests.ptq.models import batches, tiny, transformed


def test_bake_batchnorm_keeps_the_eval_output():
    gm = transformed(tiny())
    evefx.set_mode(gm, quantized=False)
    x = batches(1)[0]
    y = gm(x)
    assert bake_batchnorm(gm.conv1) and gm.conv1.bn is None
    assert torch.allclose(gm(x), y, atol=1e-6)
    assert not bake_batchnorm(gm.conv1)  # nothing left to bake


def test_equalization_pairs_follow_relu_pool_flatten_and_quantizers():
    gm = transformed(tiny())
    pairs = {(p.first, p.second): p.repeat for p in equalization_pairs(gm)}
    assert pairs == {("conv1", "conv2"): 1, ("conv2", "fc1"): 4, ("fc1", "fc2"): 1}


def test_no_pair_across_a_branch():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y) + y  # a's output has two users: scaling it would change the sum

    assert equalization_pairs(torch.fx.symbolic_trace(Branchy())) == []


def test_equalize_preserves_the_float_function_and_equalizes_ranges():
    model = tiny()
    gm = transformed(model)
    evefx.set_mode(gm, quantized=False)
    x = batches(1)[0]
    pairs = equalize(gm)
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    for p in pairs:
        r1, r2 = _out_ranges(gm.get_submodule(p.first)), _in_ranges(gm.get_submodule(p.second), p.repeat)
        assert torch.allclose(r1, r2, rtol=1e-3), (p, r1, r2)
        assert p.after < 1.001 < p.before
    assert equalize(gm, layers=["conv1"]) == []  # a pair needs both of its layers


def test_equalize_a_single_pair_exactly():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        seq[0].weight.mul_(torch.tensor([100.0, 0.01, 1.0, 3.0, 0.5])[:, None])
    gm = torch.fx.symbolic_trace(copy.deepcopy(seq))
    x = torch.randn(7, 3)
    (pair,) = equalize(gm, iterations=1)
    assert torch.allclose(gm(x), seq(x), atol=1e-4)
    w1, w2 = gm.get_submodule("0").weight, gm.get_submodule("2").weight
    # after one step both channels have the range sqrt(r1 r2) of the originals
    r1, r2 = seq[0].weight.abs().amax(dim=1), seq[2].weight.abs().amax(dim=0)
    expected = torch.sqrt(r1 * r2)
    assert torch.allclose(w1.abs().amax(dim=1), expected, rtol=1e-5)
    assert torch.allclose(w2.abs().amax(dim=0), expected, rtol=1e-5)


def test_bias_correction_makes_the_mean_output_error_zero():
    gm = transformed(tiny(), weight={"bits": 3, "granularity": "per_tensor"})
    data = batches()
    calibrate(gm, data, progress=False)
    ref = float_reference(gm)
    names = ["conv1", "conv2", "fc1", "fc2"]
    target = _mean_outputs(ref, names, data, quantized=False)
    before = _mean_outputs(gm, names, data, quantized=True)
    assert max(float((target[n] - before[n]).abs().max()) for n in names) > 1e-3
    deltas = bias_correction(gm, data, reference=ref)
    assert set(deltas) == set(names)
    after = _mean_outputs(gm, names, data, quantized=True)
    for n in names:
        # in eval mode the bias sits on the int32 grid s_x * s_w the file stores it on: the corrected
        # bias is exact up to half a step of that grid
        layer = gm.get_submodule(n)
        q = layer.__dict__.get("_input_quantizer")
        half = 0.5 * float((q.scale * layer.weight_quantizer.scale).max()) if q is not None else 0.0
        assert float((target[n] - after[n]).abs().max()) < 1e-5 + half, n


def test_bias_correction_of_selected_layers_and_unknown_names():
    gm = transformed(tiny(), weight={"bits": 4})
    calibrate(gm, batches(), progress=False)
    fc1_bias = gm.fc1.bias.detach().clone()
    assert set(bias_correction(gm, batches(), layers=["fc2"])) == {"fc2"}
    assert torch.equal(gm.fc1.bias, fc1_bias)
    with pytest.raises(QuantizationError, match="not quantized layers.*nope"):
        bias_correction(gm, batches(), layers=["nope"])


@torch.no_grad()
def _layer_loss(layer, x, y, w):
    return float((nn.functional.linear(x, w, layer.bias) - y).double().square().mean())


def test_adaround_beats_nearest_rounding_on_its_objective_and_stays_on_the_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    gm = evefx.transform(model, {"passes": [{"kind": "quantize", "weight": {"bits": 3}, "activation": None}]},
                         torch.zeros(1, 16))
    data = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    calibrate(gm, data, progress=False)
    ref = float_reference(gm)
    scale = gm.get_submodule("0").weight_quantizer.scale.clone()
    results = adaround(gm, data, config=AdaRoundConfig(iterations=300, samples=256, batch_size=64, lr=0.05),
                       reference=ref, progress=False)
    r = results["0"]
    assert r.loss_final <= r.loss_nearest and r.kept and r.loss_learned < 0.97 * r.loss_nearest and r.flipped > 0
    w = gm.get_submodule("0").weight.detach()
    codes = w / scale.reshape(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # exactly on the weight quantizer's grid
    assert torch.equal(gm.get_submodule("0").weight_quantizer.scale, scale)
    # the objective measured independently: the layer's output against the float model's
    x = torch.cat(data)
    y = ref(x)
    nearest = torch.round(ref.get_submodule("0").weight / scale.reshape(-1, 1)).clamp(-4, 3) * scale.reshape(-1, 1)
    assert _layer_loss(gm.get_submodule("0"), x, y, w) < _layer_loss(gm.get_submodule("0"), x, y, nearest)


def test_adaround_keeps_nearest_when_learning_does_not_help():
    torch.manual_seed(0)
    gm = evefx.transform(nn.Sequential(nn.Linear(8, 4)), {"passes": [{"kind": "quantize", "activation": None}]},
                         torch.zeros(1, 8))
    data = [torch.randn(32, 8)]
    calibrate(gm, data, progress=False)
    # a huge learning rate with a single step scrambles the rounding: nearest must be kept
    r = adaround(gm, data, config=AdaRoundConfig(iterations=1, lr=1.0, warm_start=0.0, reg_weight=1000.0),
                 progress=False)["0"]
    assert r.loss_final == min(r.loss_learned, r.loss_nearest) and r.loss_final <= r.loss_nearest


def test_adaround_needs_calibrated_quantizers():
    gm = transformed(tiny())
    with pytest.raises(QuantizationError, match="not calibrated"):
        adaround(gm, batches(1), progress=False)


def test_post_training_quantize_runs_the_steps_the_spec_asks_for():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = transformed(model, weight={"bits": 4}, equalize=True, bias_correction=True,
                     adaround={"iterations": 30, "samples": 32},
                     overrides=[{"names": ["fc2"], "adaround": None, "bias_correction": False}])
    report = post_training_quantize(gm, batches(), progress=False)
    assert {(p.first, p.second) for p in report.equalized} == {("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2")}
    assert set(report.adaround) == {"conv1", "conv2", "fc1"}
    assert set(report.bias_deltas) == {"conv1", "conv2", "fc1"}
    assert set(report.seconds) == {"equalize", "calibrate", "adaround", "bias_correction"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the trained model is untouched
    assert "adaround" in report.to_dict() and report.table().row_count > 0
    # still a working quantized model close to the float one
    x = batches(1)[0]
    assert torch.allclose(gm(x), model(x), atol=0.5)


def test_post_training_quantize_with_plain_spec_only_calibrates():
    gm = transformed(tiny())
    report = post_training_quantize(gm, batches(), progress=False)
    assert report.equalized == [] and report.adaround == {} and report.bias_deltas == {}
    assert all(bool(q.initialized) for q in gm.modules() if isinstance(q, Quantizer))


def test_adaround_reconstructs_through_the_following_relu():
    from evefx.ptq.adaround import _following_relu

    gm = transformed(tiny())
    assert _following_relu(gm, "conv1")  # its BatchNorm is folded: conv1 -> relu1
    assert _following_relu(gm, "fc1") and not _following_relu(gm, "fc2")
    assert not _following_relu(tiny(), "conv1")  # not a graph


def _conv1_outputs(model: nn.Module, data: list[torch.Tensor]) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    h = model.conv1.register_forward_hook(lambda _m, _i, out: outs.append(out.detach()))
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    return outs


@pytest.mark.parametrize("fold_bn", [True, False])
def test_reestimate_bn_averages_the_batches_statistics_and_restores_modes(fold_bn):
    model = tiny()
    gm = transformed(model, fold_bn=fold_bn, bn_statistics="running")
    evefx.set_mode(gm, quantized=False)  # the float function: conv1's output is the float model's
    data = batches(3)
    zs = _conv1_outputs(model, data)  # what the BatchNorm normalises, per batch
    gm.train()
    names = evefx.reestimate_bn(gm, [(x, torch.zeros(len(x), dtype=torch.long)) for x in data], include_frozen=True,
                                progress=False)
    assert names == (["conv1.bn"] if fold_bn else ["bn1"])
    bn = gm.get_submodule(names[0])
    mean = torch.stack([z.mean(dim=(0, 2, 3)) for z in zs]).mean(0)
    var = torch.stack([z.var(dim=(0, 2, 3), unbiased=True) for z in zs]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and all(m.training for m in gm.modules())  # modes as they were
    if fold_bn:
        assert gm.conv1.bn_running_stats is True


def test_reestimate_bn_keeps_the_folded_weight_codes_and_the_activation_grids():
    gm = transformed(tiny(), weight={"fn": "lsq", "bits": 4})
    calibrate(gm, batches(2), progress=False)
    q = gm.conv1.weight_quantizer

    def codes():
        w, _ = gm.conv1.folded_weight_bias()
        scale, zero, qmin, qmax, _ = q.qparams()
        return torch.clamp(torch.round(w.detach() / scale.reshape(-1, 1, 1, 1)) + zero.reshape(-1, 1, 1, 1), qmin, qmax)

    before, var = codes(), gm.conv1.bn.running_var.clone()
    acts = {n: (m.range_min.clone(), m.scale.detach().clone()) for n, m in gm.named_modules()
            if isinstance(m, Quantizer) and m is not q and bool(m.initialized)}
    # what the BatchNorm normalises, from the eval output: z = conv(x, Q(W f) / f) + b with the trained codes
    data = batches(4, seed=1)
    with torch.no_grad():
        f = gm.conv1._fold_factor().reshape(1, -1, 1, 1)
        deployed = gm.conv1._deployed_bias(gm.conv1.folded_weight_bias()[1]).reshape(1, -1, 1, 1)
        zs = [(y - deployed) / f + gm.conv1.bias.reshape(1, -1, 1, 1) for y in _conv1_outputs(gm, data)]
    evefx.reestimate_bn(gm, data, progress=False)
    assert not torch.allclose(gm.conv1.bn.running_var, var)  # new statistics, so a new fold factor ...
    assert torch.equal(codes(), before)  # ... and the same codes on a stretched grid
    torch.testing.assert_close(gm.conv1.bn.running_mean, torch.stack([z.mean(dim=(0, 2, 3)) for z in zs]).mean(0),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm.conv1.bn.running_var, torch.stack([z.var(dim=(0, 2, 3)) for z in zs]).mean(0),
                               rtol=1e-4, atol=1e-5)
    for n, m in gm.named_modules():
        if n in acts:
            assert torch.equal(m.range_min, acts[n][0]) and torch.equal(m.scale.detach(), acts[n][1])


def test_reestimate_bn_leaves_the_statistics_when_a_batch_fails():
    gm = transformed(tiny())
    stats = [t.clone() for t in (gm.conv1.bn.running_mean, gm.conv1.bn.running_var)]
    with pytest.raises(evefx.ShapeError) as e:  # torch's own RuntimeError before: no layer, no fix
        evefx.reestimate_bn(gm, [batches(1)[0], torch.zeros(2, 3, 8, 8)], progress=False)
    assert str(e.value) == ("layer conv1 (QuantConv2d) got an input of shape (2, 3, 8, 8) but expects (N, 1, H, W); "
                            "calibration inputs (2, 3, 8, 8) do not fit the model traced with (1, 1, 8, 8): give "
                            "batches of the inputs it takes")
    assert torch.equal(gm.conv1.bn.running_mean, stats[0]) and torch.equal(gm.conv1.bn.running_var, stats[1])
    assert gm.conv1.bn.momentum == 0.1 and not gm.training


def test_reestimate_bn_keeps_the_statistics_a_layer_trained_frozen_on():
    frozen = transformed(tiny(), bn_statistics="running")
    stats = frozen.conv1.bn.running_var.clone()
    assert evefx.reestimate_bn(frozen, batches(2), progress=False) == []  # the network learnt around them
    assert torch.equal(frozen.conv1.bn.running_var, stats)
    auto = transformed(tiny(), weight={"bits": 2})  # a trained network at 2 bits: auto freezes ...
    assert auto.conv1.bn_running_stats and evefx.reestimate_bn(auto, batches(2), progress=False) == []
    auto.conv1.weight_quantizer.set_bits(4)  # ... and at 4 bits trains on batch statistics: re-estimated
    assert evefx.reestimate_bn(auto, batches(2), progress=False) == ["conv1.bn"]
