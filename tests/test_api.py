"""The eve protocol functions: parameters, observations, reset, modes; no state shared between models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evefx
from evefx.api import STATIC_COLUMNS
from tests.probe import Probe
from tests.helpers import probe_model


def test_eve_parameters_list_layer_range_value(demo_net):
    gm = probe_model(demo_net)
    params = evefx.eve_parameters(gm)
    assert [p.layer for p in params] == ["features.0", "features.3", "features.6", "classifier.1", "classifier.3"]
    p = params[0]
    assert (p.kind, p.low, p.high, p.integer, p.value, p.role, p.spec_path) == ("gain", 0.0, 2.0, False, 1.0, "probe", "passes[0]")
    p.set(2.0)
    assert p.value == 2.0
    evefx.set_eve_parameter(gm, params[1].name, 0.5)
    assert params[1].value == 0.5
    with pytest.raises(KeyError, match="no eve parameter 'nope'; known: features_0_probe.gain"):
        evefx.set_eve_parameter(gm, "nope", 1.0)


def test_user_errors_of_the_api_are_evefx_errors(demo_net):
    """Item 11 of issue 12: unknown names and bad options are EvefxErrors (and still the builtin)."""
    gm = probe_model(demo_net)
    with pytest.raises(evefx.UnknownNameError) as err:
        evefx.set_eve_parameter(gm, "features_0_probe.gian", 1.0)
    assert isinstance(err.value, KeyError) and isinstance(err.value, evefx.EvefxError)
    assert str(err.value).startswith("no eve parameter 'features_0_probe.gian'; did you mean features_0_probe.gain")
    with pytest.raises(evefx.OptionError) as err:
        evefx.set_mode(gm, step="x")
    assert isinstance(err.value, ValueError)
    assert str(err.value) == "set_mode(step='x'): step must be 'single' or 'multi'"


def test_out_of_range_eve_values_raise_naming_the_range(demo_net):
    """Item 5 of issue 12: 0 bits no longer becomes 2 and 99 no longer becomes 8."""
    gm = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "upgrade_bits": True, "min_bits": 2, "max_bits": 8}]},
                         torch.zeros(1, 1, 28, 28))
    name = "features.0.weight_quantizer.bits"
    assert name in [p.name for p in evefx.eve_parameters(gm)]
    for bad in (0, 99, 4.5):
        with pytest.raises(evefx.OptionError) as err:
            evefx.set_eve_parameter(gm, name, bad)
        assert str(err.value) == (f"eve parameter {name} must be a whole number between 2 and 8 (got {bad}); "
                                  "the range comes from passes[0] (layer features.0): widen it there")
    evefx.set_eve_parameter(gm, name, 3)
    assert evefx.eve_parameters(gm)[0].value == 3
    probe = probe_model(demo_net)
    with pytest.raises(evefx.OptionError, match=r"between 0 and 2 \(got 5.0\)"):
        evefx.eve_parameters(probe)[0].set(5.0)


def test_eve_parameter_changes_output_and_travels_with_state_dict(demo_net, mnist_batch):
    gm = probe_model(demo_net)
    evefx.set_eve_parameter(gm, evefx.eve_parameters(gm)[-1].name, 0.0)
    assert torch.all(gm(mnist_batch) == 0)
    fresh = probe_model(demo_net)
    assert not torch.all(fresh(mnist_batch) == 0)
    fresh.load_state_dict(gm.state_dict())
    assert torch.equal(fresh(mnist_batch), gm(mnist_batch))


def test_observe_static_features_and_module_columns(demo_net, mnist_batch):
    gm = probe_model(demo_net)
    obs = evefx.observe(gm, mnist_batch)
    assert obs.layers == ("features.0", "features.3", "features.6", "classifier.1", "classifier.3")
    assert obs.values.dtype == np.float32 and obs.values.shape == (5, len(obs.columns))
    assert obs.columns[: len(STATIC_COLUMNS)] == STATIC_COLUMNS
    row = obs.row("features.0")
    # Conv2d(1, 4, 3, stride 2, pad 1) on 28x28: output 4x14x14, each output 1*3*3 MACs
    assert row["macs"] == 4 * 14 * 14 * 9 and row["params"] == 40 and row["in_size"] == 784
    assert row["kernel"] == 9 and row["stride"] == 2 and row["is_conv"] == 1 and row["is_depthwise"] == 0
    assert obs.row("classifier.1")["macs"] == 256 * 16
    assert "probe.calls" in obs.columns and row["act_max"] > 0
    assert obs.row("classifier.3")["probe.calls"] == 0.0  # observe resets state after its forward


def test_reset_and_set_mode_reach_every_module(demo_net, mnist_batch):
    gm = probe_model(demo_net)
    gm(mnist_batch)
    probes = [m for m in gm.modules() if isinstance(m, Probe)]
    assert all(p.calls == 1 for p in probes)
    evefx.reset(gm)
    assert all(p.calls == 0 for p in probes)
    evefx.set_eve_parameter(gm, evefx.eve_parameters(gm)[0].name, 0.0)
    evefx.set_mode(gm, pruned=False)
    assert torch.allclose(gm(mnist_batch), demo_net(mnist_batch))
    with pytest.raises(evefx.OptionError, match="step must be"):
        evefx.set_mode(gm, step="double")


def test_two_models_share_no_state(demo_net, mnist_batch):
    a, b = probe_model(demo_net), probe_model(demo_net)
    evefx.set_eve_parameter(a, evefx.eve_parameters(a)[0].name, 0.25)
    a(mnist_batch)
    assert evefx.eve_parameters(b)[0].value == 1.0
    assert all(p.calls == 0 for p in b.modules() if isinstance(p, Probe))


def test_unknown_layer_in_observations_and_set_mode_on_a_plain_model(demo_net, mnist_batch):
    """Further instances found for issue 12: a bare ValueError from tuple.index, and a silent no-op."""
    obs = evefx.observe(probe_model(demo_net))
    with pytest.raises(evefx.UnknownNameError, match=r"^no layer 'feature.0' in these observations; did you mean 'features.0'\? "):
        obs.row("feature.0")
    with pytest.warns(evefx.EvefxWarning, match=r"set_mode\(quantized=False\): DemoNet has no evefx modules, so nothing changed"):
        evefx.set_mode(demo_net, quantized=False)
