"""The search methods that are not reinforcement learning, in the same harness as the agents.

Each plays at most ``search.episodes`` evaluations through the same :class:`UpgradeEnv` (same
evaluator, same budget wall, same episode log), so their results compare with an agent's:

* ``random``: uniformly random actions, the whole stream drawn from ``seed`` up front;
* ``uniform``: the dearest single value (every parameter at the same point of its range) that
  fits the budget; one evaluation;
* ``greedy``, ``knapsack``, ``ilp``: per-parameter sensitivity probes (:mod:`.allocation`),
  then the allocation; ``ilp`` evaluates its optimum, then the uniform and greedy allocations
  (``hyperparams.ilp_baselines``), then spends the evaluations left on its next-best solutions;
* ``tpe``: Optuna's TPE sampler (``pip install optuna``), seeded.

A resumed run replays the logged episodes (random: the same stream; tpe: told to the sampler
again; sensitivity methods: probes read from ``sensitivity.json``) and plays the rest.

Example:
    >>> play_baseline(section, env, runlog)   # what search() runs for a non-RL algorithm
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from evefx.errors import SearchError
from evefx.spec import SearchSection
from evefx.upgrade.allocation import allocate, ilp_allocations, probe_count, probe_sensitivity
from evefx.upgrade.costs import cheap_end
from evefx.upgrade.env import UpgradeEnv
from evefx.upgrade.runlog import RunLog

__all__ = ["BASELINES", "SENSITIVITY_METHODS", "play_baseline", "uniform_values", "sensitivity_bits", "probes_for",
           "baseline_values"]

log = logging.getLogger(__name__)

BASELINES = ("random", "uniform", "greedy", "knapsack", "ilp", "tpe")
SENSITIVITY_METHODS = ("greedy", "knapsack", "ilp")
DEFAULT_SENSITIVITY_BITS = (2, 3, 4)
ILP_BASELINES = ("uniform", "greedy")


def sensitivity_bits(section: SearchSection) -> tuple[int, ...]:
    """``hyperparams.sensitivity_bits``: the bit widths each parameter is probed at (default 2, 3, 4)."""
    bits = section.hyperparams.get("sensitivity_bits", DEFAULT_SENSITIVITY_BITS)
    if not isinstance(bits, (list, tuple)) or not bits or not all(isinstance(b, int) and b >= 1 for b in bits):
        raise SearchError(f"search.hyperparams.sensitivity_bits: a list of bit widths >= 1 (got {bits!r})")
    return tuple(bits)


def ilp_baselines(section: SearchSection) -> tuple[str, ...]:
    """``hyperparams.ilp_baselines``: the baselines whose allocations the ILP also evaluates, right
    after its own optimum (default uniform and greedy; ``[]``: the ILP's solutions only)."""
    names = section.hyperparams.get("ilp_baselines", ILP_BASELINES)
    if not isinstance(names, (list, tuple)) or not all(n in ("uniform", "greedy", "knapsack") for n in names):
        raise SearchError(f"search.hyperparams.ilp_baselines: a list of uniform, greedy, knapsack (got {names!r})")
    return tuple(names)


def probes_for(section: SearchSection, env: UpgradeEnv, method: str | None) -> int:
    """Evaluations the sensitivity probes of ``method`` take (0 for methods without probes); checks
    the method's hyperparams before anything runs."""
    if method == "ilp":
        ilp_baselines(section)
    return probe_count(env, sensitivity_bits(section)) if method in SENSITIVITY_METHODS else 0


def uniform_values(env: UpgradeEnv) -> dict[str, float]:
    """The dearest configuration with every parameter at the same point of its range that fits the
    budget (the highest uniform bit width, the lowest uniform pruning ratio...); a cost measured
    by latency is walled at evaluation instead.

    Example:
        >>> uniform_values(env)   # avg_bits <= 3 over bits in [2, 8]
        {'features.0.weight_quantizer.bits': 3.0, ...}
    """
    grid = np.linspace(-1.0, 1.0, 601)
    configs = [{p.name: float(p.range.from_unit(u)) for p in env.params} for u in grid]
    if not env.cost_model.static:
        return configs[-1]
    fitting = [c for c in configs if env.cost_model(c) <= float(env.budget.max) + 1e-9]
    if not fitting:
        return {p.name: float(cheap_end(p)) for p in env.params}
    return max(fitting, key=env.cost_model)


def baseline_values(section: SearchSection, env: UpgradeEnv, method: str, k: int = 1,
                    run_dir: Any = None) -> list[dict[str, float]]:
    """The configurations a deterministic baseline evaluates (``uniform``, ``greedy``, ``knapsack``: one;
    ``ilp``: up to ``k``), after its sensitivity probes; also the warm start of an RL agent.

    The ILP's list is its optimum, then the allocations of ``hyperparams.ilp_baselines`` (uniform
    and greedy by default; the same probes serve greedy), then its next-best solutions, without
    repeats. Why: the ILP sums per-parameter drops measured one parameter at a time, and the
    evaluator scored the uniform allocation above every ILP solution on both bench networks
    (docs/search.md); picking the best evaluated candidate then never ranks below those baselines
    on the search's own score, for one or two evaluations."""
    if method == "uniform":
        return [uniform_values(env)]
    if method not in SENSITIVITY_METHODS:
        raise SearchError(f"search.hyperparams.warm_start: unknown {method!r}; use one of uniform, "
                          f"{', '.join(SENSITIVITY_METHODS)}")
    report = probe_sensitivity(env, sensitivity_bits(section), run_dir)
    if method != "ilp":
        return [allocate(env, report, method)]
    solutions = ilp_allocations(env, report, k=max(1, k))
    out = solutions[:1]
    for name in ilp_baselines(section):
        out.append(uniform_values(env) if name == "uniform" else allocate(env, report, name))
    out += solutions[1:]
    unique = [v for i, v in enumerate(out) if v not in out[:i]]
    return unique[:max(1, k)]


def _record_values(env: UpgradeEnv, runlog: RunLog, values: dict[str, float]) -> None:
    runlog.record(env.evaluate_values(values, env.actions_for(values)))


def _play_random(section: SearchSection, env: UpgradeEnv, runlog: RunLog, make_env: Callable[[], UpgradeEnv]) -> None:
    rng = np.random.default_rng(section.seed)
    # the whole stream is drawn up front, so a resumed run plays exactly the episodes it would have
    actions = rng.uniform(-1.0, 1.0, size=(runlog.target, len(env.params)))
    if section.backend == "ray":  # the episodes are independent: n_envs Ray actors play them, recorded in order
        from evefx.upgrade.ray_backend import RayVecEnv

        pool = RayVecEnv([make_env] * section.n_envs)
        try:
            for result in pool.evaluate_actions(actions[runlog.done:]):
                runlog.record(result)
        finally:
            pool.close()
        return
    for i in range(runlog.done, runlog.target):
        runlog.record(env.evaluate_values(env.values_from_actions(actions[i]), actions[i].tolist()))


def _play_tpe(section: SearchSection, env: UpgradeEnv, runlog: RunLog) -> None:
    try:
        import optuna
    except ImportError as e:
        raise SearchError("search.algorithm tpe needs optuna: pip install 'evefx[search]' (or optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hp = dict(section.hyperparams)
    startup = int(hp.pop("n_startup_trials", 10))
    sampler = optuna.samplers.TPESampler(seed=section.seed, n_startup_trials=startup, multivariate=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dists = {p.name: (optuna.distributions.IntDistribution(int(p.low), int(p.high)) if p.integer
                      else optuna.distributions.FloatDistribution(float(p.low), float(p.high))) for p in env.params}
    for row in runlog.rows:  # a resumed study learns the logged trials again
        chosen = env.values_from_actions(row["actions"])
        params = {n: (int(round(v)) if isinstance(dists[n], optuna.distributions.IntDistribution) else v)
                  for n, v in chosen.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=row["reward"]))
    while runlog.done < runlog.target:
        trial = study.ask(dists)
        chosen = {p.name: float(trial.params[p.name]) for p in env.params}
        # the actions on the whole ranges (as random search logs them): a resumed study reads them back
        actions = [float(np.float32(p.range.to_unit(chosen[p.name]))) for p in env.params]
        result = env.evaluate_values(env.values_from_actions(actions), actions)
        runlog.record(result)
        study.tell(trial, result["reward"])


def play_baseline(section: SearchSection, env: UpgradeEnv, runlog: RunLog,
                  make_env: Callable[[], UpgradeEnv] | None = None) -> None:
    """Play ``section.algorithm`` (one of :data:`BASELINES`) until ``runlog.target`` episodes are logged."""
    method = section.algorithm
    if method == "random":
        _play_random(section, env, runlog, make_env or (lambda: env))
    elif method == "tpe":
        _play_tpe(section, env, runlog)
    elif method in ("uniform",) + SENSITIVITY_METHODS:
        configs = baseline_values(section, env, method, k=runlog.target, run_dir=runlog.run_dir)
        for values in configs[runlog.done:runlog.target]:
            _record_values(env, runlog, values)
    else:
        raise SearchError(f"search.algorithm: {method!r} is not a baseline; use one of {', '.join(BASELINES)}")
