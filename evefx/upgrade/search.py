"""``evefx.upgrade.search``: find eve parameters with a stable-baselines3 agent (or random search).

The agent plays :class:`~evefx.upgrade.env.UpgradeEnv` episodes; every finished episode is one
configuration evaluated. A run folder records everything needed to stop and go on:

* ``episodes.csv``: one row per finished episode (reward, accuracy, cost, values, actions);
* ``best.json``: the best configuration so far; ``search.json``: what is being searched;
* ``checkpoint/``: the SB3 model and its replay buffer every ``checkpoint_every`` episodes;
* ``tb/``: TensorBoard logs (SB3's logger plus ``search/*`` scalars);
* at the end ``best.yaml`` (the input spec with the chosen values as per-layer overrides),
  ``best.pt`` (the configured, fine-tuned weights) and ``search.png``.

A resumed search reloads the last checkpoint, puts the episodes logged after it back into the
replay buffer (their rewards are in the CSV, so nothing is evaluated twice) and plays the
remaining episodes: only the episode in flight when the run stopped is lost.

Example:
    >>> result = search(gm, lambda m: evaluate(m, val)["accuracy"], gm.spec.search, run_dir="out/mp")
    >>> result.best["accuracy"], result.spec_path
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from evefx.errors import SearchError
from evefx.spec import Reward, SearchSection, Spec, dump_spec, load_section, load_spec
from evefx.upgrade.env import EpisodeResult, Evaluate, Finetune, UpgradeEnv
from evefx.upgrade.specs import spec_with_values

__all__ = ["SearchResult", "search", "search_from_spec", "algorithm_kwargs", "read_episodes", "plot_search", "ALGORITHMS"]

log = logging.getLogger(__name__)

ALGORITHMS = ("ddpg", "td3", "sac", "ppo", "a2c", "random")
_OFF_POLICY = ("ddpg", "td3", "sac")
_NET_ARCH = {"small": [64, 64], "medium": [256, 256], "big": [400, 300]}  # rl-zoo3's shorthands
_CSV_FIELDS = ("episode", "reward", "accuracy", "cost", "lowered", "seconds", "values", "actions")
DEFAULT_EPISODES = 20
DEFAULT_WARMUP = 5
"""Episodes of uniformly random actions before an off-policy agent starts learning (``warmup_episodes``)."""


@dataclass
class SearchResult:
    """What :func:`search` found and where it wrote it.

    Example:
        >>> r = search(...); r.best["values"]; evefx.load_spec(r.spec_path)
    """

    best: dict[str, Any]
    """The best episode: ``episode``, ``reward``, ``accuracy``, ``cost``, ``values``."""
    spec: Spec
    """The input spec with the best values written as overrides (also in ``best.yaml``)."""
    run_dir: Path
    episodes: list[dict[str, Any]] = field(repr=False, default_factory=list)
    replayed_accuracy: float | None = None
    """Accuracy of the best configuration applied again at the end (equals ``best["accuracy"]``
    when evaluation and fine-tuning are deterministic)."""

    @property
    def spec_path(self) -> Path:
        return self.run_dir / "best.yaml"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def plot_path(self) -> Path:
        return self.run_dir / "search.png"


# ---------------------------------------------------------------------- run folder
def read_episodes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The finished episodes logged in ``run_dir/episodes.csv`` (a row cut short by a kill is dropped).

    Example:
        >>> max(read_episodes("out/mp"), key=lambda r: r["reward"])["values"]
    """
    path = Path(run_dir) / "episodes.csv"
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            try:
                rows.append({
                    "episode": int(raw["episode"]), "reward": float(raw["reward"]), "accuracy": float(raw["accuracy"]),
                    "cost": float(raw["cost"]), "lowered": raw["lowered"] == "True", "seconds": float(raw["seconds"]),
                    "values": json.loads(raw["values"]), "actions": json.loads(raw["actions"]),
                })
            except (TypeError, ValueError, KeyError, json.JSONDecodeError):
                log.warning("episodes.csv: dropped an incomplete row (the run stopped while writing it)")
                break
    return rows


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


