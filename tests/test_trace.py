"""Tracing: leaves, concrete args, clear errors for untraceable models and wrong shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import evefx
from evefx import ShapeError, TraceError
from evefx.spec import TraceOptions
from evefx.trace import trace


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, double: bool = False):
        y = self.fc(x)
        if double:
            y = y * 2
        return y


def test_untraceable_module_named_with_source_line_and_hint():
    with pytest.raises(TraceError) as info:
        trace(WithGate())
    msg = str(info.value)
    assert "module 'gate' (Gate)" in msg
    assert "test_trace.py" in msg and "if x.sum() > 0" in msg
    assert "trace.leaf_modules" in msg


def test_untraceable_top_level_module_hint_does_not_suggest_making_it_a_leaf():
    """Issue 12, item 12: the old hint said "add 'Gate' to trace.leaf_modules", which cannot work for the root."""
    with pytest.raises(TraceError) as info:
        trace(Gate(), TraceOptions(leaf_modules=("Gate",)))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("torch.fx cannot trace the top-level module (Gate): TraceError: ")
    assert lines[-1] == (
        "  hint: the top-level module cannot be a leaf (evefx must see its layers): move the untraceable code of "
        "Gate.forward into a submodule and add that class to trace.leaf_modules, or fix the data-dependent input "
        "with trace.concrete_args.")


def test_leaf_modules_by_class_name_and_glob():
    for leaf in ("Gate", "gate", "tests.test_trace.Gate"):
        gm = trace(WithGate(), TraceOptions(leaf_modules=(leaf,)))
        assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_transform_with_leaf_keeps_outputs():
    torch.manual_seed(0)
    model = WithGate()
    gm = evefx.transform(model, {"trace": {"leaf_modules": ["Gate"]}})
    x = torch.randn(3, 4)
    assert torch.allclose(gm(x), model(x))


def test_concrete_args_pass_through():
    gm = trace(Flagged(), TraceOptions(concrete_args={"double": True}))
    assert any(n.target is getattr(__import__("operator"), "mul") for n in gm.graph.nodes)


def test_wrong_input_shape_is_a_shape_error(demo_net):
    # issue 12, item 9: one line naming the layer, the shape it got and the shape it expects (no traceback, no meta)
    with pytest.raises(ShapeError) as err:
        evefx.transform(demo_net, {"passes": []}, torch.zeros(2, 3, 28, 28))
    assert str(err.value) == (
        "layer features.0 (Conv2d) got an input of shape (2, 3, 28, 28) but expects (N, 1, H, W); example inputs "
        "(2, 3, 28, 28) do not fit the model: give inputs of the shape it takes (example_inputs, trace.input_shape, "
        "--input-shape)")
    with pytest.raises(ShapeError, match=r"^layer classifier\.1 \(Linear\) got an input of shape \(1, 1024\) but expects \(\.\.\., 256\); "):
        evefx.transform(demo_net, {"passes": []}, torch.zeros(1, 1, 64, 64))
    with pytest.raises(ShapeError, match=r"^the model takes 1 input \(x\), got 2 example inputs; give one example input per argument"):
        evefx.transform(demo_net, {"passes": []}, (torch.zeros(1, 1, 28, 28), torch.zeros(1)))


def test_wrong_input_shape_prints_no_traceback(demo_net, capsys):
    with pytest.raises(ShapeError):
        evefx.transform(demo_net, {"passes": []}, torch.zeros(2, 3, 28, 28))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_input_shape_from_spec_records_shapes(demo_net):
    gm = evefx.transform(demo_net, {"trace": {"input_shape": [1, 1, 28, 28]}})
    conv = next(n for n in gm.graph.nodes if n.target == "features.0")
    assert tuple(conv.meta["tensor_meta"].shape) == (1, 4, 14, 14)


def test_shape_propagation_changes_no_statistics(demo_net):
    demo_net.train()
    before = demo_net.features[1].running_mean.clone()
    gm = evefx.transform(demo_net, {"passes": []}, torch.rand(8, 1, 28, 28))
    assert torch.equal(gm.get_submodule("features.1").running_mean, before) and gm.training and gm.get_submodule("features.1").training


class PresetConv(nn.Conv2d):
    """Only __init__ differs from nn.Conv2d, as torchvision's Conv3DSimple(nn.Conv3d)."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1, bias=False)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2.0 * super().forward(x)


class PresetNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = PresetConv(1, 8), PresetConv(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.a(x))).mean((2, 3))


def test_a_torch_layer_subclass_keeping_its_forward_is_a_layer_to_the_passes():
    # fx traced PresetConv into F.conv2d: 16 of r3d_18's 20 convs were left float by the quantize pass
    torch.manual_seed(0)
    model, x = PresetNet().eval(), torch.rand(2, 1, 8, 8)
    gm = trace(nn.Sequential(PresetConv(1, 8), ScaledConv(8, 8, 1)))
    calls = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert calls[0] == "0" and "1" not in calls  # ScaledConv overrides forward: traced through, as before
    q = evefx.transform(model, {"passes": [{"kind": "quantize"}]}, x)
    assert {type(q.get_submodule(n)).__name__ for n in ("a", "c")} == {"QuantConv2d"}
    p = evefx.transform(model, {"passes": [{"kind": "prune", "ratio": 0.5, "select": {"names": ["a"]}}]}, x)
    evefx.prune_step(p)
    small = evefx.compact(p)
    assert small.get_submodule("a").out_channels == 4 and torch.allclose(small(x), p.eval()(x), atol=1e-6)
