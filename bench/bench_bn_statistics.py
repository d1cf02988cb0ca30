"""What a folded BatchNorm should train on when a trained network is fine-tuned with quantization:
``bn_statistics: running`` (frozen, torch.ao's ``freeze_bn_stats``), ``batch`` (the float model's
BatchNorm) and evefx's default ``auto`` (frozen at 3 weight bits or fewer, batch above), each as
trained and (but ``running``) followed by :func:`evefx.reestimate_bn` (AIMET's BatchNorm
re-estimation), side by side in one run, next to the float network given the same training
(docs/quantization.md). The float rows' ``batch`` columns are the float network's own BatchNorm.

Networks: DemoNet (bench_recipes' validation split: 3,500 training images scored on the last 500,
float 10 epochs then 10 of fine-tuning), the small ResNet of bench_search (3,000 / 1,000, 10 + 5
epochs) and torchvision's resnet18 without weights (3-channel MNIST 28x28, 3,500 / 500, 3 + 2
epochs). Adam 1e-3, batch 128; re-estimation on 16 batches of 64 training images. Validation
splits only: this chooses a setting (test figures come from bench_recipes). One torch thread.

    python bench/bench_bn_statistics.py                                   # every network, 3 seeds
    python bench/bench_bn_statistics.py --networks resnet18 --configs w4a4 --seeds 2
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import evefx  # noqa: E402
from bench_recipes import cpu  # noqa: E402
from bench_search import SmallResNet  # noqa: E402
from evefx.data import mnist5k  # noqa: E402
from evefx.train import evaluate, fit  # noqa: E402
from examples.models import DemoNet  # noqa: E402

# network -> (build, training images, held-out images, float epochs, fine-tune epochs, channels)
NETWORKS: dict[str, tuple[Any, int, int, int, int, int]] = {
    "demonet": (DemoNet, 3500, 500, 10, 10, 1),
    "resnet": (SmallResNet, 3000, 1000, 10, 5, 1),
    "resnet18": (lambda: __import__("torchvision").models.resnet18(num_classes=10), 3500, 500, 3, 2, 3),
}
CONFIGS = {  # name -> the quantize section (bn_statistics added per column)
    "w8a8": {"weight": {"bits": 8}, "activation": {"bits": 8}},
    "w4a4": {"weight": {"bits": 4}, "activation": {"bits": 4}},
    "w2a2_lsq_keep8": {"weight": {"bits": 2, "fn": "lsq"}, "activation": {"bits": 2}, "keep_first_last": 8},
}
COLUMNS = ("running", "batch", "batch + re-estimated", "auto", "auto + re-estimated")


def data(network: str) -> tuple[TensorDataset, TensorDataset]:
    _, n_train, n_held, _, _, channels = NETWORKS[network]
    full = mnist5k("train")
    x = torch.stack([full[i][0] for i in range(n_train + n_held)]).repeat(1, channels, 1, 1)
    y = torch.tensor([int(full[i][1]) for i in range(n_train + n_held)])
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def loader(ds: TensorDataset, seed: int, batch_size: int = 128) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def reestimate(net: torch.nn.Module, train: TensorDataset, seed: int) -> None:
    evefx.reestimate_bn(net, itertools.islice(loader(train, seed, 64), 16), progress=False)


def run(network: str, configs: list[str], seeds: int) -> dict[str, dict[str, list[float]]]:
    build, _, _, float_epochs, tune_epochs, channels = NETWORKS[network]
    train, held = data(network)
    score = DataLoader(held, batch_size=500)
    torch.manual_seed(0)
    model = build()
    fit(model, loader(train, 0), None, float_epochs, lr=1e-3, seed=0, progress=False)
    model.eval()
    out: dict[str, dict[str, list[float]]] = {}
    for config in ["float", *configs]:
        row = out.setdefault(config, {})
        for seed in range(1, seeds + 1):
            for stats in (("float",) if config == "float" else ("running", "batch", "auto")):
                section = {"kind": "quantize", **copy.deepcopy(CONFIGS.get(config, {})), "bn_statistics": stats}
                net = copy.deepcopy(model) if config == "float" else evefx.transform(
                    model, {"trace": {"input_shape": [1, channels, 28, 28]}, "passes": [section]})
                fit(net, loader(train, seed), None, tune_epochs, lr=1e-3, seed=seed, progress=False)
                name = "batch" if stats == "float" else stats
                row.setdefault(name, []).append(evaluate(net, score)["accuracy"])
                if stats != "running":  # auto: only the layers on batch statistics are re-estimated
                    reestimate(net, train, seed)
                    row.setdefault(f"{name} + re-estimated", []).append(evaluate(net, score)["accuracy"])
        print(f"{network} {config}: " + "; ".join(f"{k} {mean_std(v)}" for k, v in row.items()), flush=True)
    return out


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.2f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {cpu()}; torch {torch.__version__}, 1 thread", flush=True)
    lines = ["| network | config | " + " | ".join(COLUMNS) + " | auto + re-estimated minus running |",
             "|---|---|---|---|---|---|---|---|"]
    for network in args.networks:
        for config, row in run(network, args.configs, args.seeds).items():
            cells = [mean_std(row[c]) if c in row else "" for c in COLUMNS]
            gain = (f"{statistics.fmean(row['auto + re-estimated']) - statistics.fmean(row['running']):+.2f}"
                    if "running" in row else "")
            lines.append(f"| {network} | {config} | " + " | ".join(cells) + f" | {gain} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
