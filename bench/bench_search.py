"""Benchmark of the RL upgrader on the embedded MNIST split with examples/models.py:DemoNet.

Two searches, each side by side with its anchors, in one run:

* mixed precision: weight and activation bits in [2, 8] under an average of 3 bits (DDPG),
  against the float network, a uniform 3-bit model and random search with the same number
  of evaluations;
* pruning ratios in [0, 0.9] under 50% of the dense MACs (DDPG), against the float network,
  a uniform ratio that fits the same budget, and random search.

Every configuration (searched or anchor) gets the same treatment: ``--finetune-steps`` steps
while it is scored on a validation split, then ``--final-steps`` steps (``--final-seeds``
shuffling orders, averaged) before the test accuracy is measured on the 1,000 held-out test
images the search never saw. Activations use ``fn: round``: an ``lsq`` activation quantizer
calibrated at 8 bits loses most of its accuracy when its bit width is lowered afterwards.

    python bench/bench_search.py                 # the figures in docs/readme/search.md
    python bench/bench_search.py --quick         # a one-minute smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from evefx.data import mnist5k  # noqa: E402
from evefx.train import evaluate, fit  # noqa: E402
from evefx.upgrade import Accuracy, FineTune, UpgradeEnv, search, spec_with_values  # noqa: E402
from examples.models import DemoNet  # noqa: E402

console = Console(width=140)
INPUT = [1, 1, 28, 28]


def data():
    train_all = mnist5k("train")
    train, val = Subset(train_all, range(3000)), Subset(train_all, range(3000, 4000))
    return train, val, mnist5k("test")


def float_model(train, epochs: int) -> DemoNet:
    torch.manual_seed(0)
    model = DemoNet()
    fit(model, DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
        None, epochs, lr=3e-3, progress=False)
    return model.eval()


def test_accuracy(model, spec, state, train, test, final_steps: int, seeds: int) -> float:
    """Rebuild from the spec, load the configured weights, fine-tune ``final_steps``, score on test;
    the mean over ``seeds`` fine-tuning orders (a few points of run-to-run spread at 3 bits)."""
    accs = []
    for seed in range(1, seeds + 1):
        fresh = evefx.transform(model, spec)
        fresh.load_state_dict(state)
        if final_steps:
            FineTune(train, lr=3e-4, seed=seed)(fresh, final_steps)
        accs.append(evaluate(fresh, DataLoader(test, batch_size=500))["accuracy"])
    return sum(accs) / len(accs)


def run_case(name, model, spec, section, train, val, test, args, run_root: Path, uniform):
    """Search with ``section`` and with random search; evaluate both and the uniform anchor."""
    gm = evefx.transform(model, spec)
    if args.qat_epochs:
        fit(gm, DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
            None, args.qat_epochs, lr=1e-3, progress=False)
    gm.eval()
    score, tune = Accuracy(DataLoader(val, batch_size=500)), FineTune(train, lr=1e-3)
    rows = []
    for algorithm in (section["algorithm"], "random"):
        sec = {**section, "algorithm": algorithm}
        start = time.perf_counter()
        result = search(gm, score, sec, run_dir=run_root / f"{name}-{algorithm}", finetune=tune, progress=not args.quiet)
        seconds = time.perf_counter() - start
        acc = test_accuracy(model, result.spec, torch.load(result.state_path), train, test, args.final_steps, args.final_seeds)
        tail = result.episodes[-min(50, len(result.episodes)):]
        late = sum(r["accuracy"] for r in tail) / len(tail)
        rows.append((f"{algorithm} search", result.best["cost"], result.best["accuracy"], acc, seconds, result.best["values"], late))
    env = UpgradeEnv(gm, score, finetune=tune, finetune_steps=section["finetune_steps"],
                     budget=evefx.spec.Budget(**section["budget"]), reward=evefx.spec.Reward(mode="constrained"))
    values = uniform(env)
    start = time.perf_counter()
    r = env.evaluate_values(values)
    acc = test_accuracy(model, spec_with_values(evefx.load_spec(spec), env.params, r["values"]), env.state_dict_copy(),
                        train, test, args.final_steps, args.final_seeds)
    rows.append((f"uniform {next(iter(values.values())):g}", r["cost"], r["accuracy"], acc, time.perf_counter() - start,
                 values, None))
    env._restore()
    return rows


def uniform_bits(env: UpgradeEnv) -> dict[str, float]:
    return {p.name: 3.0 for p in env.params}


def uniform_ratio(env: UpgradeEnv) -> dict[str, float]:
    """The smallest single ratio (on a 0.01 grid) whose MACs fit the budget."""
    for step in range(0, 91):
        values = {p.name: step / 100 for p in env.params}
        if env.cost(values) <= env.budget.max:
            return values
    raise RuntimeError("no uniform ratio fits the budget")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--final-steps", type=int, default=300)
    ap.add_argument("--final-seeds", type=int, default=3, help="fine-tuning runs averaged for the test accuracy")
    ap.add_argument("--float-epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--only", choices=["bits", "prune"], default=None)
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.finetune_steps, args.final_steps, args.float_epochs, args.final_seeds = 8, 5, 20, 1, 1
    torch.set_num_threads(1)
    run_root = args.run_dir or Path(tempfile.mkdtemp(prefix="evefx-bench-search-"))
    train, val, test = data()
    start = time.perf_counter()
    model = float_model(train, args.float_epochs)
    float_acc = evaluate(model, DataLoader(test, batch_size=500))["accuracy"]
    console.print(f"float DemoNet: test {float_acc:.2f}% ({time.perf_counter() - start:.0f} s to train)")
    common = {"episodes": args.episodes, "finetune_steps": args.finetune_steps, "seed": 0,
              "reward": {"mode": "constrained"}, "checkpoint_every": 25}
    cases = []
    if args.only in (None, "bits"):
        spec = {"trace": {"input_shape": INPUT}, "passes": [{
            "kind": "quantize", "weight": {"bits": 8, "granularity": "per_channel"},
            "activation": {"bits": 8, "fn": "round", "symmetric": False, "signed": False},
            "upgrade_bits": True, "min_bits": 2, "max_bits": 8}]}
        section = {**common, "algorithm": "ddpg", "budget": {"kind": "avg_bits", "max": 3.0},
                   "hyperparams": {"noise_type": "normal", "noise_std": 0.5, "learning_rate": 1e-3}}
        cases.append(("bits", "mixed precision, W+A bits in [2, 8], avg bits <= 3",
                      run_case("bits", model, spec, section, train, val, test, args, run_root, uniform_bits)))
    if args.only in (None, "prune"):
        spec = {"trace": {"input_shape": INPUT}, "passes": [{
            "kind": "prune", "criterion": "l1_norm", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.9}]}
        section = {**common, "algorithm": "ddpg", "budget": {"kind": "macs", "max": 0.5},
                   "hyperparams": {"noise_type": "normal", "noise_std": 0.5, "learning_rate": 1e-3}}
        saved = args.qat_epochs
        args.qat_epochs = 0  # the pruner needs no calibration
        cases.append(("prune", "pruning ratios in [0, 0.9], MACs <= 50%",
                      run_case("prune", model, spec, section, train, val, test, args, run_root, uniform_ratio)))
        args.qat_epochs = saved
    report = {"float_test_accuracy": float_acc, "args": {k: str(v) for k, v in vars(args).items()}, "cases": {}}
    for key, title, rows in cases:
        table = Table(title=f"{title} (float: {float_acc:.2f}%)")
        for col in ("configuration", "cost", "val acc %", "val acc % last 50 ep", "test acc %", "points below float",
                    "seconds"):
            table.add_column(col, justify="right" if col != "configuration" else "left")
        for label, cost, val_acc, acc, seconds, _, late in rows:
            table.add_row(label, f"{cost:.3f}", f"{val_acc:.2f}", "-" if late is None else f"{late:.2f}", f"{acc:.2f}",
                          f"{float_acc - acc:.2f}", f"{seconds:.0f}")
        console.print(table)
        gap = {label: float_acc - acc for label, _, _, acc, _, _, _ in rows}
        ddpg, rnd, uni = (gap[rows[0][0]], gap[rows[1][0]], gap[rows[2][0]])
        console.print(f"  gap to float: ddpg {ddpg:.2f} pts, random {rnd:.2f} pts, {rows[2][0]} {uni:.2f} pts"
                      + (f"; ddpg gap / uniform gap = {ddpg / uni:.2f}" if uni > 0 else ""))
        console.print(f"  ddpg best values: {rows[0][5]}")
        report["cases"][key] = [dict(zip(("configuration", "cost", "val_accuracy", "test_accuracy", "seconds", "values",
                                          "val_accuracy_last_50"), r))
                                for r in rows]
    (run_root / "bench_search.json").write_text(json.dumps(report, indent=2))
    console.print(f"runs and bench_search.json in {run_root}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
