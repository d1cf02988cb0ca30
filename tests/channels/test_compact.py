"""compact: sizes against a net built small by hand, the nothing-to-do case, masks it refuses, quantized
layers it slices (and the constant fold it refuses there), and a constant folded into a following BatchNorm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import evefx
from evefx.channels import compact_report, count_params
from evefx.errors import PruneError
from evefx.graph import marked
from evefx.modules.neurons import SpikingNeuron

from tests.channels.nets import PRUNE, X16, X28, PreActDense, ResLike, ShuffleLike, masks_of, prune_and_compact


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


@pytest.mark.parametrize("weight", [{"bits": 8}, {"bits": 4, "fn": "lsq", "scale_domain": "log"}])
def test_a_pruned_then_quantized_model_compacts_with_its_weight_grids_and_folded_batchnorms(demo_net, weight):
    """compact refused quantized layers ('prune and compact before quantizing'), so a pruned and quantized
    model exported its masks as multiplications over the full-size int8 layers."""
    from evefx.modules import QuantConv2d

    spec = {"passes": [{"kind": "prune"}, {"kind": "quantize", "quantize_inputs": False, "weight": weight}]}
    gm = evefx.transform(demo_net, spec, X28)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    gm.train()
    gm(x)
    gm.eval()
    assert evefx.prune_step(gm)["features.3"] == (4, 8)
    kept = gm.get_submodule("features_5_pruner").mask.bool()  # after features.3's ReLU
    before = gm.get_submodule("features.3")
    small = evefx.compact(gm)
    conv = small.get_submodule("features.3")
    assert isinstance(conv, QuantConv2d) and conv.out_channels == 4 and conv.bn.num_features == 4
    q, q0 = conv.weight_quantizer, before.weight_quantizer
    assert q.num_channels == 4 and q.scale.shape == (4,) and q.range_max.shape == (4,)
    assert torch.equal(q.scale.detach(), q0.scale.detach()[kept]) and torch.equal(conv.bn.running_var, before.bn.running_var[kept])
    # each kept channel quantizes as before (summing fewer channels may round the last float bit differently)
    torch.testing.assert_close(small(x), gm(x), atol=1e-6, rtol=0)
    assert before.out_channels == 8  # gm untouched


def test_pruning_then_quantizing_keeps_the_masks_working(demo_net):
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


def test_constant_fold_goes_into_a_following_batchnorm_when_the_conv_has_no_bias():
    class WithNorm(PreActDense):
        def __init__(self):
            super().__init__()
            self.after = nn.BatchNorm2d(6)

        def forward(self, x):
            s = self.stem(x)
            h = torch.relu(self.norm(torch.cat([s, self.grow(s)], 1)))
            return self.fc(self.after(self.conv(h)).mean((2, 3)))

    gm, small = prune_and_compact(WithNorm())  # allclose to the masked model inside
    assert small.get_submodule("conv").bias is None and small.get_submodule("conv").in_channels == 4
    keep = masks_of(gm)["conv"].bool()
    shifted = small.get_submodule("after").running_mean
    assert shifted.shape == (3,) and not torch.allclose(shifted, gm.get_submodule("after").running_mean[keep])


def test_a_pruned_spiking_network_compacts_with_its_per_channel_thresholds(demo_net, mnist_batch, tmp_path):
    # neurons keep one threshold per channel (neuron_wise, the default): compact refused to cut through them
    spec = {"passes": [{"kind": "prune", "ratio": 0.5},
                       {"kind": "spike", "timesteps": 3, "encoder": "direct", "neuron": {"reset": 0.0, "threshold": 0.1}}]}
    gm = evefx.transform(demo_net, spec, mnist_batch[:1]).eval()
    gen = torch.Generator().manual_seed(0)
    for m in gm.modules():  # distinct thresholds per channel, low enough that every layer fires
        if isinstance(m, SpikingNeuron):
            m.threshold.copy_(torch.rand(m.threshold.shape, generator=gen) * 0.1 + 0.02)
    evefx.prune_step(gm)
    small = evefx.compact(gm.eval()).eval()
    neuron = small.get_submodule("features_0_neuron")
    conv = small.get_submodule("features.0")
    assert neuron.threshold.shape == (conv.out_channels,) == (2,) and neuron.channels == 2
    kept = torch.nonzero(masks_of(gm)["features.0"]).flatten()
    assert torch.equal(neuron.threshold, gm.get_submodule("features_0_neuron").threshold[kept])
    out = gm(mnist_batch)
    assert out.std(0).max() > 0 and torch.allclose(small(mnist_batch), out, atol=1e-6)  # the same network
    graph = evefx.export_nir(gm, tmp_path / "pruned.nir", mnist_batch[:1]).graph  # compacts as export_onnx does
    assert graph.nodes["features_0_neuron"].v_threshold.shape[0] == 2


def test_a_removed_constant_channel_folds_into_a_quantized_layer_exactly(tmp_path):
    """compact refused it ('prune and compact before quantizing'), so such a model exported with masks."""
    torch.manual_seed(0)
    # a BatchNorm after the ReLU (not foldable) turns a pruned zero into a constant the next conv reads
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    net[2].bias.data.uniform_(0.5, 1.0)
    gm = evefx.transform(net, {"trace": {"input_shape": [1, 1, 8, 8]},
                               "passes": [{"kind": "prune", "ratio": 0.5}, {"kind": "quantize"}]})
    gm.train()
    gm(torch.rand(8, 1, 8, 8))
    gm.eval()
    evefx.prune_step(gm)
    small = evefx.compact(gm).eval()
    assert small.get_submodule("3").in_channels == 4
    x = torch.rand(64, 1, 8, 8)
    out = gm(x)
    assert out.std(0).max() > 0 and torch.equal(small(x), out)  # the share of the removed channels is whole int32 steps
    report = evefx.export_onnx(gm, x[:1], tmp_path / "m.onnx", real_inputs=x)
    assert report.passed
