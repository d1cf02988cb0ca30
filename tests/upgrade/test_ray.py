"""search.backend: ray: RayVecEnv behaves like SB3's vec envs and a Ray search plays the episodes a local one does.

A local Ray instance (2 CPUs, no dashboard) is started once per module, in each pytest-xdist worker
that runs tests from here, and shut down after them.
"""
from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv
from typer.testing import CliRunner

import evefx
from evefx.errors import SearchError
from evefx.spec import Budget
from evefx.upgrade import Accuracy, search
from evefx.upgrade.agent import EnvFactory as _EnvFactory
from tests.upgrade.test_search import SEARCH, batches, quantized


@pytest.fixture(scope="module")
def ray_local():
    import ray  # in the test extra: CI runs these tests, it does not skip them

    # address="local": a fresh instance of our own, even when RAY_ADDRESS points elsewhere
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_ray_vec_env_steps_like_dummy_vec_env(ray_local):
    from evefx.upgrade.ray_backend import RayVecEnv

    make_env = _EnvFactory(quantized(), Accuracy(batches()), {})
    vec, ref = RayVecEnv([make_env] * 2), DummyVecEnv([make_env] * 2)
    try:
        assert vec.num_envs == 2 and vec.observation_space == ref.observation_space
        assert vec.seed(5) == [5, 6] and vec._seeds == [5, 6]
        obs = vec.reset()
        assert vec._seeds == [None, None]  # a seed is used at one reset only
        assert obs.shape == (2, *vec.observation_space.shape) and obs.dtype == np.float32
        assert np.array_equal(obs, ref.reset())
        n = len(vec.get_attr("params", indices=0)[0])
        actions = np.array([[[-0.5], [0.9]], [[0.3], [-1.0]], [[0.0], [0.2]], [[1.0], [-0.7]]], dtype=np.float32)[:n]
        for t, a in enumerate(actions):
            obs, rewards, dones, infos = vec.step(a)
            r_obs, r_rewards, r_dones, r_infos = ref.step(a)
            assert obs.shape == (2, *vec.observation_space.shape) and obs.dtype == np.float32
            assert rewards.shape == (2,) and dones.shape == (2,) and dones.dtype == bool and len(infos) == 2
            assert np.array_equal(obs, r_obs) and np.array_equal(dones, r_dones)
            # float64 as SubprocVecEnv stacks them; DummyVecEnv keeps a float32 buffer
            assert np.array_equal(rewards.astype(np.float32), r_rewards)
            assert dones.all() == (t == n - 1)
        # the last step reset the environments and kept the episode's final observation
        for info, r_info in zip(infos, r_infos):
            assert np.array_equal(info["terminal_observation"], r_info["terminal_observation"])
            assert info["TimeLimit.truncated"] is False
            assert strip([info["episode_result"]]) == strip([r_info["episode_result"]])
        assert np.array_equal(obs, ref.reset())  # the observation after done is a fresh episode's first
        assert vec.get_attr("render_mode") == [None, None]
        assert vec.has_attr("cost_model") and not vec.has_attr("no_such_attribute")
        with pytest.raises(AttributeError):
            vec.get_attr("no_such_attribute")
        vec.set_attr("finetune_steps", 0, indices=[1])
        assert vec.env_method("values_from_actions", [0.0] * n, indices=1) == ref.env_method(
            "values_from_actions", [0.0] * n, indices=1)
        assert vec.env_is_wrapped(gym.Wrapper) == [False, False]
    finally:
        vec.close()
        ref.close()
    assert vec.closed and vec.workers == [] and ray_local.is_initialized()  # the caller's instance stays up
    # an environment that cannot be built says why, with its own error, not as "actor died"
    infeasible = _EnvFactory(quantized(), Accuracy(batches()), {"budget": Budget(kind="avg_bits", max=0.5)})
    with pytest.raises(SearchError, match="search.budget: even the cheapest"):
        RayVecEnv([infeasible])


@pytest.mark.parametrize("algorithm", ["td3", "random"])
def test_ray_search_plays_the_same_episodes_as_local(ray_local, tmp_path, algorithm):
    section = {**SEARCH, "algorithm": algorithm, "episodes": 4, "n_envs": 2,
               "hyperparams": {"learning_starts": 4, "net_arch": [16, 16]} if algorithm == "td3" else {}}
    local = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path / "local", progress=False)
    remote = search(quantized(), Accuracy(batches()), {**section, "backend": "ray"}, run_dir=tmp_path / "ray",
                    progress=False)
    assert len(remote.episodes) == 4 and strip(remote.episodes) == strip(local.episodes)
    assert remote.best["values"] == local.best["values"] and remote.replayed_accuracy == remote.best["accuracy"]
    spec = evefx.load_spec(remote.spec_path)  # best.yaml validates and records the backend
    assert spec.search.backend == "ray" and spec.search.n_envs == 2


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(SearchError, match=r"search\.backend: ray .*pip install 'evefx\[ray\]'"):
        search(quantized(), Accuracy(batches()), {**SEARCH, "backend": "ray"}, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written

    from evefx.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text("passes: [{kind: quantize, upgrade_bits: true, weight: {bits: 8}}]\n"
                    "search: {algorithm: random, episodes: 1}\n")
    args = ["search", "--model", "examples.models:DemoNet", "--spec", str(spec), "--run-dir", str(tmp_path / "cli")]
    out = CliRunner().invoke(app, [*args, "--backend", "ray", "--epochs", "0"])
    assert out.exit_code == 1 and "evefx[ray]" in out.output, out.output
    out = CliRunner().invoke(app, [*args, "--backend", "local", "--ray-address", "ray://head:10001"])
    assert out.exit_code == 1 and "--ray-address" in out.output, out.output
    out = CliRunner().invoke(app, [*args, "--backend", "spark"])
    assert out.exit_code == 2
