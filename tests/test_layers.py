"""evefx.layers: the one home of MACs, channel counts, input normalisation and eval-mode runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import evefx
from evefx.errors import SearchError, ShapeError
from evefx.layers import as_inputs, count_macs, eval_mode, in_channels, layer_macs, out_channels, output_positions
from evefx.trace import trace
from evefx.upgrade import CostModel
from examples.models import DemoNet


def test_layer_macs_are_weights_times_output_positions():
    assert layer_macs(nn.Conv2d(3, 8, 3), (2, 8, 26, 26)) == 8 * 3 * 9 * 26 * 26
    assert layer_macs(nn.Conv2d(8, 8, 3, groups=8), (1, 8, 5, 5)) == 8 * 9 * 25  # depthwise: one input channel each
    assert layer_macs(nn.Linear(16, 4), (3, 4)) == 64
    assert layer_macs(nn.Linear(16, 4), (1, 10, 4)) == 640  # ten tokens
    assert output_positions(nn.Conv1d(2, 2, 1), (1, 2, 7)) == 7
    assert layer_macs(nn.ReLU(), (1, 4)) is None and layer_macs(nn.Linear(16, 4), None) is None


def test_channel_counts():
    assert (in_channels(nn.Conv2d(3, 8, 3)), out_channels(nn.Conv2d(3, 8, 3))) == (3, 8)
    assert (in_channels(nn.Linear(5, 2)), out_channels(nn.Linear(5, 2))) == (5, 2)
    assert in_channels(nn.ReLU()) is None and out_channels(nn.ReLU()) is None


def test_count_macs_needs_shapes_and_says_how_to_get_them():
    gm = evefx.transform(DemoNet(), {"passes": []}, torch.zeros(1, 1, 28, 28))
    obs = evefx.observe(gm)
    assert count_macs(gm) == int(sum(obs.row(layer)["macs"] for layer in obs.layers)) == 43856
    bare = trace(DemoNet())
    with pytest.raises(ShapeError, match=r"^layer features.0 has no recorded output shape, so its MACs are unknown: "
                                         r"pass example inputs to evefx.transform \(or set trace.input_shape in the spec\)$"):
        count_macs(bare)
    assert evefx.observe(bare).row("features.0")["macs"] == 0.0  # unknown, not a guess


def test_macs_budget_without_shapes_is_an_error():
    spec = {"passes": [{"kind": "prune", "ratio": 0.5, "upgrade_ratio": True}]}
    gm = evefx.transform(DemoNet(), spec)  # no example inputs: shapes come with the first batch
    with pytest.raises(SearchError, match=r"macs needs the layers' output shapes \(features.0 has none\)"):
        CostModel(gm, "macs")
    gm(torch.zeros(1, 1, 28, 28))
    model = CostModel(gm, "macs")
    assert model({p.name: 0.0 for p in model.parameters}) == pytest.approx(1.0)
    assert model({p.name: 0.5 for p in model.parameters}) < 0.5


def test_as_inputs():
    x = torch.zeros(2)
    assert as_inputs(x) == (x,) and as_inputs([x, x]) == (x, x) and as_inputs((x,)) == (x,) and as_inputs(None) is None
    with pytest.raises(ShapeError, match=r"^example_inputs must be a tensor or a tuple of inputs \(got dict\)$"):
        as_inputs({"x": x})


def test_eval_mode_restores_each_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model[1].eval()  # mixed flags: model.train(was) would not give them back
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
