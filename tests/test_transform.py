"""evefx.transform: copies, keeps the call signature and outputs, reports, round-trips state."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torchvision
from torch import nn

import evefx
from evefx import EvefxError
from evefx.pipeline import EveModule

TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_preserve_computation(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.rand(1, 3, 64, 64)
    gm = evefx.transform(model, {"passes": []}, x)
    assert isinstance(gm, EveModule) and not gm.report.modified
    assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_user_model_is_never_touched(demo_net, mnist_batch):
    before = copy.deepcopy(demo_net.state_dict())
    expected = demo_net(mnist_batch)
    evefx.transform(demo_net, {"passes": []}, mnist_batch)
    assert all(torch.equal(before[k], v) for k, v in demo_net.state_dict().items())
    assert torch.equal(demo_net(mnist_batch), expected)
    assert type(demo_net).__name__ == "DemoNet"


class TwoInOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x, y, scale: float = 1.0):
        return {"first": self.a(x) * scale, "pair": (self.b(y), x.sum())}


def test_call_signature_and_output_structure():
    torch.manual_seed(0)
    model = TwoInOut()
    gm = evefx.transform(model, {"passes": []})
    assert list(inspect.signature(gm.forward).parameters) == ["x", "y", "scale"]
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    out, ref = gm(x, y, 2.0), model(x, y, 2.0)
    assert set(out) == {"first", "pair"} and isinstance(out["pair"], tuple)
    assert torch.allclose(out["first"], ref["first"]) and torch.allclose(out["pair"][0], ref["pair"][0])


def test_spec_and_report_survive_deepcopy(demo_net):
    gm = evefx.transform(demo_net, {"trace": {"input_shape": [1, 1, 28, 28]}})
    clone = copy.deepcopy(gm)
    assert clone.spec == gm.spec and clone.report.to_dict() == gm.report.to_dict()
    assert gm.report.to_dict()["params_before"] == sum(p.numel() for p in demo_net.parameters())


def test_transforming_a_transformed_module_changes_nothing(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, {"passes": []})
    again = evefx.transform(gm, gm.spec)
    assert not again.report.modified and again is not gm
    assert torch.allclose(again(mnist_batch), gm(mnist_batch))


def test_not_a_module():
    with pytest.raises(EvefxError, match="needs a torch.nn.Module"):
        evefx.transform(lambda x: x, {"passes": []})


def test_bad_spec_is_spec_error_before_anything_else(demo_net):
    with pytest.raises(evefx.SpecError):
        evefx.transform(demo_net, {"passes": [{"kind": "quantize", "weight": {"bits": 99}}]})


def test_pickle_round_trip_keeps_provenance_and_outputs(demo_net, mnist_batch):
    import io
    import pickle

    from tests.helpers import probe_model

    gm = probe_model(demo_net)
    gm.meta["evefx_spec"] = evefx.load_spec({"passes": [{"kind": "prune"}]})
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert isinstance(back, EveModule) and back.spec == gm.spec
    assert [p.name for p in evefx.eve_parameters(back)] == [p.name for p in evefx.eve_parameters(gm)]
    assert torch.equal(back(mnist_batch), gm(mnist_batch))
    clone = pickle.loads(pickle.dumps(gm))
    assert evefx.observe(clone).row("features.0")["macs"] == 4 * 14 * 14 * 9


REAL_SPECS = {
    "quantize": {"passes": [{"kind": "quantize"}]},
    "spike": {"passes": [{"kind": "spike", "timesteps": 2, "encoder": "direct"}]},
    "prune": {"passes": [{"kind": "prune", "ratio": 0.5}]},
    "all": {"passes": [{"kind": "prune", "ratio": 0.25}, {"kind": "quantize", "weight": {"bits": 4}}]},
}


@pytest.mark.parametrize("name", list(REAL_SPECS))
def test_real_passes_are_idempotent_and_state_dicts_round_trip(name, demo_net):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    gm = evefx.transform(demo_net, REAL_SPECS[name], x)
    assert gm.report.modified
    gm.train()
    gm(x)  # let trackers and statistics move away from their initial values
    gm.eval()
    again = evefx.transform(gm, gm.spec)
    assert not again.report.modified, again.report
    assert torch.allclose(again(x), gm(x))
    fresh = evefx.transform(demo_net, REAL_SPECS[name], x).eval()
    fresh.load_state_dict(gm.state_dict())
    assert torch.equal(fresh(x), gm(x))
