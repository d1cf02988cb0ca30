"""Baselines in the search harness: determinism, budgets, the ILP's exactness, warm start, Pareto output."""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch

from evefx.errors import SearchError
from evefx.ptq.sensitivity import SensitivityReport, SensitivityRow
from evefx.upgrade import Accuracy, UpgradeEnv, ilp_allocations, non_dominated, read_episodes, search, uniform_values
from evefx.upgrade.allocation import cost_per_bit, probe_count
from tests.upgrade.test_search import batches, quantized

BUDGET = {"kind": "avg_bits", "max": 3.5}


def env_for(budget=BUDGET, **kw) -> UpgradeEnv:
    return UpgradeEnv(quantized(), Accuracy(batches()), budget=budget, **kw)


def synthetic_report(env: UpgradeEnv, seed: int = 0) -> SensitivityReport:
    """Drops that fall with the bit width, different per parameter (no ties)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in env.params:
        scale = float(rng.uniform(0.5, 5.0))
        for b in (4, 3, 2):
            rows.append(SensitivityRow(p.name, b, 0.0, scale * (5 - b) ** 2 + float(rng.uniform(0, 0.01)), None, None))
    return SensitivityReport([p.name for p in env.params], (4, 3, 2), "weight", 0.0, 0.0, cost_per_bit(env),
                             {p.name: int(p.high) for p in env.params}, rows)


def brute_force(env: UpgradeEnv, report: SensitivityReport) -> tuple[float, dict[str, float]]:
    names = report.layers
    best = (float("inf"), {})
    for combo in itertools.product((2, 3, 4, 8), repeat=len(names)):
        values = dict(zip(names, map(float, combo)))
        if env.cost_model(values) <= env.budget.max + 1e-12:
            drop = sum(max(report.drop(n, int(v)), 0.0) for n, v in values.items())
            best = min(best, (drop, values), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("budget", [BUDGET, {"kind": "avg_bits", "max": 2.75}, {"kind": "weight_bytes", "max": 190.0}])
def test_ilp_meets_its_budget_exactly_and_is_optimal(budget):
    env = env_for(budget)
    report = synthetic_report(env)
    first, second = ilp_allocations(env, report, k=2)
    drop = lambda v: sum(max(report.drop(n, int(b)), 0.0) for n, b in v.items())  # noqa: E731
    best_drop, _ = brute_force(env, report)
    assert drop(first) == pytest.approx(best_drop, abs=1e-9)
    assert env.cost_model(first) <= budget["max"] + 1e-12 and env.cost_model(second) <= budget["max"] + 1e-12
    assert first != second and drop(second) >= drop(first)
    if budget["kind"] == "avg_bits":  # the budget is spent exactly: 4 bit widths summing to 4 * max
        assert env.cost_model(first) == budget["max"]


def test_ilp_and_knapsack_refuse_what_they_cannot_allocate(tmp_path):
    with pytest.raises(SearchError, match="no allocation of the bit widths"):
        ilp_allocations(env_for({"kind": "avg_bits", "max": 1.5}, reward={"mode": "penalty"}),
                        synthetic_report(env_for()), k=1)
    with pytest.raises(SearchError, match=r"search.episodes: 5 evaluations leave none after the 13 sensitivity probes"):
        search(quantized(), Accuracy(batches()), {"algorithm": "ilp", "episodes": 5, "budget": BUDGET},
               run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("algorithm", ["random", "uniform", "greedy", "knapsack", "ilp", "tpe"])
def test_each_baseline_is_deterministic_for_a_seed_and_fits_the_budget(tmp_path, algorithm):
    pytest.importorskip("optuna") if algorithm == "tpe" else None
    section = {"algorithm": algorithm, "episodes": 16, "budget": BUDGET, "seed": 5}
    a = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path / "a", progress=False)
    b = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path / "b", progress=False)
    assert [(r["values"], r["accuracy"]) for r in a.episodes] == [(r["values"], r["accuracy"]) for r in b.episodes]
    assert all(r["cost"] <= BUDGET["max"] + 1e-9 for r in a.episodes)
    probes = probe_count(env_for(), (2, 3, 4)) if algorithm in ("greedy", "knapsack", "ilp") else 0
    assert a.probes == probes and len(a.episodes) + probes <= 16
    if algorithm == "ilp":  # the evaluations left after the probes go to the next-best allocations
        assert len(a.episodes) == 16 - probes and len({str(r["values"]) for r in a.episodes}) == len(a.episodes)
    if algorithm == "uniform":
        assert a.episodes[0]["values"] == uniform_values(env_for()) and set(a.episodes[0]["values"].values()) == {3.0}


def test_ilp_evaluates_its_optimum_then_the_uniform_and_greedy_allocations(tmp_path):
    section = {"algorithm": "ilp", "episodes": 18, "budget": BUDGET}
    run = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path / "a", progress=False)
    pure = search(quantized(), Accuracy(batches()), {**section, "hyperparams": {"ilp_baselines": []}},
                  run_dir=tmp_path / "b", progress=False)
    greedy = search(quantized(), Accuracy(batches()), {**section, "algorithm": "greedy"}, run_dir=tmp_path / "c",
                    progress=False)
    values = [r["values"] for r in run.episodes]
    ilp_only = [r["values"] for r in pure.episodes]
    assert values[0] == ilp_only[0]  # the ILP's optimum first, as before
    # the optimum, uniform, greedy, then the ILP's next-best solutions, each candidate once
    candidates = [ilp_only[0], uniform_values(env_for()), greedy.episodes[0]["values"], *ilp_only[1:]]
    expected = [v for i, v in enumerate(candidates) if v not in candidates[:i]][:5]
    assert values == expected and len({str(v) for v in values}) == 5
    assert run.best["accuracy"] == max(r["accuracy"] for r in run.episodes)  # the best candidate, whoever made it
    with pytest.raises(SearchError, match=r"search.hyperparams.ilp_baselines: a list of uniform, greedy, knapsack "
                                          r"\(got \['random'\]\)"):
        search(quantized(), Accuracy(batches()), {**section, "hyperparams": {"ilp_baselines": ["random"]}},
               run_dir=tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # refused before the probes


def test_sensitivity_probes_are_not_paid_twice_on_resume(tmp_path):
    section = {"algorithm": "ilp", "episodes": 15, "budget": BUDGET}
    search(quantized(), Accuracy(batches()), {**section, "episodes": 14}, run_dir=tmp_path, progress=False)
    calls = []

    class Counting(Accuracy):
        def __call__(self, gm):
            calls.append(1)
            return super().__call__(gm)

    again = search(quantized(), Counting(batches()), section, run_dir=tmp_path, resume=True, progress=False)
    assert len(again.episodes) == 2 and len(calls) == 2  # one new episode, and the best replayed once


def test_rl_warm_start_plays_the_ilp_pick_first_and_stores_it_for_the_agent(tmp_path):
    section = {"algorithm": "ddpg", "episodes": 16, "budget": BUDGET, "reward": {"mode": "constrained", "wall": "step"},
               "hyperparams": {"warm_start": "ilp", "warmup_episodes": 0}}
    result = search(quantized(), Accuracy(batches()), section, run_dir=tmp_path, progress=False)
    ilp = search(quantized(), Accuracy(batches()), {"algorithm": "ilp", "episodes": 14, "budget": BUDGET},
                 run_dir=tmp_path / "ilp", progress=False)
    assert result.probes == 13 and len(result.episodes) == 3
    assert result.episodes[0]["values"] == ilp.episodes[0]["values"] and not result.episodes[0]["lowered"]
    with pytest.raises(SearchError, match="warm_start: only an RL agent"):
        search(quantized(), Accuracy(batches()), {"algorithm": "random", "hyperparams": {"warm_start": "ilp"}},
               run_dir=tmp_path / "x", progress=False)


@pytest.mark.parametrize("wall", ["end", "step"])
def test_actions_for_plays_back_the_values_it_was_given(wall):
    env = env_for(reward={"mode": "constrained", "wall": wall})
    values = {p.name: v for p, v in zip(env.params, (4.0, 3.0, 2.0, 5.0))}
    env.reset(seed=0)
    for a in env.actions_for(values):
        *_, info = env.step(np.asarray([a], dtype=np.float32))
    assert info["episode_result"]["chosen"] == values


def test_pareto_front_is_non_dominated_and_written(tmp_path):
    rng = np.random.default_rng(0)
    points = [(float(a), float(c)) for a, c in zip(rng.uniform(50, 99, 60).round(0), rng.uniform(2, 8, 60).round(1))]
    front = set(non_dominated(points))
    dominates = lambda p, q: p[0] >= q[0] and p[1] <= q[1] and p != q  # noqa: E731
    assert front and all(not any(dominates(q, points[i]) for q in points) for i in front)
    assert all(any(dominates(points[j], points[i]) for j in front) for i in range(len(points)) if i not in front)
    result = search(quantized(), Accuracy(batches()), {"algorithm": "random", "episodes": 8, "budget": BUDGET},
                    run_dir=tmp_path, progress=False)
    with open(result.pareto_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(read_episodes(tmp_path)) == 8 and (tmp_path / "pareto.png").stat().st_size > 0
    on = [(float(r["accuracy"]), float(r["avg_bits"])) for r in rows if "avg_bits" in r["fronts"].split()]
    every = [(float(r["accuracy"]), float(r["avg_bits"])) for r in rows]
    assert on and all(not any(dominates(q, p) for q in every) for p in on)


def test_ratio_searches_are_refused_by_the_bit_allocators(tmp_path):
    spec = {"passes": [{"kind": "prune", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.5}]}
    import evefx
    from tests.upgrade.test_search import mlp

    gm = evefx.transform(mlp(), spec, torch.zeros(1, 8))
    with pytest.raises(SearchError, match="greedy, knapsack and ilp allocate bit widths"):
        search(gm, Accuracy(batches()), {"algorithm": "ilp", "episodes": 20, "budget": {"kind": "macs", "max": 0.8}},
               run_dir=tmp_path, progress=False)


def test_pareto_latency_times_the_configurations_on_a_front(tmp_path):
    result = search(quantized(), Accuracy(batches()), {"algorithm": "random", "episodes": 4, "budget": BUDGET,
                                                       "evaluator": {"kind": "none"}},
                    run_dir=tmp_path, progress=False, pareto_latency=True, example_inputs=torch.zeros(1, 8))
    with open(result.pareto_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert all((r["latency"] != "") == bool(set(r["fronts"].split()) & {"avg_bits", "weight_bytes"}) for r in rows)
    assert any(float(r["latency"]) > 0 for r in rows if r["latency"])


def test_an_unset_algorithm_is_the_ilp_for_bit_widths_random_for_ratios_and_ddpg_when_warm_started(tmp_path):
    result = search(quantized(), Accuracy(batches()), {"episodes": 14, "budget": BUDGET, "evaluator": {"kind": "none"}},
                    run_dir=tmp_path / "bits", progress=False)
    assert result.spec.search.algorithm == "ilp" and result.probes == 13
    import evefx
    from tests.upgrade.test_search import mlp

    gm = evefx.transform(mlp(), {"passes": [{"kind": "prune", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.5}]},
                         torch.zeros(1, 8))
    pruned = search(gm, Accuracy(batches()), {"episodes": 2, "budget": {"kind": "macs", "max": 0.9},
                                              "evaluator": {"kind": "none"}}, run_dir=tmp_path / "ratios", progress=False)
    assert pruned.spec.search.algorithm == "random" and not (tmp_path / "ratios" / "checkpoint").exists()
    warm = search(quantized(), Accuracy(batches()), {"episodes": 15, "budget": BUDGET, "evaluator": {"kind": "none"},
                                                      "hyperparams": {"warm_start": "ilp", "warmup_episodes": 0}},
                  run_dir=tmp_path / "warm", progress=False)
    assert warm.spec.search.algorithm == "ddpg" and (tmp_path / "warm" / "checkpoint").exists()
