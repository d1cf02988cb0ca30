"""UpgradeEnv: the gymnasium contract, exact restoration, the budget wall, costs, spec write-back."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env
from torch import nn

import evefx
from evefx.errors import SearchError
from evefx.graph import insert_after, layer_nodes, mark, output_block
from evefx.modules.protocol import EveHooks, EveRange
from evefx.pipeline import EveModule
from evefx.spec import Budget, Reward, load_spec
from evefx.trace import propagate_shapes, trace
from evefx.upgrade import CostModel, FineTune, UpgradeEnv, override_for, spec_with_values

# quantize_output: the logits' bits are searched too (six bit widths on the MLP)
QSPEC = {"passes": [{"kind": "quantize", "upgrade_bits": True, "quantize_output": True, "weight": {"bits": 8},
                     "activation": {"bits": 8, "signed": False, "symmetric": False}}]}


class Gate(EveHooks, nn.Module):
    """A hand-made eve module: zeroes the first floor(ratio * C) channels; ratio is an eve parameter."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("ratio", torch.tensor(0.0))

    def eve_ranges(self):
        return {"ratio": EveRange(0.0, 0.75)}

    def forward(self, x):
        k = int(math.floor(float(self.ratio) * self.channels))
        mask = torch.ones(self.channels)
        mask[:k] = 0.0
        return x * mask


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def data(n: int = 128):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = mlp()(x).argmax(1)
    return x, y


def quantized():
    x, _ = data()
    gm = evefx.transform(mlp(), QSPEC, torch.zeros(1, 8))
    gm.train()
    gm(x)  # calibrate the quantizer ranges
    return gm.eval()


def gated():
    """The MLP with a Gate after the first two layers' output blocks (marked as a prune pass would)."""
    gm = trace(mlp(), cls=EveModule)
    propagate_shapes(gm, (torch.zeros(1, 8),))
    for node in layer_nodes(gm)[:2]:
        layer = str(node.target)
        gate = insert_after(gm, output_block(gm, node).last, Gate(module_channels(gm, node)), f"{layer}.gate")
        mark(gate, pass_name="prune", layer=layer, spec_path="passes[0]", role="pruner")
    gm.recompile()
    return gm.eval()


def module_channels(gm, node):
    return gm.get_submodule(str(node.target)).out_features


def accuracy(gm) -> float:
    x, y = data()
    with torch.no_grad():
        return 100.0 * float((gm(x).argmax(1) == y).float().mean())


def test_check_env_quantized_and_hand_made():
    check_env(UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=4.0)), warn=True)
    check_env(UpgradeEnv(gated(), accuracy, budget=Budget(kind="macs", max=0.6)), warn=True)


def test_observation_is_the_layer_row_plus_progress():
    gm = quantized()
    env = UpgradeEnv(gm, accuracy, budget=Budget(kind="avg_bits", max=4.0), example_inputs=data()[0])
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    col = dict(zip(env.columns, obs))
    # first parameter: the weight bits of layer "0" (a Linear, the layer with the fewest parameters: params -> 0)
    assert env.params[0].name == "0.weight_quantizer.bits"
    assert col["is_linear"] == 0.0  # every layer is linear: a constant column normalises to 0
    assert col["is_bits"] == 1.0 and col["is_weight"] == 1.0 and col["position"] == 0.0
    # nothing chosen yet, all others at 2 bits: the committed cost is 2 bits out of a 4-bit budget
    assert col["cost_so_far"] == pytest.approx(2.0 / 4.0 / 2.0) and col["budget_left"] == pytest.approx(0.5)
    obs, *_ = env.step(np.array([1.0], dtype=np.float32))  # 8 bits for the first parameter
    col = dict(zip(env.columns, obs))
    assert col["previous"] == 1.0 and col["is_activation"] == 1.0
    assert col["cost_so_far"] == pytest.approx((8 + 2 * 5) / 6 / 4 / 2)


