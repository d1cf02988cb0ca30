"""``UpgradeEnv``: choosing a model's eve parameters one at a time, as a gymnasium environment.

An episode walks the model's eve parameters (``evefx.eve_parameters(gm)``, in graph order). At
step ``i`` the agent sees the row of ``evefx.observe(gm)`` for the layer of parameter ``i``
(min-max normalised over the layers), what kind of parameter it is, and the episode's progress
(cost committed so far, budget left); it answers with a number in [-1, 1] that is mapped onto the
parameter's range. After the last parameter the configuration is applied, optionally fine-tuned,
evaluated and rewarded. Every episode starts from the same weights, restored exactly.

Example:
    >>> env = UpgradeEnv(gm, lambda m: evaluate(m, val)["accuracy"], budget=Budget(kind="avg_bits", max=3))
    >>> obs, _ = env.reset(seed=0)
    >>> obs, reward, done, _, info = env.step(env.action_space.sample())
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import fx, nn

from evefx.api import EveParameter, eve_parameters, observe, reset
from evefx.channels.depgraph import DependencyGraph
from evefx.errors import SearchError
from evefx.graph import provenance
from evefx.layers import as_inputs
from evefx.modules.protocol import EveRange
from evefx.spec import Budget, Reward, load_section
from evefx.upgrade.costs import CostModel, channel_analysis, cheap_end
from evefx.upgrade.evaluators import Accuracy, FineTune, accuracy_of, apply_pruning

__all__ = ["UpgradeEnv", "EpisodeResult", "PARAM_FEATURES", "accuracy_of", "Accuracy", "FineTune", "apply_pruning"]

log = logging.getLogger(__name__)

PARAM_FEATURES = ("is_bits", "is_ratio", "is_weight", "is_activation", "position", "initial", "previous",
                  "cost_so_far", "budget_left")
"""Features appended to the layer's row: what the parameter is, where the episode stands."""

Evaluate = Callable[[nn.Module], Any]
Finetune = Callable[[nn.Module, int], Any]


def _coupled_inputs(gm: nn.Module, params: Sequence[EveParameter]) -> dict[str, list[nn.Module]]:
    """Input quantizers (role ``input``) that follow an activation bit width: ``{parameter name: quantizers}``.

    The quantize pass builds a layer's input quantizer from the layer's ``activation`` settings,
    so the per-layer override that :func:`~evefx.upgrade.spec_with_values` writes for a searched
    activation bit width (``activation: {bits: b}``) also gives the input quantizer of that layer
    (the network input, for the first layer) ``b`` bits. The episode sets them together, so that
    what the search scores is what ``best.yaml`` builds. Input quantizers count in no cost: they
    are not eve parameters.
    """
    by_layer: dict[tuple[str, str], list[nn.Module]] = {}
    for node in getattr(getattr(gm, "graph", None), "nodes", ()):
        prov = provenance(node)
        if node.op == "call_module" and prov is not None and prov.role == "input":
            q = gm.get_submodule(str(node.target))
            if hasattr(q, "set_bits"):
                by_layer.setdefault((prov.spec_path, prov.layer), []).append(q)
    return {p.name: by_layer[(p.spec_path, p.layer)] for p in params
            if p.kind == "bits" and p.role == "activation" and (p.spec_path, p.layer) in by_layer}


