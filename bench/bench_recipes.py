"""Spiking and low-bit QAT under a recipe nobody tuned for them: the plain recipe, same for every row.

Recipe: Adam lr 1e-3, batch 128, 10 epochs, the seed tutorial's network (``examples.models.DemoNet``:
convs 4/8/16 + linear 16) on the embedded MNIST-5k split, spec defaults except what a row names.
Rows:

* float (10 epochs), and float given 10 more epochs (the reference of fine-tuned rows);
* LIF T=8 with the previous defaults (threshold 1, fixed-width atan surrogate, no weights scaled)
  and with today's (data-dependent threshold, threshold-relative surrogate, ``weight_scale`` and
  ``weight_scale_no_bn``), without either scale, and with only the first (the defaults until
  2026-11-30); Poisson input, mean readout, all; today's defaults at T=4 and T=2, with a soft
  reset, and IF neurons with the erf surrogate;
* W8A8, W4A4 and W2A2 with the spec defaults (weights ``round``, activations ``lsq``), ``lsq``
  for both and ``round`` for both, from random weights and (W4A4, W2A2) fine-tuned 10 epochs from
  the trained float network; W2A2 defaults and lsq with ``keep_first_last: 8``;
* fine-tuned W4A4 defaults and W2A2 lsq ``keep_first_last: 8`` with ``bn_statistics: batch`` and
  ``evefx.reestimate_bn`` on 16 batches of 64 training images after training, next to the float
  network given the same (``REESTIMATE``).

``--split val`` trains on the first 3,500 training images and scores the last 500 (what the
defaults were chosen on); ``--split test`` (default) trains on all 4,000 and scores the 1,000 test
images, once. Seeds (weight init and batch order) 0..n-1; mean +- std. One torch thread.
``--optimizer sgd --lr 0.05`` (and ``--batch``, ``--weight-decay``) runs every row (float included)
with another recipe (SGD: momentum 0.9); a training that diverges (NaN reaching a quantizer) is
recorded as such, not scored. ``--width 2`` runs every row on DemoNet with twice the channels
(8/16/32 + linear 32): what the network's size, not the defaults, costs at 2 bits.
``--finetune-epochs 40`` fine-tunes (and gives the float reference) 40 epochs instead of
``--epochs``; each run's line in ``runs.jsonl`` has its last epoch's training accuracy.

Run:
    nice -n 5 .venv/bin/python bench/bench_recipes.py                   # every row, 3 seeds
    .venv/bin/python bench/bench_recipes.py --rows float lif_new --seeds 1 --epochs 1   # smoke test
Writes ``<out>/runs.jsonl`` (one line per row and seed, as they finish) and ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import evefx  # noqa: E402
from evefx.data import mnist5k  # noqa: E402
from evefx.train import evaluate, fit, seed_everything  # noqa: E402
from examples.models import DemoNet  # noqa: E402

LR, BATCH = 1e-3, 128
OPTIMIZER = "adam"  # --optimizer: "adam" or "sgd" (momentum 0.9), evefx.train.fit's names
WEIGHT_DECAY = 0.0  # --weight-decay (L2, on every parameter, as torch's optimizers apply it)


def _w(bits: int, fn: str) -> dict:
    # the spec's weight defaults (per channel, global tracker) with the row's bits and fn
    return {"bits": bits, "fn": fn, "granularity": "per_channel", "tracker": "global"}


def _a(bits: int, fn: str) -> dict:
    # the spec's activation defaults (asymmetric, unsigned, EMA tracker)
    return {"bits": bits, "fn": fn, "symmetric": False, "signed": False}


def _q(bits: int, fn: str, **section: Any) -> dict:
    return {"passes": [{"kind": "quantize", "weight": _w(bits, fn), "activation": _a(bits, fn), **section}]}


def _d(bits: int, **section: Any) -> dict:
    # the spec defaults, only the bits written (weights round, activations lsq, logits float)
    return {"passes": [{"kind": "quantize", "weight": {"bits": bits}, "activation": {"bits": bits}, **section}]}


PREVIOUS_SPIKE = {"threshold": 1.0, "surrogate": {"relative": False}}
# name -> (label, spec or None, start: "scratch" | "finetune")
ROWS: dict[str, tuple[str, dict | None, str]] = {
    "float": ("float", None, "scratch"),
    "float_more": ("float, N more epochs", None, "finetune"),
    "lif_new": ("LIF T=8, spec defaults", {"passes": [{"kind": "spike"}]}, "scratch"),
    "lif_unscaled": ("LIF T=8, spec defaults but weight_scale 1 and weight_scale_no_bn 1",
                     {"passes": [{"kind": "spike", "weight_scale": 1.0, "weight_scale_no_bn": 1.0}]}, "scratch"),
    "lif_bn_only": ("LIF T=8, spec defaults but weight_scale_no_bn 1 (the defaults until 2026-11-30)",
                    {"passes": [{"kind": "spike", "weight_scale_no_bn": 1.0}]}, "scratch"),
    "lif_old": ("LIF T=8, the defaults before this round (threshold 1, fixed-width atan, no weights scaled)",
                {"passes": [{"kind": "spike", "neuron": PREVIOUS_SPIKE, "weight_scale": 1.0, "weight_scale_no_bn": 1.0}]},
                "scratch"),
    "lif_t4": ("LIF T=4, spec defaults", {"passes": [{"kind": "spike", "timesteps": 4}]}, "scratch"),
    "lif_t2": ("LIF T=2, spec defaults", {"passes": [{"kind": "spike", "timesteps": 2}]}, "scratch"),
    "lif_soft": ("LIF T=8, soft reset", {"passes": [{"kind": "spike", "neuron": {"reset": None}}]}, "scratch"),
    "if_erf": ("IF T=8, erf surrogate", {"passes": [{"kind": "spike", "neuron": {"type": "if", "surrogate": {"name": "erf"}}}]},
               "scratch"),
    "w8_default": ("W8A8 spec defaults, random init", _d(8), "scratch"),
    "w4_default": ("W4A4 spec defaults, random init", _d(4), "scratch"),
    "w2_default": ("W2A2 spec defaults, random init", _d(2), "scratch"),
    "ft_w4_default": ("W4A4 spec defaults, fine-tuned", _d(4), "finetune"),
    "ft_w2_default": ("W2A2 spec defaults, fine-tuned", _d(2), "finetune"),
    "ft_w2_default_keep8": ("W2A2 spec defaults, keep_first_last: 8, fine-tuned", _d(2, keep_first_last=8), "finetune"),
    "w8_round": ("W8A8 round, random init", _q(8, "round"), "scratch"),
    "w8_lsq": ("W8A8 lsq, random init", _q(8, "lsq"), "scratch"),
    "w4_round": ("W4A4 round, random init", _q(4, "round"), "scratch"),
    "w4_lsq": ("W4A4 lsq, random init", _q(4, "lsq"), "scratch"),
    "w2_round": ("W2A2 round, random init", _q(2, "round"), "scratch"),
    "w2_lsq": ("W2A2 lsq, random init", _q(2, "lsq"), "scratch"),
    "ft_w4_lsq": ("W4A4 lsq, fine-tuned", _q(4, "lsq"), "finetune"),
    "ft_w2_lsq": ("W2A2 lsq, fine-tuned", _q(2, "lsq"), "finetune"),
    "ft_w2_lsq_keep8": ("W2A2 lsq, keep_first_last: 8, fine-tuned", _q(2, "lsq", keep_first_last=8), "finetune"),
    "ft_w4_round": ("W4A4 round, fine-tuned", _q(4, "round"), "finetune"),
    "ft_w2_round": ("W2A2 round, fine-tuned", _q(2, "round"), "finetune"),
    # BatchNorm on batch statistics in training, re-estimated after it (evefx.reestimate_bn, REESTIMATE)
    "float_more_reest": ("float, N more epochs, BN re-estimated", None, "finetune"),
    "ft_w4_reest": ("W4A4 defaults, bn_statistics batch, BN re-estimated, fine-tuned", _d(4, bn_statistics="batch"),
                    "finetune"),
    "ft_w2_lsq_keep8_reest": ("W2A2 lsq, keep_first_last: 8, bn_statistics batch, BN re-estimated, fine-tuned",
                              _q(2, "lsq", keep_first_last=8, bn_statistics="batch"), "finetune"),
}
REESTIMATE = ("float_more_reest", "ft_w4_reest", "ft_w2_lsq_keep8_reest")  # 16 batches of 64 training images


def cpu() -> str:
    """The CPU's model name and its SIMD flags that matter here (lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "vnni")]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, flags: {' '.join(simd)}"


