"""Channel rules: an op evefx does not know names the node and the rule to register; a registered rule
makes it prunable."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import evefx
from evefx.channels import analyze, register_rule, rules
from evefx.errors import PruneError

from tests.channels.nets import PRUNE, X16


def test_unsupported_coupling_names_the_node():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            return self.fc(torch.cumsum(x, dim=1).mean((2, 3)))

    gm = evefx.transform(Mixer(), PRUNE, X16)
    with pytest.raises(PruneError, match=r"node 'cumsum'.*cumsum maps channels"):
        evefx.prune_step(gm)


class Squared(nn.Module):
    """conv -> pruner -> torch.square -> conv: square keeps a masked zero at zero, but evefx has no rule for it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.square(self.c1(x))).mean((2, 3)))


class Gain(nn.Module):
    """A module evefx does not know (kept a leaf by trace.leaf_modules): one learned scale for all channels."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.gain


class Gained(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gain = Gain()
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.c2(self.gain(self.c1(x))).mean((2, 3)))


GAINED = {"trace": {"leaf_modules": ["Gain"]}, **PRUNE}


@pytest.fixture
def fresh_rules(monkeypatch):
    """register_rule writes into a copy of the default rules, so that no test leaks rules into another."""
    monkeypatch.setattr(rules, "DEFAULT_RULES", rules.DEFAULT_RULES.copy())
    return rules.DEFAULT_RULES


def test_unknown_op_error_says_how_to_register_a_rule():
    with pytest.raises(PruneError) as function:
        evefx.prune_step(evefx.transform(Squared(), PRUNE, X16))
    assert str(function.value) == (
        "cannot prune through node 'square' (call_function square): evefx does not know how square maps channels. "
        "Register a rule for it, e.g. evefx.channels.register_rule(torch.square, evefx.channels.rules.elementwise) "
        "if output channel c is input channel c and 0 stays 0 (see evefx.channels.rules for the others). Add the "
        "layers feeding it to the prune section's select.exclude (e.g. select: {exclude: ['c1']}), or keep that part "
        "opaque with trace.leaf_modules."
    )
    with pytest.raises(PruneError) as module:
        evefx.prune_step(evefx.transform(Gained(), GAINED, X16))
    assert str(module.value).startswith(
        "cannot prune through node 'gain' (gain: Gain): evefx does not know how Gain maps channels. Register a rule "
        "for it, e.g. evefx.channels.register_rule(tests.channels.test_rules.Gain, evefx.channels.rules.elementwise) "
    )


def test_a_registered_rule_makes_an_unknown_op_prunable(fresh_rules):
    model = Squared()
    gm = evefx.transform(model, PRUNE, X16)
    with pytest.raises(PruneError, match="square maps channels"):
        evefx.prune_step(gm)
    register_rule(torch.square, rules.elementwise)
    assert evefx.prune_step(gm) == {"c1": (2, 4), "c2": (3, 6)}
    small = evefx.compact(gm)  # checks small == masked gm on a random input
    assert small.c1.out_channels == 2 and small.c2.in_channels == 2 and small.fc.in_features == 3
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(small(x), gm.eval()(x), atol=1e-5)
    # a module, through the decorator form: Gain scales every channel alike
    gained = evefx.transform(Gained(), GAINED, X16)

    @register_rule(Gain)
    def gain(walk, call):
        return walk.input(call)

    assert fresh_rules.lookup("call_module", Gain()) is gain
    assert evefx.prune_step(gained)["c1"] == (2, 4)
    assert evefx.compact(gained).c2.in_channels == 2


def test_the_default_rules_are_untouched_by_a_registry_of_ones_own():
    gm = evefx.transform(Squared(), PRUNE, X16)
    mine = rules.DEFAULT_RULES.copy()
    mine.register(torch.square, rules.elementwise)
    assert [g.layers for g in analyze(gm, rules=mine).groups()] == [("c1",), ("c2",), ("fc",)]
    assert evefx.prune_step(gm, rules=mine)["c1"] == (2, 4)
    with pytest.raises(PruneError, match="square maps channels"):
        analyze(gm)


def test_lookup_by_class_hierarchy_function_name_and_method(fresh_rules):
    class MyReLU(nn.ReLU):
        pass

    assert fresh_rules.lookup("call_module", MyReLU()) is rules.elementwise  # nn.ReLU's rule, through the MRO
    fresh_rules.register(MyReLU, rules.elementwise_to_constant)
    assert fresh_rules.lookup("call_module", MyReLU()) is rules.elementwise_to_constant
    assert fresh_rules.lookup("call_module", nn.ReLU()) is rules.elementwise
    # a function by its qualified name (its library need not be imported), a tensor method by its name
    fresh_rules.register("torch.square", rules.elementwise)
    assert fresh_rules.lookup("call_function", torch.square) is rules.elementwise
    assert fresh_rules.lookup("call_method", "square") is None
    register_rule("square", rules.elementwise)
    assert fresh_rules.lookup("call_method", "square") is rules.elementwise
    fresh_rules.remove("square")
    assert fresh_rules.lookup("call_method", "square") is None
    with pytest.raises(TypeError, match="nn.Module subclass, a function or a method name"):
        fresh_rules.register(3, rules.elementwise)


def test_an_unknown_tensor_method_is_named_with_the_rule_to_register():
    class Cubed(Squared):
        def forward(self, x):
            return self.fc(self.c2(self.c1(x).pow(3)).mean((2, 3)))

    with pytest.raises(PruneError, match=r"node 'pow_1' \(call_method pow\): evefx does not know how pow maps channels\. "
                                         r"Register a rule for it, e\.g\. evefx\.channels\.register_rule\('pow', "):
        evefx.prune_step(evefx.transform(Cubed(), PRUNE, X16))


def test_a_failing_rule_is_reported_with_its_node():
    def broken(walk, call):
        raise ValueError("boom")

    mine = rules.DEFAULT_RULES.copy()
    mine.register(torch.square, broken)
    with pytest.raises(PruneError, match=r"^channel analysis failed at node 'square' \(call_function square\): boom$") as err:
        analyze(evefx.transform(Squared(), PRUNE, X16), rules=mine)
    assert isinstance(err.value.__cause__, ValueError)
