"""The shared graph-edit vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.graph import insert_after, insert_before_output, layer_nodes, marked, mark, output_block, remove_node, to_networkx


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        z = self.conv2(y)
        return z + y  # conv2's output has one user; y has two


def test_output_block_follows_bn_and_functional_relu():
    gm = fx.symbolic_trace(FunctionalNet())
    conv, conv2 = layer_nodes(gm)
    block = output_block(gm, conv)
    assert block.bn.target == "bn" and block.act.target is F.relu and block.last is block.act
    block2 = output_block(gm, conv2)
    assert block2.bn is None and block2.act is None and block2.last is conv2


def test_output_block_stops_at_branch(demo_net):
    gm = fx.symbolic_trace(demo_net)
    blocks = [output_block(gm, n) for n in layer_nodes(gm)]
    assert [b.last.target for b in blocks] == ["features.2", "features.5", "features.8", "classifier.2", "classifier.3"]


def test_insert_after_reroutes_all_users_and_keeps_output():
    torch.manual_seed(0)
    net = FunctionalNet().eval()
    gm = fx.symbolic_trace(net)
    last = output_block(gm, layer_nodes(gm)[0]).last
    new = insert_after(gm, last, nn.Identity(), "probe.here")
    assert set(u.name for u in last.users) == {new.name}
    assert len(new.users) == 2
    gm.graph.lint()
    gm.recompile()
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(gm(x), net(x))
    assert hasattr(gm, "probe_here")


def test_insert_before_output_and_remove_node():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.Identity()))
    (wrapped,) = insert_before_output(gm, nn.ReLU, "out")
    ident = next(n for n in gm.graph.nodes if n.target == "1")
    remove_node(gm, ident)
    gm.recompile()
    assert not hasattr(gm, "1") or not isinstance(getattr(gm, "1"), nn.Identity)
    assert (gm(torch.randn(5, 3)) >= 0).all()
    assert wrapped.args[0].target == "0"


def test_mark_and_networkx(demo_net):
    gm = fx.symbolic_trace(demo_net)
    first = layer_nodes(gm)[0]
    mark(first, pass_name="x", layer="features.0", spec_path="passes[0]", role="weight")
    assert marked(gm, "x") == [first] and marked(gm, "y") == [] and marked(gm, role="weight") == [first]
    g = to_networkx(gm)
    assert g.nodes[first.name]["module_type"] == "Conv2d"
    assert "x" in {n for n in g.predecessors(first.name)}


def test_provenance_is_typed_and_survives_pickling():
    import pickle

    import pytest

    import evefx
    from evefx.graph import Provenance, provenance
    from examples.models import DemoNet

    gm = evefx.transform(DemoNet(), {"passes": [{"kind": "quantize"}]}, torch.zeros(1, 1, 28, 28))
    node = marked(gm, "quantize", role="activation")[0]
    prov = provenance(node)
    assert isinstance(prov, Provenance) and (prov.pass_name, prov.role, prov.channel_axis) == ("quantize", "activation", 1)
    assert prov["pass"] == "quantize" and prov["layer"] == prov.layer and prov.get("missing", 7) == 7
    with pytest.raises(KeyError):
        prov["missing"]
    with pytest.raises(ValueError, match="a provenance role is a non-empty string"):
        Provenance("quantize", "fc", "passes[0]", "")
    again = pickle.loads(pickle.dumps(gm))
    assert [provenance(n) for n in marked(again)] == [provenance(n) for n in marked(gm)]
