"""The channel analysis: coupled groups on residual, concat, shuffle, squeeze-excite, grouped and
pre-activation graphs and torchvision resnet18, frozen channels with their reasons (each checked
against a compacted model that must equal the masked one), and the missing-shapes error."""
from __future__ import annotations

import pytest
import torch
import torchvision

import evefx
from evefx.channels import analyze, compact_report, count_macs, count_params
from evefx.errors import PruneError

from tests.channels.nets import (PRUNE, X16, X28, DenseLike, GroupedLike, PreActDense, ResLike, SELike, ShuffleLike, cbr,
                                masks_of, prune_and_compact)


def test_residual_channels_share_one_mask_and_compact_equals_masked():
    groups = analyze(evefx.transform(ResLike(), PRUNE, X16)).groups()
    assert [g.layers for g in groups] == [("stem.0", "b1.1", "b2.1"), ("b1.0.0",), ("b2.0.0",), ("fc",)]
    assert [g.prunable for g in groups] == [8, 8, 8, 0] and groups[-1].frozen == ("model output",)
    gm, small = prune_and_compact(ResLike())
    masks = masks_of(gm)
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
    gm, small = prune_and_compact(DenseLike())
    masks = masks_of(gm)
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
    gm, small = prune_and_compact(ShuffleLike())
    dw = small.get_submodule("branch.1")
    assert dw.in_channels == dw.out_channels == dw.groups == 2 and small.get_submodule("branch.3.0").in_channels == 2
    assert small.get_submodule("stem.0").out_channels == 8 and small.get_submodule("head.0").in_channels == 8 and small.get_submodule("head.0").out_channels == 8


def test_squeeze_excite_product_couples_the_expand_conv():
    groups = analyze(evefx.transform(SELike(), PRUNE, X16)).groups()
    assert [g.layers for g in groups][:2] == [("stem.0", "expand"), ("reduce",)]
    gm, small = prune_and_compact(SELike())
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
    gm, small = prune_and_compact(model, x=x)
    report = compact_report(small)
    assert small.get_submodule("layer4.1.conv2").out_channels == 256 and small.fc.in_features == 256
    assert 3.5 < report.params_before / report.params_after < 4.1  # half the channels: about a quarter of the weights
    assert report.macs_before == count_macs(gm) and report.macs_after == count_macs(small)


def test_grouped_conv_groups_shrink_together():
    groups = analyze(evefx.transform(GroupedLike(), PRUNE, X16)).groups()
    # stem channel c and c + 4 sit at the same position of the two groups: one class each
    assert groups[0].layers == ("stem.0", "grouped.0") and groups[0].channels == 4
    # the widening conv's inputs are frozen (the groups could not stay equal), and so are its outputs
    assert groups[0].prunable == 0 and "grouped (inputs != outputs)" in groups[0].frozen[0]
    model = GroupedLike()
    model.widen = cbr(8, 16)  # an ungrouped consumer: now the grouped conv's channels can go
    gm, small = prune_and_compact(model)
    g = small.get_submodule("grouped.0")
    assert (g.in_channels, g.out_channels, g.groups, tuple(g.weight.shape[:2])) == (4, 4, 2, (4, 2))
    mask = masks_of(gm)["stem.0"]
    assert torch.equal(mask[:4], mask[4:]) and int(mask.sum()) == 4


def test_constant_after_a_batchnorm_is_folded_into_the_consumer_bias():
    groups = analyze(evefx.transform(PreActDense(), PRUNE, X16)).groups()
    assert [(g.layers, g.prunable) for g in groups][:3] == [(("stem.0",), 4), (("grow",), 4), (("conv",), 6)]
    gm, small = prune_and_compact(PreActDense())  # allclose to the masked model inside
    conv = small.get_submodule("conv")
    assert conv.in_channels == 4 and conv.bias is not None and small.get_submodule("norm").num_features == 4
    assert gm.get_submodule("conv").bias is None  # the masked model is untouched
    # a padded 3x3 conv sees the constant only inside the borders: those channels stay
    padded = analyze(evefx.transform(PreActDense(k=3), PRUNE, X16)).groups()
    assert padded[0].prunable == 0 and "read by padded conv as a non-zero constant" in padded[0].frozen


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
