"""``search:``: the upgrader's settings: the search method (a stable-baselines3 agent or a baseline),
the budget, the reward and how each configuration is evaluated."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from evefx.spec.base import Bounded, StrictModel

__all__ = ["Budget", "Reward", "Evaluator", "SearchSection", "SEARCH_ALGORITHMS", "DEFAULT_EVALUATOR", "DEFAULT_FINETUNE_STEPS"]

DEFAULT_EVALUATOR = "finetune"
"""The evaluator of a search that sets no ``evaluator.kind``: a short fine-tune ranked 24 configurations
of DemoNet far closer to their final trained accuracy (Spearman 0.66) than BatchNorm re-estimation
(0.21) or no preparation (0.13); docs/search.md, ``bench/bench_search.py --rank``."""
DEFAULT_FINETUNE_STEPS = 100
"""Fine-tuning steps of the ``finetune`` evaluator when ``finetune_steps`` is 0 (the measured setting)."""
SEARCH_ALGORITHMS = ("ddpg", "td3", "sac", "ppo", "a2c", "random", "uniform", "greedy", "knapsack", "ilp", "tpe")


class Budget(StrictModel):
    """The cost the searched configuration must fit."""

    kind: Literal["avg_bits", "weight_bytes", "macs", "sparsity", "latency"] = "avg_bits"
    """avg_bits: mean bit width; weight_bytes: bytes of weights; macs: fraction of the dense MACs;
    sparsity: fraction of pruned channels kept (1 - sparsity); latency: onnxruntime seconds per batch."""
    max: Bounded(float, 0.0, 1e15, low_open=True) = 4.0
    """Upper bound of the cost."""


class Reward(StrictModel):
    """How a finished episode is scored."""

    mode: Literal["penalty", "constrained"] = "constrained"
    """penalty: accuracy - lam * cost/max; constrained (as HAQ): configurations are lowered until they fit, reward = accuracy."""
    lam: Bounded(float, 0.0, 1e6) = 0.1
    """Weight of the cost in ``penalty`` mode."""
    wall: Literal["end", "step"] = "end"
    """Where ``constrained`` mode enforces the budget. end (HAQ): after the episode, the chosen values
    are lowered one step at a time from the last parameter back until they fit. step: each action is
    mapped onto the part of its parameter's range that still fits, the parameters still to come
    counted at their cheapest, so the configuration evaluated is the one the agent chose (budgets
    computed from the values; a measured latency is walled at the end)."""
    credit: Literal["last", "all"] = "last"
    """Which transitions of an episode the off-policy agent (ddpg, td3, sac) sees rewarded. last: only
    the episode's last step carries its reward (the others 0). all (HAQ, AMC): once the episode ends,
    every one of its transitions in the replay buffer is given the episode's reward, so each layer's
    action is credited directly; use it with ``hyperparams: {gamma: 1.0}`` for HAQ's discount of 1."""
    baseline: Literal["none", "ema"] = "none"
    """Subtracted from the episode reward the agent is trained on (off-policy agents). ema (HAQ, AMC):
    an exponential moving average of the rewards of the episodes before it (the first episode is its
    own baseline); the episode log keeps the raw reward."""
    baseline_decay: Bounded(float, 0.0, 1.0) = 0.95
    """Decay of the ``ema`` baseline: after each episode, baseline = decay * baseline + (1 - decay) * reward
    (0.95: about the last 20 episodes). HAQ and AMC average the mean reward of each sampled batch with
    a factor of 0.5, a slow baseline too since each batch spans the buffer; per episode, 0.5 would
    follow the last two episodes only (both are measured in docs/search.md)."""


class Evaluator(StrictModel):
    """How each configuration is scored before the reward (``evefx.upgrade.evaluators``)."""

    kind: Literal["none", "bn_recalibrate", "finetune"] | None = None
    """none: evaluated as applied (AMC); bn_recalibrate: BatchNorm statistics re-estimated on
    ``batches`` training batches first (EagleEye); finetune: ``finetune_steps`` training steps first
    (HAQ; 100 when 0). Unset: finetune, the measured default (docs/search.md)."""
    batches: Bounded(int, 1, 10**5) = 8
    """Batches of 64 training images for bn_recalibrate."""


class SearchSection(StrictModel):
    """The search: an rl-zoo3-style agent or a baseline, each given ``episodes`` evaluations."""

    algorithm: Literal["ddpg", "td3", "sac", "ppo", "a2c", "random", "uniform", "greedy", "knapsack", "ilp", "tpe"] | None = None
    """A stable-baselines3 agent (ddpg, td3, sac, ppo, a2c) or a baseline: random, uniform (the
    dearest single value that fits), greedy/knapsack/ilp (per-layer sensitivities, then an
    allocation under the budget; bit widths only), tpe (Optuna's TPE sampler, needs optuna).
    Unset: ilp when every searched parameter is a bit width under an avg_bits or weight_bytes
    budget (it beat DDPG and random search in docs/search.md), random otherwise (pruning ratios:
    at least as good as DDPG on both bench networks, docs/search.md); ddpg with ``hyperparams.warm_start``."""
    episodes: Bounded(int, 1, 10**7) | None = None
    """Number of evaluations (one episode = one configuration evaluated; sensitivity probes count)."""
    timesteps: Bounded(int, 1, 10**9) | None = None
    """Number of environment steps (alternative to ``episodes``)."""
    budget: Budget = Budget()
    reward: Reward = Reward()
    hyperparams: dict[str, Any] = {}
    """Passed to the algorithm: policy, learning_rate, noise_type, noise_std, net_arch, ..."""
    seed: int = 0
    n_envs: Bounded(int, 1, 1024) = 1
    """Parallel environments (SubprocVecEnv when > 1 with backend local; Ray actors with backend ray)."""
    finetune_steps: Bounded(int, 0, 10**7) = 0
    """Training steps after applying a configuration, before it is evaluated (``evaluator.kind: finetune``)."""
    evaluator: Evaluator = Evaluator()
    checkpoint_every: Bounded(int, 1, 10**7) = 10
    """Save an SB3 checkpoint every N episodes."""
    backend: Literal["local", "ray"] = "local"

    @model_validator(mode="after")
    def _one_length(self) -> SearchSection:
        if self.episodes is not None and self.timesteps is not None:
            raise ValueError("give episodes or timesteps, not both")
        if self.evaluator.kind in ("none", "bn_recalibrate") and self.finetune_steps > 0:
            raise ValueError(f"evaluator.kind {self.evaluator.kind} runs no fine-tune: set finetune_steps: 0 "
                             "or evaluator.kind: finetune")
        return self

    @property
    def evaluator_kind(self) -> str:
        """The evaluator in effect (``evaluator.kind``, or what an unset kind means)."""
        if self.evaluator.kind is not None:
            return self.evaluator.kind
        return "finetune" if self.finetune_steps > 0 else DEFAULT_EVALUATOR

    @property
    def evaluator_steps(self) -> int:
        """Fine-tuning steps per evaluation in effect (0 unless the evaluator is finetune)."""
        if self.evaluator_kind != "finetune":
            return 0
        return self.finetune_steps or DEFAULT_FINETUNE_STEPS
