"""NIR export/import (evefx/export/nir.py): graph structure per node type, the parameter mapping on
hand-computed membrane traces, the round trip through ``nir.read`` and ``import_nir``, and the
same file run by simulators evefx did not write (norse, snntorch), spike for spike per layer."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import evefx
from evefx.errors import ExportError
from evefx.export.nir import export_nir, import_nir, spike_traces, to_nir
from evefx.modules.neurons import SpikingNeuron

nir = pytest.importorskip("nir", reason="NIR export needs the 'nir' package (a dependency of evefx)")

ROOT = Path(__file__).resolve().parents[2]
DT = 1e-3


class Net(nn.Module):
    """conv-bn-relu-avgpool, conv(no bias)-bn-relu, flatten, linear-relu, linear: every node type."""

    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.act0 = nn.ReLU()
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        self.conv1 = nn.Conv2d(4, 6, 3, stride=1 if pool else 2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc0 = nn.Linear(54, 12)
        self.act2 = nn.ReLU()
        self.fc1 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.act0(self.bn0(self.conv0(x))))
        x = self.flat(self.act1(self.bn1(self.conv1(x))))
        return self.fc1(self.act2(self.fc0(x)))


def make_net(seed: int = 0, pool: bool = True) -> Net:
    """Weights large enough that every layer fires; BatchNorm with statistics that make folding matter."""
    torch.manual_seed(seed)
    net = Net(pool)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.3)
    return net.eval()


def spiking(model: nn.Module, shape=(1, 1, 12, 12), *, T: int = 6, encoder: str = "poisson", **neuron) -> torch.fx.GraphModule:
    cfg = {"type": "lif", "threshold": 0.3, "reset": 0.0, "tau": 2.0, **neuron}
    spec = {"passes": [{"kind": "spike", "select": {"types": ["Conv1d", "Conv2d", "Linear"]}, "exclude_last": True,
                        "timesteps": T, "encoder": encoder, "neuron": cfg}]}
    return evefx.transform(model, spec, torch.zeros(shape)).eval()


def per_channel_thresholds(gm, low=0.2, high=0.5, seed=1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, SpikingNeuron) and m.threshold.dim() == 1:
                m.threshold.copy_(torch.rand(m.threshold.shape, generator=gen) * (high - low) + low)


def spike_steps(T=6, B=4, shape=(1, 12, 12), p=0.4, seed=0) -> torch.Tensor:
    return (torch.rand(T, B, *shape, generator=torch.Generator().manual_seed(seed)) < p).float()


def by_type(graph, cls) -> list[str]:
    return [k for k, v in graph.nodes.items() if isinstance(v, cls)]


# -- structure -------------------------------------------------------------------------------------
def test_graph_structure_per_node_type():
    net = make_net()
    gm = spiking(net)
    graph = to_nir(gm, dt=DT)
    types = {k: type(v).__name__ for k, v in graph.nodes.items()}
    order = ["input", "conv0", None, "pool", "conv1", None, "flat", "fc0", None, "fc1", "output"]
    chain = ["input"]
    while chain[-1] != "output":
        nxt = [b for a, b in graph.edges if a == chain[-1]]
        assert len(nxt) == 1
        chain.append(nxt[0])
    assert [types[k] for k in chain] == ["Input", "Conv2d", "LIF", "AvgPool2d", "Conv2d", "LIF", "Flatten", "Affine",
                                         "LIF", "Affine", "Output"]
    assert [k for k, want in zip(chain, order) if want] == [w for w in order if w]
    g = graph.nodes
    assert list(g["input"].output_type["output"]) == [1, 12, 12]
    assert list(g["output"].input_type["input"]) == [5]
    assert g["flat"].start_dim == 0 and list(g["flat"].output_type["output"]) == [54]
    assert list(g["pool"].kernel_size) == [2, 2] and list(g["pool"].stride) == [2, 2]
    assert list(g["conv0"].stride) == [2, 2] and list(g["conv0"].padding) == [1, 1]
    lifs = [g[k] for k in chain if types[k] == "LIF"]
    assert [lif.tau.shape for lif in lifs] == [(4, 6, 6), (6, 3, 3), (12,)]
    # BatchNorm folded into the conv before it (conv1 had no bias: the fold gives it one)
    for conv, bn in ((net.conv0, net.bn0), (net.conv1, net.bn1)):
        name = "conv0" if conv is net.conv0 else "conv1"
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
        w = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
        b = (conv.bias.detach().double() if conv.bias is not None else 0) * scale + bn.bias.detach().double() \
            - bn.running_mean.double() * scale
        np.testing.assert_allclose(g[name].weight, w.numpy(), rtol=1e-6)
        np.testing.assert_allclose(g[name].bias, b.numpy(), rtol=1e-5, atol=1e-7)
    assert "bn0" not in graph.nodes and "bn1" not in graph.nodes
    assert graph.metadata["timesteps"] == 6 and graph.metadata["encoder"] == "poisson"
    assert graph.metadata["decoder"] == "mean" and graph.metadata["dt"] == DT


def test_if_neuron_and_linear_without_bias():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    gm = spiking(model, (1, 3), encoder="direct", type="if", reset=0.1, threshold=0.7)
    graph = to_nir(gm, dt=0.5e-3)
    (lin,) = by_type(graph, nir.Linear)
    (iff,) = by_type(graph, nir.IF)
    assert graph.nodes[lin].weight.shape == (4, 3)
    node = graph.nodes[iff]
    np.testing.assert_allclose(node.r, np.full(4, 2000.0))     # r = 1/dt: v += dt r I = I per step
    np.testing.assert_allclose(node.v_reset, np.full(4, 0.1))
    np.testing.assert_allclose(node.v_threshold, np.full(4, 0.7))
    assert by_type(graph, nir.Affine) and graph.metadata["encoder"] == "direct"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.act0 = nn.Linear(6, 8), nn.ReLU()
        self.fc1, self.act1 = nn.Linear(8, 8), nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        a = self.act0(self.fc0(x))
        return self.fc2(torch.flatten(a + self.act1(self.fc1(a)), 1))


def test_residual_add_is_two_edges_into_one_node_and_imports_back():
    torch.manual_seed(0)
    gm = spiking(Residual().eval(), (1, 6), T=5)
    graph = to_nir(gm, dt=DT)
    neurons = by_type(graph, nir.LIF)
    into = sorted(a for a, b in graph.edges if b == "flatten")  # torch.flatten(a + b, 1)
    assert into == sorted(neurons)  # both branches feed the node after the add: NIR sums the edges
    assert isinstance(graph.nodes["flatten"], nir.Flatten)
    back = import_nir(graph)
    steps = spike_steps(5, 3, (6,), p=0.5)
    ours, theirs = spike_traces(gm, steps), spike_traces(back, steps)
    for name in neurons:
        assert torch.equal(ours[name], theirs[name]), name
    torch.testing.assert_close(ours["output"], theirs["output"])


class GlobalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(3, 2)

    def forward(self, x):
        x = self.gap(self.act(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def _round_trips(gm, graph, shape) -> None:
    """import_nir(graph) gives the outputs gm gives, on 4 steps of random spikes."""
    steps = spike_steps(4, 3, shape, p=0.6)
    ours, theirs = spike_traces(gm, steps), spike_traces(import_nir(graph), steps)
    torch.testing.assert_close(ours["output"], theirs["output"])


def test_adaptive_pool_and_view_flatten():
    torch.manual_seed(0)
    gm = spiking(GlobalPool().eval(), (1, 1, 6, 6), T=4)
    graph = to_nir(gm, dt=DT)
    (pool,) = by_type(graph, nir.AvgPool2d)
    assert list(graph.nodes[pool].kernel_size) == [6, 6] and list(graph.nodes[pool].stride) == [6, 6]
    (flat,) = by_type(graph, nir.Flatten)
    assert list(graph.nodes[flat].output_type["output"]) == [3]
    _round_trips(gm, graph, (1, 6, 6))


def test_adaptive_pool_with_none_keeps_that_axis():
    # output_size (None, 2): the height stays, the width is averaged in windows of 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((None, 2)), nn.Flatten(), nn.Linear(36, 2))
    gm = spiking(model.eval(), (1, 1, 6, 6), T=4)
    graph = to_nir(gm, dt=DT)
    (pool,) = by_type(graph, nir.AvgPool2d)
    assert list(graph.nodes[pool].kernel_size) == [1, 3] and list(graph.nodes[pool].stride) == [1, 3]
    _round_trips(gm, graph, (1, 6, 6))


def test_a_depthwise_conv_in_a_residual_block_and_a_spatial_mean_round_trip():
    """A user's block (tests.helpers.ResidualDepthwiseNet): the exporter refused `x.mean((2, 3))` (global
    average pooling written as a mean), and nir 1.0 typed the depthwise conv's input as one channel, so
    its own check rejected the graph."""
    from tests.helpers import ResidualDepthwiseNet

    torch.manual_seed(0)
    gm = spiking(ResidualDepthwiseNet(width=4).eval(), (1, 3, 8, 8), T=4)
    graph = to_nir(gm, dt=DT)
    convs = {k: graph.nodes[k] for k in by_type(graph, nir.Conv2d)}
    assert [int(c.groups) for c in convs.values()] == [1, 1, 8] and list(convs["c3"].input_type["input"]) == [8, 4, 4]
    (pool,) = by_type(graph, nir.AvgPool2d)
    assert list(graph.nodes[pool].kernel_size) == [4, 4]
    (flat,) = by_type(graph, nir.Flatten)
    assert list(graph.nodes[flat].output_type["output"]) == [8]
    _round_trips(gm, graph, (3, 8, 8))


def test_a_mean_over_other_dims_is_refused_with_what_nir_can_do():
    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean(1).flatten(1)[:, :6])

    gm = spiking(ChannelMean().eval(), (1, 1, 6, 6), T=2)
    with pytest.raises(evefx.ExportError, match=r"averages over dims 1 of a 4-D tensor; NIR has global average pooling "
                                                 r"only over the two spatial dims of a \(N, C, H, W\) map"):
        to_nir(gm, dt=DT)


def test_conv1d_with_batchnorm1d_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 2))
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    gm = spiking(model.eval(), (1, 2, 8), T=4)
    graph = to_nir(gm, dt=DT)
    (conv,) = by_type(graph, nir.Conv1d)
    assert graph.nodes[conv].weight.shape == (3, 2, 3) and "1" not in graph.nodes
    steps = spike_steps(4, 3, (2, 8), p=0.5)
    ours, theirs = spike_traces(gm, steps), spike_traces(import_nir(graph), steps)
    (lif,) = by_type(graph, nir.LIF)
    assert 0.0 < float(ours[lif].mean()) < 1.0 and torch.equal(ours[lif], theirs[lif])
    torch.testing.assert_close(ours["output"], theirs["output"])


# -- the parameter mapping, by hand ------------------------------------------------------------------
def euler(node, current: list[float], dt: float) -> tuple[list[float], list[int]]:
    """NIR's IF/LIF equations integrated with forward Euler (one step = dt), from the file's
    parameters alone; membrane starts at v_reset; fires at v >= v_threshold (evefx's rule)."""
    v = float(node.v_reset.flat[0])
    th = float(node.v_threshold.flat[0])
    trace, spikes = [], []
    for i in current:
        if isinstance(node, nir.LIF):
            v = v + dt / float(node.tau.flat[0]) * (float(node.v_leak.flat[0]) - v + float(node.r.flat[0]) * i)
        else:
            v = v + dt * float(node.r.flat[0]) * i
        trace.append(v)
        spikes.append(int(v >= th))
        if spikes[-1]:
            v = float(node.v_reset.flat[0])
    return trace, spikes


@pytest.mark.parametrize("kind, current, T, membrane, fired", [
    # LIF tau 2 (k = 1/2), reset 0.25: h = v + (x - (v - 0.25)) / 2
    ("lif", 1.1, 4, [0.8, 1.075, 0.8, 1.075], [0, 1, 0, 1]),
    # IF, reset 0.25: h = v + x
    ("if", 0.3, 6, [0.55, 0.85, 1.15, 0.55, 0.85, 1.15], [0, 0, 1, 0, 0, 1]),
])
def test_parameter_mapping_on_hand_computed_membrane_traces(kind, current, T, membrane, fired, tmp_path):
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
    gm = spiking(model, (1, 1), T=T, encoder="direct", type=kind, threshold=1.0, reset=0.25, tau=2.0,
                 neuron_wise=False)
    report = export_nir(gm, tmp_path / "n.nir", dt=DT)
    graph = nir.read(tmp_path / "n.nir")
    (name,) = by_type(graph, nir.LIF if kind == "lif" else nir.IF)
    node = graph.nodes[name]
    if kind == "lif":
        assert float(node.tau[0]) == pytest.approx(2.0 * DT, rel=1e-12)
        assert float(node.r[0]) == 1.0 and float(node.v_leak[0]) == 0.25
    else:
        assert float(node.r[0]) == pytest.approx(1.0 / DT, rel=1e-12)
    assert float(node.v_reset[0]) == 0.25 and float(node.v_threshold[0]) == 1.0
    trace, spikes = euler(node, [current] * T, DT)
    assert trace == pytest.approx(membrane, abs=1e-9) and spikes == fired
    steps = torch.full((T, 1, 1), current)
    assert spike_traces(gm, steps)[name].flatten().tolist() == fired
    assert spike_traces(import_nir(report.graph), steps)[name].flatten().tolist() == fired


# -- round trips -------------------------------------------------------------------------------------
def _fields(node) -> dict:
    return {k: v for k, v in vars(node).items() if k not in ("input_type", "output_type", "metadata")}


@pytest.mark.parametrize("neuron", [{"type": "lif"}, {"type": "plif"}, {"type": "if", "reset": -0.1}])
def test_round_trip_through_nir_read_and_import_nir(neuron, tmp_path):
    gm = spiking(make_net(), **neuron)
    per_channel_thresholds(gm)
    report = export_nir(gm, tmp_path / "m.nir", dt=DT)
    assert report.size_bytes == (tmp_path / "m.nir").stat().st_size > 0
    graph = nir.read(tmp_path / "m.nir")
    assert set(graph.nodes) == set(report.graph.nodes) and sorted(graph.edges) == sorted(report.graph.edges)
    for name, node in report.graph.nodes.items():
        read = graph.nodes[name]
        assert type(read) is type(node), name
        for key, value in _fields(node).items():
            np.testing.assert_array_equal(np.asarray(getattr(read, key)), np.asarray(value), err_msg=f"{name}.{key}")
    assert graph.metadata["timesteps"] == 6 and float(graph.metadata["dt"]) == DT

    back = import_nir(tmp_path / "m.nir")
    steps = spike_steps()
    ours, theirs = spike_traces(gm, steps), spike_traces(back, steps)
    neurons = by_type(graph, (nir.LIF, nir.IF))
    assert len(neurons) == 3
    for name in neurons:
        assert 0.0 < float(ours[name].mean()) < 1.0, f"{name} never/always fires: the comparison would be vacuous"
        assert torch.equal(ours[name], theirs[name]), name
    torch.testing.assert_close(ours["output"], theirs["output"], rtol=1e-5, atol=1e-5)


def test_export_does_not_touch_the_model():
    gm = spiking(make_net())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    gm.train()
    rng = torch.get_rng_state()
    to_nir(gm, dt=DT)  # runs the model (Poisson encoder included) once for the shapes
    assert gm.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_dt_that_is_not_a_positive_number_is_an_export_error(tmp_path):
    gm = spiking(make_net())
    for dt in (None, 0.0, -1e-3, "1ms"):
        with pytest.raises(ExportError) as e:
            export_nir(gm, tmp_path / "m.nir", dt=dt)
        assert str(e.value) == f"NIR export: dt must be a number > 0, seconds per step (got {dt!r})"
    assert not (tmp_path / "m.nir").exists()


# -- unsupported: errors that name the node ------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    ({"reset": None}, ["soft reset", "neuron.reset"]),
    ({"binary": False}, ["analog spikes", "binary"]),
])
def test_neurons_nir_cannot_express_raise_export_error(change, words):
    gm = spiking(make_net(), **change)
    with pytest.raises(ExportError) as err:
        to_nir(gm)
    for w in [*words, "conv0"]:
        assert w in str(err.value)


