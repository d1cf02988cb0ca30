"""The prune pass, the channel dependency analysis, prune_step and compact: masks follow the
criterion on hand-made weights and activations, coupled groups on residual / concat / shuffle /
squeeze-excite graphs and torchvision resnet18, compact equals the masked model, errors name nodes."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import evefx
from evefx.errors import PruneError
from evefx.graph import marked
from evefx.modules.prune import ChannelPruner
from evefx.prune_ops import analyze, compact_report, count_macs, count_params

PRUNE = {"passes": [{"kind": "prune", "ratio": 0.5}]}
X28 = torch.zeros(1, 1, 28, 28)
X16 = torch.zeros(1, 3, 16, 16)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


def _randomise_bn(model, seed=0):
    """Non-trivial BatchNorm statistics, so that a wrong channel slice shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class ResLike(nn.Module):
    """Stem and two residual blocks: the stem and both blocks' second convs share channels."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.b1 = nn.Sequential(_cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(_cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.b2(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseLike(nn.Module):
    """DenseNet-style concatenations (post-activation), and a head that views with a literal size."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 4)
        self.l1 = _cbr(4, 4)
        self.l2 = _cbr(8, 4)
        self.head = _cbr(12, 6, k=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = self.stem(x)
        a = self.l1(s)
        b = self.l2(torch.cat([s, a], 1))
        h = self.head(torch.cat([s, a, b], dim=1)).mean((2, 3))
        return self.fc(h.view(h.size(0), 6))


class ShuffleLike(nn.Module):
    """ShuffleNetV2 unit: channel split, 1x1 -> depthwise 3x3 -> 1x1 branch, concat, channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.branch = nn.Sequential(
            _cbr(4, 4, k=1),
            nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
            _cbr(4, 4, k=1),
        )
        self.head = _cbr(8, 16, k=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), dim=1)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.fc(self.head(x).mean([2, 3]))


class SELike(nn.Module):
    """Squeeze-and-excitation: the expand conv's channels are multiplied into the trunk's."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.fc((x * s).mean((2, 3)))


def _prune_and_compact(model, spec=PRUNE, x=X16):
    model = _randomise_bn(model)
    gm = evefx.transform(model, spec, x)
    evefx.prune_step(gm)
    small = evefx.compact(gm)
    xs = _rand(3, *x.shape[1:], seed=1)
    gm.eval()
    assert torch.allclose(small(xs), gm(xs), atol=1e-5)
    assert not any(isinstance(m, ChannelPruner) for m in small.modules())
    return gm, small


def _masks(gm):
    return {n.meta["evefx"]["layer"]: gm.get_submodule(str(n.target)).mask.clone() for n in marked(gm, "prune")}


# ---- the pass ------------------------------------------------------------------------------------


def test_pass_inserts_pruners_after_output_blocks(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, PRUNE, X28)
    assert gm.report.counts() == {"inserted": 4}
    nodes = marked(gm, "prune", role="pruner")
    assert [n.meta["evefx"]["layer"] for n in nodes] == ["features.0", "features.3", "features.6", "classifier.1"]
    # conv -> bn -> relu -> pruner; linear -> relu -> pruner
    assert [n.args[0].target for n in nodes] == ["features.2", "features.5", "features.8", "classifier.2"]
    p = gm.get_submodule(str(nodes[-1].target))
    assert (p.num_channels, p.dim, p.criterion) == (16, -1, "l1_norm")
    # no mask yet: the transform preserves computation
    assert torch.allclose(gm(mnist_batch), demo_net(mnist_batch), atol=1e-6)


def test_pass_is_idempotent_and_leaves_the_users_model_alone(demo_net):
    before = copy.deepcopy(demo_net.state_dict())
    gm = evefx.transform(demo_net, PRUNE, X28)
    again = evefx.transform(gm, PRUNE)
    assert not again.report.modified and len(marked(again, "prune")) == 4
    evefx.prune_step(gm)
    evefx.compact(gm)
    assert all(torch.equal(before[k], v) for k, v in demo_net.state_dict().items())
    assert all(isinstance(m, nn.Conv2d) and m.out_channels in (4, 8, 16) for m in demo_net.features if isinstance(m, nn.Conv2d))


def test_l1_norm_masks_follow_hand_made_weights(demo_net):
    model = copy.deepcopy(demo_net)
    with torch.no_grad():
        for f, v in enumerate([0.1, 0.4, 0.2, 0.3]):
            model.features[0].weight[f].fill_(v)
    gm = evefx.transform(model, PRUNE, X28)
    evefx.prune_step(gm)
    assert _masks(gm)["features.0"].tolist() == [0, 1, 0, 1]
    # the others lose half too, and the classifier's inputs are intact (exclude_last)
    assert {k: int(v.sum()) for k, v in _masks(gm).items()} == {"features.0": 2, "features.3": 4, "features.6": 8, "classifier.1": 8}


class FireNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0, 2.0, -0.5]).view(4, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv(x))).mean((2, 3)))


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


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            for f, v in enumerate([1.0, 1.0, 1.0, 5.0]):
                self.c1.weight[f].fill_(v)
            for f in range(8):
                self.c2.weight[f].fill_(f + 1.0)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


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
    assert {k: v.int().tolist() for k, v in _masks(gm).items()} == kept


