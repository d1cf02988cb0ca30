"""The long jobs: ``search`` (per-layer eve parameters under a budget) and ``demo``.

Example:
    $ evefx search --model examples.models:DemoNet --spec examples/specs/mixed_precision.yaml --run-dir out/search
    $ evefx demo
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from evefx.cli.app import MODEL, MODEL_KWARGS, app, console, fail, log_progress
from evefx.cli.models import import_module, load_model, parse_kwargs
from evefx.errors import EvefxError
from evefx.spec import load_spec

__all__ = ["search", "demo"]


class Backend(str, Enum):
    """Where ``evefx search`` plays its episodes (``search.backend``)."""

    local = "local"
    ray = "ray"


@app.command()
def search(
    model: str = MODEL,
    spec: Path = typer.Option(..., help="spec file with a search: section"),
    model_kwargs: Optional[str] = MODEL_KWARGS,
    data: str = typer.Option("mnist5k", help="mnist5k (embedded), mnist (torchvision, needs --data-root) or a .pt file "
                             "holding (inputs, labels), ((inputs_1, inputs_2, ...), labels) for several inputs, or "
                             "{'train': ..., 'test': ...}, or a .npz file (x, y, x_test, y_test; several inputs x0, x1, ...); "
                             "the search trains on the "
                             "training part and scores on its last fifth (MNIST-5k: last 1,000), never on the test part"),
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    run_dir: Path = typer.Option(Path("out/search"), file_okay=False, help="run folder (logs, checkpoints, best.yaml)"),
    resume: Optional[Path] = typer.Option(None, file_okay=False, help="resume the search in this run folder"),
    weights: Optional[Path] = typer.Option(None, help="trained float weights of the model (else it is trained)"),
    epochs: int = typer.Option(3, min=0, help="float training epochs when no weights are given"),
    episodes: Optional[int] = typer.Option(None, min=1, help="episodes to play", show_default="search.episodes"),
    seed: Optional[int] = typer.Option(None, help="seed of training and search", show_default="search.seed"),
    backend: Optional[Backend] = typer.Option(None, help="play the episodes here (local) or on Ray actors (ray)",
                                              show_default="search.backend"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster for the episodes, e.g. ray://head:10001 (implies "
                                              "--backend ray)", show_default="RAY_ADDRESS, else a local Ray instance"),
    pareto_latency: bool = typer.Option(False, help="also time the Pareto-front configurations with onnxruntime"),
) -> None:
    """Search per-layer eve parameters (bits, ratios) with the spec's method (search.algorithm: an RL agent or a
    baseline such as ilp); write best.yaml, pareto.csv and pareto.png and the episode log to the run folder."""
    from evefx.recipes import search_from_spec

    log_progress()
    try:
        if ray_address is not None:
            if backend is Backend.local:
                raise EvefxError("--ray-address is for search.backend ray: drop --backend local or the address")
            backend = Backend.ray
        spec_in: Any = load_spec(spec)
        update: dict[str, Any] = {}
        if backend is not None:
            update["backend"] = backend.value
        if episodes is not None:
            update.update(episodes=episodes, timesteps=None)
        if seed is not None:
            update["seed"] = seed
        if update and spec_in.search is not None:
            data_in = spec_in.model_dump(mode="json")
            data_in["search"].update(update)
            spec_in = load_spec(data_in)
        if ray_address is not None and spec_in.search is not None:
            from evefx.upgrade.ray_backend import connect

            connect(ray_address)  # the search's Ray actors then run on this cluster
        result = search_from_spec(load_model(model, parse_kwargs(model_kwargs)), spec_in, run_dir=resume or run_dir,
                                  data=data, data_root=data_root, weights=weights, epochs=epochs,
                                  resume=resume is not None, pareto_latency=pareto_latency)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        fail(e)
    console.print(f"best accuracy {result.best['accuracy']:.2f}% at cost {result.best['cost']:.4g}; wrote {result.spec_path}")


@app.command()
def demo(
    epochs: int = typer.Option(5, min=0, help="training epochs of each run"),
    out: Path = typer.Option(Path("out/demo"), file_okay=False, help="folder for the demo's files"),
) -> None:
    """The main job: train DemoNet on MNIST-5k, then quantize, export, spike and prune it.

    Stages: float training; W8A8 QAT (examples/specs/demo.yaml); int8 ONNX export checked with
    onnxruntime; a spiking version (spiking.yaml); 50% channel pruning (prune.yaml), fine-tuned
    and compacted. Logs progress line by line, ends with a summary table and the files it wrote
    under --out. Runs from a checkout of evefx (it needs examples/).
    """
    log_progress()
    try:
        demo_main = import_module("examples.demo").main
    except ImportError as e:
        fail(EvefxError(f"evefx demo runs from a checkout of evefx (it needs examples/): {e}"))
    try:
        demo_main(epochs=epochs, out=out, console=console)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        fail(e)
