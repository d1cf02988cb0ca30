"""The commands on specs and graphs: ``validate``, ``schema``, ``transform``, ``inspect``, ``export``.

``validate`` and ``schema`` only read specs and never import torch.

Example:
    $ evefx validate examples/specs/*.yaml
    $ evefx transform --model torchvision:resnet18 --spec examples/specs/w8a8.yaml --input-shape 1,3,224,224
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from evefx.cli.app import INPUT_SHAPE, MODEL, MODEL_KWARGS, SPEC, app, console, err_console, fail
from evefx.cli.models import parse_shape, transform_model
from evefx.errors import EvefxError, EvefxWarning
from evefx.spec import json_schema, load_spec

__all__ = ["validate", "schema", "transform", "inspect", "export"]


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
def schema(out: Optional[Path] = typer.Option(None, dir_okay=False, help="write the schema here instead of stdout")) -> None:
    """Print (or write) the JSON Schema of evefx spec files."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}")


DATA_EXAMPLE = typer.Option(None, help="mnist5k, mnist or a .pt/.npz file (as for export): trace with its first input "
                                       "instead of zeros of --input-shape (token ids stay integers; several inputs)")
DATA_ROOT = typer.Option(None, help="folder of torchvision's MNIST (--data mnist)")


def _transform_with_data(model: str, spec: Path, input_shape: Optional[str], model_kwargs: Optional[str],
                         data: Optional[str], data_root: Optional[Path]) -> Any:
    """``transform_model``, traced with ``--data``'s first input when it is given."""
    if data is None:
        return transform_model(model, spec, input_shape, model_kwargs)
    spec_obj = load_spec(spec)
    _, example = _data_example(data, data_root, parse_shape(input_shape) or spec_obj.trace.input_shape)
    return transform_model(model, spec_obj, None, model_kwargs, example=example)


@app.command()
def transform(
    model: str = MODEL, spec: Path = SPEC,
    input_shape: Optional[str] = INPUT_SHAPE,
    model_kwargs: Optional[str] = MODEL_KWARGS,
    out: Optional[Path] = typer.Option(None, dir_okay=False, help="save the transformed module's state_dict here (.pt)"),
    report: Optional[Path] = typer.Option(None, dir_okay=False, help="write the change report here (JSON)"),
    data: Optional[str] = DATA_EXAMPLE,
    data_root: Optional[Path] = DATA_ROOT,
) -> None:
    """Transform a model with a spec and print the change table."""
    try:
        gm = _transform_with_data(model, spec, input_shape, model_kwargs, data, data_root)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        fail(e)
    console.print(gm.report)
    target = out
    try:
        if out is not None:
            import torch

            torch.save(gm.state_dict(), out)
            console.print(f"wrote state_dict to {out}")
        target = report
        if report is not None:
            report.write_text(json.dumps(gm.report.to_dict(), indent=2), encoding="utf-8")
            console.print(f"wrote report to {report}")
    except (OSError, RuntimeError) as e:  # torch.save reports a missing folder as a RuntimeError
        fail(EvefxError(f"cannot write {target}: {str(e).splitlines()[0]}; check that its folder exists"))


def _flat_options(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"weight": {"bits": 8}, "fold_bn": True}`` -> ``{"weight.bits": "8", "fold_bn": "true"}``."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat_options(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


