"""Search DemoNet's bit widths and pruning ratios with the RL upgrader, at a small size.

    python examples/search.py              # about a minute on a laptop CPU
    python examples/search.py --episodes 200 --out out/search

Two searches: mixed precision (examples/specs/mixed_precision.yaml: weights and activations in
[2, 8] bits under an average of 3) and pruning ratios in [0, 0.9] under 50% of the MACs. Each
writes a run folder with episodes.csv, TensorBoard logs, checkpoints, search.png and best.yaml,
the input spec with the chosen values as per-layer overrides.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from evefx.upgrade import search_from_spec  # noqa: E402
from examples.models import DemoNet  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(episodes: int = 12, out: Path = Path("out/search"), console: Console | None = None) -> None:
    console = console or Console()
    data = evefx.load_spec(HERE / "specs" / "mixed_precision.yaml").model_dump(mode="json")
    # round activations: an lsq activation quantizer calibrated at one bit width transfers badly to another
    data["passes"][0]["activation"]["fn"] = "round"
    data["search"].update(episodes=episodes, finetune_steps=10)
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
        result = search_from_spec(DemoNet(), spec, run_dir=run_dir, epochs=3, resume=(run_dir / "start.pt").exists())
        best = result.best
        console.print(f"[bold]{name}[/]: best of {len(result.episodes)} episodes: validation accuracy "
                      f"{best['accuracy']:.2f}% at {spec.search.budget.kind} {best['cost']:.3f} "
                      f"(budget {spec.search.budget.max})")
        for key, value in best["values"].items():
            console.print(f"  {key} = {value:.3g}")
        console.print(f"  spec: {result.spec_path}   plot: {result.plot_path}")
        console.print(f"  reproduce: evefx transform --model examples.models:DemoNet --spec {result.spec_path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("out/search"))
    args = ap.parse_args()
    main(args.episodes, args.out)
