"""The prune pass: a ChannelPruner after each selected layer's output block, idempotent, the user's
model untouched. prune_step, the channel analysis and compact are tested in tests/channels/."""
from __future__ import annotations

import copy

import torch
from torch import nn

import evefx
from evefx.graph import marked

PRUNE = {"passes": [{"kind": "prune", "ratio": 0.5}]}
X28 = torch.zeros(1, 1, 28, 28)


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


def test_a_quantizer_between_a_pruner_and_the_next_layer_keeps_pruned_channels_at_zero():
    """prune then quantize: the classifier's input quantizer was taken to turn a pruned channel into data,
    so prune_step froze every channel feeding the classifier ('read by fc without passing a pruner') and a
    search over those ratios pruned nothing. A quantizer maps 0 to exactly 0 (its zero point is a code)."""
    from evefx.modules import Quantizer
    from tests.helpers import ResidualDepthwiseNet

    torch.manual_seed(0)
    gm = evefx.transform(ResidualDepthwiseNet(), {"trace": {"input_shape": [1, 3, 16, 16]}, "passes": [
        {"kind": "prune", "criterion": "l1_norm", "ratio": 0.5},
        {"kind": "quantize", "activation": {"bits": 4}}]})
    assert isinstance(gm.get_submodule("fc_input_quant"), Quantizer)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm.train()
    gm(x)  # ranges
    gm.eval()
    assert evefx.prune_step(gm) == {"c1": (8, 16), "c2": (16, 32), "c3": (16, 32)}
    seen = []
    gm.get_submodule("fc").register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        gm(x)
    pruned = ~gm.get_submodule("relu_1_pruner").mask.bool()
    assert int(pruned.sum()) == 16 and torch.equal(seen[0][:, pruned], torch.zeros(8, 16))
