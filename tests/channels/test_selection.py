"""prune_step: masks follow the criterion on hand-made weights and activations, the ratio as an eve
parameter, iterative schedules, layer and global scope with min_channels, set_mode lifting masks, and
on one layer: min_channels, the schedule's steps, masked channels staying masked, ties."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import evefx
from evefx.channels import count_params
from evefx.errors import PruneError
from evefx.graph import marked

from tests.channels.nets import PRUNE, X16, X28, FireNet, TwoConv, masks_of


def test_l1_norm_masks_follow_hand_made_weights(demo_net):
    model = copy.deepcopy(demo_net)
    with torch.no_grad():
        for f, v in enumerate([0.1, 0.4, 0.2, 0.3]):
            model.features[0].weight[f].fill_(v)
    gm = evefx.transform(model, PRUNE, X28)
    evefx.prune_step(gm)
    assert masks_of(gm)["features.0"].tolist() == [0, 1, 0, 1]
    # the others lose half too, and the classifier's inputs are intact (exclude_last)
    assert {k: int(v.sum()) for k, v in masks_of(gm).items()} == {"features.0": 2, "features.3": 4, "features.6": 8, "classifier.1": 8}


@pytest.mark.parametrize("criterion", ["fire_rate", "kl_div", "taylor"])
def test_statistic_criteria_on_hand_made_activations(criterion):
    spec = {"passes": [{"kind": "prune", "criterion": criterion, "select": {"names": ["conv"]}, "exclude_last": False}]}
    gm = evefx.transform(FireNet(), spec, torch.zeros(1, 1, 4, 4))
    with pytest.raises(PruneError, match="no statistics yet"):
        evefx.prune_step(gm)
    gm.train()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1  # positive inputs
    loss = gm(x).sum()
    loss.backward()
    pruner = gm.get_submodule(str(marked(gm, "prune")[0].target))
    if criterion == "fire_rate":
        assert pruner.importance().tolist() == [1.0, 0.0, 1.0, 0.0]
    else:
        # channels 1 and 3 are dead after the ReLU: constant (kl_div 0) and without gradient (taylor 0)
        imp = pruner.importance()
        assert imp[1] == 0 and imp[3] == 0 and imp[0] > 0 and imp[2] > 0
    evefx.prune_step(gm)
    assert pruner.mask.tolist() == [1, 0, 1, 0]


def test_set_mode_lifts_masks_and_observe_reports_them(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, PRUNE, X28)
    evefx.prune_step(gm)
    masked = gm(mnist_batch)
    assert not torch.allclose(masked, demo_net(mnist_batch), atol=1e-4)
    evefx.set_mode(gm, pruned=False)
    assert torch.allclose(gm(mnist_batch), demo_net(mnist_batch), atol=1e-6)
    evefx.set_mode(gm, pruned=True)
    assert torch.equal(gm(mnist_batch), masked)
    obs = evefx.observe(gm)
    assert obs.row("features.3")["pruner.pruned"] == 0.5 and obs.row("features.3")["pruner.ratio"] == 0.5


def test_upgrade_ratio_is_an_eve_parameter_used_by_prune_step(demo_net):
    spec = {"passes": [{"kind": "prune", "ratio": 0.25, "upgrade_ratio": True, "max_ratio": 0.8}]}
    gm = evefx.transform(demo_net, spec, X28)
    params = {p.name: p for p in evefx.eve_parameters(gm)}
    assert len(params) == 4 and all(p.kind == "ratio" and p.high == 0.8 for p in params.values())
    name = next(n for n, p in params.items() if p.layer == "features.6")
    evefx.set_eve_parameter(gm, name, 0.75)
    assert evefx.prune_step(gm)["features.6"] == (4, 16)
    assert evefx.prune_step(gm)["features.3"] == (6, 8)


def test_iterative_schedule_reaches_the_ratio_in_steps(demo_net):
    spec = {"passes": [{"kind": "prune", "ratio": 0.5, "schedule": {"kind": "iterative", "steps": 2}}]}
    gm = evefx.transform(demo_net, spec, X28)
    assert evefx.prune_step(gm)["features.6"] == (12, 16)
    assert evefx.prune_step(gm)["features.6"] == (8, 16)
    assert evefx.prune_step(gm)["features.6"] == (8, 16)


@pytest.mark.parametrize(
    "scope, min_channels, kept",
    [("layer", 1, {"c1": [0, 0, 1, 1], "c2": [0, 0, 0, 0, 1, 1, 1, 1]}),
     # normalised by the layer mean: c1 = .5 .5 .5 2.5, c2 = (1..8)/4.5; global divides by the
     # relative cost (c1's channel: 100 params, 25,344 MACs; c2's: 39, 9,218): c1 .29 .29 .29 1.46,
     # c2 .34 .69 1.03 ...; the six lowest, c1 losing at most 3 of 4 (its cap)
     ("global", 1, {"c1": [0, 0, 0, 1], "c2": [0, 0, 0, 1, 1, 1, 1, 1]}),
     ("global", 2, {"c1": [0, 0, 1, 1], "c2": [0, 0, 0, 0, 1, 1, 1, 1]})],
)
def test_scope_layer_and_global_with_min_channels(scope, min_channels, kept):
    spec = {"passes": [{"kind": "prune", "ratio": 0.5, "scope": scope, "min_channels": min_channels}]}
    gm = evefx.transform(TwoConv(), spec, X16)
    evefx.prune_step(gm)
    assert {k: v.int().tolist() for k, v in masks_of(gm).items()} == kept


def test_global_scope_prunes_the_costliest_of_equally_important_channels_up_to_a_cap():
    model = TwoConv()
    with torch.no_grad():
        model.c1.weight.fill_(1.0)
        model.c2.weight.fill_(1.0)
    sizes = {}
    for scope in ("layer", "global"):
        gm = evefx.transform(model, {"passes": [{"kind": "prune", "ratio": 0.5, "scope": scope}]}, X16)
        evefx.prune_step(gm)
        sizes[scope] = {k: int(v.sum()) for k, v in masks_of(gm).items()}
        sizes[scope]["params"] = count_params(evefx.compact(gm))
    # same 6 of 12 channels; a c1 channel costs 100 params (c2's 39): global takes c1's first,
    # but at most (1 + 0.5) / 2 of its 4 channels
    assert sizes["layer"] == {"c1": 2, "c2": 4, "params": 2 * 28 + 4 * (2 * 9 + 1) + 4 * 2 + 2}
    assert sizes["global"] == {"c1": 1, "c2": 5, "params": 28 + 5 * (9 + 1) + 5 * 2 + 2}
    assert sizes["global"]["params"] < sizes["layer"]["params"]


class OneConv(nn.Module):
    """A 1x1 conv whose filter ``f`` is filled with ``weights[f]`` (its l1_norm importance), then a head."""

    def __init__(self, weights):
        super().__init__()
        self.conv = nn.Conv2d(1, len(weights), 1)
        self.head = nn.Conv2d(len(weights), 2, 1)
        with torch.no_grad():
            for f, v in enumerate(weights):
                self.conv.weight[f].fill_(v)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x))).mean((2, 3))


def _conv_only(**options):
    return {"passes": [{"kind": "prune", "select": {"names": ["conv"]}, "exclude_last": False, **options}]}


def _conv_mask(gm):
    return masks_of(gm)["conv"].int().tolist()


X1 = torch.zeros(1, 1, 4, 4)


def test_min_channels_and_iterative_schedule_of_one_layer():
    gm = evefx.transform(OneConv([1.0, 2, 3, 4, 5, 6, 7, 8]), _conv_only(ratio=0.9, min_channels=3), X1)
    assert evefx.prune_step(gm)["conv"] == (3, 8)
    spec = _conv_only(ratio=0.5, schedule={"kind": "iterative", "steps": 2})
    gm = evefx.transform(OneConv([8.0, 7, 6, 5, 4, 3, 2, 1]), spec, X1)
    evefx.prune_step(gm)
    assert _conv_mask(gm) == [1, 1, 1, 1, 1, 1, 0, 0]
    evefx.prune_step(gm)
    assert _conv_mask(gm) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_masked_channels_stay_masked_when_importance_changes():
    gm = evefx.transform(OneConv([1.0, 2, 3, 4]), _conv_only(ratio=0.25), X1)
    evefx.prune_step(gm)
    assert _conv_mask(gm) == [0, 1, 1, 1]
    with torch.no_grad():
        gm.get_submodule("conv").weight[0].fill_(9.0)
    # channel 0 is now the most important, but it was masked: it stays masked
    evefx.prune_step(gm)
    assert _conv_mask(gm) == [0, 1, 1, 1]


def test_ties_prune_the_earlier_channel_first():
    gm = evefx.transform(OneConv([1.0, 1.0, 1.0]), _conv_only(ratio=0.67), X1)
    evefx.prune_step(gm)
    assert _conv_mask(gm) == [0, 0, 1]


def test_prune_step_on_an_untransformed_model_says_what_to_do():
    from examples.models import DemoNet

    with pytest.raises(PruneError, match=r"^prune_step takes the fx.GraphModule evefx.transform returns \(with a prune "
                                         r"section\), not a DemoNet: transform the model first$"):
        evefx.prune_step(DemoNet())