def test_episodes_are_deterministic_and_restore_weights_exactly():
    gm = quantized()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    x, y = data()
    tune = FineTune(torch.utils.data.TensorDataset(x, y), batch_size=32, lr=1e-2)
    env = UpgradeEnv(gm, accuracy, finetune=tune, finetune_steps=3, budget=Budget(kind="avg_bits", max=5.0),
                     reward=Reward(mode="penalty", lam=0.5))
    actions = np.random.default_rng(0).uniform(-1, 1, size=(2, len(env.params))).astype(np.float32)
    results = []
    for episode in (0, 1, 0):
        env.reset(seed=0)
        for a in actions[episode]:
            obs, reward, done, truncated, info = env.step(a[None])
        assert done and not truncated
        results.append(info["episode_result"])
        assert any(not torch.equal(v, before[k]) for k, v in gm.state_dict().items())  # fine-tuning changed weights
        env.reset()
        for k, v in gm.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert results[0] == {**results[2], "seconds": results[0]["seconds"]}
    r = results[1]
    assert r["reward"] == pytest.approx(r["accuracy"] / 100 - 0.5 * r["cost"] / 5.0)
    assert r["values"] == r["chosen"] and not r["lowered"]  # penalty mode never lowers


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=6, max_size=6), st.sampled_from([2.0, 2.5, 3.0, 4.5]))
def test_budget_wall_never_lets_an_over_budget_configuration_through(actions, limit):
    env = _WALL_ENVS.setdefault(limit, UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=limit)))
    env.reset()
    for a in actions:
        *_, done, _, info = env.step(np.array([a], dtype=np.float32))
    r = info["episode_result"]
    assert r["cost"] <= limit + 1e-9
    assert np.mean([r["values"][n] for n in r["values"]]) == pytest.approx(r["cost"])
    assert all(r["values"][n] <= r["chosen"][n] for n in r["values"])  # only ever lowered
    assert all(int(round(p.value)) == r["values"][p.name] for p in env.params)  # and really applied
    assert r["lowered"] == (np.mean(list(r["chosen"].values())) > limit)


_WALL_ENVS: dict[float, UpgradeEnv] = {}


def test_budget_wall_raises_ratios_for_macs():
    gm = gated()
    env = UpgradeEnv(gm, accuracy, budget=Budget(kind="macs", max=0.5))
    out = env.fit_budget({p.name: 0.0 for p in env.params})
    assert env.cost(out) <= 0.5
    assert all(v >= 0.0 for v in out.values()) and out[env.params[-1].name] > 0.0  # the last one moved first


def test_costs_by_hand():
    gm = gated()
    names = [p.name for p in evefx.eve_parameters(gm)]
    macs = CostModel(gm, "macs")
    dense = 8 * 16 + 16 * 12 + 12 * 4
    assert macs({n: 0.0 for n in names}) == pytest.approx(1.0)
    # ratio 0.5 on layer 0 keeps 8 of 16 channels: layer 0 and the input of layer 2 halve
    assert macs({names[0]: 0.5, names[1]: 0.0}) == pytest.approx((8 * 8 + 8 * 12 + 12 * 4) / dense)
    # and ratio 0.25 on layer 2 keeps 9 of 12 channels
    assert macs({names[0]: 0.5, names[1]: 0.25}) == pytest.approx((8 * 8 + 8 * 9 + 9 * 4) / dense)
    assert CostModel(gm, "sparsity")({names[0]: 0.5, names[1]: 0.25}) == pytest.approx((8 + 9 + 4) / (16 + 12 + 4))
    q = quantized()
    qn = [p.name for p in evefx.eve_parameters(q)]
    assert CostModel(q, "avg_bits")(dict(zip(qn, [2, 4, 6, 8, 3, 7]))) == pytest.approx(5.0)
    wb = CostModel(q, "weight_bytes")(dict(zip(qn, [2, 8, 4, 8, 8, 8])))
    assert wb == pytest.approx(8 * 16 * 2 / 8 + 16 * 12 * 4 / 8 + 12 * 4 * 8 / 8 + 4 * (16 + 12 + 4))


def test_latency_is_measured_with_onnxruntime():
    q = quantized()
    cm = CostModel(q, "latency", latency_inputs=(torch.zeros(4, 8),))
    seconds = cm.measure(q)
    assert 0.0 < seconds < 0.1
    # an episode under a latency budget measures the configured model once it is applied
    env = UpgradeEnv(q, accuracy, budget=Budget(kind="latency", max=1.0), example_inputs=torch.zeros(4, 8))
    env.reset()
    for _ in env.params:
        *_, info = env.step(np.array([0.0], dtype=np.float32))
    r = info["episode_result"]
    assert 0.0 < r["cost"] < 0.1 and not r["lowered"] and r["reward"] == r["accuracy"] / 100


