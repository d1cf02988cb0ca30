"""Search DemoNet's bit widths and pruning ratios with the RL upgrader, at a small size.

    python examples/search.py              # about 5 minutes on 2 CPU cores
    python examples/search.py --episodes 6 --final-epochs 0   # smoke test
    python examples/search.py --episodes 200 --out out/search

Two searches: mixed precision (examples/specs/mixed_precision.yaml: weights and activations in
[2, 8] bits under an average of 3) and pruning ratios in [0, 0.9] under 50% of the MACs. Each
writes a run folder with episodes.csv, TensorBoard logs, checkpoints, search.png and best.yaml,
the input spec with the chosen values as per-layer overrides. The search's reward is a proxy
(a few fine-tuning steps per configuration); as in HAQ, the chosen configuration is then trained
properly: the float network, transformed with best.yaml, trains ``--final-epochs`` epochs and is
scored on the test images (bench/bench_search.py does the same with 10 epochs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from evefx.data import loaders  # noqa: E402
from evefx.train import evaluate, fit  # noqa: E402
from evefx.recipes import search_from_spec  # noqa: E402
from evefx.upgrade.env import apply_pruning  # noqa: E402
from examples.models import DemoNet  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(episodes: int = 12, out: Path = Path("out/search"), console: Console | None = None,
         final_epochs: int = 2) -> None:
    console = console or Console()
    data = evefx.load_spec(HERE / "specs" / "mixed_precision.yaml").model_dump(mode="json")
    # round activations: an lsq activation quantizer calibrated at one bit width transfers badly to another;
    # llsq weights, the weight quantizer the final training uses, so the search scores what gets trained
    data["passes"][0]["activation"]["fn"] = "round"
    data["passes"][0]["weight"]["fn"] = "llsq"
    # each action is mapped onto the bit widths that still fit the budget (no lowering at the end)
    data["search"].update(episodes=episodes, finetune_steps=10, reward={"mode": "constrained", "wall": "step"})
    bits = evefx.load_spec(data)
    prune = evefx.load_spec({
        "trace": {"input_shape": [1, 1, 28, 28]},
        "passes": [{"kind": "prune", "criterion": "l1_norm", "ratio": 0.0, "upgrade_ratio": True, "max_ratio": 0.9}],
        "search": {"algorithm": "ddpg", "episodes": episodes, "finetune_steps": 10,
                   "budget": {"kind": "macs", "max": 0.5},
                   "hyperparams": {"noise_type": "normal", "noise_std": 0.5}},
    })
    for name, spec in (("bits", bits), ("prune", prune)):
        torch.manual_seed(0)
        run_dir = out / name
        model, resumed = DemoNet(), (run_dir / "start.pt").exists()
        result = search_from_spec(model, spec, run_dir=run_dir, epochs=3, resume=resumed)
        best = result.best
        console.print(f"[bold]{name}[/]: best of {len(result.episodes)} episodes: validation accuracy "
                      f"{best['accuracy']:.2f}% at {spec.search.budget.kind} {best['cost']:.3f} "
                      f"(budget {spec.search.budget.max})")
        for key, value in best["values"].items():
            console.print(f"  {key} = {value:.3g}")
        console.print(f"  spec: {result.spec_path}   plot: {result.plot_path}")
        console.print(f"  reproduce: evefx transform --model examples.models:DemoNet --spec {result.spec_path}")
        if final_epochs and not resumed:  # a resumed search did not train ``model`` here
            # final training, the same for any configuration: the float network with best.yaml applied
            final = evefx.transform(model, result.spec_path)
            if name == "prune":
                apply_pruning(final)  # masks from the chosen ratios; training keeps them fixed
            train, test = loaders(batch_size=128, seed=0)
            fit(final, train, None, final_epochs, lr=1e-3, progress=False)
            console.print(f"  after {final_epochs} epochs of training: test accuracy {evaluate(final, test)['accuracy']:.2f}%")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("out/search"))
    ap.add_argument("--final-epochs", type=int, default=2, help="training epochs of the chosen configuration (0: none)")
    args = ap.parse_args()
    main(args.episodes, args.out, final_epochs=args.final_epochs)
