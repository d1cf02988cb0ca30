"""The upgrader: search a transformed model's eve parameters (bits, pruning ratios) with reinforcement learning.

``UpgradeEnv`` turns the choice into a gymnasium environment; ``search`` plays it with a
stable-baselines3 agent (ddpg, td3, sac, ppo, a2c) or random search and writes the result as a
spec (``best.yaml``). Nothing below ``evefx.upgrade`` imports it.

Example:
    >>> from evefx.upgrade import search
    >>> result = search(gm, lambda m: evaluate(m, val)["accuracy"], run_dir="out/mp")
    >>> evefx.transform(model, result.spec_path)
"""
from __future__ import annotations

from evefx.upgrade.costs import COST_KINDS, CostModel, measure_latency
from evefx.upgrade.env import Accuracy, EpisodeResult, FineTune, UpgradeEnv
from evefx.upgrade.search import ALGORITHMS, SearchResult, algorithm_kwargs, plot_search, read_episodes, search, search_from_spec
from evefx.upgrade.specs import override_for, spec_with_values

__all__ = [
    "UpgradeEnv",
    "EpisodeResult",
    "Accuracy",
    "FineTune",
    "CostModel",
    "COST_KINDS",
    "measure_latency",
    "search",
    "search_from_spec",
    "SearchResult",
    "ALGORITHMS",
    "algorithm_kwargs",
    "read_episodes",
    "plot_search",
    "spec_with_values",
    "override_for",
]
