"""The ``evefx`` command: a thin face over the library. Nothing imports this module.

Commands that only read specs (``validate``, ``schema``) never import torch.

Example:
    $ evefx validate examples/specs/*.yaml
    $ evefx transform --model torchvision:resnet18 --spec examples/specs/w8a8.yaml --input-shape 1,3,224,224
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from evefx import __version__
from evefx.errors import EvefxError, EvefxWarning
from evefx.spec import json_schema, load_spec

app = typer.Typer(help="evefx: a declarative graph compiler for PyTorch models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """EvefxWarnings as one ``warning: ...`` line on stderr (no file:line of evefx's source)."""
    if issubclass(category, EvefxWarning):
        err_console.print(f"warning: {message}", style="yellow", highlight=False, markup=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _version(value: bool) -> None:
    if value:
        console.print(f"evefx {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """evefx: a declarative graph compiler for PyTorch models."""
    warnings.showwarning = _show_warning
    root = logging.getLogger("evefx")
    if not root.handlers:  # the library's warnings, one line each; demo and search add progress (INFO)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # every command starts quiet (one process may run several, as tests do)


def _log_progress() -> None:
    """Long jobs log their progress line by line, so a piped or redirected run shows it too."""
    logging.getLogger("evefx").setLevel(logging.INFO)
    logging.getLogger("examples").setLevel(logging.INFO)
    if not logging.getLogger("examples").handlers:
        logging.getLogger("examples").handlers = logging.getLogger("evefx").handlers


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


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs``: a JSON or YAML mapping of constructor arguments (``'{"num_classes": 10}'``)."""
    if text is None:
        return {}
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EvefxError(f"--model-kwargs must be a JSON/YAML mapping like '{{\"num_classes\": 10}}' (got {text!r}: {e})") from None
    if not isinstance(value, dict):
        raise EvefxError(f"--model-kwargs must be a JSON/YAML mapping like '{{\"num_classes\": 10}}' (got {text!r})")
    return value


def load_model(ref: str, kwargs: dict[str, Any] | None = None) -> Any:
    """``torchvision:resnet18`` (no weights) or ``package.module:attr`` (a class, factory or instance),
    called with ``kwargs`` (``--model-kwargs``).

    Example:
        >>> load_model("examples.models:DemoNet", {"num_classes": 10})
    """
    import torch

    kwargs = dict(kwargs or {})
    if ":" not in ref:
        raise EvefxError(f"--model must look like 'package.module:attr' or 'torchvision:NAME' (got {ref!r})")
    mod_name, attr = ref.split(":", 1)
    if mod_name == "torchvision":
        import torchvision

        if not hasattr(torchvision.models, attr):
            raise EvefxError(f"torchvision has no model {attr!r}; see torchvision.models.list_models()")
        obj = getattr(torchvision.models, attr)
        kwargs.setdefault("weights", None)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # so examples.models works from a checkout
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise EvefxError(f"cannot load model {ref!r}: {e}") from e
    if isinstance(obj, torch.nn.Module):
        if kwargs:
            raise EvefxError(f"{ref!r} is a model instance; --model-kwargs only applies to a class or a factory")
        model = obj
    elif callable(obj):
        import inspect as _inspect

        try:
            _inspect.signature(obj).bind(**kwargs)
        except TypeError as e:
            raise EvefxError(
                f"cannot build {ref}: {e}; pass its arguments as JSON with --model-kwargs '{{\"name\": value}}', "
                f"or point --model at a factory function that needs none"
            ) from None
        except ValueError:  # no signature (some builtins): let the call say it
            pass
        try:
            model = obj(**kwargs)
        except Exception as e:
            raise EvefxError(f"building {ref}(**{kwargs}) failed: {type(e).__name__}: {e}") from e
    else:
        model = obj
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


def _transform(model: str, spec: Path, input_shape: str | None, model_kwargs: str | None = None):
    import torch

    import evefx

    shape = parse_shape(input_shape)
    inputs = torch.zeros(shape) if shape else None
    return evefx.transform(load_model(model, parse_kwargs(model_kwargs)), load_spec(spec), inputs)


MODEL_HELP = "package.module:attr (a class, factory or instance) or torchvision:NAME"
MODEL_KWARGS_HELP = "constructor arguments of --model as JSON, e.g. '{\"num_classes\": 10}'"


@app.command()
def transform(
    model: str = typer.Option(..., help=MODEL_HELP),
    spec: Path = typer.Option(..., help="spec file"),
    input_shape: Optional[str] = typer.Option(None, help="example input shape, e.g. 1,3,224,224", show_default="trace.input_shape"),
    model_kwargs: Optional[str] = typer.Option(None, help=MODEL_KWARGS_HELP),
    out: Optional[Path] = typer.Option(None, help="save the transformed module's state_dict here (.pt)"),
    report: Optional[Path] = typer.Option(None, help="write the change report here (JSON)"),
) -> None:
    """Transform a model with a spec and print the change table."""
    try:
        gm = _transform(model, spec, input_shape, model_kwargs)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        _fail(e)
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
        _fail(EvefxError(f"cannot write {target}: {str(e).splitlines()[0]}; check that its folder exists"))


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
    model: str = typer.Option(..., help=MODEL_HELP),
    spec: Path = typer.Option(..., help="spec file"),
    input_shape: Optional[str] = typer.Option(None, help="example input shape, e.g. 1,3,224,224", show_default="trace.input_shape"),
    model_kwargs: Optional[str] = typer.Option(None, help=MODEL_KWARGS_HELP),
) -> None:
    """List each layer: its quantizers' bits, the modules each pass put there, every resolved option.

    Bits read I (input), W (weight), A (activation). Then one table per spec section gives every
    option as it applies to each layer (overrides included); layers that resolve alike share a column.
    """
    from evefx.api import eve_modules
    from evefx.graph import layer_nodes, module_of

    try:
        gm = _transform(model, spec, input_shape, model_kwargs)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        _fail(e)
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
    model: str = typer.Option(..., help=MODEL_HELP),
    spec: Path = typer.Option(..., help="spec file"),
    out: Path = typer.Option(..., help="the file to write (ONNX, or NIR with --format nir)"),
    format: str = typer.Option("onnx", "--format", help="onnx | nir (spiking models, for neuromorphic simulators)"),
    dt: float = typer.Option(1e-3, help="--format nir: seconds per time step (NIR's time constants are continuous)"),
    input_shape: Optional[str] = typer.Option(None, help="example input shape, e.g. 1,3,224,224", show_default="trace.input_shape"),
    model_kwargs: Optional[str] = typer.Option(None, help=MODEL_KWARGS_HELP),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict of the transformed model (from training)"),
    calibrate_batches: int = typer.Option(8, help="batches to calibrate quantizers when no checkpoint is given"),
    data: Optional[str] = typer.Option(None, help="mnist5k: calibrate on its training split and check parity on 256 "
                                       "held-out images (else random inputs, 64 for parity)"),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default 17; 21 when the spec stores weights packed)"),
    check: bool = typer.Option(True, help="check parity with onnxruntime"),
    tolerance: Optional[float] = typer.Option(None, help="a stated absolute tolerance for the outputs, replacing the "
                                              "one-step rules (for deep networks that amplify rounding ties; the "
                                              "op-by-op checks still apply)"),
    top1_min: float = typer.Option(99.5, help="required top-1 agreement of PyTorch and onnxruntime, percent"),
    allow_unpruned: bool = typer.Option(False, help="export even when the spec's pruners have never pruned "
                                        "(the file is then the unpruned model)"),
) -> None:
    """Export a transformed model to ONNX (int8 QDQ when quantized) or, with --format nir, a spiking model to NIR."""
    import torch

    from evefx.api import load_checkpoint, never_pruned
    from evefx.export import calibrate, export_onnx

    try:
        spec_obj = load_spec(spec)
        shape = parse_shape(input_shape) or spec_obj.trace.input_shape
        if shape is None:
            raise EvefxError("give --input-shape or trace.input_shape in the spec: export needs example inputs")
        if format not in ("onnx", "nir"):
            raise EvefxError(f"--format must be onnx or nir (got {format!r})")
        gm = _transform(model, spec, ",".join(map(str, shape)), model_kwargs)
        if checkpoint is not None:
            load_checkpoint(gm, checkpoint, "--checkpoint")
        if format == "nir":
            from evefx.export.nir import export_nir

            console.print(export_nir(gm.eval(), out, torch.zeros(shape), dt=dt).table())
            return
        calib, held_out = _export_data(data, shape, calibrate_batches)
        if checkpoint is None:
            calibrate(gm, calib)
        unpruned = never_pruned(gm)
        if unpruned:
            where = "the checkpoint was saved before evefx.prune_step" if checkpoint else "no --checkpoint was given"
            msg = (f"the pruners of {', '.join(unpruned)} have never pruned ({where}): the file would be the unpruned "
                   f"model with no-op Mul nodes")
            if not allow_unpruned:
                raise EvefxError(f"{msg}; pass --checkpoint of a model pruned with evefx.prune_step, "
                                 "or --allow-unpruned to export it anyway")
            warnings.warn(msg, EvefxWarning, stacklevel=1)
        report = export_onnx(gm, torch.zeros(shape), out, opset=opset, check=check, real_inputs=held_out,
                             tolerance=tolerance, top1_min=top1_min)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        _fail(e)
    console.print(report.table())