def _tied_ratios(dg: DependencyGraph | None, params: Sequence[EveParameter]) -> dict[str, list[EveParameter]]:
    """Pruning ratios of coupled layers: ``{leader name: followers}``. Coupled layers share one channel
    mask, which ``prune_step`` cuts at the least of their ratios, so a ratio per layer would spend
    search dimensions on values that change nothing. The first of a group (graph order) is searched,
    the others take its value. Only ratios of the same range are tied; ``{}`` without the channel
    analysis ``dg``."""
    ratios = [p for p in params if p.kind == "ratio"]
    if len(ratios) < 2 or dg is None:
        return {}
    group_of = {layer: i for i, g in enumerate(dg.groups()) for layer in g.layers}
    ties: dict[str, list[EveParameter]] = {}
    leaders: dict[tuple[int, float, float], EveParameter] = {}
    for p in ratios:
        key = (group_of.get(p.layer, -1 - len(leaders)), p.low, p.high)  # an unknown layer ties with nothing
        if key[0] >= 0 and key in leaders:
            ties[leaders[key].name].append(p)
        else:
            leaders[key] = p
            ties[p.name] = []
    return {k: v for k, v in ties.items() if v}


def _last_fitting(fits: Callable[[float], bool], ok: float, bad: float, iterations: int) -> float:
    """Bisection between ``ok`` (fits) and ``bad`` (does not): the last point found that fits."""
    for _ in range(iterations):
        mid = (ok + bad) / 2.0
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    return ok


class EpisodeResult(dict):
    """What one finished episode produced: ``reward``, ``accuracy`` (percent), ``cost``,
    ``values`` (applied, after the budget wall), ``chosen`` (the agent's values), ``actions``,
    ``lowered`` (whether the wall changed anything), ``seconds``. A plain dict, so it pickles
    across processes and lands in ``info["episode_result"]``."""


