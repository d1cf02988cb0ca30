"""Benchmark of the search methods and evaluators on the embedded MNIST split (docs/search.md).

Two measurements, each from flags:

* ``--rank N``: how well each evaluator (none, bn_recalibrate, finetune) ranks configurations.
  N random configurations under the budget (random search's stream, budget wall) are scored by
  every evaluator, then each is trained properly (``--final-epochs`` on the 3,000 search-training
  images) and scored on the 1,000 validation images; the Spearman and Kendall rank correlations
  of proxy against final accuracy say which evaluator to trust. Validation only: this chooses a
  setting, so the test images stay unseen.
* ``--methods``: every method in the same harness (same evaluator, same budget wall), for each of
  ``--evaluations`` (e.g. 50 100 200) and ``--search-seeds``; the configuration each run picks is
  trained ``--final-epochs`` epochs on all 4,000 training images for each of ``--final-seeds``
  seeds and scored once on the 1,000 test images, next to the float network trained the same
  number of epochs. Deterministic methods (uniform, greedy, knapsack, ilp) are run once: their
  pick does not depend on the search seed.

The network is DemoNet (examples/models.py) or a small ResNet (``--network resnet``). ``--task bits``
(default): bits of weights and activations in [2, 8] under ``--avg-bits``, searched on the model after
one epoch of 8-bit QAT (lsq weights and activations, the logits float). ``--task prune``:
the channel pruning ratio of every conv/linear but the classifier in [0, 0.9] (l1-norm) under
``--macs`` (fraction of the dense MACs); greedy, knapsack and ilp allocate bit widths only and are
skipped there.

    python bench/bench_search.py --rank 24 --final-epochs 5                       # the rank table
    python bench/bench_search.py --methods ilp random greedy ddpg --evaluations 50 # the methods table
    python bench/bench_search.py --task prune --methods ddpg random tpe uniform --evaluations 100
    python bench/bench_search.py --full      # the issue's protocol: 50/100/200 x 3 x 3, both networks
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from evefx.data import mnist5k  # noqa: E402
from evefx.train import evaluate, fit  # noqa: E402
from evefx.upgrade import Accuracy, BNRecalibrate, FineTune, UpgradeEnv, search, spec_with_values  # noqa: E402
from evefx.upgrade.evaluators import apply_pruning  # noqa: E402
from examples.models import DemoNet  # noqa: E402

console = Console(width=200)
INPUT = [1, 1, 28, 28]
METHOD_SECTIONS = {  # the search section of each method (the evaluator and budget are added)
    "random": {"algorithm": "random"},
    "uniform": {"algorithm": "uniform"},
    "greedy": {"algorithm": "greedy"},
    "knapsack": {"algorithm": "knapsack"},
    "ilp": {"algorithm": "ilp"},
    "tpe": {"algorithm": "tpe"},
    "ddpg": {"algorithm": "ddpg", "reward": {"mode": "constrained", "wall": "step", "credit": "all"},
             "hyperparams": {"noise_type": "normal", "noise_std": 0.5, "learning_rate": 1e-3, "noise_decay": 0.99,
                             "warmup_episodes": 10}},
    "ddpg-warm": {"algorithm": "ddpg", "reward": {"mode": "constrained", "wall": "step", "credit": "all"},
                  "hyperparams": {"noise_type": "normal", "noise_std": 0.3, "learning_rate": 1e-3, "noise_decay": 0.99,
                                  "warmup_episodes": 0, "warm_start": "ilp"}},
}
DETERMINISTIC = ("uniform", "greedy", "knapsack", "ilp")


class SmallResNet(nn.Module):
    """Two residual stages (8 and 16 channels) for 28x28 inputs: the second network of the protocol."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = self.down(x)
        x = torch.relu(x + self.b(x))
        return self.head(x)


NETWORKS = {"demonet": DemoNet, "resnet": SmallResNet}


def qspec() -> dict:
    return {"trace": {"input_shape": INPUT}, "passes": [{
        # lsq weights and activations, the network's output float (the spec defaults but the weights' fn)
        "kind": "quantize", "weight": {"bits": 8, "fn": "lsq"}, "activation": {"bits": 8},
        "upgrade_bits": True, "min_bits": 2, "max_bits": 8}]}