@app.command()
def inspect(
    model: str = MODEL, spec: Path = SPEC,
    input_shape: Optional[str] = INPUT_SHAPE,
    model_kwargs: Optional[str] = MODEL_KWARGS,
    data: Optional[str] = DATA_EXAMPLE,
    data_root: Optional[Path] = DATA_ROOT,
) -> None:
    """List each layer: its quantizers' bits, the modules each pass put there, every resolved option.

    Bits read I (input), W (weight), A (activation). Then one table per spec section gives every
    option as it applies to each layer (overrides included); layers that resolve alike share a column.
    """
    from evefx.api import eve_modules
    from evefx.graph import layer_nodes, module_of

    try:
        gm = _transform_with_data(model, spec, input_shape, model_kwargs, data, data_root)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        fail(e)
    attached: dict[str, list[str]] = {}
    bits: dict[str, list[str]] = {}
    layers_of: dict[str, list[str]] = {}
    for name, prov, module in eve_modules(gm):
        layer = prov.layer
        attached.setdefault(layer, []).append(f"{prov.spec_path} {prov.role}: {name}")
        if hasattr(module, "bits") and hasattr(module, "quant_range"):
            bits.setdefault(layer, []).append(f"{prov.role[:1].upper()}{int(module.bits)}")
        if layer not in layers_of.setdefault(prov.spec_path, []):
            layers_of[prov.spec_path].append(layer)
    table = Table(title=f"{model} with {spec}")
    for col in ("layer", "module", "bits", "evefx modules"):
        table.add_column(col)
    for node in layer_nodes(gm):
        layer = str(node.target)
        table.add_row(layer, type(module_of(gm, node)).__name__, " ".join(bits.get(layer, ["-"])),
                      "\n".join(attached.get(layer, ["-"])))
    console.print(table)
    for path, layers in layers_of.items():
        section = gm.spec.passes[int(path[len("passes["):-1])]
        groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for layer in layers:
            data = section.for_layer(layer).model_dump(mode="json", exclude={"kind", "select", "overrides", "exclude_last"})
            groups.setdefault(tuple(_flat_options(data).items()), []).append(layer)
        options = Table(title=f"{path} ({section.kind}): options as resolved per layer")
        options.add_column("option", no_wrap=True)
        for members in groups.values():
            options.add_column(", ".join(members))
        for key in (k for k, _ in next(iter(groups))):
            options.add_row(key, *(dict(g)[key] for g in groups))
        console.print(options)


@app.command()
def export(
    model: str = MODEL, spec: Path = SPEC,
    out: Path = typer.Option(..., dir_okay=False, help="the file to write (ONNX, or NIR with --format nir)"),
    format: str = typer.Option("onnx", "--format", help="onnx | nir (spiking models, for neuromorphic simulators)"),
    dt: float = typer.Option(1e-3, help="--format nir: seconds per time step (NIR's time constants are continuous)"),
    input_shape: Optional[str] = INPUT_SHAPE,
    model_kwargs: Optional[str] = MODEL_KWARGS,
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the transformed model (from training)"),
    calibrate_batches: int = typer.Option(8, min=1, help="batches to calibrate quantizers when no checkpoint is given"),
    data: Optional[str] = typer.Option(None, help="mnist5k, mnist (with --data-root), or a .pt/.npz file of inputs (or "
                                       "(inputs, labels), ((inputs_1, inputs_2, ...), labels) for several inputs): traced with its first "
                                       "input, calibrated on its training part, parity checked on 256 held-out inputs "
                                       "(else random inputs of --input-shape, 64 for parity)"),
    data_root: Optional[Path] = DATA_ROOT,
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default 17; 21 when the spec stores weights packed)"),
    check: bool = typer.Option(True, help="check parity with onnxruntime"),
    tolerance: Optional[float] = typer.Option(None, help="a stated absolute tolerance for the outputs, replacing the "
                                              "one-step rules (for deep networks that amplify rounding ties; the "
                                              "op-by-op checks still apply)"),
    top1_min: float = typer.Option(99.5, min=0.0, max=100.0, help="required top-1 agreement of PyTorch and onnxruntime, percent"),
    allow_unpruned: bool = typer.Option(False, help="export even when the spec's pruners have never pruned "
                                        "(the file is then the unpruned model)"),
    reestimate_bn: bool = typer.Option(False, help="re-estimate every BatchNorm's running statistics on the "
                                       "--data calibration batches first (after QAT on batch statistics; "
                                       "evefx.reestimate_bn)"),
) -> None:
    """Export a transformed model to ONNX (int8 QDQ when quantized) or, with --format nir, a spiking model to NIR."""

    from evefx.api import load_checkpoint, never_pruned
    from evefx.export import calibrate, export_onnx

    try:
        spec_obj = load_spec(spec)
        if format not in ("onnx", "nir"):
            raise EvefxError(f"--format must be onnx or nir (got {format!r})")
        source, example = _data_example(data, data_root, parse_shape(input_shape) or spec_obj.trace.input_shape)
        gm = transform_model(model, spec_obj, None, model_kwargs, example=example)  # loaded once: one schema warning
        if checkpoint is not None:
            load_checkpoint(gm, checkpoint, "--checkpoint")
        calib, held_out = _export_data(source, example, calibrate_batches)
        if checkpoint is None:
            calibrate(gm, calib)
            _set_thresholds(gm, calib)
        if format == "nir":
            from evefx.export.nir import export_nir

            console.print(export_nir(gm.eval(), out, example, dt=dt).table())
            return
        if reestimate_bn and data is None:
            raise EvefxError("--reestimate-bn needs real images: give --data (on random inputs BatchNorm would "
                             "learn the statistics of noise)")
        if reestimate_bn:
            from evefx.ptq import reestimate_bn as reestimate

            names = reestimate(gm, calib, progress=False)
            console.print(f"re-estimated {len(names)} BatchNorms on {len(calib)} batches of --data")
        unpruned = never_pruned(gm)
        if unpruned:
            where = "the checkpoint was saved before evefx.prune_step" if checkpoint else "no --checkpoint was given"
            msg = (f"the pruners of {', '.join(unpruned)} have never pruned ({where}): the file would be the unpruned "
                   f"model with no-op Mul nodes")
            if not allow_unpruned:
                raise EvefxError(f"{msg}; pass --checkpoint of a model pruned with evefx.prune_step, "
                                 "or --allow-unpruned to export it anyway")
            warnings.warn(msg, EvefxWarning, stacklevel=1)
        report = export_onnx(gm, example, out, opset=opset, check=check, real_inputs=held_out,
                             tolerance=tolerance, top1_min=top1_min)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        fail(e)
    console.print(report.table())


