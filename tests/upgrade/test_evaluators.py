"""Evaluators: BatchNorm re-estimation (exact statistics, nothing else touched), each deterministic in a search."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import evefx
from evefx.errors import SearchError
from evefx.spec import load_spec
from evefx.upgrade import Accuracy, BNRecalibrate, FineTune, search

SPEC = {"trace": {"input_shape": [1, 1, 6, 6]},
        "passes": [{"kind": "quantize", "upgrade_bits": True, "weight": {"bits": 8}, "min_bits": 2, "max_bits": 8,
                    "activation": {"bits": 8, "signed": False, "symmetric": False}}]}


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 1, 6, 6, generator=g)
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long())


def test_bn_recalibrate_sets_the_exact_batch_statistics_and_restores_modes():
    model = convnet().train()
    bn = model[1]
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(100.0)
    recal = BNRecalibrate(dataset(), batches=3, batch_size=32, seed=0)
    recal(model)
    x = torch.cat([b[0] for b in recal._inputs()])
    y = model[0](x)
    # equal batches: the average of the per-batch means is the mean over all of them
    per_batch = [model[0](b[0]) for b in recal._inputs()]
    assert torch.allclose(bn.running_mean, y.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([b.var((0, 2, 3), unbiased=True) for b in per_batch]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and all(m.training for m in model.modules())  # modes and momentum put back


def test_bn_recalibrate_on_a_quantized_model_is_deterministic_and_leaves_activation_grids_alone():
    gm = evefx.transform(convnet(), SPEC)
    gm.train()
    gm(dataset().tensors[0])
    gm.eval()
    # every grid but the weights' of the layer that folds the BatchNorm (stretched, codes kept: tests/ptq)
    acts = {k: v.clone() for k, v in gm.state_dict().items() if "quant" in k and not k.startswith("0.weight_quantizer")}
    assert acts
    runs = []
    for model in (gm, copy.deepcopy(gm)):  # the same state twice: the same statistics
        BNRecalibrate(dataset(), batches=2, batch_size=16)(model)
        runs.append({k: v.clone() for k, v in model.state_dict().items() if "running" in k})
        assert not any(m.training for m in model.modules())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(torch.equal(acts[k], gm.state_dict()[k]) for k in acts)


@pytest.mark.parametrize("bits,mode", [(8, "running"), (2, "auto")])
def test_bn_recalibrate_re_estimates_batchnorms_that_train_on_running_statistics(bits, mode):
    trained = convnet().train()
    trained(dataset().tensors[0])  # tracked statistics: auto trains on the running ones at 2 bits
    section = {**SPEC["passes"][0], "weight": {"bits": bits}, "bn_statistics": mode}
    gm = evefx.transform(trained, {**SPEC, "passes": [section]})
    layer = gm.get_submodule("0")
    assert layer.bn_running_stats
    BNRecalibrate(dataset(), batches=1, batch_size=32, seed=0)(gm)
    # reset, then one batch's statistics: without batch statistics in the layer they would stay 0 / 1
    assert not torch.allclose(layer.bn.running_mean, torch.zeros(4)) and not torch.allclose(layer.bn.running_var, torch.ones(4))
    assert int(layer.bn.num_batches_tracked) == 1 and layer.bn_statistics == mode  # re-estimated, the option put back


@pytest.mark.parametrize("kind", ["none", "bn_recalibrate", "finetune"])
def test_each_evaluator_is_deterministic_for_a_seed(tmp_path, kind):
    gm = evefx.transform(convnet(), SPEC)
    gm.train()
    gm(dataset().tensors[0])
    gm.eval()
    data = [(dataset().tensors[0], dataset().tensors[1])]
    section = {"algorithm": "random", "episodes": 4, "seed": 1, "budget": {"kind": "avg_bits", "max": 4.0},
               "evaluator": {"kind": kind, "batches": 2}, "finetune_steps": 3 if kind == "finetune" else 0}
    kw = {"finetune": FineTune(dataset(), batch_size=16), "recalibrate": BNRecalibrate(dataset(), batches=2)}
    a = search(gm, Accuracy(data), section, run_dir=tmp_path / "a", progress=False, **kw).episodes
    b = search(gm, Accuracy(data), section, run_dir=tmp_path / "b", progress=False, **kw).episodes
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b] and [r["values"] for r in a] == [r["values"] for r in b]


def test_evaluator_settings_are_checked(tmp_path):
    assert load_spec({**SPEC, "search": {"evaluator": {"kind": "finetune"}}}).search.evaluator_steps == 100
    with pytest.raises(Exception, match="evaluator.kind none runs no fine-tune"):
        load_spec({**SPEC, "search": {"evaluator": {"kind": "none"}, "finetune_steps": 5}})
    spec = load_spec({**SPEC, "search": {}})
    assert (spec.search.evaluator_kind, spec.search.evaluator_steps) == ("finetune", 100)  # the measured default
    assert load_spec({**SPEC, "search": {"finetune_steps": 5}}).search.evaluator_steps == 5
    assert load_spec({**SPEC, "search": {"evaluator": {"kind": "none"}}}).search.evaluator_steps == 0
    gm = evefx.transform(convnet(), {k: v for k, v in SPEC.items() if k != "trace"}, torch.zeros(1, 1, 6, 6))
    with pytest.raises(SearchError, match="bn_recalibrate: pass recalibrate=BNRecalibrate"):
        search(gm, Accuracy([]), {"evaluator": {"kind": "bn_recalibrate"}}, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_fine_tune_evaluator_keeps_its_epoch_lines_out_of_the_search_log(caplog):
    """A search on a user's small data set logged 17 'train epoch' lines per evaluation at INFO."""
    import logging

    from evefx.train import fit

    gm = evefx.transform(convnet(), load_spec(SPEC))
    with caplog.at_level(logging.INFO, logger="evefx"):
        FineTune(dataset(), batch_size=16)(gm, 20)  # 20 steps = 4 epochs of 6 batches
    assert not [r for r in caplog.records if "epoch" in r.getMessage()]
    with caplog.at_level(logging.DEBUG, logger="evefx"):
        FineTune(dataset(), batch_size=16)(gm, 20)
    assert [r.getMessage().split(":")[0] for r in caplog.records if "epoch" in r.getMessage()] == [
        f"evaluator fine-tune epoch {k}/4" for k in range(1, 5)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evefx"):
        fit(gm, torch.utils.data.DataLoader(dataset(), batch_size=48), None, 1, progress=False)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["train epoch 1/1"]  # fit's own default


def test_bn_recalibrate_feeds_every_input_of_a_two_input_model():
    """It stacked only each item's first field: a model of two inputs failed with a missing argument."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x, z):
            return self.b(torch.relu(self.bn(self.a(x) + z)))

    g = torch.Generator().manual_seed(0)
    x, z, y = torch.randn(64, 4, generator=g), torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    gm = evefx.transform(Two(), {"passes": [{"kind": "quantize", "activation": {"bits": 8}}]}, (x[:2], z[:2]))
    gm.train()
    gm(x, z)  # ranges set
    gm.eval()
    recal = BNRecalibrate(TensorDataset(x, z, y), batches=1, batch_size=64)
    recal(gm)
    (bx, bz, by), = recal._inputs()
    assert torch.equal(by.sort().values, y.sort().values)
    seen = []
    hook = gm.get_submodule("bn").register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        gm(bx, bz)  # eval: the quantizers' grids as the re-estimation saw them
    hook.remove()
    assert torch.allclose(gm.get_submodule("bn").running_mean, seen[0].mean(0), atol=1e-6)