class _RunLog:
    """Appends finished episodes to the CSV, keeps the best one, drives the progress bar and TensorBoard."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]], target: int, progress: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.run_dir = run_dir
        self.rows = list(rows)
        self.target = target
        self.best: dict[str, Any] | None = max(rows, key=lambda r: r["reward"]) if rows else None
        new = not (run_dir / "episodes.csv").exists()
        if not new:
            self._rewrite()  # drop a half-written last line so appends stay parseable
        self._file = open(run_dir / "episodes.csv", "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=_CSV_FIELDS)
        if new:
            self._csv.writeheader()
            self._file.flush()
        self._bar = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                             TimeRemainingColumn(), disable=not progress)
        self._task = self._bar.add_task("search", total=target, completed=len(rows), status=self._status())
        self.logger: Any = None

    def _rewrite(self) -> None:
        with open(self.run_dir / "episodes.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            w.writeheader()
            for r in self.rows:
                w.writerow(self._csv_row(r))

    @staticmethod
    def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
        return {**{k: r[k] for k in _CSV_FIELDS if k not in ("values", "actions")},
                "values": json.dumps(r["values"]), "actions": json.dumps(r["actions"])}

    def _status(self) -> str:
        if self.best is None:
            return "best reward -"
        return f"best reward {self.best['reward']:.4f} (acc {self.best['accuracy']:.2f}%, cost {self.best['cost']:.4g})"

    @property
    def done(self) -> int:
        return len(self.rows)

    def record(self, result: EpisodeResult) -> None:
        row = {"episode": self.done + 1, **{k: result[k] for k in _CSV_FIELDS if k != "episode"}}
        self.rows.append(row)
        self._csv.writerow(self._csv_row(row))
        self._file.flush()
        if self.best is None or row["reward"] > self.best["reward"]:
            self.best = row
            _write_json(self.run_dir / "best.json", row)
        if self.logger is not None:
            for key in ("reward", "accuracy", "cost"):
                self.logger.record(f"search/{key}", row[key])
            self.logger.record("search/best_reward", self.best["reward"])
        self._bar.update(self._task, completed=self.done, status=self._status())
        log.info("episode %d: reward %.4f accuracy %.2f cost %.4g", row["episode"], row["reward"], row["accuracy"], row["cost"])

    def __enter__(self) -> _RunLog:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()
        self._file.close()


# ---------------------------------------------------------------------- stable-baselines3
def algorithm_kwargs(section: SearchSection | dict[str, Any], episode_length: int, n_actions: int = 1) -> tuple[type, dict[str, Any]]:
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

    algo = section.algorithm
    if _Credit(section.reward).rewrites and algo not in _OFF_POLICY:
        raise SearchError(f"search.reward.credit/baseline: {algo} keeps no replay buffer to credit "
                          "(only ddpg, td3, sac); leave credit: last and baseline: none")
    cls = {"ddpg": sb3.DDPG, "td3": sb3.TD3, "sac": sb3.SAC, "ppo": sb3.PPO, "a2c": sb3.A2C}[algo]
    hp = dict(section.hyperparams)
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
        if algo not in _OFF_POLICY:
            raise SearchError(f"search.hyperparams.warmup_episodes: {algo} has no warm-up (only ddpg, td3, sac)")
        if "learning_starts" in hp:
            raise SearchError("search.hyperparams: give warmup_episodes or learning_starts, not both")
        if int(warmup) != warmup or warmup < 0:
            raise SearchError(f"search.hyperparams.warmup_episodes: must be a whole number >= 0 (got {warmup})")
    if noise_type is not None:
        if algo not in _OFF_POLICY:
            raise SearchError(f"search.hyperparams.noise_type: {algo} does not take action noise (only ddpg, td3, sac)")
        mean, sigma = np.zeros(n_actions), noise_std * np.ones(n_actions)
        if noise_type == "normal":
            kw["action_noise"] = NormalActionNoise(mean, sigma)
        elif noise_type in ("ornstein-uhlenbeck", "ou"):
            kw["action_noise"] = OrnsteinUhlenbeckActionNoise(mean, sigma)
        else:
            raise SearchError(f"search.hyperparams.noise_type: unknown {noise_type!r}; use normal or ornstein-uhlenbeck")
    if algo in _OFF_POLICY:
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


class _Credit:
    """The reward an off-policy agent is trained on for each finished episode, in order
    (``reward.baseline``): the episode's reward, less an exponential moving average of the rewards
    of the episodes before it with ``baseline: ema`` (the first episode is its own baseline).
    ``every``: the reward goes on all of the episode's transitions (``reward.credit: all``).

    Example:
        >>> c = _Credit(Reward(baseline="ema", baseline_decay=0.5), [0.5, 0.7]); c.next(0.9)  # 0.9 - (0.5 * 0.5 + 0.5 * 0.7)
    """

    def __init__(self, cfg: Reward, rewards: Sequence[float] = ()):
        self.cfg = cfg
        self.baseline: float | None = None
        for r in rewards:
            self.next(r)

    @property
    def every(self) -> bool:
        return self.cfg.credit == "all"

    @property
    def rewrites(self) -> bool:
        """True when stored rewards differ from what ``UpgradeEnv.step`` returned."""
        return self.cfg.credit != "last" or self.cfg.baseline != "none"

    def next(self, reward: float) -> float:
        """The trained-on reward of the next finished episode, which earned ``reward``."""
        if self.cfg.baseline == "none":
            return float(reward)
        base = float(reward) if self.baseline is None else self.baseline
        d = float(self.cfg.baseline_decay)
        self.baseline = d * base + (1.0 - d) * float(reward)
        return float(reward) - base


def _set_stored_rewards(buf: Any, env_index: int, back: Sequence[int], value: float) -> None:
    """Reward ``value`` on environment ``env_index``'s transitions added ``k`` additions ago, for each
    ``k`` in ``back`` (1: the latest; the buffer is circular, ``rewards`` of shape [buffer_size, n_envs])."""
    for k in back:
        buf.rewards[(buf.pos - k) % buf.buffer_size, env_index] = value


def _replay_into_buffer(model: Any, env: UpgradeEnv, rows: Sequence[dict[str, Any]],
                        credited: Sequence[float] | None = None) -> int:
    """Put logged episodes back into an off-policy model's replay buffer; returns transitions added.
    ``credited``: the reward each episode is trained on (default: its logged reward), placed as
    ``reward.credit`` says, as the live search stores it."""
    buf = model.replay_buffer
    credited = [r["reward"] for r in rows] if credited is None else credited
    trans = [t for r, c in zip(rows, credited) for t in env.transitions(r["actions"], c)]
    n = buf.n_envs
    usable = len(trans) - len(trans) % n
    for i in range(0, usable, n):
        chunk = trans[i:i + n]
        buf.add(np.stack([t[0] for t in chunk]), np.stack([t[3] for t in chunk]), np.stack([t[1] for t in chunk]),
                np.asarray([t[2] for t in chunk], dtype=np.float32), np.asarray([t[4] for t in chunk]),
                [{} for _ in chunk])
    if usable < len(trans):
        log.info("resume: %d logged transitions did not fill a whole batch of %d environments; skipped", len(trans) - usable, n)
    return usable


def _save_checkpoint(model: Any, run_dir: Path, episodes: int, off_policy: bool) -> None:
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    model.save(ckpt / "model.tmp.zip")
    os.replace(ckpt / "model.tmp.zip", ckpt / "model.zip")
    if off_policy:
        model.save_replay_buffer(ckpt / "replay_buffer.tmp.pkl")
        os.replace(ckpt / "replay_buffer.tmp.pkl", ckpt / "replay_buffer.pkl")
    _write_json(ckpt / "state.json", {"episodes": episodes, "timesteps": int(model.num_timesteps)})
    log.info("checkpoint after %d episodes", episodes)


def _decay_noise(model: Any, base: float, decay: float, episodes: int) -> None:
    """Exploration noise scale after ``episodes`` finished episodes: ``base * decay ** episodes``
    (computed from the count, so a resumed search continues the schedule)."""
    noise = getattr(model, "action_noise", None)
    if noise is None or decay == 1.0:
        return
    for n in getattr(noise, "noises", [noise]):  # VectorizedActionNoise holds one per environment
        n._sigma = np.ones_like(n._sigma) * base * decay ** episodes


def _make_callback(runlog: _RunLog, run_dir: Path, every: int, off_policy: bool, noise: tuple[float, float],
                   credit: _Credit | None = None, ep_len: int = 1):
    from stable_baselines3.common.callbacks import BaseCallback

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

        def _flush(self) -> None:
            for env_index, value in self.last:
                _set_stored_rewards(self.model.replay_buffer, env_index, [1], value)
            self.last = []

        def _on_step(self) -> bool:
            self._flush()
            for env_index, (done, info) in enumerate(zip(self.locals["dones"], self.locals["infos"])):
                if done and "episode_result" in info and runlog.done < runlog.target:
                    runlog.record(info["episode_result"])
                    if rewrite:
                        value = credit.next(info["episode_result"]["reward"])
                        if credit.every:  # steps 0 .. ep_len - 2 of the episode, stored already
                            _set_stored_rewards(self.model.replay_buffer, env_index, range(1, ep_len), value)
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


class _EnvFactory:
    """Builds an :class:`UpgradeEnv` in a ``SubprocVecEnv`` worker (an ``EveModule`` pickles with
    its provenance, so the worker's copy still knows which eve parameter belongs to which layer)."""

    def __init__(self, gm: fx.GraphModule, evaluate: Evaluate, env_kwargs: dict[str, Any]):
        self.gm, self.evaluate, self.env_kwargs = gm, evaluate, env_kwargs

    def __call__(self) -> UpgradeEnv:
        return UpgradeEnv(self.gm, self.evaluate, **self.env_kwargs)


def _search_sb3(section: SearchSection, env: UpgradeEnv, make_env: Callable[[], UpgradeEnv], runlog: _RunLog,
                run_dir: Path, resume_rows: list[dict[str, Any]]) -> None:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    ep_len = len(env.params)
    off_policy = section.algorithm in _OFF_POLICY
    if section.backend == "ray":  # the environments on Ray actors, the agent stays here
        from evefx.upgrade.ray_backend import RayVecEnv

        vec = RayVecEnv([make_env] * section.n_envs)
    else:
        vec = DummyVecEnv([lambda: env]) if section.n_envs == 1 else SubprocVecEnv([make_env] * section.n_envs)
    try:
        cls, kw = algorithm_kwargs(section, ep_len)
        ckpt = run_dir / "checkpoint"
        state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() and resume_rows else None
        if state is not None:
            model = cls.load(ckpt / "model.zip", env=vec, device="cpu", tensorboard_log=str(run_dir / "tb"))
            if off_policy and (ckpt / "replay_buffer.pkl").exists():
                model.load_replay_buffer(ckpt / "replay_buffer.pkl")
            later = [r for r in resume_rows if r["episode"] > state["episodes"]]
        else:
            try:
                model = cls(env=vec, tensorboard_log=str(run_dir / "tb"), **kw)
            except TypeError as e:
                raise SearchError(f"search.hyperparams: {cls.__name__} rejected them: {e}") from e
            later = list(resume_rows)
        # the rewards the agent is trained on: the baseline runs over every logged episode, in order
        credit = _Credit(section.reward, [r["reward"] for r in resume_rows[:len(resume_rows) - len(later)]])
        credited = [credit.next(r["reward"]) for r in later]
        if off_policy and later:
            added = _replay_into_buffer(model, env, later, credited)
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


def _search_random(section: SearchSection, env: UpgradeEnv, runlog: _RunLog,
                   make_env: Callable[[], UpgradeEnv]) -> None:
    from stable_baselines3.common.logger import configure

    runlog.logger = configure(str(runlog.run_dir / "tb" / "random"), ["tensorboard"])
    rng = np.random.default_rng(section.seed)
    # the whole stream is drawn up front, so a resumed run plays exactly the episodes it would have
    actions = rng.uniform(-1.0, 1.0, size=(runlog.target, len(env.params)))
    if section.backend == "ray":  # the episodes are independent: n_envs Ray actors play them, recorded in order
        from evefx.upgrade.ray_backend import RayVecEnv

        pool = RayVecEnv([make_env] * section.n_envs)
        try:
            for result in pool.evaluate_actions(actions[runlog.done:]):
                runlog.record(result)
                runlog.logger.dump(step=runlog.done)
        finally:
            pool.close()
        return
    for i in range(runlog.done, runlog.target):
        result = env.evaluate_values(env.values_from_actions(actions[i]), actions[i].tolist())
        runlog.record(result)
        runlog.logger.dump(step=runlog.done)


# ---------------------------------------------------------------------- plots
def plot_search(rows: Sequence[dict[str, Any]], best: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG of the best configuration's value per eve parameter and of the reward per episode.

    Example:
        >>> plot_search(read_episodes("out/mp"), json.load(open("out/mp/best.json")), "mp.png")
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(best["values"])
    ax1.bar(range(len(names)), [best["values"][n] for n in names], color="tab:blue")
    ax1.set_xticks(range(len(names)), [n.replace(".weight_quantizer", ".w").replace("_act_quant", ".a") for n in names],
                   rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel("chosen value")
    ax1.set_title(f"best: episode {best['episode']}, acc {best['accuracy']:.2f}%, cost {best['cost']:.4g}")
    rewards = [r["reward"] for r in rows]
    ax2.plot(range(1, len(rows) + 1), rewards, ".", alpha=0.6, label="reward")
    ax2.plot(range(1, len(rows) + 1), np.maximum.accumulate(rewards), "-", label="best so far")
    ax2.set_xlabel("episode")
    ax2.set_ylabel("reward")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------- entry point
def _episode_target(section: SearchSection, ep_len: int) -> int:
    if section.episodes is not None:
        return int(section.episodes)
    if section.timesteps is not None:
        return max(1, math.ceil(section.timesteps / ep_len))
    return DEFAULT_EPISODES


def search(
    gm: fx.GraphModule,
    evaluate: Evaluate,
    section: SearchSection | dict[str, Any] | None = None,
    *,
    run_dir: str | Path,
    spec: Spec | dict | str | Path | None = None,
    finetune: Finetune | None = None,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    apply: Callable[[nn.Module], Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Search ``gm``'s eve parameters; write the run folder and ``best.yaml``; return the best.

    Args:
        gm: the trained, transformed model (its weights are the start of every episode).
        evaluate: ``evaluate(gm) -> accuracy`` in percent (or ``{"accuracy": ...}``); use held-out data.
        section: the ``search:`` settings (default: ``gm.spec.search``).
        run_dir: folder for logs, checkpoints and results.
        spec: the spec ``gm`` was transformed with (default: ``gm.spec``); ``best.yaml`` extends it.
        finetune: ``finetune(gm, steps)`` for ``section.finetune_steps``.
        example_inputs: a batch for activation statistics and latency (default: zeros of ``trace.input_shape``).
        apply: ``apply(gm)`` after setting values (e.g. to recompute pruning masks).
        resume: go on from ``run_dir`` (refuses a non-empty folder otherwise).

    Example:
        >>> result = search(gm, evaluate, {"algorithm": "td3", "episodes": 50, "budget": {"kind": "avg_bits", "max": 3}},
        ...                 run_dir="out/td3")
    """
    spec = load_spec(spec) if spec is not None else getattr(gm, "spec", None)
    if spec is None:
        raise SearchError("search needs the spec gm was transformed with: pass spec= (or search an EveModule)")
    if section is None:
        section = spec.search or SearchSection()
    elif isinstance(section, dict):
        section = load_spec({**spec.model_dump(mode="json"), "search": section}).search
    assert isinstance(section, SearchSection)
    if section.backend == "ray":  # say a missing extra before any work is done
        from evefx.upgrade.ray_backend import import_ray

        import_ray()
    if example_inputs is None and spec.trace.input_shape is not None:
        example_inputs = torch.zeros(spec.trace.input_shape)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = read_episodes(run_dir)
    if rows and not resume:
        raise SearchError(f"{run_dir} already holds a search ({len(rows)} episodes); pass resume=True "
                          "(--resume) to go on with it, or choose another folder")
    env_kwargs = dict(finetune=finetune, finetune_steps=section.finetune_steps, budget=section.budget,
                      reward=section.reward, example_inputs=example_inputs, apply=apply)
    env = UpgradeEnv(gm, evaluate, **env_kwargs)
    names = [p.name for p in env.params]
    meta = {"parameters": names, "section": section.model_dump(mode="json")}
    meta_path = run_dir / "search.json"
    if resume and meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["parameters"] != names:
            raise SearchError(f"--resume: {run_dir} searched the eve parameters {old['parameters']}, this model has {names}; "
                              "resume with the same model and spec")
        if old["section"]["algorithm"] != section.algorithm:
            raise SearchError(f"--resume: {run_dir} was searched with {old['section']['algorithm']}, not {section.algorithm}")
    _write_json(meta_path, meta)
    target = _episode_target(section, len(names))
    if rows:
        log.info("resuming %s: %d of %d episodes already done", run_dir, len(rows), target)
    try:
        with _RunLog(run_dir, rows, target, progress) as runlog:
            make_env = _EnvFactory(gm, evaluate, env_kwargs)
            if section.algorithm == "random":
                _search_random(section, env, runlog, make_env)
            else:
                _search_sb3(section, env, make_env, runlog, run_dir, rows)
            rows, best = runlog.rows, runlog.best
        if best is None:
            raise SearchError("the search finished without a single episode; give search.episodes >= 1")
        # apply the best configuration once more: its weights become best.pt, its values best.yaml
        again = env.evaluate_values(best["values"], best["actions"])
        if abs(again["accuracy"] - best["accuracy"]) > 1e-6:
            log.warning("best configuration re-evaluated at %.4f%% (searched: %.4f%%): evaluate/finetune are not "
                        "deterministic", again["accuracy"], best["accuracy"])
        torch.save(env.state_dict_copy(), run_dir / "best.pt")
    finally:
        env._restore()  # the caller's model leaves the search as it came in, even when interrupted
    out_spec = spec_with_values(spec.model_copy(update={"search": section}), env.params, again["values"])
    dump_spec(out_spec, run_dir / "best.yaml")
    result = SearchResult(best=best, spec=out_spec, run_dir=run_dir, episodes=rows, replayed_accuracy=again["accuracy"])
    plot_search(rows, best, result.plot_path, title=f"{section.algorithm}, budget {section.budget.kind} <= {section.budget.max}")
    return result


def search_from_spec(
    model: nn.Module,
    spec: Spec | dict | str | Path,
    *,
    run_dir: str | Path,
    data: str = "mnist5k",
    data_root: str | Path | None = None,
    weights: str | Path | None = None,
    epochs: int = 3,
    qat_epochs: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> SearchResult:
    """What ``evefx search`` runs: train (or load) ``model``, transform it with ``spec``, search with
    ``spec.search``. The reward is scored on a validation split held out of the training images
    (the last 1,000 of MNIST-5k's 4,000; the last 5,000 of full MNIST), never on the test set.

    The starting weights are saved as ``run_dir/start.pt``; a resumed search loads them instead of
    training again, so its episodes continue from the very same model.

    Example:
        >>> search_from_spec(DemoNet(), "examples/specs/mixed_precision.yaml", run_dir="out/mp")
        $ evefx search --model examples.models:DemoNet --spec examples/specs/mixed_precision.yaml --run-dir out/mp
    """
    from torch.utils.data import DataLoader, Subset

    from evefx.data import mnist, mnist5k
    from evefx.pipeline import transform
    from evefx.train import fit
    from evefx.upgrade.env import Accuracy, FineTune

    spec = load_spec(spec)
    if spec.search is None:
        raise SearchError("the spec has no search: section; add one (algorithm, episodes, budget...) to search it")
    if spec.search.backend == "ray":  # before training, not after
        from evefx.upgrade.ray_backend import import_ray

        import_ray()
    from evefx.api import eve_parameters

    if not eve_parameters(transform(model, spec)):  # say it before minutes of training, not after
        raise SearchError("the spec has no eve parameters to search: set upgrade_bits: true in a quantize section "
                          "or upgrade_ratio: true in a prune section")
    if data == "mnist5k":
        full = mnist5k("train")
        n_val = 1000
    elif data == "mnist":
        if data_root is None:
            raise SearchError("--data mnist needs --data-root, the folder holding torchvision's MNIST")
        full = mnist(data_root, "train")
        n_val = 5000
    else:
        raise SearchError(f"--data: unknown {data!r}; use mnist5k or mnist")
    train, val = Subset(full, range(len(full) - n_val)), Subset(full, range(len(full) - n_val, len(full)))
    loader = lambda: DataLoader(train, batch_size=64, shuffle=True,  # noqa: E731
                                generator=torch.Generator().manual_seed(spec.search.seed))
    run_dir = Path(run_dir)
    if not resume and read_episodes(run_dir):
        raise SearchError(f"{run_dir} already holds a search; pass --resume {run_dir} to go on with it, or choose another folder")
    start = run_dir / "start.pt"
    gm = None
    if resume and start.exists():
        gm = transform(model, spec)
        gm.load_state_dict(torch.load(start))
        log.info("resume: starting weights loaded from %s", start)
    else:
        if weights is not None:
            from evefx.api import load_checkpoint

            load_checkpoint(model, weights, "--weights")
        elif epochs > 0:
            fit(model, loader(), None, epochs, lr=3e-3, seed=spec.search.seed, progress=progress, description="float")
        gm = transform(model.eval(), spec)
        if qat_epochs > 0 and any(p.requires_grad for p in gm.parameters()):
            fit(gm, loader(), None, qat_epochs, lr=1e-3, seed=spec.search.seed, progress=progress, description="calibrate")
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(gm.state_dict(), start)
    gm.eval()
    batch = torch.stack([train[i][0] for i in range(min(64, len(train)))])  # activation statistics for observations
    return search(gm, Accuracy(DataLoader(val, batch_size=500)), spec.search, run_dir=run_dir, spec=spec,
                  finetune=FineTune(train, seed=spec.search.seed), example_inputs=batch, resume=resume,
                  progress=progress)
