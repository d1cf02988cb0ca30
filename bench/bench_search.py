"""Benchmark of the RL upgrader on the embedded MNIST split with examples/models.py:DemoNet.

Two searches, each side by side with its anchors, in one run:

* mixed precision: weight and activation bits in [2, 8] under an average of 3 bits (DDPG),
  against the float network, a uniform 3-bit model and random search with the same number
  of evaluations;
* pruning ratios in [0, 0.9] under 50% of the dense MACs (DDPG), against the float network,
  a uniform ratio that fits the same budget, and random search.

The protocol is the standard one (HAQ, AMC): the search scores each configuration with a short
fine-tuning (``--finetune-steps`` steps for the bit widths, ``--prune-finetune-steps`` for the
ratios, on 3,000 training images; accuracy on the other 1,000) as its proxy reward; then the configuration it picks, like every anchor, is trained properly:
the float network with that configuration applied is trained ``--final-epochs`` epochs (Adam
1e-3, batch 128, all 4,000 training images, as the quantization tables of
docs/quantization.md) for each of ``--final-seeds`` seeds (batch order), and scored on
the 1,000 held-out test images the search never saw. The float network trains
``--float-epochs`` epochs on the 3,000 search-training images; the references are that network
and the same network trained ``--final-epochs`` more epochs exactly like the configured rows
("float, N more epochs": the same total training). The bit widths are searched with the weight
quantizer ``--weight-fn`` (default ``llsq``, the best 4-bit row of the quantization tables), so the
proxy scores the model the final training builds; the bit-width rows are trained twice, with that
quantizer and with ``--final-weight-fn`` (default ``round``), the bit widths staying those chosen.
A searched activation bit width also sets the bits of its layer's input quantizer (the first
layer's: the network input), in the search as in ``best.yaml``. Activations use ``fn: round``: an ``lsq``
activation quantizer calibrated at 8 bits loses most of its accuracy when its bit width is
lowered afterwards.

    python bench/bench_search.py                 # the figures in docs/search.md
    python bench/bench_search.py --quick         # a one-minute smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
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
from evefx.data import loaders  # noqa: E402
from evefx.train import evaluate, fit  # noqa: E402
from evefx.upgrade import Accuracy, FineTune, UpgradeEnv, search, spec_with_values  # noqa: E402
from evefx.upgrade.env import apply_pruning  # noqa: E402
from examples.models import DemoNet  # noqa: E402

console = Console(width=200)
INPUT = [1, 1, 28, 28]


def data():
    train_all = mnist5k("train")
    train, val = Subset(train_all, range(3000)), Subset(train_all, range(3000, 4000))
    return train, val, mnist5k("test")


def float_model(train, epochs: int) -> DemoNet:
    """DemoNet trained as in docs/quantization.md (Adam 1e-3, batch 128), on the search's
    3,000 training images so that the validation images stay unseen until the final training."""
    torch.manual_seed(0)
    model = DemoNet()
    fit(model, DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)),
        None, epochs, lr=1e-3, progress=False)
    return model.eval()


def final_accuracy(model, spec, epochs: int, seeds: int, weight_fn: str | None = None) -> list[float]:
    """The final training every row gets: ``model`` (the float network) transformed with ``spec``
    (None: left float), pruning masks computed from its ratios, trained ``epochs`` epochs (Adam 1e-3,
    batch 128, the 4,000 training images) per seed; test accuracy after the last epoch, per seed.
    ``weight_fn`` swaps the weight quantizer of every quantize pass (the chosen bit widths stay)."""
    if weight_fn is not None and spec is not None:
        spec = copy.deepcopy(spec)
        for section in spec["passes"]:
            if section.get("kind") == "quantize":
                section["weight"]["fn"] = weight_fn
    accs = []
    for seed in range(seeds):
        net = copy.deepcopy(model) if spec is None else evefx.transform(model, spec)
        if spec is not None and any(p.get("kind") == "prune" for p in spec["passes"]):
            apply_pruning(net)
        train, test = loaders(batch_size=128, seed=seed)
        if epochs:
            fit(net, train, None, epochs, lr=1e-3, optimizer="adam", seed=seed, progress=False)
        accs.append(evaluate(net, test)["accuracy"])
    return accs


def searched_test_accuracy(model, spec, state, test) -> float:
    """Test accuracy of the configuration as the search left it (proxy fine-tuning only)."""
    fresh = evefx.transform(model, spec)
    fresh.load_state_dict(state)
    return evaluate(fresh, DataLoader(test, batch_size=500))["accuracy"]


def run_case(name, model, spec, section, train, val, test, args, run_root: Path, uniform):
    """Search with ``section`` and with random search, then train their best configurations and the
    uniform anchor the same way (``final_accuracy``)."""
    quant = any(p["kind"] == "quantize" for p in spec["passes"])
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
        chosen = result.spec.model_dump(mode="json")
        proxy = searched_test_accuracy(model, result.spec, torch.load(result.state_path), test)
        accs = final_accuracy(model, chosen, args.final_epochs, args.final_seeds)
        accs2 = final_accuracy(model, chosen, args.final_epochs, args.final_seeds, args.final_weight_fn) if quant else None
        tail = result.episodes[-min(50, len(result.episodes)):]
        late = sum(r["accuracy"] for r in tail) / len(tail)
        rows.append((f"{algorithm} search", result.best["cost"], result.best["accuracy"], late, proxy, accs, accs2,
                     seconds, result.best["values"]))
    env = UpgradeEnv(gm, score, finetune=tune, finetune_steps=section["finetune_steps"],
                     budget=evefx.spec.Budget(**section["budget"]), reward=evefx.spec.Reward(**section["reward"]))
    values = uniform(env)
    start = time.perf_counter()
    r = env.evaluate_values(values)
    uni_spec = spec_with_values(evefx.load_spec(spec), env.params, r["values"])
    proxy = searched_test_accuracy(model, uni_spec, env.state_dict_copy(), test)
    seconds = time.perf_counter() - start
    uni = uni_spec.model_dump(mode="json")
    accs = final_accuracy(model, uni, args.final_epochs, args.final_seeds)
    accs2 = final_accuracy(model, uni, args.final_epochs, args.final_seeds, args.final_weight_fn) if quant else None
    rows.append((f"uniform {next(iter(values.values())):g}", r["cost"], r["accuracy"], None, proxy, accs, accs2, seconds,
                 values))
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


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=200, help="proxy fine-tuning steps per episode (bit widths)")
    ap.add_argument("--prune-finetune-steps", type=int, default=50, help="proxy fine-tuning steps per episode (ratios)")
    ap.add_argument("--weight-fn", default="llsq", choices=["round", "lsq", "llsq"],
                    help="weight quantizer of the bit-width search and of its first final training")
    ap.add_argument("--final-epochs", type=int, default=10, help="training epochs of every row after the search")
    ap.add_argument("--final-seeds", type=int, default=3, help="final trainings (batch orders) averaged per row")
    ap.add_argument("--final-weight-fn", default="round", choices=["round", "lsq", "llsq"],
                    help="weight quantizer of the second final training of the bit-width rows")
    ap.add_argument("--float-epochs", type=int, default=10)
    ap.add_argument("--qat-epochs", type=int, default=1, help="8-bit QAT epochs before the bit-width search")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--only", choices=["bits", "prune"], default=None)
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.finetune_steps, args.final_epochs, args.float_epochs, args.final_seeds = 8, 5, 1, 1, 1
        args.prune_finetune_steps = 5
    torch.set_num_threads(1)
    run_root = args.run_dir or Path(tempfile.mkdtemp(prefix="evefx-bench-search-"))
    run_root.mkdir(parents=True, exist_ok=True)
    train, val, test = data()
    start = time.perf_counter()
    model = float_model(train, args.float_epochs)
    float_acc = evaluate(model, DataLoader(test, batch_size=500))["accuracy"]
    more = final_accuracy(model, None, args.final_epochs, args.final_seeds)
    more_acc, more_std = mean_std(more)
    console.print(f"float DemoNet ({args.float_epochs} epochs): test {float_acc:.2f}%; "
                  f"float, {args.final_epochs} more epochs: {more_acc:.2f} ± {more_std:.2f}% "
                  f"({time.perf_counter() - start:.0f} s)")
    common = {"episodes": args.episodes, "finetune_steps": args.finetune_steps, "seed": 0,
              "reward": {"mode": "constrained"}, "checkpoint_every": 25}
    cases = []
    if args.only in (None, "bits"):
        spec = {"trace": {"input_shape": INPUT}, "passes": [{
            "kind": "quantize", "weight": {"bits": 8, "granularity": "per_channel", "fn": args.weight_fn},
            "activation": {"bits": 8, "fn": "round", "symmetric": False, "signed": False},
            "upgrade_bits": True, "min_bits": 2, "max_bits": 8}]}
        # each action mapped onto what still fits the budget; every transition of an episode credited
        # with its reward (HAQ, AMC; no baseline, SB3's gamma 0.99: docs/search.md); HAQ's warm-up and noise decay
        section = {**common, "algorithm": "ddpg", "budget": {"kind": "avg_bits", "max": 3.0},
                   "reward": {"mode": "constrained", "wall": "step", "credit": "all"},
                   "hyperparams": {"noise_type": "normal", "noise_std": 0.5, "learning_rate": 1e-3,
                                   "noise_decay": 0.99, "warmup_episodes": 20}}
        cases.append(("bits", "mixed precision, W+A bits in [2, 8], avg bits <= 3",
                      run_case("bits", model, spec, section, train, val, test, args, run_root, uniform_bits)))
    if args.only in (None, "prune"):
        spec = {"trace": {"input_shape": INPUT}, "passes": [{
            "kind": "prune", "criterion": "l1_norm", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.9}]}
        section = {**common, "algorithm": "ddpg", "budget": {"kind": "macs", "max": 0.5},
                   "finetune_steps": args.prune_finetune_steps,
                   "hyperparams": {"noise_type": "normal", "noise_std": 0.5, "learning_rate": 1e-3}}
        saved = args.qat_epochs
        args.qat_epochs = 0  # the pruner needs no calibration
        cases.append(("prune", "pruning ratios in [0, 0.9], MACs <= 50%",
                      run_case("prune", model, spec, section, train, val, test, args, run_root, uniform_ratio)))
        args.qat_epochs = saved
    report = {"float_test_accuracy": float_acc, "float_more_epochs_test_accuracy": more,
              "args": {k: str(v) for k, v in vars(args).items()}, "cases": {}}
    ref = f"float {float_acc:.2f}%, float +{args.final_epochs} epochs {more_acc:.2f}%"
    for key, title, rows in cases:
        table = Table(title=f"{title} ({ref}; final: {args.final_epochs} epochs x {args.final_seeds} seeds)")
        second = rows[0][6] is not None
        fn = f", {args.weight_fn} weights" if second else ""
        cols = ["configuration", "cost", "val acc % (best)", "val acc % last 50 ep", "test acc % searched state",
                f"test acc % after {args.final_epochs} epochs{fn}", "vs float", f"vs float +{args.final_epochs}"]
        if second:
            cols += [f"test acc %, {args.final_weight_fn} weights", "vs float", f"vs float +{args.final_epochs}"]
        for col in cols + ["search s"]:
            table.add_column(col, justify="right" if col != "configuration" else "left")
        for label, cost, val_acc, late, proxy, accs, accs2, seconds, _ in rows:
            cells = [label, f"{cost:.3f}", f"{val_acc:.2f}", "-" if late is None else f"{late:.2f}", f"{proxy:.2f}"]
            for a in ([accs, accs2] if second else [accs]):
                m, sd = mean_std(a)
                cells += [f"{m:.2f} ± {sd:.2f}", f"{m - float_acc:+.2f}", f"{m - more_acc:+.2f}"]
            table.add_row(*cells, f"{seconds:.0f}")
        console.print(table)
        for label, *_, values in rows:
            console.print(f"  {label} values: " + ", ".join(f"{k}={v:g}" for k, v in values.items()))
        report["cases"][key] = [dict(zip(("configuration", "cost", "val_accuracy", "val_accuracy_last_50",
                                          "test_accuracy_searched_state", "test_accuracy_final",
                                          "test_accuracy_final_weight_fn", "seconds", "values"), r))
                                for r in rows]
    (run_root / "bench_search.json").write_text(json.dumps(report, indent=2))
    console.print(f"runs and bench_search.json in {run_root}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