def split(name: str) -> tuple[TensorDataset, TensorDataset]:
    x, y = mnist5k("train").tensors
    if name == "val":
        return TensorDataset(x[:3500], y[:3500]), TensorDataset(x[3500:], y[3500:])
    return mnist5k("train"), mnist5k("test")


def loaders(data: tuple[TensorDataset, TensorDataset], seed: int) -> tuple[DataLoader, DataLoader]:
    train, held = data
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size=BATCH, shuffle=True, generator=gen), DataLoader(held, batch_size=512)


def train(model: torch.nn.Module, data, epochs: int, seed: int, reestimate: bool = False,
          history: list | None = None) -> float:
    """Train ``epochs`` with the bench's recipe, return the held-out accuracy; ``history`` (a list)
    receives fit's per-epoch metrics."""
    tr, held = loaders(data, seed)
    epochs_run = fit(model, tr, None, epochs=epochs, lr=LR, seed=seed, progress=False, optimizer=OPTIMIZER,
                     weight_decay=WEIGHT_DECAY)
    if history is not None:
        history.extend(epochs_run)
    if reestimate:
        first = DataLoader(data[0], batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        evefx.reestimate_bn(model, itertools.islice(first, 16), progress=False)  # (x, y) pairs: the inputs are taken
    return evaluate(model, held)["accuracy"]


def trained_float(floats: dict[int, tuple[Any, float]], seed: int, build: Callable[[], torch.nn.Module],
                  data, epochs: int) -> tuple[Any, float]:
    """This seed's float network and its accuracy, trained once (``floats`` caches it): every
    fine-tuned row of the seed starts from it."""
    if seed not in floats:
        net = fresh(build, seed)
        floats[seed] = (net, train(net, data, epochs, seed))
    return floats[seed]


def fresh(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """A network with this seed's initial weights."""
    seed_everything(seed)
    return build()


def record(runs: list[dict[str, Any]], log, row: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Keep one row's result, append it to the run log and print it (with ``extra`` lines)."""
    row = {**row, **(extra or {})}
    runs.append(row)
    log.write(json.dumps(row) + "\n")
    log.flush()
    print(f"{row['label']:<44} seed {row['seed']}: {row['accuracy']:6.2f}%  ({row['seconds']:.0f} s)"
          + "".join(f"\n    {k}: {v}" for k, v in (extra or {}).items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="sgd: momentum 0.9")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="epochs of the fine-tuned rows and of the float reference given more (default: --epochs)")
    parser.add_argument("--width", type=int, default=1, help="DemoNet's channel multiplier (2: convs 8/16/32 + linear 32)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_recipes"))
    args = parser.parse_args(argv)
    args.finetune_epochs = args.finetune_epochs or args.epochs
    global OPTIMIZER, LR, BATCH, WEIGHT_DECAY
    OPTIMIZER, LR, BATCH, WEIGHT_DECAY = args.optimizer, args.lr, args.batch, args.weight_decay
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = cpu()
    print(f"machine: {machine}; torch {torch.__version__}, 1 thread", flush=True)
    data = split(args.split)
    runs: list[dict[str, Any]] = []
    floats: dict[int, tuple[DemoNet, float]] = {}  # seed -> (trained float network, its accuracy)
    build = functools.partial(DemoNet, width=args.width)
    with open(args.out / "runs.jsonl", "a") as log:
        for name in args.rows:
            label, spec, start = ROWS[name]
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                float_net, float_acc = trained_float(floats, seed, build, data, args.epochs)
                diverged, history = None, []
                if name == "float":
                    acc = float_acc
                else:
                    init = float_net if start == "finetune" else fresh(build, seed)
                    model = copy.deepcopy(init) if spec is None else evefx.transform(init, spec, torch.zeros(1, 1, 28, 28))
                    try:
                        acc = train(model, data, args.finetune_epochs if start == "finetune" else args.epochs, seed,
                                    reestimate=name in REESTIMATE, history=history)
                    except evefx.QuantizationError as e:  # NaN reached a quantizer: the training diverged
                        acc, diverged = float("nan"), str(e)
                record(runs, log, {"row": name, "label": label, "seed": seed, "accuracy": acc, "split": args.split,
                                   "epochs": args.finetune_epochs if start == "finetune" else args.epochs,
                                   "train_accuracy": history[-1]["train_accuracy"] if history else None,
                                   "optimizer": OPTIMIZER, "lr": LR, "batch": BATCH,
                                   "weight_decay": WEIGHT_DECAY, "width": args.width, "machine": machine,
                                   "seconds": round(time.perf_counter() - t0, 1)},
                       {"diverged": diverged} if diverged else None)
    table = summarise(runs, args)
    print(table)
    (args.out / "table.md").write_text(table + "\n")


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace,
              rows: dict[str, tuple[Any, ...]] | None = None, compared_later: tuple[str, ...] = ("finetune",)) -> str:
    """Markdown table: mean +- std per row, and the difference to the float reference of its start
    (rows whose start is in ``compared_later`` against the float network given the same extra
    epochs). ``rows``: ``{name: (label, spec, start)}``, this bench's ``ROWS`` by default; "N more" in
    a label reads as the epoch count."""
    rows = ROWS if rows is None else rows
    by: dict[str, list[float]] = {}
    diverged: dict[str, int] = {}
    for r in runs:
        if r["accuracy"] != r["accuracy"]:  # NaN: a diverged training, counted, not averaged
            diverged[r["row"]] = diverged.get(r["row"], 0) + 1
            by.setdefault(r["row"], [])
        else:
            by.setdefault(r["row"], []).append(r["accuracy"])
    mean = {k: sum(v) / len(v) for k, v in by.items() if v}
    std = {k: (torch.tensor(v, dtype=torch.float64).std().item() if len(v) > 1 else 0.0) for k, v in by.items()}

    def label(name: str) -> str:
        return rows[name][0].replace("N more", f"{getattr(args, 'finetune_epochs', None) or args.epochs} more")

    recipe = f"{'SGD (momentum 0.9)' if getattr(args, 'optimizer', 'adam') == 'sgd' else 'Adam'} {getattr(args, 'lr', LR):g}"
    if getattr(args, "weight_decay", 0.0):
        recipe += f", weight decay {args.weight_decay:g}"
    if getattr(args, "width", 1) != 1:
        recipe += f", DemoNet width x{args.width}"
    epochs = f"{args.epochs} epochs"
    if (getattr(args, "finetune_epochs", None) or args.epochs) != args.epochs:
        epochs += f" (fine-tuned rows {args.finetune_epochs})"
    lines = [f"| row ({args.split} split, {epochs}, {recipe}, batch {getattr(args, 'batch', BATCH)}) "
             "| accuracy % | vs float |",
             "|---|---|---|"]
    for name, accs in by.items():
        start = rows[name][2]
        ref = "float_more" if start in compared_later and name != "float_more" else "float"
        if name in REESTIMATE and name != "float_more_reest" and "float_more_reest" in mean:
            ref = "float_more_reest"  # against the float network whose BatchNorm was re-estimated too
        failed = f", {diverged[name]} diverged" if name in diverged else ""
        if not accs:
            lines.append(f"| {label(name)} | every seed diverged ({diverged[name]}) | |")
            continue
        delta = f"{mean[name] - mean[ref]:+.2f} (vs {label(ref)})" if ref in mean and ref != name else ""
        lines.append(f"| {label(name)} | {mean[name]:.2f} +- {std[name]:.2f} ({len(accs)} seeds{failed}) | {delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
