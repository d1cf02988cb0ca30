"""search(): run folder, best.yaml that reproduces the searched model, resume after a kill, algorithms."""
from __future__ import annotations

import json

import numpy as np
import pytest
from stable_baselines3 import DDPG
from stable_baselines3.common.save_util import load_from_pkl
import torch
from torch import nn

import evefx
from evefx.errors import SearchError
from evefx.upgrade import Accuracy, read_episodes, search

# quantize_output: the logits' bits are searched too (six bit widths on the MLP)
QSPEC = {"passes": [{"kind": "quantize", "upgrade_bits": True, "quantize_output": True, "weight": {"bits": 8},
                     "activation": {"bits": 8, "signed": False, "symmetric": False}}]}
SEARCH = {"algorithm": "random", "episodes": 6, "budget": {"kind": "avg_bits", "max": 4.0}, "seed": 3}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    return [(x, mlp()(x).argmax(1))]


def quantized():
    gm = evefx.transform(mlp(), QSPEC, torch.zeros(1, 8))
    gm.train()
    gm(batches()[0][0])  # calibrate quantizer ranges
    return gm.eval()


class KilledAfter(Accuracy):
    """Evaluates like Accuracy, then dies (as a killed process would) at evaluation k + 1."""

    def __init__(self, data, k):
        super().__init__(data)
        self.k, self.calls = k, 0

    def __call__(self, gm):
        self.calls += 1
        if self.calls > self.k:
            raise KeyboardInterrupt
        return super().__call__(gm)


def test_random_search_writes_a_spec_that_reproduces_the_searched_model(tmp_path):
    gm = quantized()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result = search(gm, Accuracy(batches()), SEARCH, run_dir=tmp_path, progress=False)
    rows = read_episodes(tmp_path)
    assert [r["episode"] for r in rows] == list(range(1, 7))
    assert result.best == max(rows, key=lambda r: r["reward"])
    assert json.loads((tmp_path / "best.json").read_text()) == result.best
    assert all(r["cost"] <= 4.0 for r in rows)
    assert result.replayed_accuracy == result.best["accuracy"]
    assert result.plot_path.stat().st_size > 10_000 and (tmp_path / "tb").is_dir()
    for k, v in gm.state_dict().items():  # the searched model is left as it was given
        assert torch.equal(v, before[k])
    # best.yaml validates, carries the values as overrides, and with best.pt gives the searched accuracy
    spec = evefx.load_spec(result.spec_path)
    assert spec.search.algorithm == "random"
    fresh = evefx.transform(mlp(), spec, torch.zeros(1, 8))
    assert {p.name: p.value for p in evefx.eve_parameters(fresh)} == result.best["values"]
    fresh.load_state_dict(torch.load(result.state_path))
    assert Accuracy(batches())(fresh) == result.best["accuracy"]
    with pytest.raises(SearchError, match="resume"):
        search(gm, Accuracy(batches()), SEARCH, run_dir=tmp_path, progress=False)


def test_random_search_resumes_to_the_same_run(tmp_path):
    whole = search(quantized(), Accuracy(batches()), SEARCH, run_dir=tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):
        search(quantized(), KilledAfter(batches(), 4), SEARCH, run_dir=tmp_path / "cut", progress=False)
    assert len(read_episodes(tmp_path / "cut")) == 4
    resumed = search(quantized(), Accuracy(batches()), SEARCH, run_dir=tmp_path / "cut", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.episodes) == strip(whole.episodes)
    assert resumed.best["values"] == whole.best["values"]


def test_ddpg_resume_after_a_kill_loses_only_the_episode_in_flight(tmp_path):
    section = {**SEARCH, "algorithm": "ddpg", "episodes": 9, "checkpoint_every": 3,
               "hyperparams": {"noise_type": "normal", "noise_std": 0.3, "noise_decay": 0.9, "learning_starts": 8}}
    with pytest.raises(KeyboardInterrupt):
        search(quantized(), KilledAfter(batches(), 5), section, run_dir=tmp_path, progress=False)
    first = read_episodes(tmp_path)
    assert len(first) == 5
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["episodes"] == 3
    result = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path, resume=True, progress=False)
    assert [r["episode"] for r in result.episodes] == list(range(1, 10))
    assert result.episodes[:5] == first
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["episodes"] == 9
    # 3 checkpointed episodes + 2 put back from the CSV + 4 played (the very last step is not stored)
    buffer = load_from_pkl(tmp_path / "checkpoint" / "replay_buffer.pkl")
    assert buffer.size() == 9 * 4 - 1
    # the exploration noise decays per finished episode, across the restart too
    model = DDPG.load(tmp_path / "checkpoint" / "model.zip", device="cpu")
    assert model.action_noise._sigma == pytest.approx([0.3 * 0.9**9])
    assert all(r["cost"] <= 4.0 for r in result.episodes)