def test_max_pool_non_spiking_mode_and_ann_raise_export_error():
    net = make_net()
    net.pool = nn.MaxPool2d(2)
    with pytest.raises(ExportError, match="pool.*no max pooling.*AvgPool2d"):
        to_nir(spiking(net))
    gm = spiking(make_net())
    evefx.set_mode(gm, spiking=False)
    with pytest.raises(ExportError, match="non-spiking"):
        to_nir(gm)
    ann = evefx.transform(make_net(), {"passes": []}, torch.zeros(1, 1, 12, 12))
    with pytest.raises(ExportError, match="act0.*analog activation"):
        to_nir(ann)


class Gain(nn.Module):
    def forward(self, x):
        return 2.0 * x


def test_a_rule_exports_a_module_evefx_does_not_know():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Gain(), nn.Linear(4, 2))
    spec = {"trace": {"leaf_modules": ["Gain"]},
            "passes": [{"kind": "spike", "select": {"types": ["Linear"]}, "timesteps": 3}]}
    gm = evefx.transform(model, spec, torch.zeros(1, 3)).eval()
    gm(torch.randn(8, 3))  # sets the data-dependent threshold
    with pytest.raises(ExportError, match=r"Gain.*rules=\{Gain: fn\}"):
        to_nir(gm)
    graph = to_nir(gm, rules={Gain: lambda m, shape: nir.Scale(scale=np.full(shape, 2.0, np.float32))})
    (scale,) = by_type(graph, nir.Scale)
    assert list(graph.nodes[scale].scale) == [2.0] * 4


