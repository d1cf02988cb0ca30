"""Bit allocation from per-layer sensitivities: greedy, knapsack and an integer program (HAWQ-v3).

:func:`probe_sensitivity` scores the model with one eve parameter lowered to each of a few bit
widths, every other one at its highest (the reference), with the search's own evaluator; the
probes count in the search's evaluations and are kept in ``sensitivity.json``, so a resumed
search does not pay for them twice. The drops become a :class:`evefx.ptq.SensitivityReport`
whose ``params`` are each parameter's cost per bit, so its ``allocate`` (greedy, knapsack)
solves the search's budget. :func:`ilp_allocations` solves the same choice as an integer program
(pulp with its bundled CBC solver): least summed drop with the budget met exactly (no rounding of
costs), and the next-best solutions after it (each earlier one cut off), so the evaluations left
go to the best few allocations rather than one.

Example:
    >>> report = probe_sensitivity(env, bits=(2, 3, 4))
    >>> report.allocate(report_budget(env), "greedy")
    >>> ilp_allocations(env, report, k=5)[0]
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from evefx.errors import SearchError
from evefx.ptq.sensitivity import SensitivityReport, SensitivityRow
from evefx.upgrade.env import UpgradeEnv

__all__ = ["allocatable", "probe_sensitivity", "probe_count", "cost_per_bit", "report_budget", "allocate", "ilp_allocations"]

log = logging.getLogger(__name__)


def allocatable(env: UpgradeEnv) -> bool:
    """True when greedy, knapsack and ilp can search ``env``: bit widths only, under avg_bits or weight_bytes."""
    return all(p.kind == "bits" for p in env.params) and env.budget.kind in ("avg_bits", "weight_bytes")


def _check_bits(env: UpgradeEnv) -> None:
    if not allocatable(env):
        raise SearchError(f"search.algorithm: greedy, knapsack and ilp allocate bit widths under an avg_bits or "
                          f"weight_bytes budget (got {env.budget.kind} over {sorted({p.kind for p in env.params})}); "
                          "use random, tpe or an RL agent for pruning ratios and other costs")


def probe_count(env: UpgradeEnv, bits: Sequence[int]) -> int:
    """Evaluations :func:`probe_sensitivity` spends: the reference and one per parameter and bit width."""
    return 1 + sum(1 for p in env.params for b in bits if b < p.high)


def probe_sensitivity(env: UpgradeEnv, bits: Sequence[int] = (2, 3, 4), run_dir: str | Path | None = None) -> SensitivityReport:
    """Drops of the search's score with each bit eve parameter lowered alone to each of ``bits``.

    Probes already in ``run_dir/sensitivity.json`` are read back, not evaluated again.

    Example:
        >>> probe_sensitivity(env, (2, 4)).ranking(2)[:3]
    """
    _check_bits(env)
    path = Path(run_dir) / "sensitivity.json" if run_dir is not None else None
    done: dict[str, float] = json.loads(path.read_text()) if path is not None and path.exists() else {}
    high = {p.name: float(p.high) for p in env.params}

    def measured(key: str, values: dict[str, float]) -> float:
        if key not in done:
            done[key] = env.score(values)[0]
            if path is not None:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(done, indent=1))
                tmp.replace(path)
        return done[key]

    ref = measured("reference", high)
    rows = []
    for p in env.params:
        for b in sorted(set(int(b) for b in bits), reverse=True):
            if b >= p.high or b < p.low:
                continue
            acc = measured(f"{p.name}@{b}", {**high, p.name: float(b)})
            rows.append(SensitivityRow(p.name, b, acc, ref - acc, None, None))
    slopes = cost_per_bit(env)
    measured_bits = tuple(sorted({r.bits for r in rows}, reverse=True))
    return SensitivityReport(layers=[p.name for p in env.params], bits=measured_bits, what="weight", baseline=ref,
                             float_metric=ref, params=slopes, current_bits={p.name: int(p.high) for p in env.params},
                             rows=rows)


def cost_per_bit(env: UpgradeEnv) -> dict[str, float]:
    """Each parameter's cost per bit under the budget (avg_bits: 1/n each; weight_bytes: its weights/8),
    checked to be linear, which is what makes a knapsack or an integer program exact."""
    _check_bits(env)
    low = {p.name: float(p.low) for p in env.params}
    base = env.cost_model(low)
    slopes = {p.name: env.cost_model({**low, p.name: p.low + 1.0}) - base for p in env.params}
    top = {p.name: float(p.high) for p in env.params}
    linear = base + sum(slopes[p.name] * (p.high - p.low) for p in env.params)
    if abs(env.cost_model(top) - linear) > 1e-6 * max(1.0, abs(linear)):
        raise SearchError(f"search.budget.kind {env.budget.kind}: the cost is not linear in the bit widths here; "
                          "use random, tpe or an RL agent")
    return slopes


def _intercept(env: UpgradeEnv, slopes: dict[str, float]) -> float:
    return env.cost_model({p.name: float(p.low) for p in env.params}) - sum(slopes[p.name] * p.low for p in env.params)


def report_budget(env: UpgradeEnv, slopes: dict[str, float] | None = None) -> float:
    """The budget as the cost-weighted average bit width :meth:`SensitivityReport.allocate` takes."""
    slopes = cost_per_bit(env) if slopes is None else slopes
    total = sum(slopes.values())
    if total <= 0:
        raise SearchError("search.budget: no searched bit width changes this cost")
    return (float(env.budget.max) - _intercept(env, slopes)) / total


def allocate(env: UpgradeEnv, report: SensitivityReport, method: str) -> dict[str, float]:
    """The greedy or knapsack allocation of :meth:`SensitivityReport.allocate` under the search's budget."""
    try:
        bits = report.allocate(report_budget(env, report.params), method)
    except Exception as e:  # a QuantizationError from the PTQ report says the budget in its own words
        raise SearchError(f"search.budget: {e}") from e
    return {name: float(b) for name, b in bits.items()}