def _set_thresholds(gm: Any, batches: list[Any]) -> None:
    """Without a checkpoint, data-dependent neuron thresholds are set from the first calibration
    batch, as the quantizers' ranges are calibrated (export refuses a threshold never set)."""
    import torch

    from evefx.modules.neurons import SpikingNeuron

    if any(isinstance(m, SpikingNeuron) and m.threshold_pending for m in gm.modules()):
        with torch.no_grad():
            gm.eval()(*(batches[0] if isinstance(batches[0], tuple) else (batches[0],)))


def _data_example(data: Optional[str], data_root: Optional[Path], shape: tuple[int, ...] | None) -> tuple[Any, Any]:
    """The ``--data`` of ``export``, ``transform`` and ``inspect`` (None without it) and one example
    input: the data's first training input (its dtype too: token ids stay integers), else zeros of
    ``shape``."""
    import torch

    from evefx.data import open_data

    if data is None:
        if shape is None:
            raise EvefxError("give --input-shape, trace.input_shape in the spec, or --data: export needs example inputs")
        return None, torch.zeros(shape)
    source = open_data(data, data_root)
    example = source.inputs("train", 1)  # a tuple for a model of several inputs (no shape to check then)
    if shape is not None and isinstance(example, torch.Tensor) and tuple(example.shape[1:]) != tuple(shape[1:]):
        raise EvefxError(f"--data {source.name} holds inputs of shape {list(example.shape[1:])} but the model takes "
                         f"{list(shape)}; give data of that shape, or no --data (random inputs)")
    return source, example


def _export_data(source: Any, example: Any, batches: int) -> tuple[list[Any], Any]:
    """Calibration batches (32 inputs each, from the data's training part) and held-out parity
    inputs (256) for ``evefx export``; random inputs shaped like ``example`` without ``--data``."""
    import torch

    from evefx.data import rows

    if source is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.rand(example.shape, generator=gen) for _ in range(batches)], None
    calib = [source.inputs("train", 32, start=i * 32) for i in range(batches)]
    return [c for c in calib if rows(c)], source.inputs("held_out", 256)