def test_errors_name_the_fix():
    with pytest.raises(SearchError, match="upgrade_bits"):
        UpgradeEnv(evefx.transform(mlp(), {"passes": [{"kind": "quantize"}]}), accuracy)
    with pytest.raises(SearchError, match="cheapest configuration costs 2 avg_bits"):
        UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=1.5))
    with pytest.raises(SearchError, match="upgrade_ratio"):
        UpgradeEnv(quantized(), accuracy, budget=Budget(kind="macs", max=0.5))
    with pytest.raises(SearchError, match="finetune"):
        UpgradeEnv(quantized(), accuracy, finetune_steps=5)


@pytest.mark.parametrize("wall", ["end", "step"])
def test_transitions_replay_what_step_observed(wall):
    env = UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=3.0),
                     reward=Reward(mode="constrained", wall=wall))
    actions = [0.3, -0.9, 1.0, 0.1, -0.2, 0.7]
    seen = [env.reset()[0]]
    for a in actions:
        obs, reward, *_ = env.step(np.array([a], dtype=np.float32))
        seen.append(obs)
    trans = env.transitions(actions, reward)
    assert len(trans) == len(actions)
    for i, (obs, act, rew, nxt, done) in enumerate(trans):
        np.testing.assert_array_equal(obs, seen[i])
        np.testing.assert_array_equal(nxt, seen[i + 1])
        assert act[0] == np.float32(actions[i]) and done == (i == len(actions) - 1)
        assert rew == (reward if done else 0.0)
    # reward.credit: all (HAQ, AMC): every transition of the episode carries the reward it is given
    assert [t[2] for t in env.transitions(actions, 0.25, credit="all")] == [0.25] * len(actions)
    credited = UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=3.0),
                          reward=Reward(mode="constrained", wall=wall, credit="all"))
    assert [t[2] for t in credited.transitions(actions, reward)] == [reward] * len(actions)


def play(env, actions):
    env.reset()
    for a in actions:
        *_, info = env.step(np.array([a], dtype=np.float32))
    return info["episode_result"]


def test_step_wall_maps_every_action_onto_what_still_fits():
    env = UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=4.0),
                     reward=Reward(mode="constrained", wall="step"))
    # action 0 spends the budget evenly; +1 takes all that still fits, the rest left at their cheapest
    assert list(play(env, [0.0] * 6)["values"].values()) == [4.0] * 6
    assert list(play(env, [1.0] * 6)["values"].values()) == [8.0, 8.0, 2.0, 2.0, 2.0, 2.0]
    assert list(play(env, [-1.0] * 6)["values"].values()) == [2.0] * 6
    for actions in np.random.default_rng(0).uniform(-1, 1, size=(20, 6)):
        r = play(env, actions)
        assert r["cost"] <= 4.0 and not r["lowered"] and r["values"] == r["chosen"]  # evaluated as chosen
    # the same actions under the end wall: chosen on the whole range, then lowered from the back
    end = UpgradeEnv(quantized(), accuracy, budget=Budget(kind="avg_bits", max=4.0))
    assert list(play(end, [1.0] * 6)["values"].values()) == [4.0] * 6
    # ratios are cheap at the top of their range: the macs budget raises the floor instead
    gate = UpgradeEnv(gated(), accuracy, budget=Budget(kind="macs", max=0.6), reward=Reward(mode="constrained", wall="step"))
    for actions in np.random.default_rng(1).uniform(-1, 1, size=(10, 2)):
        r = play(gate, actions)
        assert r["cost"] <= 0.6 + 1e-9 and not r["lowered"]
    lo = play(gate, [-1.0, -1.0])["values"]
    assert list(lo.values())[0] == 0.0 and list(lo.values())[1] > 0.0  # the last one must prune to fit


def test_spec_with_values_writes_overrides_the_pass_understands():
    gm = quantized()
    params = evefx.eve_parameters(gm)
    values = dict(zip([p.name for p in params], [3, 5, 2, 4, 8, 6]))
    spec = spec_with_values(gm.spec, params, values)
    section = spec.passes[0]
    assert section.for_layer("0").weight.bits == 3 and section.for_layer("0").activation.bits == 5
    assert section.for_layer("4").weight.bits == 8 and section.for_layer("4").activation.bits == 6
    assert load_spec(evefx.dump_spec(spec)) == spec
    fresh = evefx.transform(mlp(), spec, torch.zeros(1, 8))
    assert {p.name: p.value for p in evefx.eve_parameters(fresh)} == values
    gate = gated()
    assert override_for(evefx.eve_parameters(gate)[0], 0.25) == {"ratio": 0.25}