def pspec() -> dict:
    """Channel pruning of every conv/linear but the classifier (l1-norm), the ratios searched in [0, 0.9]."""
    return {"trace": {"input_shape": INPUT}, "passes": [{
        "kind": "prune", "criterion": "l1_norm", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.9}]}


TASKS = {"bits": qspec, "prune": pspec}
BITS_ONLY = ("greedy", "knapsack", "ilp")  # sensitivity allocations of bit widths (SearchError on ratios)


def data():
    train_all = mnist5k("train")
    return Subset(train_all, range(3000)), Subset(train_all, range(3000, 4000)), train_all, mnist5k("test")


def loader(ds, seed: int, batch_size: int = 128) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def float_model(network: str, train, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = NETWORKS[network]()
    fit(model, loader(train, 0), None, epochs, lr=1e-3, progress=False)
    return model.eval()


def start_model(model: nn.Module, spec: dict, train) -> nn.Module:
    """The searched model: the float network transformed (8 bits / nothing pruned), one epoch of training."""
    gm = evefx.transform(model, spec)
    fit(gm, loader(train, 0, 64), None, 1, lr=1e-3, progress=False)
    return gm.eval()


REESTIMATE_BN = False  # --reestimate-bn: evefx.reestimate_bn after every final training (float too)
BN_STATISTICS: str | None = None  # --bn-statistics: the quantize sections' bn_statistics in the final trainings


def final_accuracy(model: nn.Module, spec, train, score_on, epochs: int, seeds: int) -> list[float]:
    """``model`` (float) transformed with ``spec`` (None: float), trained ``epochs`` on ``train`` per seed,
    accuracy on ``score_on`` after the last epoch (with ``REESTIMATE_BN``: :func:`evefx.reestimate_bn` on 16
    batches of 64 after training, float too; ``BN_STATISTICS`` written into the quantize sections)."""
    if spec is not None and BN_STATISTICS:
        spec = {**spec, "passes": [{**p, "bn_statistics": BN_STATISTICS} if p["kind"] == "quantize" else p
                                   for p in spec["passes"]]}
    out = []
    for seed in range(seeds):
        net = copy.deepcopy(model) if spec is None else evefx.transform(model, spec)
        if spec is not None:
            apply_pruning(net)  # masks at the searched ratios (nothing without pruners), as the search scored them
        if epochs:
            fit(net, loader(train, seed), None, epochs, lr=1e-3, seed=seed, progress=False)
        if REESTIMATE_BN:
            evefx.reestimate_bn(net, itertools.islice(loader(train, seed, 64), 16), progress=False)
        out.append(evaluate(net, DataLoader(score_on, batch_size=500))["accuracy"])
    return out


def mean_std(xs) -> str:
    xs = list(xs)
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def evaluator_kwargs(kind: str, finetune_steps: int) -> dict:
    return {"evaluator": {"kind": kind}, "finetune_steps": finetune_steps if kind == "finetune" else 0}


# ---------------------------------------------------------------------- rank correlation of evaluators
def budget_of(args) -> dict:
    return {"kind": "avg_bits", "max": args.avg_bits} if args.task == "bits" else {"kind": "macs", "max": args.macs}


def rank_study(args, model, gm, spec, train, val) -> dict:
    from scipy.stats import kendalltau, spearmanr

    budget = budget_of(args)
    score = Accuracy(DataLoader(val, batch_size=500))
    env = UpgradeEnv(gm, score, budget=budget, reward={"mode": "constrained"}, finetune=FineTune(train),
                     recalibrate=BNRecalibrate(train))
    rng = np.random.default_rng(args.rank_seed)
    configs = []
    while len(configs) < args.rank:  # distinct configurations under the budget (random search's wall)
        values = env.fit_budget(env.values_from_actions(rng.uniform(-1, 1, len(env.params))))
        if values not in configs:
            configs.append(values)
    proxies: dict[str, list[float]] = {"none": [], "bn_recalibrate": [], "finetune": []}
    for values in configs:
        for kind in proxies:
            env.recalibrate_fn = BNRecalibrate(train) if kind == "bn_recalibrate" else None
            env.finetune_steps = args.finetune_steps if kind == "finetune" else 0
            proxies[kind].append(env.score(values)[0])
    env._restore()
    finals = []
    for i, values in enumerate(configs):
        cspec = spec_with_values(evefx.load_spec(spec), env.params, values).model_dump(mode="json")
        finals.append(statistics.fmean(final_accuracy(model, cspec, train, val, args.final_epochs, args.rank_final_seeds)))
        console.print(f"  config {i + 1}/{len(configs)}: final {finals[-1]:.2f}  " +
                      "  ".join(f"{k} {v[i]:.2f}" for k, v in proxies.items()))
    table = Table(title=f"evaluator rank correlation: {len(configs)} configurations, avg bits <= {args.avg_bits}, "
                        f"final = {args.final_epochs} epochs x {args.rank_final_seeds} seeds (validation)")
    for col in ("evaluator", "Spearman", "Kendall", "proxy mean", "final mean"):
        table.add_column(col)
    out = {"configs": configs, "final": finals, "proxies": proxies, "correlation": {}}
    for kind, xs in proxies.items():
        rho, tau = spearmanr(xs, finals).statistic, kendalltau(xs, finals).statistic
        out["correlation"][kind] = {"spearman": float(rho), "kendall": float(tau)}
        table.add_row(kind if kind != "finetune" else f"finetune {args.finetune_steps} steps", f"{rho:.3f}", f"{tau:.3f}",
                      f"{statistics.fmean(xs):.2f}", f"{statistics.fmean(finals):.2f}")
    console.print(table)
    return out


# ---------------------------------------------------------------------- methods
def methods_study(args, model, gm, spec, train, val, train_all, test, root: Path) -> dict:
    score = Accuracy(DataLoader(val, batch_size=500))
    recal, tune = BNRecalibrate(train), FineTune(train)
    float_final = [] if args.skip_float else final_accuracy(model, None, train_all, test, args.final_epochs, args.final_seeds)
    rows = []
    for n_eval in args.evaluations:
        for method in args.methods:
            if args.task == "prune" and method in BITS_ONLY:
                console.print(f"  {method}: skipped (allocates bit widths only; pruning ratios are searched by the others)")
                continue
            seeds = [0] if method in DETERMINISTIC else list(range(args.first_seed, args.first_seed + args.search_seeds))
            for seed in seeds:
                section = {"episodes": n_eval, "seed": seed, "budget": budget_of(args),
                           "reward": {"mode": "constrained"}, **METHOD_SECTIONS[method],
                           **evaluator_kwargs(args.evaluator, args.finetune_steps)}
                start = time.perf_counter()
                result = search(gm, score, section, run_dir=root / f"{method}-{n_eval}-{seed}", finetune=tune,
                                recalibrate=recal, progress=False)
                seconds = time.perf_counter() - start
                finals = final_accuracy(model, result.spec.model_dump(mode="json"), train_all, test, args.final_epochs,
                                        args.final_seeds)
                rows.append({"method": method, "evaluations": n_eval, "seed": seed, "proxy": result.best["accuracy"],
                             "cost": result.best["cost"], "final": finals, "seconds": seconds,
                             "episodes": len(result.episodes), "probes": result.probes, "values": result.best["values"]})
                console.print(f"  {method} {n_eval} eval seed {seed}: proxy {result.best['accuracy']:.2f}, "
                              f"final {mean_std(finals)}, {seconds:.0f} s")
    fm = statistics.fmean(float_final) if float_final else float("nan")
    budget = f"avg bits <= {args.avg_bits}" if args.task == "bits" else f"MACs <= {args.macs:g} of dense"
    table = Table(title=f"methods, {budget}, evaluator {args.evaluator}; final: {args.final_epochs} "
                        f"epochs x {args.final_seeds} seeds on 4,000 images, test; float same training "
                        f"{mean_std(float_final) if float_final else 'not run'}")
    for col in ("method", "evaluations", "search seeds", "proxy (val) best", "test acc % (all runs)", "vs float",
                "search s / run"):
        table.add_column(col)
    summary = {}
    for n_eval in args.evaluations:
        for method in args.methods:
            rs = [r for r in rows if r["method"] == method and r["evaluations"] == n_eval]
            if not rs:
                continue
            accs = [a for r in rs for a in r["final"]]
            per_seed = [statistics.fmean(r["final"]) for r in rs]
            summary[f"{method}@{n_eval}"] = {"mean": statistics.fmean(accs), "per_search_seed": per_seed}
            table.add_row(method, str(n_eval), str(len(rs)), mean_std(r["proxy"] for r in rs), mean_std(accs),
                          f"{statistics.fmean(accs) - fm:+.2f}", f"{statistics.fmean(r['seconds'] for r in rs):.0f}")
    console.print(table)
    return {"float_final": float_final, "runs": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", choices=sorted(NETWORKS), nargs="+", default=["demonet"])
    ap.add_argument("--task", choices=sorted(TASKS), default="bits",
                    help="bits: weight and activation bits in [2, 8] (--avg-bits); prune: channel ratios (--macs)")
    ap.add_argument("--avg-bits", type=float, default=3.0)
    ap.add_argument("--macs", type=float, default=0.5, help="--task prune: MACs budget, fraction of the dense model's")
    ap.add_argument("--float-epochs", type=int, default=10)
    ap.add_argument("--rank", type=int, default=0, help="configurations of the evaluator rank study (0: skip)")
    ap.add_argument("--rank-seed", type=int, default=0)
    ap.add_argument("--rank-final-seeds", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=[], choices=sorted(METHOD_SECTIONS))
    ap.add_argument("--evaluations", type=int, nargs="+", default=[50])
    ap.add_argument("--search-seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="search seeds first-seed .. (to split a run over processes)")
    ap.add_argument("--evaluator", default="none", choices=["none", "bn_recalibrate", "finetune"])
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--final-epochs", type=int, default=5)
    ap.add_argument("--final-seeds", type=int, default=1)
    ap.add_argument("--skip-float", action="store_true", help="do not train the float reference (another run has it)")
    ap.add_argument("--reestimate-bn", action="store_true",
                    help="evefx.reestimate_bn after every final training (float too)")
    ap.add_argument("--bn-statistics", choices=["auto", "batch", "running"], default=None,
                    help="bn_statistics of the final trainings (default: the spec's, auto)")
    ap.add_argument("--full", action="store_true", help="the issue's protocol (hours on 2 cores)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.full:
        args.network, args.evaluations, args.search_seeds, args.final_seeds = ["demonet", "resnet"], [50, 100, 200], 3, 3
        args.final_epochs, args.rank = 10, 24
        args.methods = args.methods or ["ilp", "random", "greedy", "knapsack", "uniform", "tpe", "ddpg", "ddpg-warm"]
    global REESTIMATE_BN, BN_STATISTICS
    REESTIMATE_BN, BN_STATISTICS = args.reestimate_bn, args.bn_statistics
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="evefx-bench-search-"))
    root.mkdir(parents=True, exist_ok=True)
    train, val, train_all, test = data()
    report = {"args": {k: str(v) for k, v in vars(args).items()}}
    start = time.perf_counter()
    for network in args.network:
        model = float_model(network, train, args.float_epochs)
        spec = TASKS[args.task]()
        gm = start_model(model, spec, train)
        console.print(f"{network}: float {args.float_epochs} epochs, then 1 epoch of "
                      f"{'8-bit QAT' if args.task == 'bits' else 'training with the prune section at ratio 0'} "
                      f"({time.perf_counter() - start:.0f} s)")
        if args.rank:
            report[f"{network}/rank"] = rank_study(args, model, gm, spec, train, val)
        if args.methods:
            report[f"{network}/methods"] = methods_study(args, model, gm, spec, train, val, train_all, test, root / network)
        (root / "bench_search.json").write_text(json.dumps(report, indent=1, default=str))
    console.print(f"bench_search.json in {root}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
