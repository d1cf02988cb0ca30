"""The reinforcement-learning agent of the search: a stable-baselines3 algorithm playing ``UpgradeEnv``.

:func:`algorithm_kwargs` translates the spec's rl-zoo3-style ``hyperparams``; :func:`search_sb3`
plays the episodes, checkpoints the model and its replay buffer, and on resume puts the episodes
logged after the last checkpoint back into the buffer. ``warm_rows`` (episodes already played by
a baseline, e.g. the sensitivity allocation) go into the replay buffer before the agent's first
episode: the agent starts from what the baseline knows.

Example:
    >>> cls, kw = algorithm_kwargs({"algorithm": "td3"}, episode_length=10)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from torch import fx

from evefx.errors import SearchError
from evefx.spec import SearchSection, load_section
from evefx.upgrade.credit import Credit, replay_into_buffer, set_stored_rewards
from evefx.upgrade.env import Evaluate, UpgradeEnv
from evefx.upgrade.runlog import RunLog, write_json

if TYPE_CHECKING:  # stable-baselines3 is imported when a search runs
    from stable_baselines3.common.base_class import BaseAlgorithm

__all__ = ["algorithm_kwargs", "search_sb3", "EnvFactory", "RL_ALGORITHMS", "OFF_POLICY", "DEFAULT_EPISODES",
           "DEFAULT_WARMUP"]

log = logging.getLogger(__name__)

RL_ALGORITHMS = ("ddpg", "td3", "sac", "ppo", "a2c")
OFF_POLICY = ("ddpg", "td3", "sac")
_NET_ARCH = {"small": [64, 64], "medium": [256, 256], "big": [400, 300]}  # rl-zoo3's shorthands
DEFAULT_EPISODES = 20
DEFAULT_WARMUP = 5
"""Episodes of uniformly random actions before an off-policy agent starts learning (``warmup_episodes``)."""


def algorithm_kwargs(section: SearchSection | dict[str, Any], episode_length: int, n_actions: int = 1) -> tuple[type[BaseAlgorithm], dict[str, Any]]:
    """The SB3 class and constructor keywords for ``section`` (rl-zoo3-style ``hyperparams``).

    ``policy`` (default ``MlpPolicy``), ``noise_type`` (``normal`` or ``ornstein-uhlenbeck``) with
    ``noise_std``, ``noise_decay`` (the noise's scale is multiplied by it after every episode, as in
    HAQ), ``warmup_episodes`` (episodes of uniformly random actions before the agent starts
    learning, HAQ's warm-up; SB3's ``learning_starts`` counted in episodes), ``net_arch`` (a list,
    a dict, or ``small``/``medium``/``big``) and ``policy_kwargs`` are translated; every other key
    goes to the algorithm as it is. Defaults fit short searches: ``net_arch`` [64, 64], learning
    starts after ``DEFAULT_WARMUP`` episodes, the replay buffer holds the whole run.

    Example:
        >>> cls, kw = algorithm_kwargs(SearchSection(algorithm="td3", hyperparams={"noise_std": 0.2}), 10)
        >>> cls, kw = algorithm_kwargs({"algorithm": "td3"}, 10)  # the dict a spec file holds works too
    """
    section = load_section(SearchSection, section, "search")
    import stable_baselines3 as sb3
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    algo = section.algorithm or "ddpg"  # the agent an unset algorithm means when an agent is asked for
    if Credit(section.reward).rewrites and algo not in OFF_POLICY:
        raise SearchError(f"search.reward.credit/baseline: {algo} keeps no replay buffer to credit "
                          "(only ddpg, td3, sac); leave credit: last and baseline: none")
    if algo not in RL_ALGORITHMS:
        raise SearchError(f"search.algorithm: {algo} is a baseline, not a stable-baselines3 agent ({', '.join(RL_ALGORITHMS)})")
    classes: dict[str, type[BaseAlgorithm]] = {"ddpg": sb3.DDPG, "td3": sb3.TD3, "sac": sb3.SAC, "ppo": sb3.PPO, "a2c": sb3.A2C}
    cls = classes[algo]
    hp = dict(section.hyperparams)
    hp.pop("warm_start", None)  # the search's, not the agent's (search.py plays the baseline first)
    hp.pop("sensitivity_bits", None)
    kw: dict[str, Any] = {"policy": hp.pop("policy", "MlpPolicy")}
    # a few dozen features in, one action out: small networks train fast enough between episodes
    policy_kwargs = {"net_arch": [64, 64], **(hp.pop("policy_kwargs", None) or {})}
    net_arch = hp.pop("net_arch", None)
    if isinstance(net_arch, str):
        if net_arch not in _NET_ARCH:
            raise SearchError(f"search.hyperparams.net_arch: unknown {net_arch!r}; use a list of sizes or one of {sorted(_NET_ARCH)}")
        net_arch = _NET_ARCH[net_arch]
    if net_arch is not None:
        policy_kwargs["net_arch"] = net_arch
    kw["policy_kwargs"] = policy_kwargs
    noise_type = hp.pop("noise_type", None)
    noise_std = float(hp.pop("noise_std", 0.1))
    noise_decay = float(hp.pop("noise_decay", 1.0))  # applied per episode by the search's callback
    if not 0.0 < noise_decay <= 1.0:
        raise SearchError(f"search.hyperparams.noise_decay: must be in (0, 1] (got {noise_decay})")
    warmup = hp.pop("warmup_episodes", None)  # HAQ's warm-up: random episodes before the agent learns
    if warmup is not None:
        if algo not in OFF_POLICY:
            raise SearchError(f"search.hyperparams.warmup_episodes: {algo} has no warm-up (only ddpg, td3, sac)")
        if "learning_starts" in hp:
            raise SearchError("search.hyperparams: give warmup_episodes or learning_starts, not both")
        if int(warmup) != warmup or warmup < 0:
            raise SearchError(f"search.hyperparams.warmup_episodes: must be a whole number >= 0 (got {warmup})")
    if noise_type is not None:
        if algo not in OFF_POLICY:
            raise SearchError(f"search.hyperparams.noise_type: {algo} does not take action noise (only ddpg, td3, sac)")
        mean, sigma = np.zeros(n_actions), noise_std * np.ones(n_actions)
        if noise_type == "normal":
            kw["action_noise"] = NormalActionNoise(mean, sigma)
        elif noise_type in ("ornstein-uhlenbeck", "ou"):
            kw["action_noise"] = OrnsteinUhlenbeckActionNoise(mean, sigma)
        else:
            raise SearchError(f"search.hyperparams.noise_type: unknown {noise_type!r}; use normal or ornstein-uhlenbeck")
    if algo in OFF_POLICY:
        total = (section.episodes or DEFAULT_EPISODES) * episode_length if section.timesteps is None else section.timesteps
        kw.update(learning_starts=int(DEFAULT_WARMUP if warmup is None else warmup) * episode_length,
                  buffer_size=max(1000, total + 10 * episode_length), batch_size=min(64, 5 * episode_length))
    elif algo == "ppo":
        steps = max(2, 4 * episode_length // section.n_envs)
        kw.update(n_steps=steps, batch_size=steps * section.n_envs)
    else:
        kw.update(n_steps=episode_length)
    kw.update(hp)
    kw.update(seed=section.seed, device="cpu", verbose=0)
    return cls, kw


def _save_checkpoint(model: Any, run_dir: Path, episodes: int, off_policy: bool) -> None:
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    model.save(ckpt / "model.tmp.zip")
    os.replace(ckpt / "model.tmp.zip", ckpt / "model.zip")
    if off_policy:
        model.save_replay_buffer(ckpt / "replay_buffer.tmp.pkl")
        os.replace(ckpt / "replay_buffer.tmp.pkl", ckpt / "replay_buffer.pkl")
    write_json(ckpt / "state.json", {"episodes": episodes, "timesteps": int(model.num_timesteps)})
    log.info("checkpoint after %d episodes", episodes)


def _decay_noise(model: Any, base: float, decay: float, episodes: int) -> None:
    """Exploration noise scale after ``episodes`` finished episodes: ``base * decay ** episodes``
    (computed from the count, so a resumed search continues the schedule)."""
    noise = getattr(model, "action_noise", None)
    if noise is None or decay == 1.0:
        return
    for n in getattr(noise, "noises", [noise]):  # VectorizedActionNoise holds one per environment
        n._sigma = np.ones_like(n._sigma) * base * decay ** episodes


def _make_callback(runlog: RunLog, run_dir: Path, every: int, off_policy: bool, noise: tuple[float, float],
                   credit: Credit | None = None, ep_len: int = 1):
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

    rewrite = credit is not None and credit.rewrites and off_policy

    class Recorder(BaseCallback):
        """Logs finished episodes, stops at the target, checkpoints once transitions are stored, and
        (``reward.credit``/``baseline``) rewrites the stored rewards of each finished episode.

        SB3's ``collect_rollouts`` calls ``_on_step`` after ``env.step`` and before the step's
        transition is added to the replay buffer; the episode's earlier transitions are there already
        and are rewritten at once, its last one as soon as it is stored: at the next ``_on_step`` or
        at ``_on_rollout_end``, which both come before any gradient step (``train`` runs after the
        rollout ends), so every update already sees the episode's credited rewards."""

        def __init__(self) -> None:
            super().__init__()
            self.pending = False
            self.last: list[tuple[int, float]] = []  # (environment, reward) of a just-finished episode's last step

        def _on_training_start(self) -> None:
            runlog.logger = self.logger

        def _buffer(self) -> Any:
            # rewards are rewritten only with an off-policy agent (algorithm_kwargs refuses the others)
            assert isinstance(self.model, OffPolicyAlgorithm), "credit rewrites need an off-policy agent"
            return self.model.replay_buffer

        def _flush(self) -> None:
            for env_index, value in self.last:
                set_stored_rewards(self._buffer(), env_index, [1], value)
            self.last = []

        def _on_step(self) -> bool:
            self._flush()
            for env_index, (done, info) in enumerate(zip(self.locals["dones"], self.locals["infos"])):
                if done and "episode_result" in info and runlog.done < runlog.target:
                    runlog.record(info["episode_result"])
                    if rewrite:
                        value = credit.next(info["episode_result"]["reward"])
                        if credit.every:  # steps 0 .. ep_len - 2 of the episode, stored already
                            set_stored_rewards(self._buffer(), env_index, range(1, ep_len), value)
                        self.last.append((env_index, value))
                    if runlog.done % every == 0:
                        self.pending = True
                    _decay_noise(self.model, noise[0], noise[1], runlog.done)
            return runlog.done < runlog.target

        def _on_rollout_end(self) -> None:
            # called after the step's transition went into the buffer: the checkpoint holds it
            self._flush()
            if self.pending:
                _save_checkpoint(self.model, run_dir, runlog.done, off_policy)
                self.pending = False

    return Recorder()


