"""Quantization-aware training of the demo network on the embedded MNIST split, the seed's tables redone.

The float row trains ``examples.models.DemoNet`` for 10 epochs (Adam 1e-3, batch 128, the 4,000-image
train split). Every quantized row then trains that float network with one quantize spec for another
10 epochs (quantization-aware fine-tuning, as in the LSQ paper; ``--from-scratch`` starts from random
weights instead), and "float, 10 more epochs" is the float network given the same extra training.
Each row reports the test accuracy (1,000 images) after its last epoch, averaged over 3 seeds
(seed = weight init and batch order), the difference to the float row, and the weight size.

Run:
    .venv/bin/python examples/quantization.py                 # every row, 3 seeds (a few minutes on 2 cores)
    .venv/bin/python examples/quantization.py --from-scratch  # quantized rows from random weights
    .venv/bin/python examples/quantization.py --quick         # 1 epoch, 1 seed, 3 rows (smoke test)
    .venv/bin/python examples/quantization.py --rows W8A8 W4A4 --out out/quant
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

import evefx
from evefx.data import loaders
from evefx.passes.quantize import quant_summary
from evefx.train import fit, seed_everything
from examples.models import DemoNet

console = Console()

# first conv and classifier at 8 bits: the usual mixed-precision recipe (and the example override)
EDGES_8BIT = [{"names": ["features.0", "classifier.*"], "weight": {"bits": 8}, "activation": {"bits": 8}}]


def q(weight: dict | None = None, activation: dict | None = None, **section: Any) -> dict:
    """A one-section quantize spec; ``None`` sides stay in float."""
    return {"passes": [{"kind": "quantize", "weight": weight, "activation": activation, **section}]}


def W(bits: int, **kw: Any) -> dict:
    # tracker written: the tables below were measured with the EMA tracker on weights
    return {"bits": bits, "fn": "lsq", "granularity": "per_channel", "symmetric": True, "signed": True, "tracker": "average", **kw}


def A(bits: int, **kw: Any) -> dict:
    return {"bits": bits, "fn": "lsq", "granularity": "per_tensor", "symmetric": False, "signed": False, **kw}


def LW(bits: int) -> dict:
    return W(bits, fn="llsq", regularization="l1")


def LA(bits: int) -> dict:
    return A(bits, fn="llsq", regularization="l1")


# name -> (group, spec or None for float). The comparison groups run at 4 bits, where choices matter.
ROWS: dict[str, tuple[str, dict | None]] = {
    "float": ("headline", None),
    "float, 10 more epochs": ("headline", None),
    "W8A8": ("headline", q(W(8), A(8))),
    "W4A4": ("headline", q(W(4), A(4))),
    "W2A2": ("headline", q(W(2), A(2))),
    # the network's output (10 logits) on a 2-bit grid too: 4 levels, so classes tie (the default leaves it float)
    "W2A2 (logits 2-bit)": ("headline", q(W(2), A(2), quantize_output=True)),
    "W2A2 (first/last 8-bit)": ("headline", q(W(2), A(2), overrides=EDGES_8BIT)),
    "W8A8 round (spec defaults)": ("headline", q(W(8, fn="round", tracker="global"), A(8, fn="round"))),  # the defaults until 2026-11-29
    "W2A2 llsq-l1": ("2 bits with llsq-l1", q(LW(2), LA(2))),
    "W2A2 llsq-l1 (first/last 8-bit)": ("2 bits with llsq-l1", q(LW(2), LA(2), overrides=EDGES_8BIT)),
    "W4 weights only": ("what is quantized (4 bits)", q(W(4), None)),
    "A4 activations only": ("what is quantized (4 bits)", q(None, A(4))),
    "W4A4 both": ("what is quantized (4 bits)", q(W(4), A(4))),
    "W4A4 round": ("quantize function (W4A4)", q(W(4, fn="round", tracker="global"), A(4, fn="round"))),
    "W4A4 lsq": ("quantize function (W4A4)", q(W(4), A(4))),
    "W4A4 llsq-l1": ("quantize function (W4A4)", q(LW(4), LA(4))),
    "W4A4 llsq-l2": ("quantize function (W4A4)", q(W(4, fn="llsq", regularization="l2"), A(4, fn="llsq", regularization="l2"))),
    "W4A4 round, average tracker": ("range tracker (W4A4 round)", q(W(4, fn="round", tracker="average"), A(4, fn="round", tracker="average"))),
    "W4A4 round, global tracker": ("range tracker (W4A4 round)", q(W(4, fn="round", tracker="global"), A(4, fn="round", tracker="global"))),
    "W4A4 per-channel weights": ("granularity (W4A4)", q(W(4), A(4))),
    "W4A4 per-tensor weights": ("granularity (W4A4)", q(W(4, granularity="per_tensor"), A(4))),
    "W4A4 symmetric activations": ("symmetry (W4A4)", q(W(4), A(4, symmetric=True))),
    "W4A4 asymmetric weights": ("symmetry (W4A4)", q(W(4, symmetric=False), A(4))),
    "W4A4 signed activations": ("signedness (W4A4)", q(W(4), A(4, signed=True))),
    "W4A4 unsigned activations": ("signedness (W4A4)", q(W(4), A(4, signed=False))),
}
QUICK_ROWS = ["float", "W8A8", "W4A4"]


def weight_bytes(model: torch.nn.Module) -> int:
    gm = model if isinstance(model, torch.fx.GraphModule) else evefx.transform(model, {"passes": []})
    return sum(r["bytes"] for r in quant_summary(gm))


def train_row(model: torch.nn.Module, epochs: int, seed: int) -> list[float]:
    train, test = loaders(batch_size=128, seed=seed)  # fresh loaders: every row sees the same batches
    history = fit(model, train, test, epochs=epochs, lr=1e-3, optimizer="adam", seed=seed, progress=False)
    return [h["val_accuracy"] for h in history]


def run(names: list[str], epochs: int, seeds: list[int], from_scratch: bool) -> list[dict[str, Any]]:
    """Train every row for every seed; quantized rows start from the float network of the same
    seed (the LSQ paper's protocol) unless ``from_scratch``."""
    curves: dict[str, list[list[float]]] = {n: [] for n in names}
    sizes: dict[str, int] = {}
    for seed in seeds:
        seed_everything(seed)
        float_net = DemoNet()
        start = time.perf_counter()
        curves["float"].append(train_row(float_net, epochs, seed))
        sizes["float"] = weight_bytes(float_net)
        for name in names:
            if name == "float":
                continue
            spec = ROWS[name][1]
            if from_scratch:
                seed_everything(seed)
                init = DemoNet()
            else:
                init = float_net
            model = copy.deepcopy(init) if spec is None else evefx.transform(init, spec, torch.zeros(1, 1, 28, 28))
            curve = train_row(model, epochs, seed)
            curves[name].append(curve)
            sizes[name] = weight_bytes(model)
        console.print(f"seed {seed}: {len(names)} rows in {time.perf_counter() - start:.0f} s")
    results = []
    for name in names:
        finals = torch.tensor([c[-1] for c in curves[name]])
        results.append({
            "row": name,
            "group": ROWS[name][0],
            "accuracy": float(finals.mean()),
            "std": float(finals.std()) if len(finals) > 1 else 0.0,
            "per_seed": finals.tolist(),
            "curve": torch.tensor(curves[name]).mean(0).tolist(),
            "bytes": sizes[name],
        })
    return results


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """One panel per group of rows (accuracy per epoch), the float row dashed in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in results))
    cols = min(len(groups), 4)
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    # with fine-tuning, the fair float curve is the float network's 10 extra epochs
    base = next((r for r in results if r["row"] == "float, 10 more epochs"), results[0])
    for ax, group in zip(axes.flat, groups):
        epochs = range(1, len(base["curve"]) + 1)
        ax.plot(epochs, base["curve"], "k--", linewidth=1, label=base["row"])
        for r in results:
            if r["group"] == group and r is not base and r["row"] != "float":
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", markersize=3, label=r["row"])
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)", fontsize=8)
    fig.suptitle("DemoNet on MNIST-5k: quantization-aware training (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="QAT accuracy table of the demo network")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, 3 rows (smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per row (default 10, 1 with --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds averaged per row (default 3, 1 with --quick)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train quantized rows from random weights instead of from the float network")
    parser.add_argument("--rows", nargs="*", default=None, help=f"subset of rows; known: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=Path("out/quantization"), help="folder for the PNG and JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the network is tiny: 1 is as fast)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 10)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    names = args.rows or (QUICK_ROWS if args.quick else list(ROWS))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    names = ["float", *[n for n in names if n != "float"]]
    if args.from_scratch:
        names = [n for n in names if n != "float, 10 more epochs"]
    results = run(names, epochs, seeds, args.from_scratch)
    base = results[0]["accuracy"]
    init = "random weights" if args.from_scratch else f"the float network ({epochs} epochs)"
    table = Table(title=f"DemoNet, MNIST-5k test, {epochs} epochs, Adam 1e-3, batch 128, mean of {len(seeds)} seeds; "
                        f"quantized rows start from {init}")
    for col in ("group", "row", "test acc %", "± std", "vs float", "weight bytes"):
        table.add_column(col, justify="left" if col in ("group", "row") else "right")
    for r in results:
        table.add_row(r["group"], r["row"], f"{r['accuracy']:.2f}", f"{r['std']:.2f}", f"{r['accuracy'] - base:+.2f}",
                      f"{r['bytes']:,}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"epochs": epochs, "seeds": seeds, "from_scratch": args.from_scratch}
    (args.out / "quantization.json").write_text(json.dumps({**meta, "rows": results}, indent=2))
    plot(results, args.out / "quantization.png")
    console.print(f"wrote {args.out / 'quantization.png'} and {args.out / 'quantization.json'}")


if __name__ == "__main__":
    main()