def test_global_scope_prunes_the_costliest_of_equally_important_channels_up_to_a_cap():
    model = TwoConv()
    with torch.no_grad():
        model.c1.weight.fill_(1.0)
        model.c2.weight.fill_(1.0)
    sizes = {}
    for scope in ("layer", "global"):
        gm = evefx.transform(model, {"passes": [{"kind": "prune", "ratio": 0.5, "scope": scope}]}, X16)
        evefx.prune_step(gm)
        sizes[scope] = {k: int(v.sum()) for k, v in _masks(gm).items()}
        sizes[scope]["params"] = count_params(evefx.compact(gm))
    # same 6 of 12 channels; a c1 channel costs 100 params (c2's 39): global takes c1's first,
    # but at most (1 + 0.5) / 2 of its 4 channels
    assert sizes["layer"] == {"c1": 2, "c2": 4, "params": 2 * 28 + 4 * (2 * 9 + 1) + 4 * 2 + 2}
    assert sizes["global"] == {"c1": 1, "c2": 5, "params": 28 + 5 * (9 + 1) + 5 * 2 + 2}
    assert sizes["global"]["params"] < sizes["layer"]["params"]


# ---- dependency analysis and compact ------------------------------------------------------------


def test_residual_channels_share_one_mask_and_compact_equals_masked():
    groups = analyze(evefx.transform(ResLike(), PRUNE, X16)).groups()
    assert [g.layers for g in groups] == [("stem.0", "b1.1", "b2.1"), ("b1.0.0",), ("b2.0.0",), ("fc",)]
    assert [g.prunable for g in groups] == [8, 8, 8, 0] and groups[-1].frozen == ("model output",)
    gm, small = _prune_and_compact(ResLike())
    masks = _masks(gm)
    assert torch.equal(masks["stem.0"], masks["b1.1"]) and torch.equal(masks["stem.0"], masks["b2.1"])
    assert int(masks["stem.0"].sum()) == 4
    assert small.get_submodule("stem.0").out_channels == 4 and small.get_submodule("b1.1").out_channels == 4 and small.get_submodule("b1.0.0").in_channels == 4
    assert small.fc.in_features == 4 and small.get_submodule("stem.1").num_features == 4
    report = compact_report(small)
    assert report.params_after == count_params(small) < report.params_before == count_params(gm)
    assert report.macs_after < report.macs_before


