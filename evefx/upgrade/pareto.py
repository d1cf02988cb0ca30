"""The Pareto front of a search: every evaluated configuration priced under several costs.

:func:`pareto_rows` prices each logged configuration under every static cost the model has
(``avg_bits``, ``weight_bytes``, ``macs``; ``latency`` measured with onnxruntime only when asked,
as it costs an export per point) and marks the ones no other configuration beats on both
accuracy and that cost. :func:`write_pareto` writes ``pareto.csv`` (every configuration, its
costs, and the fronts it is on) and ``pareto.png`` (accuracy against each cost, fronts drawn).

Example:
    >>> rows = pareto_rows(env, read_episodes("out/mp")); write_pareto(rows, "out/mp")
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from evefx.errors import SearchError
from evefx.upgrade.costs import CostModel
from evefx.upgrade.env import UpgradeEnv

__all__ = ["non_dominated", "pareto_rows", "write_pareto", "PARETO_COSTS"]

PARETO_COSTS = ("avg_bits", "weight_bytes", "macs")


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(accuracy, cost)`` that no other point dominates (an accuracy at
    least as high at a cost at most as high, one of the two strictly better); duplicates all stay.

    Example:
        >>> non_dominated([(90, 3), (91, 4), (89, 4), (91, 3.5)])
        [0, 3]
    """
    out = []
    for i, (acc, cost) in enumerate(points):
        if not any((a >= acc and c <= cost) and (a > acc or c < cost) for a, c in points):
            out.append(i)
    return out


def pareto_rows(env: UpgradeEnv, rows: Sequence[dict[str, Any]], *, latency: bool = False) -> list[dict[str, Any]]:
    """``rows`` (logged episodes) with a column per cost and ``fronts`` (the costs on whose front
    each row lies). ``latency``: also time every configuration on the front of avg_bits or macs."""
    models = {}
    for kind in PARETO_COSTS:
        try:
            models[kind] = CostModel(env.gm, kind, parameters=env.params)
        except SearchError:
            continue  # e.g. macs when nothing is pruned: every configuration costs the same
    out = [{**r, **{kind: m(r["values"]) for kind, m in models.items()}, "fronts": []} for r in rows]
    for kind in models:
        for i in non_dominated([(r["accuracy"], r[kind]) for r in out]):
            out[i]["fronts"].append(kind)
    if latency and env.example_inputs is not None:
        timer = CostModel(env.gm, "latency", latency_inputs=env.example_inputs, parameters=env.params)
        try:
            for r in out:
                if r["fronts"]:
                    env.set_values(r["values"])
                    r["latency"] = timer.measure(env.gm)
        finally:
            env._restore()
        timed = [i for i, r in enumerate(out) if "latency" in r]
        for j in non_dominated([(out[i]["accuracy"], out[i]["latency"]) for i in timed]):
            out[timed[j]]["fronts"].append("latency")
    return out


def write_pareto(rows: Sequence[dict[str, Any]], run_dir: str | Path, budget: tuple[str, float] | None = None) -> tuple[Path, Path]:
    """Write ``pareto.csv`` and ``pareto.png`` in ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    kinds = [k for k in PARETO_COSTS + ("latency",) if any(k in r for r in rows)]
    csv_path, png_path = run_dir / "pareto.csv", run_dir / "pareto.png"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["episode", "accuracy", *kinds, "fronts", "values"])
        for r in rows:
            w.writerow([r["episode"], f"{r['accuracy']:.4f}", *[("" if k not in r else f"{r[k]:.6g}") for k in kinds],
                        " ".join(r["fronts"]), json.dumps(r["values"])])
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        pts = [(r[kind], r["accuracy"]) for r in rows if kind in r]
        ax.plot([c for c, _ in pts], [a for _, a in pts], ".", color="0.6", label="evaluated")
        front = sorted((r[kind], r["accuracy"]) for r in rows if kind in r["fronts"])
        ax.step([c for c, _ in front], [a for _, a in front], "-o", where="post", color="tab:red", label="Pareto front")
        if budget is not None and budget[0] == kind:
            ax.axvline(budget[1], color="black", linestyle="--", linewidth=0.8, label="budget")
        ax.set_xlabel(kind)
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path
