"""A small ViT on the embedded MNIST-5k split through every pass, one recipe for every row (issue 15).

Model: ``torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4,
hidden_dim=64, mlp_dim=128, num_classes=10)`` whose patch embedding ``conv_proj`` is replaced by a
1-input-channel Conv2d (64 filters, 7x7, stride 7): the grey image goes in as it is, nothing repeated.
Its ``nn.MultiheadAttention`` layers are decomposed into q/k/v/out Linear layers when traced.

Recipe (every row): Adam lr 1e-3, batch 128, ``--epochs`` epochs, spec defaults except what a row names.
Rows:

* float; float given ``--epochs`` more epochs (the reference of every fine-tuned row);
* W8A8 QAT (``kind: quantize`` defaults), fine-tuned ``--epochs`` epochs from the float network;
* W4A4 QAT, ``fn: lsq``, same protocol;
* spiking T=4 (``kind: spike``, ``timesteps: 4``, other defaults), trained from scratch;
* 50% heads pruned (``kind: prune, ratio: 0.5, granularity: head``, l1): one ``prune_step`` on the
  trained float network, ``compact``, then fine-tuned ``--epochs`` epochs; params/MACs before/after.

The W8A8 network of each seed is exported (``evefx.export_onnx``, real_inputs: the 1,000 test
images, which no setting was chosen on) and its parity / top-1 agreement printed.
``--split val`` trains on the first 3,500 training images and scores the last 500; ``--split test``
(default) trains on all 4,000 and scores the 1,000 test images, once. Seeds 0..n-1; mean +- std.

Run (one torch thread):
    nice -n 5 .venv/bin/python bench/bench_vit.py                       # every row, 3 seeds
    .venv/bin/python bench/bench_vit.py --seeds 1 --epochs 1 --rows float w8   # smoke test
Writes ``<out>/runs.jsonl`` and ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipes import BATCH, LR, cpu, fresh, record, split, summarise, train, trained_float

import evefx
from evefx.channels import compact_report
from evefx.train import evaluate

X = torch.zeros(1, 1, 28, 28)
HIDDEN, PATCH = 64, 7


def vit() -> nn.Module:
    """The small ViT with a grey (1-channel) patch embedding."""
    net = torchvision.models.VisionTransformer(image_size=28, patch_size=PATCH, num_layers=4, num_heads=4,
                                               hidden_dim=HIDDEN, mlp_dim=2 * HIDDEN, num_classes=10)
    net.conv_proj = nn.Conv2d(1, HIDDEN, PATCH, stride=PATCH)  # MNIST is grey: one input channel
    return net


W4_LSQ = {"passes": [{"kind": "quantize", "weight": {"bits": 4, "fn": "lsq"}, "activation": {"bits": 4, "fn": "lsq"}}]}
# name -> (label, spec or None, start: "scratch" | "finetune" | "prune")
ROWS: dict[str, tuple[str, dict | None, str]] = {
    "float": ("float", None, "scratch"),
    "float_more": ("float, N more epochs", None, "finetune"),
    "w8": ("W8A8 QAT (quantize defaults), fine-tuned", {"passes": [{"kind": "quantize"}]}, "finetune"),
    "w4_lsq": ("W4A4 QAT lsq, fine-tuned", W4_LSQ, "finetune"),
    "spike": ("spiking T=4 (spike defaults), from scratch", {"passes": [{"kind": "spike", "timesteps": 4}]}, "scratch"),
    "prune_head": ("50% heads pruned + compact, fine-tuned",
                   {"passes": [{"kind": "prune", "ratio": 0.5, "granularity": "head"}]}, "prune"),
}


def pruned(init: nn.Module, spec: dict) -> tuple[nn.Module, str]:
    """One prune step on the trained network, compacted; and its params/MACs before -> after."""
    gm = evefx.transform(init, spec, X)
    evefx.prune_step(gm)
    small = evefx.compact(gm.eval(), X)  # raises if the compacted model differs from the masked one
    r = compact_report(small)
    size = (f"params {r.params_before:,} -> {r.params_after:,} ({r.params_ratio:.2f}x), "
            f"MACs {r.macs_before:,} -> {r.macs_after:,} ({r.macs_ratio:.2f}x)")
    return small.train(), size


def export_check(model: nn.Module, held) -> str:
    """Export the W8A8 network with the held-out images as real inputs; parity and top-1 agreement."""
    xs = held.tensors[0]
    with tempfile.TemporaryDirectory() as d:
        try:
            rep = evefx.export_onnx(model.eval(), X, Path(d) / "vit_w8a8.onnx", real_inputs=xs)
        except evefx.EvefxError as err:  # a failed check is a figure too: record its message
            return f"check failed: {err}"
    p = rep.parity.to_dict() if rep.parity is not None else {}
    return f"passed={rep.passed}, failing={list(rep.failing)}, parity={json.dumps(p)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/bench_vit"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("evefx").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = cpu()
    print(f"machine: {machine}; torch {torch.__version__}, 1 thread", flush=True)
    print(f"model: VisionTransformer(image 28, patch {PATCH}, 4 layers, 4 heads, hidden {HIDDEN}, mlp {2 * HIDDEN}), "
          f"1-channel conv_proj; recipe: Adam lr {LR:g}, batch {BATCH}, {args.epochs} epochs", flush=True)
    data = split(args.split)
    runs: list[dict[str, Any]] = []
    floats: dict[int, tuple[nn.Module, float]] = {}
    with open(args.out / "runs.jsonl", "a") as log:
        for seed in range(args.seeds):
            for name in args.rows:
                label, spec, start = ROWS[name]
                t0 = time.perf_counter()
                extra: dict[str, Any] = {}
                float_net, float_acc = trained_float(floats, seed, vit, data, args.epochs)
                if name == "float":
                    acc = float_acc
                else:
                    init = fresh(vit, seed) if start == "scratch" else float_net
                    if start == "prune":
                        model, extra["size"] = pruned(init, spec)
                    else:
                        model = copy.deepcopy(init) if spec is None else evefx.transform(init, spec, X)
                    acc = train(model, data, args.epochs, seed)
                    if name == "w8" and not args.no_export:
                        extra["export"] = export_check(model, data[1])
                        extra["accuracy_after_export_eval"] = evaluate(model, torch.utils.data.DataLoader(data[1], batch_size=512))["accuracy"]
                record(runs, log, {"row": name, "label": label, "seed": seed, "accuracy": acc, "split": args.split,
                                   "epochs": args.epochs, "seconds": round(time.perf_counter() - t0, 1), "machine": machine},
                       extra)
    table = summarise(runs, args, ROWS, compared_later=("finetune", "prune"))
    print(table)
    (args.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
