"""The same flow with the model on a GPU: transform, a training step, calibration, export (which
checks on the CPU). Runs only where CUDA is present (the `device` machine); skipped elsewhere."""
from __future__ import annotations

import pytest
import torch

import evefx
from evefx.export import calibrate, export_onnx
from examples.models import DemoNet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

SPECS = {
    "quantize": {"kind": "quantize"},
    "spike": {"kind": "spike", "timesteps": 4, "encoder": "direct", "neuron": {"type": "lif"}},
    "prune": {"kind": "prune", "exclude_last": True, "ratio": 0.5},
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_transform_train_and_export_with_the_model_on_cuda(kind, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    gm = evefx.transform(DemoNet().cuda(), {"passes": [SPECS[kind]]}, x[:1])
    assert all(p.is_cuda for p in gm.parameters())
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(gm.train()(x), y)
    loss.backward()
    opt.step()
    if kind == "prune":
        evefx.prune_step(gm)
        assert all(p.is_cuda for p in evefx.compact(gm).parameters())
    calibrate(gm, [x])
    report = export_onnx(gm, x[:1], tmp_path / "m.onnx", real_inputs=torch.rand(64, 1, 28, 28, device="cuda"),
                         kernels=False)
    assert report.passed
    assert all(p.is_cuda for p in gm.parameters())  # the user's model stays where it was