def _export_data(data: Optional[str], shape: tuple[int, ...], batches: int) -> tuple[list[Any], Any]:
    """Calibration batches and held-out parity inputs for ``evefx export``."""
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.rand(shape, generator=gen) for _ in range(batches)], None
    if data != "mnist5k":
        raise EvefxError(f"--data must be mnist5k (got {data!r})")
    from evefx.data import mnist5k

    if tuple(shape[1:]) != (1, 28, 28):
        raise EvefxError(f"--data mnist5k gives 1x28x28 images but the model takes {list(shape)}; give no --data")
    train, test = mnist5k("train").tensors[0], mnist5k("test").tensors[0]
    return [train[i * 32:(i + 1) * 32] for i in range(batches)], test[:256]


class Backend(str, Enum):
    """Where ``evefx search`` plays its episodes (``search.backend``)."""

    local = "local"
    ray = "ray"


@app.command()
def search(
    model: str = typer.Option(..., help=MODEL_HELP),
    spec: Path = typer.Option(..., help="spec file with a search: section"),
    model_kwargs: Optional[str] = typer.Option(None, help=MODEL_KWARGS_HELP),
    data: str = typer.Option("mnist5k", help="mnist5k (embedded) or mnist (torchvision, needs --data-root)"),
    data_root: Optional[Path] = typer.Option(None, help="folder of torchvision's MNIST"),
    run_dir: Path = typer.Option(Path("out/search"), help="run folder (logs, checkpoints, best.yaml)"),
    resume: Optional[Path] = typer.Option(None, help="resume the search in this run folder"),
    weights: Optional[Path] = typer.Option(None, help="trained float weights of the model (else it is trained)"),
    epochs: int = typer.Option(3, help="float training epochs when no weights are given"),
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

    _log_progress()
    try:
        if ray_address is not None:
            if backend is Backend.local:
                raise EvefxError("--ray-address is for search.backend ray: drop --backend local or the address")
            backend = Backend.ray
            os.environ["RAY_ADDRESS"] = ray_address  # read by evefx.upgrade.ray_backend.connect (and by Ray itself)
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
        result = search_from_spec(load_model(model, parse_kwargs(model_kwargs)), spec_in, run_dir=resume or run_dir,
                                  data=data, data_root=data_root, weights=weights, epochs=epochs,
                                  resume=resume is not None, pareto_latency=pareto_latency)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
        _fail(e)
    console.print(f"best accuracy {result.best['accuracy']:.2f}% at cost {result.best['cost']:.4g}; wrote {result.spec_path}")


@app.command()
def demo(
    epochs: int = typer.Option(5, help="training epochs of each run"),
    out: Path = typer.Option(Path("out/demo"), help="folder for the demo's files"),
) -> None:
    """The main job: train DemoNet on MNIST-5k, then quantize, export, spike and prune it.

    Stages: float training; W8A8 QAT (examples/specs/demo.yaml); int8 ONNX export checked with
    onnxruntime; a spiking version (spiking.yaml); 50% channel pruning (prune.yaml), fine-tuned
    and compacted. Logs progress line by line, ends with a summary table and the files it wrote
    under --out. Runs from a checkout of evefx (it needs examples/).
    """
    _log_progress()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from examples.demo import main as demo_main
    except ImportError as e:
        _fail(EvefxError(f"evefx demo runs from a checkout of evefx (it needs examples/): {e}"))
    try:
        demo_main(epochs=epochs, out=out, console=console)
    except (EvefxError, OSError) as e:  # OSError: an output folder that does not exist, a full disk
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