def test_input_quantizer_follows_its_layers_activation_bits_as_best_yaml_builds_it():
    # the override written for a searched activation bit width also sets the layer's input
    # quantizer (the network input here); the episode must score that very model
    gm = quantized()
    env = UpgradeEnv(gm, accuracy, budget=Budget(kind="avg_bits", max=8.0))
    assert list(env.coupled) == ["0_act_quant.bits"]  # only the first layer reads an unquantized input
    values = dict(zip([p.name for p in env.params], [3, 2, 4, 5, 6, 7]))
    env.set_values(values)
    bits = {n: int(m.bits) for n, m in gm.named_modules() if hasattr(m, "set_bits")}
    assert bits["0_input_quant"] == 2
    fresh = evefx.transform(mlp(), spec_with_values(gm.spec, env.params, values), torch.zeros(1, 8))
    assert bits == {n: int(m.bits) for n, m in fresh.named_modules() if hasattr(m, "set_bits")}
    env.reset()
    assert int(gm.get_submodule("0_input_quant").bits) == 8  # restored with the rest


def test_real_pruning_masks_follow_the_ratios_and_the_macs_wall():
    from evefx.modules.prune import ChannelPruner

    spec = {"passes": [{"kind": "prune", "upgrade_ratio": True, "ratio": 0.0, "max_ratio": 0.9}]}
    gm = evefx.transform(mlp(), spec, torch.zeros(1, 8)).eval()
    env = UpgradeEnv(gm, accuracy, budget=Budget(kind="macs", max=0.4))
    check_env(env)
    env.reset()
    for _ in env.params:  # ask for no pruning at all: the wall must prune until 40% of the MACs remain
        *_, info = env.step(np.array([-1.0], dtype=np.float32))
    r = info["episode_result"]
    assert r["lowered"] and r["cost"] <= 0.4
    keep = env.cost_model.layer_values(r["values"])
    masks = {p.layer: float(p.module.mask.mean()) for p in env.params if isinstance(p.module, ChannelPruner)}
    assert masks == {layer: keep[layer]["keep"] for layer in masks}
    env.reset()  # masks restored with the weights
    assert all(float(p.module.mask.mean()) == 1.0 for p in env.params)


def test_fine_tuning_does_not_reseed_the_agents_random_streams():
    x, y = data()
    env = UpgradeEnv(quantized(), accuracy, finetune=FineTune(torch.utils.data.TensorDataset(x, y)), finetune_steps=2,
                     budget=Budget(kind="avg_bits", max=8.0))
    draws = []
    for _ in range(2):
        env.reset()
        for _ in env.params:
            env.step(np.array([0.0], dtype=np.float32))
        draws.append((np.random.normal(), float(torch.rand(1))))  # FineTune seeds fit(); the agent must not see it
    assert draws[0] != draws[1]


def test_budget_and_reward_take_the_dict_a_spec_file_holds():
    """Issue 12, item 6: budget={"kind": ..., "max": ...} used to raise AttributeError: 'dict' object has no attribute 'kind'."""
    env = UpgradeEnv(quantized(), accuracy, budget={"kind": "avg_bits", "max": 3.0}, reward={"mode": "constrained"})
    assert env.budget == Budget(kind="avg_bits", max=3.0) and env.reward_cfg.mode == "constrained"
    with pytest.raises(evefx.SpecError) as err:
        UpgradeEnv(quantized(), accuracy, budget={"kind": "avg_bits", "maximum": 3.0})
    assert str(err.value).splitlines()[1].startswith("search.budget.maximum: unknown field")


