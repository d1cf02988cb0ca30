"""The ``evefx`` command: a thin face over the library. Nothing imports this module.

Commands that only read specs (``validate``, ``schema``) never import torch.

Example:
    $ evefx validate examples/specs/*.yaml
    $ evefx transform --model torchvision:resnet18 --spec examples/specs/w8a8.yaml --input-shape 1,3,224,224
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from evefx.errors import EvefxError
from evefx.spec import json_schema, load_spec

app = typer.Typer(help="evefx: a declarative graph compiler for PyTorch models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)


def _fail(err: Exception, code: int = 1) -> None:
    err_console.print(f"error: {err}", style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def validate(specs: list[Path] = typer.Argument(..., help="spec files (YAML or JSON)")) -> None:
    """Validate spec files; exit 1 with one line per problem if any is invalid. Does not import torch."""
    bad = 0
    for path in specs:
        try:
            load_spec(path)
            console.print(f"[green]ok[/] {path}")
        except EvefxError as e:
            bad += 1
            err_console.print(str(e), style="red", highlight=False, markup=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command()
def schema(out: Optional[Path] = typer.Option(None, help="write the schema here instead of stdout")) -> None:
    """Print (or write) the JSON Schema of evefx spec files."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}")


def load_model(ref: str) -> Any:
    """``torchvision:resnet18`` (no weights) or ``package.module:attr`` (a class, factory or instance)."""
    import torch

    if ":" not in ref:
        raise EvefxError(f"--model must look like 'package.module:attr' or 'torchvision:NAME' (got {ref!r})")
    mod_name, attr = ref.split(":", 1)
    if mod_name == "torchvision":
        import torchvision

        try:
            return getattr(torchvision.models, attr)(weights=None)
        except AttributeError:
            raise EvefxError(f"torchvision has no model {attr!r}; see torchvision.models.list_models()") from None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so examples.models works from a checkout
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise EvefxError(f"cannot load model {ref!r}: {e}") from e
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise EvefxError(f"{ref!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise EvefxError(f"--input-shape must be comma-separated integers like 1,3,224,224 (got {text!r})") from None
    if not shape or min(shape) < 1:
        raise EvefxError(f"--input-shape sizes must be positive (got {text!r})")
    return shape


def _transform(model: str, spec: Path, input_shape: str | None):
    import torch

    import evefx

    shape = parse_shape(input_shape)
    inputs = torch.zeros(shape) if shape else None
    return evefx.transform(load_model(model), load_spec(spec), inputs)


@app.command()
def transform(
    model: str = typer.Option(..., help="package.module:attr or torchvision:NAME"),
    spec: Path = typer.Option(..., help="spec file"),
    input_shape: Optional[str] = typer.Option(None, help="example input shape, e.g. 1,3,224,224"),
    out: Optional[Path] = typer.Option(None, help="save the transformed module's state_dict here (.pt)"),
    report: Optional[Path] = typer.Option(None, help="write the change report here (JSON)"),
) -> None:
    """Transform a model with a spec and print the change table."""
    try:
        gm = _transform(model, spec, input_shape)
    except EvefxError as e:
        _fail(e)
    console.print(gm.report)
    if out is not None:
        import torch

        torch.save(gm.state_dict(), out)
        console.print(f"wrote state_dict to {out}")
    if report is not None:
        report.write_text(json.dumps(gm.report.to_dict(), indent=2), encoding="utf-8")
        console.print(f"wrote report to {report}")


@app.command()
def inspect(
    model: str = typer.Option(..., help="package.module:attr or torchvision:NAME"),
    spec: Path = typer.Option(..., help="spec file"),
    input_shape: Optional[str] = typer.Option(None, help="example input shape, e.g. 1,3,224,224"),
) -> None:
    """List the layers of the transformed model with what each pass put there."""
    from evefx.api import eve_modules
    from evefx.graph import layer_nodes, module_of

    try:
        gm = _transform(model, spec, input_shape)
    except EvefxError as e:
        _fail(e)
    attached: dict[str, list[str]] = {}
    for name, prov, module in eve_modules(gm):
        attached.setdefault(prov["layer"], []).append(f"{prov['spec_path']} {prov['role']}: {type(module).__name__} ({name})")
    table = Table(title=f"{model} with {spec}")
    table.add_column("layer")
    table.add_column("module")
    table.add_column("evefx modules")
    for node in layer_nodes(gm):
        table.add_row(str(node.target), type(module_of(gm, node)).__name__, "\n".join(attached.get(str(node.target), ["-"])))
    console.print(table)


@app.command()
def export(
    model: str = typer.Option(..., help="package.module:attr or torchvision:NAME"),
    spec: Path = typer.Option(..., help="spec file"),
    out: Path = typer.Option(..., help="the ONNX file to write"),
    input_shape: Optional[str] = typer.Option(None, help="example input shape (default: trace.input_shape)"),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the transformed model (from training)"),
    calibrate_batches: int = typer.Option(8, help="random batches to calibrate quantizers when no checkpoint is given"),
    opset: int = typer.Option(17, help="ONNX opset"),
    check: bool = typer.Option(True, help="check parity with onnxruntime"),
) -> None:
    """Export a transformed model to ONNX (int8 QDQ when quantized) and print the size/parity table."""
    import torch

    from evefx.export import calibrate, export_onnx

    try:
        spec_obj = load_spec(spec)
        shape = parse_shape(input_shape) or spec_obj.trace.input_shape
        if shape is None:
            raise EvefxError("give --input-shape or trace.input_shape in the spec: export needs example inputs")
        gm = _transform(model, spec, ",".join(map(str, shape)))
        if checkpoint is not None:
            gm.load_state_dict(torch.load(checkpoint, map_location="cpu"))
        else:
            gen = torch.Generator().manual_seed(0)
            calibrate(gm, [torch.rand(shape, generator=gen) for _ in range(calibrate_batches)])
        report = export_onnx(gm, torch.zeros(shape), out, opset=opset, check=check)
    except EvefxError as e:
        _fail(e)
    console.print(report.table())


class Backend(str, Enum):
    """Where ``evefx search`` plays its episodes (``search.backend``)."""

    local = "local"
    ray = "ray"


@app.command()
def search(
    model: str = typer.Option(..., help="package.module:attr or torchvision:NAME"),
    spec: Path = typer.Option(..., help="spec file with a search: section"),
    data: str = typer.Option("mnist5k", help="mnist5k (embedded) or mnist (torchvision, needs --data-root)"),
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    run_dir: Path = typer.Option(Path("out/search"), help="run folder (logs, checkpoints, best.yaml)"),
    resume: Optional[Path] = typer.Option(None, help="resume the search in this run folder"),
    weights: Optional[Path] = typer.Option(None, help="trained float weights of the model (else it is trained)"),
    epochs: int = typer.Option(3, help="float training epochs when no weights are given"),
    backend: Optional[Backend] = typer.Option(None, help="play the episodes here (local) or on Ray actors (ray); "
                                              "overrides the spec's search.backend"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster for the episodes, e.g. ray://head:10001 (implies "
                                              "--backend ray; default: RAY_ADDRESS, else a local Ray instance)"),
) -> None:
    """Search per-layer eve parameters (bits, ratios) with RL; write best.yaml and plots to the run folder."""
    from evefx.upgrade import search_from_spec

    try:
        if ray_address is not None:
            if backend is Backend.local:
                raise EvefxError("--ray-address is for search.backend ray: drop --backend local or the address")
            backend = Backend.ray
            os.environ["RAY_ADDRESS"] = ray_address  # read by evefx.upgrade.ray_backend.connect (and by Ray itself)
        spec_in: Any = spec
        if backend is not None:
            spec_in = load_spec(spec)
            if spec_in.search is not None:
                spec_in = spec_in.model_copy(update={"search": spec_in.search.model_copy(update={"backend": backend.value})})
        result = search_from_spec(load_model(model), spec_in, run_dir=resume or run_dir, data=data, data_root=data_root,
                                  weights=weights, epochs=epochs, resume=resume is not None)
    except EvefxError as e:
        _fail(e)
    console.print(f"best accuracy {result.best['accuracy']:.2f}% at cost {result.best['cost']:.4g}; wrote {result.spec_path}")


@app.command()
def demo(
    epochs: int = typer.Option(5, help="training epochs of each run"),
    out: Path = typer.Option(Path("out/demo"), help="folder for the demo's files"),
) -> None:
    """The main job: transform, train and evaluate the demo network on the embedded MNIST."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from examples.demo import main
    except ImportError as e:
        _fail(EvefxError(f"evefx demo runs from a checkout of evefx (it needs examples/): {e}"))
    try:
        main(epochs=epochs, out=out, console=console)
    except EvefxError as e:
        _fail(e)


# ----------------------------------------------------------------- post-training quantization
def _ptq_setup(model: str, checkpoint: Optional[Path], spec: Path, data: str, data_root: Optional[Path],
               calib_samples: int, batch_size: int):
    """Float model (checkpoint loaded), transformed copy, calibration batches and a labelled test set (or None)."""
    import torch

    import evefx

    float_model = load_model(model)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu")
        try:
            float_model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, AttributeError) as e:
            raise EvefxError(f"--checkpoint {checkpoint} does not fit {model} (a state_dict of the float model is "
                             f"expected): {e}") from e
    float_model.eval()
    if data in ("mnist5k", "mnist"):
        from evefx.data import loaders

        train, test = loaders(batch_size=batch_size, source=data, root=data_root)
        xs = torch.stack([train.dataset[i][0] for i in range(min(calib_samples, len(train.dataset)))])
        labelled = [(x, y) for x, y in test]
    else:
        path = Path(data)
        if not path.is_file():
            raise EvefxError(f"--data must be mnist5k, mnist or a .pt file holding a tensor or (inputs, labels) (got {data!r})")
        obj = torch.load(path, map_location="cpu")
        x_all, y_all = (obj[0], obj[1]) if isinstance(obj, (tuple, list)) else (obj, None)
        xs = x_all[:calib_samples]
        labelled = None if y_all is None else [(x_all[i:i + batch_size], y_all[i:i + batch_size])
                                                for i in range(0, len(x_all), batch_size)]
    calib = [xs[i:i + batch_size] for i in range(0, len(xs), batch_size)]
    gm = evefx.transform(float_model, load_spec(spec), xs[:1])
    return float_model, gm, calib, labelled


_PTQ_DATA = typer.Option("mnist5k", help="mnist5k (embedded), mnist (torchvision, needs --data-root) or a .pt file "
                                      "holding a tensor or (inputs, labels)")


@app.command()
def quantize(
    model: str = typer.Option(..., help="package.module:attr or torchvision:NAME"),
    spec: Path = typer.Option(..., help="spec file with a quantize section (calibration, corrections)"),
    out: Path = typer.Option(..., help="the ONNX file to write"),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the trained float model"),
    data: str = _PTQ_DATA,
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    calib_samples: int = typer.Option(512, help="calibration samples (from the training split)"),
    batch_size: int = typer.Option(64, help="calibration batch size"),
    report: Optional[Path] = typer.Option(None, help="write the calibration/correction/export figures here (JSON)"),
    check: bool = typer.Option(True, help="check parity with onnxruntime"),
) -> None:
    """Post-training quantization: transform, calibrate, correct (as the spec says), export with parity."""
    import evefx
    from evefx.export import export_onnx, onnx_accuracy
    from evefx.train import evaluate

    try:
        float_model, gm, calib, labelled = _ptq_setup(model, checkpoint, spec, data, data_root, calib_samples, batch_size)
        ptq = evefx.post_training_quantize(gm, calib)
        export = export_onnx(gm, calib[0][:1], out, real_inputs=calib[0], check=check)
    except EvefxError as e:
        _fail(e)
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
    model: str = typer.Option(..., help="package.module:attr or torchvision:NAME"),
    spec: Path = typer.Option(..., help="spec file with a quantize section"),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the trained float model"),
    data: str = _PTQ_DATA,
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    bits: str = typer.Option("8,4,2", help="bit widths each layer is lowered to, one at a time"),
    what: str = typer.Option("weight", help="weight, activation or both"),
    budget: Optional[float] = typer.Option(None, help="average weight bits: print/write overrides for it"),
    allocation: str = typer.Option("greedy", help="greedy or knapsack (exact) allocation for --budget"),
    calib_samples: int = typer.Option(512, help="calibration samples (from the training split)"),
    batch_size: int = typer.Option(64, help="calibration batch size"),
    png: Optional[Path] = typer.Option(None, help="write the bar chart here"),
    overrides: Optional[Path] = typer.Option(None, help="write the overrides for --budget here (YAML)"),
) -> None:
    """Per-layer sensitivity: the metric with one layer at a time lowered (accuracy when labels are given)."""
    import torch
    import yaml

    import evefx
    from evefx.train import evaluate

    try:
        levels = tuple(int(b) for b in bits.split(","))
    except ValueError:
        _fail(EvefxError(f"--bits must be comma-separated integers like 8,4,2 (got {bits!r})"))
    try:
        float_model, gm, calib, labelled = _ptq_setup(model, checkpoint, spec, data, data_root, calib_samples, batch_size)
        evefx.post_training_quantize(gm, calib, progress=False)
        if labelled is not None:
            def metric(m: Any) -> float:
                return evaluate(m, labelled)["accuracy"]
        else:
            x = torch.cat(calib)
            with torch.no_grad():
                y = float_model(x)

            def metric(m: Any) -> float:  # minus the output's mean squared error against the float model
                with torch.no_grad():
                    return -float((m(x) - y).square().mean())
        result = evefx.sensitivity(gm, metric, levels, what=what, inputs=calib[0])  # type: ignore[arg-type]
        patch = result.to_overrides(budget, allocation) if budget is not None else None  # type: ignore[arg-type]
    except EvefxError as e:
        _fail(e)
    console.print(result)
    if png is not None:
        console.print(f"wrote {result.plot(png)}")
    if patch is not None:
        text = yaml.safe_dump({"overrides": list(patch)}, sort_keys=False)
        console.print(f"overrides for {budget} average bits:\n{text}", markup=False, highlight=False)
        if overrides is not None:
            overrides.write_text(text, encoding="utf-8")
            console.print(f"wrote {overrides}")


if __name__ == "__main__":  # pragma: no cover
    app()