class UpgradeEnv(gym.Env):
    """A gymnasium environment whose episodes choose every eve parameter of ``gm`` once.

    Args:
        gm: a transformed model whose spec exposes eve parameters (``upgrade_bits``, ``upgrade_ratio``),
            already trained: its current weights are the starting point of every episode.
        evaluate: ``evaluate(gm) -> accuracy`` in percent (or a dict with ``"accuracy"``).
        finetune: ``finetune(gm, steps)``, run after applying a configuration when ``finetune_steps > 0``.
        finetune_steps: training steps per episode (``search.finetune_steps``).
        recalibrate: ``recalibrate(gm)``, run after applying a configuration and before any fine-tune
            (``search.evaluator.kind: bn_recalibrate``: :class:`~evefx.upgrade.BNRecalibrate`).
        budget: the cost and its bound (``search.budget``): a :class:`~evefx.spec.Budget` or the same
            dict a spec file holds (``{"kind": "avg_bits", "max": 3.0}``).
        reward: ``penalty`` (accuracy - lam * cost / max) or ``constrained`` (values lowered from the
            last parameter back until the cost fits; reward = accuracy). Accuracy enters as a fraction.
        example_inputs: a batch for activation statistics in the observations and for latency.
        apply: called as ``apply(gm)`` after the values are set; by default :func:`apply_pruning`
            when pruning ratios are searched (masks follow the new ratios), nothing otherwise.
        names: restrict the episode to these eve parameter names (default: all of them).

    Example:
        >>> from stable_baselines3.common.env_checker import check_env
        >>> check_env(UpgradeEnv(gm, evaluate))
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        gm: fx.GraphModule,
        evaluate: Evaluate,
        *,
        finetune: Finetune | None = None,
        finetune_steps: int = 0,
        budget: Budget | dict[str, Any] = Budget(),
        reward: Reward | dict[str, Any] = Reward(),
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        apply: Callable[[nn.Module], Any] | None = None,
        names: Sequence[str] | None = None,
        recalibrate: Callable[[nn.Module], Any] | None = None,
    ):
        super().__init__()
        self.gm = gm
        self.evaluate_fn = evaluate
        self.finetune_fn = finetune
        self.finetune_steps = int(finetune_steps)
        self.recalibrate_fn = recalibrate
        self.budget = budget = load_section(Budget, budget, "search.budget")
        self.reward_cfg = reward = load_section(Reward, reward, "search.reward")
        self.apply_fn = apply
        params = eve_parameters(gm)
        if names is not None:
            unknown = sorted(set(names) - {p.name for p in params})
            if unknown:
                raise SearchError(f"UpgradeEnv(names=...): no eve parameters {unknown}; known: {[p.name for p in params]}")
            params = [p for p in params if p.name in set(names)]
        if not params:
            raise SearchError("the model has no eve parameters to search: set upgrade_bits: true in a quantize "
                              "section or upgrade_ratio: true in a prune section of its spec")
        self.all_params: list[EveParameter] = params
        # one channel analysis for the ties and the cost of pruning ratios (nothing to analyse without them)
        analysis = channel_analysis(gm) if isinstance(gm, fx.GraphModule) and any(p.kind == "ratio" for p in params) else None
        self.ties = _tied_ratios(analysis, params)
        followers = {f.name for fs in self.ties.values() for f in fs}
        params = [p for p in params if p.name not in followers]
        self.params: list[EveParameter] = params
        self.coupled = _coupled_inputs(gm, params)
        if apply is None and any(p.kind == "ratio" for p in params):
            self.apply_fn = apply_pruning
        if self.finetune_steps > 0 and finetune is None:
            raise SearchError("search.finetune_steps > 0 needs a finetune(gm, steps) callback")
        self.example_inputs = as_inputs(example_inputs)
        # the starting point of every episode: an exact copy of the weights, buffers and modes
        self._state = {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=False).items()}
        self._training = {name: m.training for name, m in gm.named_modules()}
        self.initial_values = {p.name: p.value for p in params}
        self.cost_model = CostModel(gm, budget.kind, latency_inputs=self.example_inputs, parameters=params, analysis=analysis,
                                    tied={lead.layer: [f.layer for f in self.ties[lead.name]] for lead in params if lead.name in self.ties})
        self._rows = self._layer_rows()
        self._check_feasible()
        dim = self._rows.shape[1] + len(PARAM_FEATURES)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(dim,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._i = 0
        self._actions: list[float] = []
        self._chosen: dict[str, float] = {}
        self.episodes = 0

    # ------------------------------------------------------------------ observations
    def _layer_rows(self) -> np.ndarray:
        obs = observe(self.gm, self.example_inputs)
        self._restore()  # observing runs a forward in eval mode; leave nothing behind
        vals = obs.values.astype(np.float64)
        lo, hi = vals.min(axis=0), vals.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        norm = np.where(hi > lo, (vals - lo) / span, 0.0)
        rows = np.zeros((len(self.params), vals.shape[1]), dtype=np.float32)
        for i, p in enumerate(self.params):
            if p.layer in obs.layers:
                rows[i] = norm[obs.layers.index(p.layer)]
        self.columns = tuple(obs.columns) + PARAM_FEATURES
        return rows

    def _progress(self, chosen: Mapping[str, float]) -> tuple[float, float]:
        if not self.cost_model.static:
            return 0.0, 1.0  # latency is only known once measured at the end
        rest = {p.name: cheap_end(p) for p in self.params if p.name not in chosen}
        committed = self.cost_model({**rest, **chosen})
        limit = float(self.budget.max)
        return min(committed / limit, 2.0) / 2.0, max(limit - committed, 0.0) / limit

    def _observation(self, i: int, chosen: Mapping[str, float], previous: float) -> np.ndarray:
        n = len(self.params)
        p = self.params[min(i, n - 1)]
        so_far, left = self._progress(chosen)
        extra = [
            float(p.kind == "bits"), float(p.kind == "ratio"), float(p.role == "weight"),
            float(p.role == "activation"), i / n, (p.range.to_unit(self.initial_values[p.name]) + 1.0) / 2.0,
            (previous + 1.0) / 2.0, so_far, left,
        ]
        out = np.concatenate([self._rows[min(i, n - 1)], np.asarray(extra, dtype=np.float32)]).astype(np.float32)
        return np.clip(out, 0.0, 1.0)

    # ------------------------------------------------------------------ state
    def _restore(self) -> None:
        self.gm.load_state_dict(self._state, strict=True)
        for name, m in self.gm.named_modules():
            if name in self._training:
                m.training = self._training[name]
        reset(self.gm)

    def _check_feasible(self) -> None:
        if self.reward_cfg.mode != "constrained" or not self.cost_model.static:
            return
        cheapest = self.cost_model({p.name: cheap_end(p) for p in self.params})
        if cheapest > self.budget.max + 1e-9:
            raise SearchError(
                f"search.budget: even the cheapest configuration costs {cheapest:.4g} {self.budget.kind}, over "
                f"the budget max={self.budget.max}; raise budget.max or widen the ranges (min_bits, max_ratio)"
            )

    # ------------------------------------------------------------------ gymnasium
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._restore()
        self._i = 0
        self._actions = []
        self._chosen = {}
        return self._observation(0, {}, 0.0), {}

    def step(self, action):
        if self._i >= len(self.params):
            raise SearchError("UpgradeEnv.step after the episode ended: call reset() first")
        # float32 like the action space, so a logged action replays to the very same observation
        a = float(np.float32(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0)))
        p = self.params[self._i]
        self._actions.append(a)
        self._chosen[p.name] = self._value(p, a, self._chosen)
        self._i += 1
        if self._i < len(self.params):
            return self._observation(self._i, self._chosen, a), 0.0, False, False, {}
        result = self._finish(self._chosen, self._actions)
        obs = self._observation(self._i, self._chosen, a)
        return obs, float(result["reward"]), True, False, {"episode_result": result}

    # ------------------------------------------------------------------ configurations
    @property
    def step_wall(self) -> bool:
        """True when actions are mapped onto what still fits the budget (``reward.wall: step``)."""
        return self.reward_cfg.mode == "constrained" and self.reward_cfg.wall == "step" and self.cost_model.static

    def feasible_range(self, p: EveParameter, chosen: Mapping[str, float]) -> EveRange:
        """The part of ``p``'s range that fits the budget given the ``chosen`` values, with every
        parameter not chosen yet at its cheapest (``cheap_end``)."""
        limit = float(self.budget.max) + 1e-9
        rest = {q.name: cheap_end(q) for q in self.params if q.name not in chosen}
        fits = lambda v: self.cost_model({**rest, **chosen, p.name: v}) <= limit  # noqa: E731
        cheap, dear = cheap_end(p), (p.low if cheap_end(p) == p.high else p.high)
        if fits(dear) or not fits(cheap):
            edge = dear if fits(dear) else cheap
        elif p.integer:
            step = 1 if dear > cheap else -1
            edge = cheap
            while edge != dear and fits(edge + step):
                edge += step
        else:
            edge = _last_fitting(fits, cheap, dear, 40)
        lo, hi = sorted((cheap, edge))
        return EveRange(lo, hi, p.integer)

    def fair_value(self, p: EveParameter, chosen: Mapping[str, float]) -> float:
        """The value that spends the budget left evenly: ``p`` and every parameter not chosen yet at
        the same point of their ranges, the highest-cost point that still fits (not rounded)."""
        limit = float(self.budget.max) + 1e-9
        todo = [q for q in self.params if q.name not in chosen and q.name != p.name] + [p]
        at = lambda u: {q.name: q.low + (u + 1.0) / 2.0 * (q.high - q.low) for q in todo}  # noqa: E731
        fits = lambda u: self.cost_model({**chosen, **at(u)}) <= limit  # noqa: E731
        cheap_u = 1.0 if cheap_end(p) == p.high else -1.0
        ok, bad = cheap_u, -cheap_u
        if fits(bad):
            return at(bad)[p.name]
        return at(_last_fitting(fits, ok, bad, 30))[p.name]

    def _value(self, p: EveParameter, action: float, chosen: Mapping[str, float]) -> float:
        """The value of ``p`` for ``action``: on its whole range, or (``step_wall``) on what still fits,
        with action 0 at :meth:`fair_value` ([-1, 0] below it, [0, 1] above it)."""
        if not self.step_wall:
            return float(p.range.from_unit(action))
        rng = self.feasible_range(p, chosen)
        fair = min(max(self.fair_value(p, chosen), rng.low), rng.high)
        a = min(max(float(action), -1.0), 1.0)
        v = fair + a * ((fair - rng.low) if a < 0 else (rng.high - fair))
        return float(rng.clip(v))

    def values_from_actions(self, actions: Sequence[float]) -> dict[str, float]:
        """The values ``actions`` (one per parameter, in [-1, 1]) stand for on the whole ranges (random search;
        the budget wall applies when they are evaluated)."""
        if len(actions) != len(self.params):
            raise SearchError(f"{len(actions)} actions for {len(self.params)} eve parameters")
        return {p.name: float(p.range.from_unit(a)) for p, a in zip(self.params, actions)}

    def set_values(self, values: Mapping[str, float]) -> None:
        """Set the eve parameters of ``gm`` (missing ones keep their starting value) and run ``apply``."""
        for p in self.params:
            p.set(values.get(p.name, self.initial_values[p.name]))
            for q in self.coupled.get(p.name, ()):
                q.set_bits(int(round(p.value)))  # as the spec override will: activation bits -> input quantizer
            for f in self.ties.get(p.name, ()):
                f.set(p.value)  # a coupled layer's ratio follows its group's searched one
        if self.apply_fn is not None:
            self.apply_fn(self.gm)

    def with_followers(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` with every tied ratio's value written out (what ``best.yaml`` records per layer)."""
        out = dict(values)
        for lead, followers in self.ties.items():
            for f in followers:
                out[f.name] = float(values.get(lead, self.initial_values[lead]))
        return out

    def cost(self, values: Mapping[str, float]) -> float:
        """Cost of ``values`` under the budget's kind (latency is measured on ``gm`` with them applied)."""
        if self.cost_model.static:
            return self.cost_model(values)
        self._restore()
        self.set_values(values)
        return self.cost_model.measure(self.gm)

    def fit_budget(self, values: Mapping[str, float]) -> dict[str, float]:
        """The budget wall (as in HAQ): lower the values one step at a time, from the last parameter
        back and round again, until the cost fits. Raises when even the cheapest values do not fit."""
        out = {p.name: float(values.get(p.name, self.initial_values[p.name])) for p in self.params}
        limit = float(self.budget.max) + 1e-9
        cost = self.cost(out)
        while cost > limit:
            moved = False
            for p in reversed(self.params):
                target = cheap_end(p)
                if out[p.name] == target:
                    continue
                step = 1.0 if p.integer else (p.high - p.low) / 20.0
                nxt = out[p.name] - step if target < out[p.name] else out[p.name] + step
                out[p.name] = float(p.range.clip(min(max(nxt, p.low), p.high)))
                moved = True
                cost = self.cost(out)
                if cost <= limit:
                    break
            if not moved:
                raise SearchError(
                    f"search.budget: the cheapest configuration still costs {cost:.4g} {self.budget.kind}, "
                    f"over max={self.budget.max}; raise budget.max or widen the parameter ranges"
                )
        return out

    def evaluate_values(self, values: Mapping[str, float], actions: Sequence[float] | None = None) -> EpisodeResult:
        """Run one whole configuration (as an episode's end does) and return its result."""
        return self._finish(values, actions)

    def score(self, values: Mapping[str, float]) -> tuple[float, float]:
        """``(accuracy, cost)`` of ``values`` applied as they are (no budget wall): restore the
        starting weights, set the values, recalibrate and fine-tune as configured, evaluate.
        A sensitivity probe (one layer lowered, the rest high) is scored this way."""
        values = {p.name: float(values.get(p.name, self.initial_values[p.name])) for p in self.params}
        self._restore()
        self.set_values(values)
        cost = self.cost_model(values) if self.cost_model.static else self.cost_model.measure(self.gm)
        # the callbacks draw from their own generators (FineTune, BNRecalibrate), never from the
        # global RNGs the agent's exploration noise comes from
        if self.recalibrate_fn is not None:
            self.recalibrate_fn(self.gm)
        if self.finetune_steps > 0 and self.finetune_fn is not None:
            self.finetune_fn(self.gm, self.finetune_steps)
        accuracy = accuracy_of(self.evaluate_fn(self.gm))
        return accuracy, float(cost)

    def actions_for(self, values: Mapping[str, float]) -> list[float]:
        """The actions an agent plays to choose ``values`` (inverse of :meth:`step`'s mapping; with
        ``wall: step``, relative to what still fits after the earlier choices): how a baseline's
        configuration enters an agent's replay buffer (warm start)."""
        chosen: dict[str, float] = {}
        out = []
        for p in self.params:
            v = float(values.get(p.name, self.initial_values[p.name]))
            if self.step_wall:
                rng = self.feasible_range(p, chosen)
                fair = min(max(self.fair_value(p, chosen), rng.low), rng.high)
                v = float(rng.clip(min(max(v, rng.low), rng.high)))
                below, above = fair - rng.low, rng.high - fair
                a = (v - fair) / below if v < fair and below > 0 else ((v - fair) / above if v > fair and above > 0 else 0.0)
            else:
                a = p.range.to_unit(v)
            a = float(np.float32(min(max(a, -1.0), 1.0)))
            chosen[p.name] = self._value(p, a, chosen)
            out.append(a)
        return out

    def _finish(self, chosen: Mapping[str, float], actions: Sequence[float] | None) -> EpisodeResult:
        start = time.perf_counter()
        chosen = {p.name: float(chosen.get(p.name, self.initial_values[p.name])) for p in self.params}
        values = self.fit_budget(chosen) if self.reward_cfg.mode == "constrained" else chosen
        accuracy, cost = self.score(values)
        if self.reward_cfg.mode == "constrained":
            reward = accuracy / 100.0
        else:
            reward = accuracy / 100.0 - self.reward_cfg.lam * cost / float(self.budget.max)
        self.episodes += 1
        return EpisodeResult(
            reward=float(reward), accuracy=accuracy, cost=float(cost), values=values, chosen=chosen,
            actions=[float(a) for a in (actions or [])], lowered=values != chosen,
            seconds=time.perf_counter() - start,
        )

    def transitions(self, actions: Sequence[float], reward: float,
                    credit: str | None = None) -> list[tuple[np.ndarray, np.ndarray, float, np.ndarray, bool]]:
        """``(obs, action, reward, next_obs, done)`` of an episode played with ``actions`` that earned
        ``reward``, without running the model: how a resumed search refills its replay buffer.
        ``credit`` (default ``reward.credit``): ``last`` puts ``reward`` on the last transition only
        (0 on the others, as :meth:`step` returns them), ``all`` on every transition. ``reward`` is
        what the agent is trained on (the search subtracts its ``reward.baseline`` first)."""
        every = (credit or self.reward_cfg.credit) == "all"
        chosen: dict[str, float] = {}
        out = []
        obs = self._observation(0, chosen, 0.0)
        for i, (p, a) in enumerate(zip(self.params, actions)):
            a = float(np.float32(np.clip(a, -1.0, 1.0)))
            chosen[p.name] = self._value(p, a, chosen)
            nxt = self._observation(i + 1, chosen, float(a))
            last = i == len(self.params) - 1
            out.append((obs, np.asarray([a], dtype=np.float32), float(reward) if last or every else 0.0, nxt, last))
            obs = nxt
        return out

    def state_dict_copy(self) -> dict[str, torch.Tensor]:
        """A copy of ``gm``'s current state (after an episode: the configured, fine-tuned model)."""
        return copy.deepcopy(self.gm.state_dict())
