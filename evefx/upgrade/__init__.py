"""The upgrader: search a transformed model's eve parameters (bits, pruning ratios).

``UpgradeEnv`` turns the choice into a gymnasium environment; ``search`` plays it with a
stable-baselines3 agent (ddpg, td3, sac, ppo, a2c) or a baseline (random, uniform, greedy,
knapsack and ilp from per-layer sensitivities, Optuna TPE), scores each configuration with the
spec's evaluator (BatchNorm re-estimation, a short fine-tune, or neither), and writes the result
as a spec (``best.yaml``) and the Pareto front. Nothing below ``evefx.upgrade`` imports it, and
it imports no data set: ``evefx.recipes`` wires MNIST in for the CLI.

Example:
    >>> from evefx.upgrade import search
    >>> result = search(gm, lambda m: evaluate(m, val)["accuracy"], run_dir="out/mp")
    >>> evefx.transform(model, result.spec_path)
"""
from __future__ import annotations

from evefx.upgrade.agent import algorithm_kwargs
from evefx.upgrade.allocation import ilp_allocations, probe_sensitivity
from evefx.upgrade.baselines import BASELINES, uniform_values
from evefx.upgrade.costs import COST_KINDS, CostModel, measure_latency
from evefx.upgrade.env import EpisodeResult, UpgradeEnv
from evefx.upgrade.evaluators import EVALUATORS, Accuracy, BNRecalibrate, FineTune
from evefx.upgrade.pareto import non_dominated, pareto_rows, write_pareto
from evefx.upgrade.plots import plot_search
from evefx.upgrade.runlog import read_episodes
from evefx.upgrade.search import ALGORITHMS, SearchResult, search
from evefx.upgrade.specs import override_for, spec_with_values

__all__ = [
    "UpgradeEnv",
    "EpisodeResult",
    "Accuracy",
    "FineTune",
    "BNRecalibrate",
    "EVALUATORS",
    "CostModel",
    "COST_KINDS",
    "measure_latency",
    "search",
    "SearchResult",
    "ALGORITHMS",
    "BASELINES",
    "algorithm_kwargs",
    "read_episodes",
    "plot_search",
    "probe_sensitivity",
    "ilp_allocations",
    "uniform_values",
    "non_dominated",
    "pareto_rows",
    "write_pareto",
    "spec_with_values",
    "override_for",
]