def credited(rewards, decay):
    """HAQ's rewards: each episode's reward less the moving average of the ones before it."""
    out, base = [], None
    for r in rewards:
        b = r if base is None else base
        out.append(r - b)
        base = decay * b + (1 - decay) * r
    return out


def test_credit_all_with_a_baseline_rewards_every_transition_and_resumes_exactly(tmp_path):
    # 4 eve parameters: 4 transitions per episode; rows 4(k-1) .. 4k-1 of the buffer are episode k
    section = {**SEARCH, "algorithm": "ddpg", "episodes": 9, "checkpoint_every": 3,
               "reward": {"mode": "constrained", "credit": "all", "baseline": "ema", "baseline_decay": 0.7},
               "hyperparams": {"noise_type": "normal", "noise_std": 0.3, "learning_starts": 8, "gamma": 1.0}}
    with pytest.raises(KeyboardInterrupt):
        search(quantized(), KilledAfter(batches(), 5), section, run_dir=tmp_path, progress=False)
    ckpt = load_from_pkl(tmp_path / "checkpoint" / "replay_buffer.pkl")  # after episode 3, rewritten live
    expected = credited([r["reward"] for r in read_episodes(tmp_path)], 0.7)
    assert ckpt.size() == 12
    np.testing.assert_allclose(ckpt.rewards[:12, 0], np.repeat(np.float32(expected[:3]), 4))
    result = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path, resume=True, progress=False)
    rewards = [r["reward"] for r in result.episodes]
    assert len(set(rewards)) > 2 and rewards == [r["reward"] for r in read_episodes(tmp_path)]  # the log keeps raw rewards
    expected = credited(rewards, 0.7)
    buffer = load_from_pkl(tmp_path / "checkpoint" / "replay_buffer.pkl")
    # 3 checkpointed episodes, 2 put back from the CSV, 4 played; the very last step is not stored
    assert buffer.size() == 9 * 4 - 1
    stored = buffer.rewards[:35, 0]
    np.testing.assert_allclose(stored, np.repeat(np.float32(expected), 4)[:35])
    # the same rewards as a search that was never stopped would have stored for these episodes
    from evefx.upgrade.credit import Credit as _Credit
    from evefx.spec import Reward

    c = _Credit(Reward(**section["reward"]))
    assert [c.next(r) for r in rewards] == pytest.approx(expected)