def test_spec_with_values_merges_with_the_overrides_already_there():
    """Issue 12, item 8: best.yaml kept the original override of a layer and added a conflicting one after it."""
    spec = {"passes": [{"kind": "quantize", "upgrade_bits": True, "min_bits": 2, "max_bits": 8, "quantize_output": True,
                        "weight": {"bits": 4}, "activation": {"bits": 4, "signed": False, "symmetric": False},
                        "overrides": [{"names": ["0", "4"], "weight": {"bits": 8}, "activation": {"bits": 8},
                                       "fold_bn": False},
                                      {"names": ["2"], "weight": {"bits": 6}}]}]}
    gm = evefx.transform(mlp(), spec, torch.zeros(1, 8))
    params = evefx.eve_parameters(gm)
    values = dict(zip([p.name for p in params], [3, 5, 2, 4, 7, 6]))
    best = spec_with_values(gm.spec, params, values).passes[0]
    assert [dict(o) for o in best.overrides] == [
        {"names": ["0", "4"], "fold_bn": False},  # the searched bits left it; what the search did not set stays
        {"names": ["2"], "weight": {"bits": 2}, "activation": {"bits": 4}},  # merged into the layer's own override
        {"names": ["0"], "weight": {"bits": 3}, "activation": {"bits": 5}},
        {"names": ["4"], "weight": {"bits": 7}, "activation": {"bits": 6}},
    ]
    fresh = evefx.transform(mlp(), spec_with_values(gm.spec, params, values), torch.zeros(1, 8))
    assert {p.name: p.value for p in evefx.eve_parameters(fresh)} == values


@pytest.mark.parametrize("values", [(0.5, 0.2, 0.05), (0.25, 0.6, 0.6), (0.0, 0.7, 0.3)])
def test_the_macs_a_search_prices_are_the_macs_of_the_compacted_model(values):
    """Coupled layers (a depthwise conv and the conv feeding it, tied by a residual add) share one mask,
    pruned at the least of their ratios; the cost priced each ratio alone, so a search's pick "within
    MACs <= 0.5" compacted to 0.51 of the dense model."""
    from evefx.channels import compact_report
    from tests.helpers import ResidualDepthwiseNet

    torch.manual_seed(0)
    gm = evefx.transform(ResidualDepthwiseNet(), {"trace": {"input_shape": [1, 3, 16, 16]}, "passes": [
        {"kind": "prune", "criterion": "l1_norm", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.8}]})
    params = evefx.eve_parameters(gm)
    assert [p.layer for p in params] == ["c1", "c2", "c3"]
    config = {p.name: v for p, v in zip(params, values)}
    priced = CostModel(gm, "macs")(config)
    for name, v in config.items():
        evefx.set_eve_parameter(gm, name, v)
    evefx.prune_step(gm)
    report = compact_report(evefx.compact(gm))
    assert priced == pytest.approx(report.macs_after / report.macs_before, rel=1e-12)


def test_coupled_ratios_are_one_search_dimension_and_best_yaml_builds_what_was_priced(tmp_path):
    """Coupled layers each had their own ratio, and only the least acted: the search spent dimensions on values
    that changed nothing, and best.yaml wrote them. The depthwise conv c3 now follows c2 (one channel mask)."""
    from evefx.channels import compact_report
    from evefx.upgrade import Accuracy, search
    from tests.helpers import ResidualDepthwiseNet

    torch.manual_seed(0)
    spec = {"trace": {"input_shape": [1, 3, 16, 16]},
            "passes": [{"kind": "prune", "criterion": "l1_norm", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.8}],
            "search": {"algorithm": "random", "episodes": 3, "seed": 1, "evaluator": {"kind": "none"},
                       "budget": {"kind": "macs", "max": 0.6}}}
    model = ResidualDepthwiseNet()
    gm = evefx.transform(model, spec)
    env = UpgradeEnv(gm, accuracy, budget=Budget(kind="macs", max=0.6))
    assert [p.layer for p in env.params] == ["c1", "c2"] and [f.layer for fs in env.ties.values() for f in fs] == ["c3"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    result = search(gm, Accuracy([(x, y)]), gm.spec.search, run_dir=tmp_path / "run", progress=False)
    overrides = {o["names"][0]: o["ratio"] for o in result.spec.passes[0].overrides}
    assert set(overrides) == {"c1", "c2", "c3"} and overrides["c3"] == overrides["c2"]
    rebuilt = evefx.transform(model, result.spec)
    evefx.prune_step(rebuilt)
    report = compact_report(evefx.compact(rebuilt))
    assert result.best["cost"] == pytest.approx(report.macs_after / report.macs_before, rel=1e-12) and result.best["cost"] <= 0.6
