"""Post-training quantization commands: ``quantize`` (calibrate, correct, export) and ``sensitivity``.

Example:
    $ evefx quantize --model examples.models:DemoNet --checkpoint W.pt --spec examples/specs/ptq.yaml --out demo.onnx
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from evefx.cli.app import MODEL, MODEL_KWARGS, app, console, fail
from evefx.cli.models import load_model, parse_kwargs
from evefx.errors import EvefxError
from evefx.spec import load_spec

__all__ = ["quantize", "sensitivity_cmd"]


def _ptq_setup(model: str, model_kwargs: Optional[str], checkpoint: Optional[Path], spec: Path, data: str,
               data_root: Optional[Path], calib_samples: int, batch_size: int):
    """Float model (checkpoint loaded), transformed copy, calibration batches (from the data's training
    part) and its labelled held-out part as batches (None without labels)."""
    from torch.utils.data import DataLoader

    import evefx
    from evefx.api import load_checkpoint
    from evefx.data import open_data, rows, take

    float_model = load_model(model, parse_kwargs(model_kwargs))
    if checkpoint is not None:
        load_checkpoint(float_model, checkpoint, "--checkpoint",
                        saved_from=f"the float model {model} (torch.save(model.state_dict()))")
    float_model.eval()
    source = open_data(data, data_root)
    xs = source.inputs("train", calib_samples)
    labelled: list[tuple[Any, Any]] | None = None
    if source.labelled:  # scored on the held-out part, never on the calibration samples
        labelled = list(DataLoader(source.held_out, batch_size=max(batch_size, 256)))
    calib = [take(xs, i, i + batch_size) for i in range(0, rows(xs), batch_size)]  # xs: a tuple for several inputs
    gm = evefx.transform(float_model, load_spec(spec), take(xs, 0, 1))
    return float_model, gm, calib, labelled


_PTQ_DATA = typer.Option("mnist5k", help="mnist5k (embedded), mnist (torchvision, needs --data-root) or a .pt file "
                                      "holding inputs, (inputs, labels), ((inputs_1, inputs_2, ...), labels) for several inputs, or "
                                      "{'train': ..., 'test': ...}, or a .npz file (x, y, x_test, "
                                      "y_test; several inputs x0, x1, ...); calibrated on "
                                      "the training part, scored on the held-out one (a file's last fifth)")


@app.command()
def quantize(
    model: str = MODEL,
    spec: Path = typer.Option(..., help="spec file with a quantize section (calibration, corrections)"),
    model_kwargs: Optional[str] = MODEL_KWARGS,
    out: Path = typer.Option(..., dir_okay=False, help="the ONNX file to write"),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the trained float model"),
    data: str = _PTQ_DATA,
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    calib_samples: int = typer.Option(512, min=1, help="calibration samples (from the training split)"),
    batch_size: int = typer.Option(64, min=1, help="calibration batch size"),
    report: Optional[Path] = typer.Option(None, dir_okay=False, help="write the calibration/correction/export figures here (JSON)"),
    check: bool = typer.Option(True, help="check parity with onnxruntime"),
) -> None:
    """Post-training quantization: transform, calibrate, correct (as the spec says), export with parity."""
    import evefx
    from evefx.data import take
    from evefx.export import export_onnx, onnx_accuracy
    from evefx.train import evaluate

    try:
        float_model, gm, calib, labelled = _ptq_setup(model, model_kwargs, checkpoint, spec, data, data_root, calib_samples, batch_size)
        ptq = evefx.post_training_quantize(gm, calib)
        export = export_onnx(gm, take(calib[0], 0, 1), out, real_inputs=calib[0], check=check)
    except EvefxError as e:
        fail(e)
    console.print(ptq)
    console.print(export.table())
    figures: dict[str, Any] = {"ptq": ptq.to_dict(), "onnx": str(out)}
    if labelled is not None:
        acc = {"float": evaluate(float_model, labelled)["accuracy"], "quantized (PyTorch)": evaluate(gm, labelled)["accuracy"],
               "quantized (onnxruntime)": onnx_accuracy(out, labelled)}
        table = Table(title="accuracy (%)")
        for k in acc:
            table.add_column(k, justify="right")
        table.add_row(*(f"{v:.2f}" for v in acc.values()))
        console.print(table)
        figures["accuracy"] = acc
    if report is not None:
        report.write_text(json.dumps(figures, indent=2), encoding="utf-8")
        console.print(f"wrote report to {report}")


@app.command("sensitivity")
def sensitivity_cmd(
    model: str = MODEL,
    spec: Path = typer.Option(..., help="spec file with a quantize section"),
    model_kwargs: Optional[str] = MODEL_KWARGS,
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the trained float model"),
    data: str = _PTQ_DATA,
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    bits: str = typer.Option("8,4,2", help="bit widths each layer is lowered to, one at a time"),
    what: str = typer.Option("weight", help="weight, activation or both"),
    budget: Optional[float] = typer.Option(None, help="average weight bits: print/write overrides for it"),
    allocation: str = typer.Option("greedy", help="greedy or knapsack (exact) allocation for --budget"),
    calib_samples: int = typer.Option(512, min=1, help="calibration samples (from the training split)"),
    batch_size: int = typer.Option(64, min=1, help="calibration batch size"),
    png: Optional[Path] = typer.Option(None, dir_okay=False, help="write the bar chart here"),
    overrides: Optional[Path] = typer.Option(None, dir_okay=False, help="write the overrides for --budget here (YAML)"),
) -> None:
    """Per-layer sensitivity: the metric with one layer at a time lowered (accuracy when labels are given)."""
    import torch
    import yaml

    import evefx
    from evefx.ptq.batches import run_batch
    from evefx.train import evaluate

    try:
        levels = tuple(int(b) for b in bits.split(","))
    except ValueError:
        fail(EvefxError(f"--bits must be comma-separated integers like 8,4,2 (got {bits!r})"))
    try:
        float_model, gm, calib, labelled = _ptq_setup(model, model_kwargs, checkpoint, spec, data, data_root, calib_samples, batch_size)
        evefx.post_training_quantize(gm, calib, progress=False)
        if labelled is not None:
            def metric(m: Any) -> float:
                return evaluate(m, labelled)["accuracy"]
        else:
            with torch.no_grad():  # batch by batch: a model of several inputs has tuples of tensors
                ys = [run_batch(float_model, b) for b in calib]
            count = sum(y.numel() for y in ys)

            def metric(m: Any) -> float:  # minus the output's mean squared error against the float model
                with torch.no_grad():
                    return -sum(float((run_batch(m, b) - y).square().sum()) for b, y in zip(calib, ys)) / count
        result = evefx.sensitivity(gm, metric, levels, what=what, inputs=calib[0])
        patch = result.to_overrides(budget, allocation) if budget is not None else None
    except EvefxError as e:
        fail(e)
    console.print(result)
    if png is not None:
        console.print(f"wrote {result.plot(png)}")
    if patch is not None:
        text = yaml.safe_dump({"overrides": list(patch)}, sort_keys=False)
        console.print(f"overrides for {budget} average bits:\n{text}", markup=False, highlight=False)
        if overrides is not None:
            overrides.write_text(text, encoding="utf-8")
            console.print(f"wrote {overrides}")
