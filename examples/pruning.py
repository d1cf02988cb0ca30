"""Channel pruning of the demo network on the embedded MNIST split: the seed's pruning table redone.

The unpruned row trains ``examples.models.DemoNet`` for 10 epochs (Adam 1e-3, batch 128, the
4,000-image train split). Every pruned row starts from that network and

1. inserts pruners with one spec ``{kind: prune, criterion: ..., ratio: ...}`` (every conv and the
   hidden linear layer; the classifier is left whole),
2. trains one epoch, during which the pruners gather their statistic (fire rate, KL divergence,
   Taylor score; l1_norm reads the weights),
3. ``evefx.prune_step``: masks ``ratio`` of each layer's channels,
4. fine-tunes ``--finetune`` epochs with the masks on (Adam, lr 1e-2 for the first three quarters,
   then 1e-3: the pruned network has to re-learn, which a low learning rate does slowly); with
   ``--steps k`` the ratio is reached in k ``prune_step`` calls spread over the lr 1e-2 epochs,
5. ``evefx.compact``: removes the masked channels for real, and evaluates the compacted network.

"vs unpruned" compares with the network that was pruned (10 epochs); "unpruned, same extra training"
is that network given the same extra epochs and learning rates as the pruned rows.
Accuracies are on the 1,000 test images, averaged over the seeds (weight init and batch order).

Run:
    .venv/bin/python examples/pruning.py            # 4 criteria x 25/50/75%, 2 seeds (~15 min on 2 busy cores)
    .venv/bin/python examples/pruning.py --quick    # 2 criteria x 50%, 1 epoch each (smoke test)
    .venv/bin/python examples/pruning.py --criteria l1_norm taylor --ratios 0.5 --out out/prune
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
from evefx.channels import compact_report, count_macs, count_params
from evefx.train import evaluate, fit, seed_everything
from examples.models import DemoNet

console = Console(width=150)
CRITERIA = ("l1_norm", "fire_rate", "kl_div", "taylor")
RATIOS = (0.25, 0.5, 0.75)
EXAMPLE = torch.zeros(1, 1, 28, 28)


def spec(criterion: str, ratio: float, steps: int = 1) -> dict[str, Any]:
    schedule = {"kind": "iterative", "steps": steps} if steps > 1 else {"kind": "one_shot"}
    return {"passes": [{"kind": "prune", "criterion": criterion, "ratio": ratio, "schedule": schedule}]}


def fine_tune(model: torch.nn.Module, train: Any, test: Any, epochs: int, seed: int,
              between: Any = None, steps: int = 1) -> None:
    """``epochs`` of Adam: three quarters at lr 1e-2, the rest at 1e-3.

    With ``steps`` > 1, ``between()`` (the next ``prune_step``) runs ``steps - 1`` times, evenly
    spread over the lr 1e-2 epochs: the network re-learns after each cut before the next one.
    """
    if epochs <= 0:
        return
    low = max(1, epochs // 4) if epochs > 1 else 0
    high = epochs - low
    cuts = [round(high * k / steps) for k in range(steps + 1)]  # epoch boundaries of the steps
    for k in range(steps):
        if k and between is not None:
            between()
        if cuts[k + 1] > cuts[k]:
            fit(model, train, None, epochs=cuts[k + 1] - cuts[k], lr=1e-2, seed=seed + k, progress=False)
    if low:
        fit(model, train, None, epochs=low, lr=1e-3, seed=seed + 100, progress=False)


def prune_row(base: torch.nn.Module, criterion: str, ratio: float, epochs: int, seed: int,
              steps: int = 1) -> dict[str, Any]:
    train, test = loaders(batch_size=128, seed=seed)
    gm = evefx.transform(base, spec(criterion, ratio, steps), EXAMPLE)
    fit(gm, train, None, epochs=1, seed=seed, progress=False)  # statistics gather while it trains
    evefx.prune_step(gm)
    after_mask = evaluate(gm, test)["accuracy"]
    fine_tune(gm, train, test, epochs, seed + 1, between=lambda: evefx.prune_step(gm), steps=steps)
    small = evefx.compact(gm)
    masked_acc = evaluate(gm, test)["accuracy"]
    acc = evaluate(small, test)["accuracy"]
    if abs(acc - masked_acc) > 0.1 + 1e-9:  # one image of 1,000
        raise RuntimeError(f"compacted accuracy {acc} differs from masked {masked_acc}")
    report = compact_report(small)
    return {"accuracy": acc, "after_mask": after_mask, "params": report.params_after, "macs": report.macs_after}


def run(criteria: list[str], ratios: list[float], epochs: int, finetune: int, seeds: list[int],
        steps: int = 1) -> dict[str, Any]:
    rows: dict[tuple[str, float], list[dict[str, Any]]] = {}
    base_rows: list[dict[str, Any]] = []
    for seed in seeds:
        start = time.perf_counter()
        seed_everything(seed)
        base = DemoNet()
        train, test = loaders(batch_size=128, seed=seed)
        fit(base, train, test, epochs=epochs, seed=seed, progress=False)
        base_acc = evaluate(base, test)["accuracy"]
        more = copy.deepcopy(base)  # the same extra training as a pruned row, without pruning
        fit(more, train, None, epochs=1, seed=seed, progress=False)
        fine_tune(more, train, test, finetune, seed + 1)
        gm = evefx.transform(base, {"passes": []}, EXAMPLE)
        base_rows.append({"accuracy": base_acc, "more": evaluate(more, test)["accuracy"],
                          "params": count_params(base), "macs": count_macs(gm)})
        for c in criteria:
            for r in ratios:
                rows.setdefault((c, r), []).append(prune_row(base, c, r, finetune, seed, steps))
        console.print(f"seed {seed}: {len(criteria) * len(ratios)} pruned rows in {time.perf_counter() - start:.0f} s")

    def mean(xs: list[float]) -> float:
        return float(torch.tensor(xs, dtype=torch.float64).mean())

    out = {"unpruned": {"accuracy": mean([b["accuracy"] for b in base_rows]),
                        "more": mean([b["more"] for b in base_rows]),
                        "params": base_rows[0]["params"], "macs": base_rows[0]["macs"]},
           "rows": []}
    for (c, r), rs in rows.items():
        out["rows"].append({"criterion": c, "ratio": r, "accuracy": mean([x["accuracy"] for x in rs]),
                            "per_seed": [x["accuracy"] for x in rs], "after_mask": mean([x["after_mask"] for x in rs]),
                            "params": rs[0]["params"], "macs": rs[0]["macs"]})
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in dict.fromkeys(r["criterion"] for r in results["rows"]):
        pts = sorted((r["ratio"], r["accuracy"]) for r in results["rows"] if r["criterion"] == c)
        ax.plot([100 * p for p, _ in pts], [a for _, a in pts], marker="o", label=c)
    ax.axhline(results["unpruned"]["accuracy"], color="k", ls="--", lw=1, label="unpruned (the network pruned)")
    ax.axhline(results["unpruned"]["accuracy"] - 1, color="grey", ls=":", lw=1, label="unpruned - 1 point")
    ax.axhline(results["unpruned"]["more"], color="tab:grey", ls="-.", lw=1, label="unpruned, same extra training")
    ax.set_xlabel("channels pruned per layer (%)")
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    ax.set_title("DemoNet on MNIST-5k: pruned, fine-tuned, compacted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="pruning accuracy table of the demo network")
    parser.add_argument("--quick", action="store_true", help="2 criteria at 50%%, 1 epoch each, 1 seed (smoke test)")
    parser.add_argument("--criteria", nargs="*", default=None, choices=CRITERIA)
    parser.add_argument("--ratios", nargs="*", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the unpruned network (default 10)")
    parser.add_argument("--finetune", type=int, default=None, help="fine-tuning epochs after prune_step (default 8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="prune in this many steps spread over the lr 1e-2 fine-tuning (default 1: one shot)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds averaged per row (default 2)")
    parser.add_argument("--out", type=Path, default=Path("out/pruning"), help="folder for the PNG and JSON")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    quick = args.quick
    criteria = args.criteria or (["l1_norm", "fire_rate"] if quick else list(CRITERIA))
    ratios = args.ratios or ([0.5] if quick else list(RATIOS))
    epochs = args.epochs or (1 if quick else 10)
    finetune = args.finetune if args.finetune is not None else (1 if quick else 8)
    seeds = list(range(args.seeds or (1 if quick else 2)))
    steps = args.steps or 1
    start = time.perf_counter()
    results = run(criteria, ratios, epochs, finetune, seeds, steps)
    u = results["unpruned"]
    table = Table(title=f"DemoNet, MNIST-5k test: {epochs} epochs (Adam 1e-3, batch 128), then 1 epoch gathering statistics, "
                        f"prune_step, {finetune} epochs fine-tuning, compact; mean of {len(seeds)} seed(s)")
    for col in ("criterion", "pruned", "test acc %", "vs unpruned", "vs same extra training", "right after masking",
                "params", "MACs"):
        table.add_column(col, justify="left" if col == "criterion" else "right")
    table.add_row("unpruned", "0%", f"{u['accuracy']:.2f}", "", "", "", f"{u['params']:,}", f"{u['macs']:,}")
    table.add_row("unpruned, same extra training", "0%", f"{u['more']:.2f}", f"{u['more'] - u['accuracy']:+.2f}", "", "",
                  f"{u['params']:,}", f"{u['macs']:,}")
    for r in results["rows"]:
        table.add_row(r["criterion"], f"{100 * r['ratio']:.0f}%", f"{r['accuracy']:.2f}", f"{r['accuracy'] - u['accuracy']:+.2f}",
                      f"{r['accuracy'] - u['more']:+.2f}", f"{r['after_mask']:.2f}", f"{r['params']:,}", f"{r['macs']:,}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"epochs": epochs, "finetune": finetune, "seeds": seeds, "seconds": time.perf_counter() - start}
    (args.out / "pruning.json").write_text(json.dumps({**meta, **results}, indent=2))
    plot(results, args.out / "pruning.png")
    console.print(f"wrote {args.out / 'pruning.png'} and {args.out / 'pruning.json'} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