def test_concatenated_channels_keep_their_producers_masks():
    groups = analyze(evefx.transform(DenseLike(), PRUNE, X16)).groups()
    assert [g.layers for g in groups] == [("stem.0",), ("l1.0",), ("l2.0",), ("head.0",), ("fc",)]
    gm, small = _prune_and_compact(DenseLike())
    masks = _masks(gm)
    assert small.get_submodule("l2.0").in_channels == 4 and small.get_submodule("head.0").in_channels == 6
    # head's kept input channels are exactly the kept stem, l1 and l2 channels, in concat order
    keep = torch.cat([masks["stem.0"], masks["l1.0"], masks["l2.0"]]).bool()
    assert torch.equal(small.get_submodule("head.0").weight, gm.get_submodule("head.0").weight[:, keep][masks["head.0"].bool()])
    # the literal 6 in h.view(h.size(0), 6) became 3
    assert small.fc.in_features == 3 and any(3 in n.args for n in small.graph.nodes if n.target == "view")


def test_channel_shuffle_freezes_split_channels_and_prunes_the_branch():
    groups = {g.layers: g for g in analyze(evefx.transform(ShuffleLike(), PRUNE, X16)).groups()}
    assert set(groups) == {("stem.0",), ("branch.0.0", "branch.1"), ("branch.3.0",), ("head.0",), ("fc",)}
    assert groups[("stem.0",)].prunable == 0 and "chunk" in groups[("stem.0",)].frozen[0]
    assert groups[("branch.3.0",)].prunable == 0 and "shuffle" in groups[("branch.3.0",)].frozen[0]
    assert groups[("branch.0.0", "branch.1")].prunable == 4 and groups[("head.0",)].prunable == 16
    gm, small = _prune_and_compact(ShuffleLike())
    dw = small.get_submodule("branch.1")
    assert dw.in_channels == dw.out_channels == dw.groups == 2 and small.get_submodule("branch.3.0").in_channels == 2
    assert small.get_submodule("stem.0").out_channels == 8 and small.get_submodule("head.0").in_channels == 8 and small.get_submodule("head.0").out_channels == 8


def test_squeeze_excite_product_couples_the_expand_conv():
    groups = analyze(evefx.transform(SELike(), PRUNE, X16)).groups()
    assert [g.layers for g in groups][:2] == [("stem.0", "expand"), ("reduce",)]
    gm, small = _prune_and_compact(SELike())
    assert small.expand.out_channels == small.get_submodule("stem.0").out_channels == small.reduce.in_channels == 4


def test_torchvision_resnet18_groups_and_compact():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    groups = analyze(evefx.transform(model, PRUNE, x)).groups()
    coupled = [g.layers for g in groups if len(g.layers) > 1]
    assert coupled == [
        ("conv1", "layer1.0.conv2", "layer1.1.conv2"),
        ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"),
        ("layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"),
        ("layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"),
    ]
    gm, small = _prune_and_compact(model, x=x)
    report = compact_report(small)
    assert small.get_submodule("layer4.1.conv2").out_channels == 256 and small.fc.in_features == 256
    assert 3.5 < report.params_before / report.params_after < 4.1  # half the channels: about a quarter of the weights
    assert report.macs_before == count_macs(gm) and report.macs_after == count_macs(small)


def test_compact_size_matches_a_net_built_small_by_hand(demo_net):
    gm = evefx.transform(demo_net, PRUNE, X28)
    evefx.prune_step(gm)
    report = compact_report(evefx.compact(gm))
    small = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Linear(128, 8), nn.Linear(8, 10))
    assert (report.params_before, report.params_after) == (count_params(demo_net), count_params(small))
    # per sample: 14x14x4x9 + 7x7x8x4x9 + 4x4x16x8x9 + 256x16 + 16x10, then with half the channels
    assert report.macs_before == 14 * 14 * 4 * 9 + 7 * 7 * 8 * 4 * 9 + 4 * 4 * 16 * 8 * 9 + 256 * 16 + 160
    assert report.macs_after == 14 * 14 * 2 * 9 + 7 * 7 * 4 * 2 * 9 + 4 * 4 * 8 * 4 * 9 + 128 * 8 + 80
    assert report.channels["features.6"] == (16, 8) and report.channels["classifier.3"] == (10, 10)


