"""SectionPass.mark/marked/ensure_marked_are: a pass records and checks its own provenance."""
from __future__ import annotations

import pytest
from torch import nn

from evefx import PassError, load_spec
from evefx.graph import provenance
from evefx.modules import SpikingNeuron
from evefx.passes.spike import SpikePass
from evefx.pipeline import EveModule
from evefx.trace import trace


def test_mark_records_this_pass_and_marked_finds_it_back(demo_net):
    gm = trace(demo_net, cls=EveModule)
    spike = SpikePass(load_spec({"passes": [{"kind": "spike"}]}).passes[0], "passes[0]")
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "features.0")
    spike.mark(node, "features.0", "neuron", channel_axis=1)
    prov = provenance(node)
    assert (prov.pass_name, prov.layer, prov.spec_path, prov.role, prov.channel_axis) == (
        "spike", "features.0", "passes[0]", "neuron", 1)
    assert spike.marked(gm, "features.0") == [node] == spike.marked(gm, role="neuron")
    assert spike.marked(gm, "features.3") == [] and spike.marked(gm, role="encoder") == []


def test_ensure_marked_are_names_the_node_and_the_module_it_found(demo_net):
    gm = trace(demo_net, cls=EveModule)
    spike = SpikePass(load_spec({"passes": [{"kind": "spike"}]}).passes[0], "passes[0]")
    spike.ensure_marked_are(gm, "neuron", (SpikingNeuron,), "a neuron")  # nothing marked: holds
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d))
    spike.mark(node, str(node.target), "neuron")
    with pytest.raises(PassError) as err:
        spike.ensures(gm)
    assert str(err.value) == (f"passes[0]: {node.target} is marked as a neuron but is a Conv2d; "
                              "report a bug with this message")