def test_import_rejects_what_evefx_neurons_cannot_run():
    shape = (3,)
    base = dict(tau=np.full(shape, 2e-3), r=np.ones(shape), v_threshold=np.ones(shape), v_reset=np.zeros(shape))
    for bad, match in ((dict(v_leak=np.full(shape, 0.5)), "v_leak differs from v_reset"),
                       (dict(v_leak=np.zeros(shape), tau=np.array([2e-3, 3e-3, 2e-3])), "tau differs")):
        node = nir.LIF(**{**base, **bad})
        graph = nir.NIRGraph.from_list(nir.Input(input_type=np.array(shape)), node, nir.Output(output_type=np.array(shape)))
        with pytest.raises(ExportError, match=match):
            import_nir(graph, dt=1e-3, timesteps=4)


# -- independent simulators ------------------------------------------------------------------------------
def _norse_layers(graph, steps: torch.Tensor, dt: float) -> dict[str, torch.Tensor]:
    """Run the NIR graph with norse's importer (one sample at a time: NIR shapes have no batch
    dim) and record every neuron's spikes and the output, ``[T, B, ...]``."""
    norse = pytest.importorskip("norse.torch", reason="norse (an independent NIR importer) is not installed; "
                                                       "pip install norse 'torch==2.14.1'")
    from norse.torch.module.iaf import IAFCell
    from norse.torch.module.lif_box import LIFBoxCell

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = norse.from_nir(graph, dt=dt, ignore_warnings=True)
    rec: dict[str, list] = {}
    for name, m in net.named_modules():
        if isinstance(m, (LIFBoxCell, IAFCell)):
            m.register_forward_hook(lambda _m, _i, o, name=name: rec.setdefault(name, []).append(o[0].detach()))
    T, B = steps.shape[:2]
    outs = []
    with torch.no_grad():
        for b in range(B):
            state = None
            for t in range(T):
                out, state = net(steps[t, b], state)
                outs.append(out)
    layers = {k: torch.stack(v).reshape(B, T, *v[0].shape).transpose(0, 1) for k, v in rec.items()}
    layers["output"] = torch.stack(outs).reshape(B, T, *outs[0].shape).transpose(0, 1)
    return layers


