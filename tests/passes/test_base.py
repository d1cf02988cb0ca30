"""Pass infrastructure: PassResult, Sequential, error wrapping, the section -> pass registry."""
from __future__ import annotations

import pytest
import torch
from torch import fx

from evefx import PassError, PlanError, load_spec
from evefx.passes import PASS_FOR_SECTION, Pass, PassResult, Sequential, pass_class
from evefx.passes.base import SectionPass
from evefx.spec import SECTION_TYPES
from evefx.pipeline import EveModule
from evefx.trace import trace
from tests.probe import Probe, ProbePass


def probe_pass(section=None):
    section = load_spec({"passes": [section or {"kind": "quantize"}]}).passes[0]
    return ProbePass(section, "passes[0]")


def test_every_section_type_has_a_pass():
    assert set(PASS_FOR_SECTION) == set(SECTION_TYPES)
    for section_type in SECTION_TYPES:
        cls = pass_class(section_type)
        assert issubclass(cls, SectionPass)
        assert cls.name == section_type.model_fields["kind"].annotation.__args__[0]


def test_unknown_section_type_names_valid_kinds():
    with pytest.raises(PassError, match="valid kinds: prune, quantize, spike"):
        pass_class(dict)


def test_sequential_runs_in_order_and_is_idempotent(demo_net, mnist_batch):
    gm = trace(demo_net, cls=EveModule)
    result = Sequential([probe_pass()])(gm)
    assert result.modified and [c.layer for c in result.changes] == ["features.0", "features.3", "features.6", "classifier.1", "classifier.3"]
    assert all(c.action == "inserted" and c.spec_path == "passes[0]" for c in result.changes)
    assert torch.allclose(result.graph_module(mnist_batch), demo_net(mnist_batch))
    again = Sequential([probe_pass()])(result.graph_module)
    assert not again.modified and again.changes == ()
    probes = [m for m in again.graph_module.modules() if isinstance(m, Probe)]
    assert len(probes) == 5


def test_unexpected_failure_becomes_pass_error_naming_node(demo_net):
    class Broken(ProbePass):
        def call(self, gm):
            self.current_node = next(iter(self.plan(gm).values())).node
            raise ZeroDivisionError("boom")

    gm = trace(demo_net, cls=EveModule)
    section = load_spec({"passes": [{"kind": "quantize"}]}).passes[0]
    with pytest.raises(PassError, match=r"passes\[0\]: the probe pass failed at node 'features_0' \(features\.0: Conv2d\): ZeroDivisionError: boom") as info:
        Sequential([Broken(section, "passes[0]")])(gm)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_evefx_errors_pass_through(demo_net):
    gm = trace(demo_net, cls=EveModule)
    with pytest.raises(PlanError):
        Sequential([probe_pass({"kind": "quantize", "select": {"names": ["zzz"]}})])(gm)


def test_pre_and_postconditions_run(demo_net):
    calls = []

    class Checked(Pass):
        def requires(self, gm):
            calls.append("requires")

        def ensures(self, gm):
            calls.append("ensures")

        def call(self, gm):
            calls.append("call")
            return PassResult(gm, False)

    Checked()(fx.symbolic_trace(demo_net))
    assert calls == ["requires", "call", "ensures"]


@pytest.mark.parametrize("kind, state", [("quantize", "quantized"), ("spike", "spiking"), ("prune", "given a pruner")])
def test_a_second_section_over_the_same_layers_warns_that_it_changes_nothing(kind, state):
    """Two sections of one kind over the same layers: the second was a silent no-op (its settings,
    e.g. other bits, never applied). Sections over different layers, and the same spec applied
    again to its own result (idempotent by design), stay silent."""
    import warnings

    import evefx
    from evefx.errors import EvefxWarning
    from examples.models import DemoNet

    x = torch.zeros(1, 1, 28, 28)
    second = {"kind": kind, "select": {"names": ["features.3", "features.6"]}}
    with pytest.warns(EvefxWarning) as caught:
        evefx.transform(DemoNet(), {"schema_version": 1, "passes": [{"kind": kind}, second]}, x)
    assert [str(w.message) for w in caught] == [
        f"passes[1]: features.3, features.6 are already {state} by passes[0], so this section leaves them as they are; "
        "give passes[0] other settings for some layers with its overrides, or select.names the layers each section takes"]
    first = {"kind": kind, "select": {"names": ["features.*"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvefxWarning)
        spec = {"schema_version": 1, "passes": [first, {**second, "select": {"names": ["classifier.1"]}}]}
        gm = evefx.transform(DemoNet(), spec, x)
        assert not evefx.transform(gm, spec, x).report.modified
