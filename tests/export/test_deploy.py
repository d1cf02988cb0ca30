"""deployable (evefx/export/deploy.py): the one step before every export and latency measurement."""
from __future__ import annotations

import torch
from torch import nn

import evefx
import evefx.channels
from evefx.export import Deployed, deployable, export_onnx
from evefx.export.qdq import QDQ, QuantizedWeightLayer
from evefx.modules.prune import ChannelPruner
from evefx.upgrade.costs import measure_latency
from examples.models import DemoNet

X0 = torch.zeros(1, 1, 28, 28)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _pruned() -> evefx.EveModule:
    torch.manual_seed(0)
    gm = evefx.transform(DemoNet(), "examples/specs/prune.yaml", X0)
    evefx.prune_step(gm)
    return gm.eval()


def test_nothing_to_deploy_is_a_plain_copy():
    """A float model without pruners or spiking modules: an eval copy computing the same, nothing swapped."""
    torch.manual_seed(0)
    net = DemoNet().train()
    deployed = deployable(net)
    assert isinstance(deployed, Deployed) and deployed.source is net and deployed.model is not net
    assert deployed.channels_removed == 0 and deployed.stand_ins == () and not deployed.quantized
    assert not deployed.model.training and net.training  # the user's train flag stays
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(deployed.model(x), net.eval()(x))


def test_pruned_model_is_compacted_once_and_left_untouched(monkeypatch):
    gm = _pruned()
    before = _state(gm)
    masked = sum(int((m.mask == 0).sum()) for m in gm.modules() if isinstance(m, ChannelPruner))
    assert masked > 0
    deployed = deployable(gm)
    assert deployed.channels_removed == masked
    assert not any(isinstance(m, ChannelPruner) for m in deployed.model.modules())
    assert sum(p.numel() for p in deployed.model.parameters()) < sum(p.numel() for p in gm.parameters())
    x = torch.rand(8, 1, 28, 28)
    assert torch.allclose(deployed.model(x), gm(x), atol=1e-5)
    after = _state(gm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # measure_latency deploys once and hands the result to export_onnx, which does not compact again
    calls = []
    real = evefx.channels.compact
    monkeypatch.setattr(evefx.channels, "compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert measure_latency(gm, (X0,), repeats=2) > 0
    assert len(calls) == 1


def test_quantized_model_gets_stand_ins_and_exports_the_same_from_either_form(tmp_path):
    torch.manual_seed(0)
    gm = evefx.transform(DemoNet(), {"passes": [{"kind": "quantize", "quantize_output": True}]}, X0)
    evefx.calibrate(gm, [torch.rand(16, 1, 28, 28)])
    gm.eval()
    deployed = deployable(gm)
    assert deployed.quantized
    swapped = {name: type(deployed.model.get_submodule(name)) for name in deployed.stand_ins}
    assert set(swapped.values()) == {QDQ, QuantizedWeightLayer}
    assert {n for n, t in swapped.items() if t is QuantizedWeightLayer} == {
        n for n, m in gm.named_modules() if hasattr(m, "weight_quantizer")}
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        diff = (deployed.model(x) - gm(x)).abs()
    # the same codes; a tie may round the other way (BatchNorm folded in another float order): one output step
    step = float(gm.get_submodule("classifier_3_act_quant").qparams()[0])
    assert float(diff.max()) <= step * 1.001 and float((diff > 1e-6).float().mean()) < 0.05
    a = export_onnx(gm, X0, tmp_path / "a.onnx", check=False, kernels=False)
    b = export_onnx(deployed, X0, tmp_path / "b.onnx", check=False, kernels=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.rewrites == b.rewrites and a.bits == b.bits