def _compare(ours: dict, theirs: dict, graph) -> None:
    neurons = by_type(graph, (nir.LIF, nir.IF))
    assert neurons
    for name in neurons:
        key = name.replace(".", "_")
        assert 0.0 < float(ours[name].mean()) < 1.0, f"{name}: no spikes to compare"
        agree = float((ours[name] == theirs[key]).double().mean())
        assert agree == 1.0, f"{name}: {agree:.6f} of the spikes agree"
    torch.testing.assert_close(theirs["output"], ours["output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neuron, encoder", [({"type": "lif"}, "poisson"), ({"type": "plif"}, "poisson"),
                                             ({"type": "if"}, "direct")])
def test_norse_runs_the_file_spike_for_spike(neuron, encoder, tmp_path):
    """norse's importer has no AvgPool2d (it reads SumPool2d only), so this net has no pooling."""
    gm = spiking(make_net(pool=False), encoder=encoder, **neuron)
    per_channel_thresholds(gm)
    export_nir(gm, tmp_path / "m.nir", dt=DT)
    graph = nir.read(tmp_path / "m.nir")
    steps = spike_steps() if encoder == "poisson" else torch.rand(1, 4, 1, 12, 12).expand(6, -1, -1, -1, -1)
    _compare(spike_traces(gm, steps), _norse_layers(graph, steps, DT), graph)


def test_snntorch_runs_the_lif_file_spike_for_spike(tmp_path):
    """snntorch's importer assumes dt = 1e-4, a reset to 0, v_leak 0 and one threshold per layer;
    its IF import adds a leak (beta 0.9), so only LIF is compared."""
    snn = pytest.importorskip("snntorch", reason="snntorch (an independent NIR importer) is not installed")
    from snntorch.import_nir import import_from_nir

    gm = spiking(make_net())
    export_nir(gm, tmp_path / "m.nir", dt=1e-4)
    graph = nir.read(tmp_path / "m.nir")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-scaling warnings
        net = import_from_nir(nir.read(tmp_path / "m.nir"))
    rec: dict[str, list] = {}
    for name, m in net.named_modules():
        if isinstance(m, snn.Leaky):
            m.register_forward_hook(lambda _m, _i, o, name=name: rec.setdefault(name, []).append(o.detach()))
    steps = spike_steps()
    T, B = steps.shape[:2]
    outs = []
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        for b in range(B):
            for m in net.modules():
                if isinstance(m, snn.Leaky):
                    m.reset_hidden()
            for t in range(T):
                outs.append(net(steps[t, b])[0])
    theirs = {k: torch.stack(v).reshape(B, T, *v[0].shape).transpose(0, 1) for k, v in rec.items()}
    theirs["output"] = torch.stack(outs).reshape(B, T, *outs[0].shape).transpose(0, 1)
    _compare(spike_traces(gm, steps), theirs, graph)


# -- the command line ------------------------------------------------------------------------------------
def test_cli_export_format_nir(tmp_path):
    from evefx.cli import app

    out = tmp_path / "demo.nir"
    result = CliRunner().invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec",
                                      str(ROOT / "examples/specs/spiking.yaml"), "--out", str(out), "--format", "nir",
                                      "--dt", "0.002"])
    assert result.exit_code == 0, result.output
    graph = nir.read(out)
    assert len(by_type(graph, nir.LIF)) == 4 and len(by_type(graph, nir.Conv2d)) == 3
    assert float(graph.metadata["dt"]) == 0.002
    assert float(next(iter(graph.nodes[by_type(graph, nir.LIF)[0]].tau.flat))) == pytest.approx(2 * 0.002)
    bad = CliRunner().invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec",
                                   str(ROOT / "examples/specs/spiking.yaml"), "--out", str(out), "--format", "tflite"])
    assert bad.exit_code != 0 and "--format must be onnx or nir" in bad.output