class EnvFactory:
    """Builds an :class:`UpgradeEnv` in a ``SubprocVecEnv`` worker (an ``EveModule`` pickles with
    its provenance, so the worker's copy still knows which eve parameter belongs to which layer)."""

    def __init__(self, gm: fx.GraphModule, evaluate: Evaluate, env_kwargs: dict[str, Any]):
        self.gm, self.evaluate, self.env_kwargs = gm, evaluate, env_kwargs

    def __call__(self) -> UpgradeEnv:
        return UpgradeEnv(self.gm, self.evaluate, **self.env_kwargs)


def search_sb3(section: SearchSection, env: UpgradeEnv, make_env: Callable[[], UpgradeEnv], runlog: RunLog,
                run_dir: Path, resume_rows: list[dict[str, Any]]) -> None:
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

    ep_len = len(env.params)
    off_policy = (section.algorithm or "ddpg") in OFF_POLICY
    if section.backend == "ray":  # the environments on Ray actors, the agent stays here
        from evefx.upgrade.ray_backend import RayVecEnv

        vec: VecEnv = RayVecEnv([make_env] * section.n_envs)
    else:
        vec = DummyVecEnv([lambda: env]) if section.n_envs == 1 else SubprocVecEnv([make_env] * section.n_envs)
    try:
        cls, kw = algorithm_kwargs(section, ep_len)
        ckpt = run_dir / "checkpoint"
        state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() and resume_rows else None
        if state is not None:
            model = cls.load(ckpt / "model.zip", env=vec, device="cpu", tensorboard_log=str(run_dir / "tb"))
            if isinstance(model, OffPolicyAlgorithm) and (ckpt / "replay_buffer.pkl").exists():
                model.load_replay_buffer(ckpt / "replay_buffer.pkl")
            later = [r for r in resume_rows if r["episode"] > state["episodes"]]
        else:
            try:
                model = cls(env=vec, tensorboard_log=str(run_dir / "tb"), **kw)
            except TypeError as e:
                raise SearchError(f"search.hyperparams: {cls.__name__} rejected them: {e}") from e
            later = list(resume_rows)
        # the rewards the agent is trained on: the baseline runs over every logged episode, in order
        credit = Credit(section.reward, [r["reward"] for r in resume_rows[:len(resume_rows) - len(later)]])
        credited = [credit.next(r["reward"]) for r in later]
        if off_policy and later:
            added = replay_into_buffer(model, env, later, credited)
            log.info("resume: %d episodes (%d transitions) put back into the replay buffer", len(later), added)
        remaining = runlog.target - runlog.done
        if remaining <= 0:
            return
        hp = section.hyperparams
        noise = (float(hp.get("noise_std", 0.1)), float(hp.get("noise_decay", 1.0)))
        _decay_noise(model, *noise, runlog.done)
        callback = _make_callback(runlog, run_dir, section.checkpoint_every, off_policy, noise, credit, ep_len)
        # generous timesteps: the callback stops learning once the target episode count is reached
        model.learn(total_timesteps=(remaining + section.n_envs + 1) * ep_len * 2, callback=callback,
                    reset_num_timesteps=state is None, tb_log_name="sb3", progress_bar=False)
        _save_checkpoint(model, run_dir, runlog.done, off_policy)
    finally:
        vec.close()