def _options(report: SensitivityReport, name: str) -> list[int]:
    return sorted({r.bits for r in report.rows if r.layer == name} | {report.current_bits[name]})


def ilp_allocations(env: UpgradeEnv, report: SensitivityReport, k: int = 1) -> list[dict[str, float]]:
    """Up to ``k`` allocations, best first: the least summed (non-negative) drop with the cost at most
    ``budget.max`` exactly; among equal drops, the one spending more of the budget. Each solution is
    cut off before the next solve. Needs ``pulp`` (a dependency of evefx).

    Example:
        >>> ilp_allocations(env, probe_sensitivity(env), k=3)
    """
    try:
        import pulp
    except ImportError as e:
        raise SearchError("search.algorithm ilp needs pulp, a dependency of evefx: pip install pulp") from e
    slopes = report.params
    rest = float(env.budget.max) - _intercept(env, slopes)
    names = report.layers
    prob = pulp.LpProblem("bits", pulp.LpMinimize)
    x = {(n, b): pulp.LpVariable(f"x{i}_{b}", cat="Binary") for i, n in enumerate(names) for b in _options(report, n)}
    # the drop, then (far smaller) the bits left unspent: ties go to the allocation using the budget
    spread = max(report.current_bits.values())
    prob += pulp.lpSum(v * (max(report.drop(n, b), 0.0) + 1e-6 * (spread - b) / spread) for (n, b), v in x.items())
    for n in names:
        prob += pulp.lpSum(v for (m, _), v in x.items() if m == n) == 1
    # scaled so the smallest positive cost per bit is 1: integer coefficients for bit budgets
    unit = min((s for s in slopes.values() if s > 0), default=1.0)
    prob += pulp.lpSum(v * (slopes[n] / unit) * b for (n, b), v in x.items()) <= rest / unit + 1e-9
    out: list[dict[str, float]] = []
    solver = pulp.PULP_CBC_CMD(msg=False)
    while len(out) < k:
        if prob.solve(solver) != pulp.LpStatusOptimal:
            break
        pick = {n: b for (n, b), v in x.items() if v.value() is not None and v.value() > 0.5}
        values = {n: float(b) for n, b in pick.items()}
        if env.cost_model(values) > float(env.budget.max) + 1e-9:  # a solver tolerance, never a wrong answer
            raise SearchError(f"ilp: the solver's allocation costs {env.cost_model(values):.6g} over "
                              f"budget.max {env.budget.max}; report this model")
        out.append(values)
        prob += pulp.lpSum(x[(n, b)] for n, b in pick.items()) <= len(names) - 1
    if not out:
        raise SearchError(f"search.budget: no allocation of the bit widths {sorted({b for _, b in x})} "
                          f"fits {env.budget.kind} <= {env.budget.max}; raise it or add lower bits")
    return out