def test_nothing_to_do(demo_net, mnist_batch):
    plain = evefx.transform(demo_net, {"passes": []}, X28)
    assert evefx.prune_step(plain) == {}
    same = evefx.compact(plain)
    assert torch.allclose(same(mnist_batch), demo_net(mnist_batch), atol=1e-6)
    gm = evefx.transform(demo_net, {"passes": [{"kind": "prune", "ratio": 0.0}]}, X28)
    assert all(kept == total for kept, total in evefx.prune_step(gm).values())
    small = evefx.compact(gm)
    assert count_params(small) == count_params(demo_net)
    assert torch.allclose(small(mnist_batch), demo_net(mnist_batch), atol=1e-6)


def test_unsupported_coupling_names_the_node():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            return self.fc(torch.softmax(x, dim=1).mean((2, 3)))

    gm = evefx.transform(Mixer(), PRUNE, X16)
    with pytest.raises(PruneError, match=r"node 'softmax'.*softmax maps channels"):
        evefx.prune_step(gm)


def test_hand_set_masks_that_cannot_be_compacted_are_refused():
    gm = evefx.transform(ResLike(), PRUNE, X16)
    masks = {n.meta["evefx"]["layer"]: gm.get_submodule(str(n.target)) for n in marked(gm, "prune")}
    masks["stem.0"].set_mask(torch.tensor([0, 1, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(PruneError, match="disagree on a coupled channel"):
        evefx.compact(gm)
    shuffle = evefx.transform(ShuffleLike(), PRUNE, X16)
    stem = next(shuffle.get_submodule(str(n.target)) for n in marked(shuffle, "prune", layer="stem.0"))
    stem.set_mask(torch.tensor([1, 1, 1, 1, 1, 1, 1, 0]))
    with pytest.raises(PruneError, match="cannot be removed.*chunk"):
        evefx.compact(shuffle)


def test_missing_shapes_are_explained(demo_net):
    gm = evefx.transform(demo_net, PRUNE)  # no example inputs, no trace.input_shape
    with pytest.raises(PruneError, match="example_inputs"):
        evefx.prune_step(gm)
    assert evefx.prune_step(gm, X28)["features.0"] == (2, 4)


def test_batches_that_ran_record_the_shapes(demo_net):
    """Issue 12, item 7: after training batches, prune_step still said "pass example_inputs"."""
    gm = evefx.transform(demo_net, PRUNE)  # no example inputs, no trace.input_shape
    reference = evefx.transform(demo_net, PRUNE, X28)
    gm.train()
    reference.train()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gm(x), reference(x))  # recording the shapes changes nothing the batch computes
    assert evefx.prune_step(gm) == evefx.prune_step(reference)


def test_with_quantization_masks_work_but_compact_refuses_quantized_layers(demo_net, caplog):
    spec = {"passes": [{"kind": "prune"}, {"kind": "quantize", "quantize_inputs": False}]}
    gm = evefx.transform(demo_net, spec, X28)
    assert evefx.prune_step(gm)["features.3"] == (4, 8)
    with pytest.raises(PruneError, match=r"compact cannot slice node 'features_0' \(features.0: QuantConv2d\)"):
        evefx.compact(gm)
    # prune then quantize with quantize_inputs (the default): the next layer's input quantizer is not
    # needed (the mask keeps the previous quantizer's grid), so the masks still work
    gm = evefx.transform(demo_net, {"passes": [{"kind": "prune"}, {"kind": "quantize"}]}, X28)
    assert not any(n.meta.get("evefx", {}).get("role") == "input" and n.meta["evefx"]["layer"] == "features.3" for n in gm.graph.nodes)
    assert evefx.prune_step(gm)["features.3"] == (4, 8)
    # quantizers before the pruners would turn masked zeros into codes: nothing would be prunable, so the
    # spec refuses the order and says which to use (issue 12, item 3)
    with pytest.raises(evefx.SpecError) as err:
        evefx.transform(demo_net, {"passes": [{"kind": "quantize"}, {"kind": "prune"}]}, X28)
    assert str(err.value).splitlines()[1] == (
        "passes[1]: a prune section after a quantize section (passes[0]) cannot prune: the quantizers hide which "
        "channels the pruner zeroes, so prune_step finds nothing to prune; move this section before passes[0] "
        "(prune, then quantize)")


class GroupedLike(nn.Module):
    """ResNeXt-style grouped conv (in = out, 2 groups of 4), then a grouped conv that widens (4 -> 8 per group)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.grouped = _cbr(8, 8, groups=2)
        self.widen = _cbr(8, 16, groups=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.widen(self.grouped(self.stem(x))).mean((2, 3)))


def test_grouped_conv_groups_shrink_together():
    groups = analyze(evefx.transform(GroupedLike(), PRUNE, X16)).groups()
    # stem channel c and c + 4 sit at the same position of the two groups: one class each
    assert groups[0].layers == ("stem.0", "grouped.0") and groups[0].channels == 4
    # the widening conv's inputs are frozen (the groups could not stay equal), and so are its outputs
    assert groups[0].prunable == 0 and "grouped (inputs != outputs)" in groups[0].frozen[0]
    model = GroupedLike()
    model.widen = _cbr(8, 16)  # an ungrouped consumer: now the grouped conv's channels can go
    gm, small = _prune_and_compact(model)
    g = small.get_submodule("grouped.0")
    assert (g.in_channels, g.out_channels, g.groups, tuple(g.weight.shape[:2])) == (4, 4, 2, (4, 2))
    mask = _masks(gm)["stem.0"]
    assert torch.equal(mask[:4], mask[4:]) and int(mask.sum()) == 4


class PreActDense(nn.Module):
    """DenseNet's order: concat -> BatchNorm -> ReLU -> conv. A removed channel reaches the conv as
    the constant relu(BatchNorm(0)), which a 1x1 conv without padding takes into its bias."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.stem = _cbr(3, 4)
        self.grow = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, k, padding=k // 2, bias=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = self.stem(x)
        h = torch.relu(self.norm(torch.cat([s, self.grow(s)], 1)))
        return self.fc(self.conv(h).mean((2, 3)))


def test_constant_after_a_batchnorm_is_folded_into_the_consumer_bias():
    groups = analyze(evefx.transform(PreActDense(), PRUNE, X16)).groups()
    assert [(g.layers, g.prunable) for g in groups][:3] == [(("stem.0",), 4), (("grow",), 4), (("conv",), 6)]
    gm, small = _prune_and_compact(PreActDense())  # allclose to the masked model inside
    conv = small.get_submodule("conv")
    assert conv.in_channels == 4 and conv.bias is not None and small.get_submodule("norm").num_features == 4
    assert gm.get_submodule("conv").bias is None  # the masked model is untouched
    # a padded 3x3 conv sees the constant only inside the borders: those channels stay
    padded = analyze(evefx.transform(PreActDense(k=3), PRUNE, X16)).groups()
    assert padded[0].prunable == 0 and "read by padded conv as a non-zero constant" in padded[0].frozen


def test_constant_fold_goes_into_a_following_batchnorm_when_the_conv_has_no_bias():
    class WithNorm(PreActDense):
        def __init__(self):
            super().__init__()
            self.after = nn.BatchNorm2d(6)

        def forward(self, x):
            s = self.stem(x)
            h = torch.relu(self.norm(torch.cat([s, self.grow(s)], 1)))
            return self.fc(self.after(self.conv(h)).mean((2, 3)))

    gm, small = _prune_and_compact(WithNorm())  # allclose to the masked model inside
    assert small.get_submodule("conv").bias is None and small.get_submodule("conv").in_channels == 4
    keep = _masks(gm)["conv"].bool()
    shifted = small.get_submodule("after").running_mean
    assert shifted.shape == (3,) and not torch.allclose(shifted, gm.get_submodule("after").running_mean[keep])