def test_credit_all_rewards_reach_the_replay_buffer_before_any_gradient_step(tmp_path, monkeypatch):
    from stable_baselines3 import TD3

    seen = []
    train = TD3.train

    def checked(self, gradient_steps, batch_size=100):
        buf = self.replay_buffer
        n = buf.pos
        expected = credited([r["reward"] for r in read_episodes(tmp_path)], 0.95)  # the default decay
        # every finished episode: its credited reward on all four transitions, the last one included
        np.testing.assert_allclose(buf.rewards[:4 * (n // 4), 0], np.repeat(np.float32(expected[:n // 4]), 4))
        assert np.all(buf.rewards[4 * (n // 4):n, 0] == 0)  # the episode in flight has no reward yet
        seen.append((n, expected))
        return train(self, gradient_steps, batch_size)

    monkeypatch.setattr(TD3, "train", checked)  # DDPG trains with TD3's train
    section = {**SEARCH, "algorithm": "ddpg", "episodes": 5, "hyperparams": {"learning_starts": 4},
               "reward": {"mode": "constrained", "credit": "all", "baseline": "ema"}}
    search(quantized(), Accuracy(batches()), section, run_dir=tmp_path, progress=False)
    counts = [n for n, _ in seen]
    assert 8 in counts and 9 in counts  # trained right after an episode ended, and mid-episode
    assert any(e != 0 for e in seen[-1][1])
    with pytest.raises(SearchError, match="ppo keeps no replay buffer"):
        search(quantized(), Accuracy(batches()), {**section, "algorithm": "ppo"}, run_dir=tmp_path / "ppo")


@pytest.mark.parametrize("algorithm", ["td3", "sac", "ppo", "a2c"])
def test_every_algorithm_runs_and_respects_the_budget(tmp_path, algorithm):
    section = {**SEARCH, "algorithm": algorithm, "episodes": 4, "hyperparams": {"net_arch": [16, 16]}}
    result = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path, progress=False)
    assert len(result.episodes) == 4 and all(r["cost"] <= 4.0 for r in result.episodes)
    assert (tmp_path / "checkpoint" / "model.zip").exists()


def test_parallel_environments_in_subprocesses(tmp_path):
    section = {**SEARCH, "algorithm": "td3", "episodes": 4, "n_envs": 2, "hyperparams": {"learning_starts": 4}}
    result = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path, progress=False)
    assert len(result.episodes) == 4 and result.replayed_accuracy == result.best["accuracy"]


def test_search_settings_errors(tmp_path):
    gm, acc = quantized(), Accuracy(batches())
    with pytest.raises(SearchError, match="ppo does not take action noise"):
        search(gm, acc, {**SEARCH, "algorithm": "ppo", "hyperparams": {"noise_type": "normal"}}, run_dir=tmp_path / "a")
    with pytest.raises(SearchError, match="unknown 'pink'"):
        search(gm, acc, {**SEARCH, "algorithm": "td3", "hyperparams": {"noise_type": "pink"}}, run_dir=tmp_path / "b")
    with pytest.raises(SearchError, match="rejected"):
        search(gm, acc, {**SEARCH, "algorithm": "a2c", "hyperparams": {"bogus": 1}}, run_dir=tmp_path / "c")


def test_warmup_episodes_set_when_an_off_policy_agent_starts_learning(tmp_path):
    from evefx.spec import SearchSection
    from evefx.upgrade import algorithm_kwargs

    _, kw = algorithm_kwargs(SearchSection(algorithm="ddpg", hyperparams={"warmup_episodes": 7}), 4)
    assert kw["learning_starts"] == 28 and "warmup_episodes" not in kw
    with pytest.raises(SearchError, match="ppo has no warm-up"):
        algorithm_kwargs(SearchSection(algorithm="ppo", hyperparams={"warmup_episodes": 2}), 4)
    with pytest.raises(SearchError, match="not both"):
        algorithm_kwargs(SearchSection(algorithm="td3", hyperparams={"warmup_episodes": 2, "learning_starts": 3}), 4)
    # the warm-up episodes play uniformly random actions: the same run with another actor
    # initialisation (policy seed unchanged elsewhere) keeps them; the first learned episode differs
    gm, acc = quantized(), Accuracy(batches())
    section = {**SEARCH, "algorithm": "ddpg", "episodes": 3, "hyperparams": {"warmup_episodes": 3}}
    a = search(gm, acc, section, run_dir=tmp_path / "a", progress=False).episodes
    b = search(gm, acc, {**section, "hyperparams": {"warmup_episodes": 3, "policy_kwargs": {"net_arch": [8]}}},
               run_dir=tmp_path / "b", progress=False).episodes
    assert [r["actions"] for r in a] == [r["actions"] for r in b]
    c = search(gm, acc, {**section, "hyperparams": {"warmup_episodes": 0}}, run_dir=tmp_path / "c", progress=False).episodes
    d = search(gm, acc, {**section, "hyperparams": {"warmup_episodes": 0, "policy_kwargs": {"net_arch": [8]}}},
               run_dir=tmp_path / "d", progress=False).episodes
    assert c[0]["actions"] != d[0]["actions"]  # no warm-up: the actor acts from the first episode


def test_search_from_spec_trains_once_and_resumes_from_the_saved_start(tmp_path):
    from examples.models import DemoNet
    from evefx.recipes import search_from_spec

    spec = {"trace": {"input_shape": [1, 1, 28, 28]},
            "passes": [{"kind": "quantize", "upgrade_bits": True, "weight": {"bits": 8}, "select": {"names": ["features.*"]}}],
            "search": {"algorithm": "random", "episodes": 2, "budget": {"kind": "avg_bits", "max": 5.0}}}
    torch.manual_seed(0)
    first = search_from_spec(DemoNet(), spec, run_dir=tmp_path, epochs=0, qat_epochs=1, progress=False)
    assert (tmp_path / "start.pt").exists() and len(first.episodes) == 2
    with pytest.raises(SearchError, match="--resume"):
        search_from_spec(DemoNet(), spec, run_dir=tmp_path, epochs=0, progress=False)
    longer = {**spec, "search": {**spec["search"], "episodes": 3}}
    again = search_from_spec(DemoNet(), longer, run_dir=tmp_path, epochs=0, resume=True, progress=False)
    assert again.episodes[:2] == first.episodes and len(again.episodes) == 3
    assert evefx.load_spec(again.spec_path).passes[0].overrides[-1]["names"] == ["features.6"]