def test_a_threshold_never_set_is_refused_before_the_shape_run_sets_it():
    # the shape run on the example input (often zeros) would have set it and written that to the file
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gm = evefx.transform(model, {"passes": [{"kind": "spike", "timesteps": 3}]}, torch.zeros(1, 3)).eval()
    with pytest.raises(ExportError, match=r"^0_neuron: the data-dependent threshold \(threshold_std\) was never set"):
        to_nir(gm)
    assert not bool(gm.get_submodule("0_neuron").threshold_ready)  # refused before anything ran
    gm(torch.randn(8, 3))
    assert to_nir(gm) is not None


def test_the_gains_of_weight_scale_no_bn_are_folded_back_into_the_weights():
    """Linears without BatchNorm are stored x0.577 with a gain of 1/0.577 on the neuron or decoder
    reading them; NIR has no scaling node, so the file holds the weights the network computes with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = evefx.transform(model, {"passes": [{"kind": "spike", "timesteps": 4, "encoder": "direct"}]},
                         torch.rand(2, 1, 4, 4))
    assert float(gm.get_submodule("1_neuron").input_gain) == pytest.approx(1 / 0.577)
    gm(torch.rand(2, 1, 4, 4))  # the data-dependent thresholds
    graph = to_nir(gm, dt=DT)
    for name, layer in (("1", model[1]), ("3", model[3])):
        np.testing.assert_allclose(graph.nodes[name].weight, layer.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(graph.nodes[name].bias, layer.bias.detach().numpy(), rtol=1e-6, atol=1e-7)
