"""``export_onnx``: write an evefx model (or any ``nn.Module``) to ONNX and check it with onnxruntime.

The steps, one function each:

1. :func:`~evefx.export.deploy.deployable`: an eval-mode CPU copy, pruned channels removed
   (``evefx.compact``), quantizers swapped for stand-ins that the TorchScript exporter writes as
   ``QuantizeLinear``/``DequantizeLinear`` (BatchNorm folded, weights as int8/uint8 codes, per
   channel on axis 0), spiking modules unrolled over the timesteps;
2. ``_torch_export``: ``torch.onnx.export`` (TorchScript exporter), the module's call signature kept;
3. ``_rewrite``: the onnx-ir passes of :mod:`~evefx.export.rewrite` name the constants, store biases
   of fusable Conv/Gemm nodes as int32 and re-quantize after Flatten/MaxPool/Reshape, so onnxruntime
   fuses into integer kernels;
4. ``_pack``: with ``weight_storage: packed``, :mod:`~evefx.export.packed` stores weights of <= 4 bits
   as INT4/UINT4 (opset 21) and Linear layers as ``MatMulNBits``;
5. ``_save``: metadata (evefx version, spec, per-layer bits and weight bytes),
   ``onnx.checker.check_model(full_check=True)``, the file written;
6. ``_check``: parity with the PyTorch module (see :mod:`~evefx.export.check`); a failure raises
   :class:`~evefx.errors.ExportError` with the figures and the first diverging node.

Example:
    >>> report = evefx.export_onnx(gm, torch.zeros(1, 1, 28, 28), "demo.onnx", real_inputs=x_test)
    >>> rich.print(report.table())
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import onnx
import torch
from torch import fx, nn
from torch.utils._pytree import GetAttrKey, MappingKey, tree_flatten_with_path

from evefx.errors import ExportError
from evefx.export.check import (
    check_file,
    deployment_target,
    failure_text,
    float_weights_between_qdq,
    set_aside,
    stand_in_inputs,
)
from evefx.export.parity import TOP1_MIN, Parity, degenerate_outputs, flatten_outputs, ort_session, plain_outputs
from evefx.export.packed import MIN_PACKED_OPSET, name_weight_nodes, pack_weights, packed_layers, require_opset, upgrade_opset, weight_bytes
from evefx.export.deploy import Deployed, deployable, is_quantized
from evefx.export.qdq import QuantizedWeightLayer
from evefx.export.report import ExportReport, count_parameters
from evefx.export.spiking import is_stochastic
from evefx.export.rewrite import rewrite
from evefx.graph import provenance
from evefx.modules import QUANT_LAYER_TYPES, Quantizer

__all__ = ["export_onnx", "onnx_accuracy", "layer_bits", "deployment_target", "MIN_QDQ_OPSET"]

log = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13
"""Per-channel ``DequantizeLinear`` (the ``axis`` attribute) needs opset 13."""

DEFAULT_OPSET = 17
"""The opset of files without packed weights (those get :data:`~evefx.export.packed.MIN_PACKED_OPSET`)."""

_TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's newest opset; the file is converted up from it

_REAL_CHUNK = 256


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs.detach().cpu(),)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(t.detach().cpu() for t in inputs)
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors (got {type(inputs).__name__})")


def _input_names(model: nn.Module, count: int) -> list[str]:
    if isinstance(model, fx.GraphModule):
        names = [str(n.target) for n in model.graph.nodes if n.op == "placeholder"]
    else:
        params = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [n.lstrip("*") for n in names][:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _layer_of(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Module path -> (layer, role) for every module the quantize pass marked."""
    out: dict[str, tuple[str, str]] = {}
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            prov = provenance(node)
            if node.op == "call_module" and prov:
                out[str(node.target)] = (prov.layer, prov.role)
    return out


def layer_bits(model: nn.Module) -> dict[str, dict[str, int | None]]:
    """Per layer, the true bit widths of its weight and activation quantizers (None: float), and
    ``input`` for a layer whose input the quantize pass quantized (``quantize_inputs``).

    Example:
        >>> layer_bits(gm)["features.0"]
        {'weight': 8, 'activation': 8}
    """
    marks = _layer_of(model)
    bits: dict[str, dict[str, int | None]] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QUANT_LAYER_TYPES):
            wq = module.weight_quantizer
            bits.setdefault(name, {"weight": None, "activation": None})["weight"] = int(wq.bits) if wq.enabled else None
            inside.append(name + ".")
        elif isinstance(module, Quantizer) and not any(name.startswith(p) for p in inside):
            layer, role = marks.get(name, (name, "activation"))
            # an input quantizer (quantize_inputs) is listed under "input", not as the layer's activation
            key = "input" if role == "input" else "activation"
            bits.setdefault(layer, {"weight": None, "activation": None})[key] = (
                int(module.bits) if module.enabled else None
            )
    return bits


def _spec_text(model: nn.Module) -> str | None:
    spec = getattr(model, "spec", None)
    if spec is None or not getattr(spec, "passes", None):
        return None
    from evefx.spec import dump_spec

    return dump_spec(spec)


def _explain_failure(model: nn.Module, err: Exception) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    match = re.search(r"aten::(\w+)", str(err))
    where = ""
    if match and isinstance(model, fx.GraphModule):
        op = match.group(1).rstrip("_")
        hits = []
        for node in model.graph.nodes:
            target = node.target
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            if node.op in ("call_function", "call_method") and name.rstrip("_") == op:
                hits.append(node)
        if hits:
            from evefx.graph import describe_node

            where = "; it comes from " + ", ".join(describe_node(model, n) for n in hits)
    elif match:
        where = f" (operator aten::{match.group(1)})"
    return (f"ONNX export failed: {first}{where}. Replace that operation with ONNX-exportable ones, "
            f"or keep it outside the exported module.")


def _export(deploy: nn.Module, original: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int,
            input_names: list[str], output_names: list[str], dynamic_batch: bool) -> None:
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    try:
        # the TorchScript exporter prints its IR (from C++) on failure and warns about its deprecation
        with warnings.catch_warnings(), _quiet_output() as captured:
            warnings.simplefilter("ignore")
            torch.onnx.export(
                deploy, inputs, str(path), dynamo=False, autograd_inlining=True, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=axes,
                do_constant_folding=True,
            )
    except ExportError:
        raise
    except Exception as e:
        log.debug("exporter output:\n%s", captured.get("text", ""))
        raise ExportError(_explain_failure(original, e)) from e


@contextlib.contextmanager
def _quiet_output() -> Iterator[dict[str, str]]:
    """Capture what is written to the process's stdout/stderr (file descriptors 1 and 2)."""
    captured: dict[str, str] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            captured["text"] = tmp.read().decode(errors="replace")


def _metadata(model: onnx.ModelProto, original: nn.Module, bits: dict[str, Any], quantized: bool, target: str,
              weights: dict[str, Any], packed: bool) -> None:
    import evefx

    model.producer_name = "evefx"
    model.producer_version = evefx.__version__
    kind = "QDQ with 4-bit weights packed" if packed else "int8 QDQ"
    model.doc_string = "exported by evefx.export_onnx" + (f" ({kind})" if quantized else "")
    props = {
        "evefx.version": evefx.__version__,
        "evefx.format": ("qdq-packed" if packed else "qdq") if quantized else "float",
        "evefx.target": target if quantized else "any",
        "evefx.bits": json.dumps(bits, sort_keys=True),
    }
    if quantized:
        # per layer: int8 | int4 | matmulnbits and the bytes of its codes, scales and zero points
        props["evefx.weight_bytes"] = json.dumps(weights, sort_keys=True)
    spec = _spec_text(original)
    if spec is not None:
        props["evefx.spec"] = spec
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _kernel_histogram(path: Path) -> dict[str, int] | None:
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        try:
            ort_session(str(path), 1, str(opt))
            optimized = onnx.load(str(opt))
        except Exception as e:  # noqa: BLE001 - the histogram is informative only
            log.info("could not read onnxruntime's optimized graph: %s", e)
            return None
    return dict(Counter(n.op_type for n in optimized.graph.node))


def _chunks(real_inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    if real_inputs is None:
        return []
    data = _as_tuple(real_inputs)
    n = int(data[0].shape[0])
    return [tuple(t[i:i + _REAL_CHUNK] for t in data) for i in range(0, n, _REAL_CHUNK)]


def export_onnx(
    gm: nn.Module | Deployed,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    opset: int | None = None,
    weight_storage: str | None = None,
    linear_form: str = "matmulnbits",
    check: bool = True,
    real_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    tolerance: float | None = None,
    top1_min: float = TOP1_MIN,
    dynamic_batch: bool = True,
    int32_bias: bool = True,
    kernels: bool = True,
) -> ExportReport:
    """Write ``gm`` to ``path`` as ONNX (int8 QDQ when it has quantizers, float otherwise).

    Args:
        gm: an ``EveModule`` from :func:`evefx.transform` or any ``nn.Module``; it is not modified. Or
            what :func:`~evefx.export.deploy.deployable` returned for it, exported as it is.
        example_inputs: inputs of one call (a tensor or a tuple); they fix the traced shapes, and the
            batch dimension stays dynamic with ``dynamic_batch``.
        opset: ONNX opset (at least 13 for quantized models, 21 with packed weights); default 17, or
            21 when some layer's weights are stored packed.
        weight_storage: ``int8`` or ``packed`` for every layer, overriding the quantize sections'
            ``weight_storage`` (None: each layer as its section says). Packed: weights of <= 4 bits as
            INT4/UINT4 (two per byte), Linear layers as ``MatMulNBits`` (see :mod:`evefx.export.packed`).
        linear_form: packed Linear layers as ``matmulnbits`` (measured fastest on CPU) or ``qdq``
            (``DequantizeLinear`` of INT4 codes + ``Gemm``).
        check: compare PyTorch (eval) and onnxruntime on ``example_inputs`` and ``real_inputs``
            (64 random samples when none are given): PyTorch vs the QDQ graph (optimizations off),
            this CPU's kernels vs that graph, PyTorch vs what runs here, and, for int8 files, the
            AVX2 u8s8 emulation (a ``portable`` file must not saturate). Outputs that cannot show a
            difference (NaN, all zero, the same for every sample) are refused. On failure raise
            :class:`~evefx.errors.ExportError` with the figures and the first diverging node, and
            move the file to ``<name>.failed.onnx``: nothing wrong is left at ``path``, and a file
            that was there before is put back (see :mod:`evefx.export.parity`).
        tolerance: absolute tolerance overriding the default rules; ``top1_min``: the required top-1
            agreement in percent. Deep networks amplify the one-step differences of ties (each
            runtime orders its float sums differently), so a deep model may need a stated budget.
        int32_bias: store biases of fusable Conv/Gemm as int32 codes at scale ``s_x * s_w``, as
            onnxruntime's integer kernels need (a rounding of at most half that scale).
        kernels: record the op histogram of onnxruntime's optimized graph in the report.

    Example:
        >>> report = export_onnx(gm, torch.zeros(1, 1, 28, 28), "demo.onnx", real_inputs=x_test)
        >>> report.parity.top1_agreement
        100.0
    """
    source = gm.source if isinstance(gm, Deployed) else gm
    if not isinstance(source, nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module (got {type(source).__name__})")
    inputs, path = _as_tuple(example_inputs), Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    packed, opset = _storage(source, weight_storage, opset)
    deployed = gm if isinstance(gm, Deployed) else deployable(gm)
    with _previous_file_kept(path):
        _torch_export(deployed, inputs, path, opset, dynamic_batch)
        model, rewrites = _rewrite(path, deployed, int32_bias)
        model, forms = _pack(model, path, opset, packed, linear_form)
        rewrites["packed_weights"] = len(forms)
        report = _save(model, path, deployed, opset, rewrites, bool(forms), kernels)
        return _check(deployed, inputs, path, report, real_inputs, tolerance, top1_min) if check else report


@contextlib.contextmanager
def _previous_file_kept(path: Path) -> Iterator[None]:
    """A file already at ``path`` (yesterday's good export) is moved aside while the new one is
    written and checked, and put back when the export fails: a failed export leaves the user's
    previous file where it was, and the new file at ``<name>.failed.onnx``."""
    previous = path.with_name(f".{path.name}.previous") if path.is_file() else None
    if previous is not None:
        os.replace(path, previous)
    try:
        yield
    except BaseException:
        if previous is not None:
            os.replace(previous, path)
        raise
    if previous is not None:
        previous.unlink()


def _storage(source: nn.Module, weight_storage: str | None, opset: int | None) -> tuple[dict[str, tuple[int, str]], int]:
    """The layers whose weights are stored packed and the opset of the file (checked against each other)."""
    quantized = is_quantized(source)
    packed = packed_layers(source, weight_storage) if quantized else {}
    opset = opset if opset is not None else (MIN_PACKED_OPSET if packed else DEFAULT_OPSET)
    if quantized and opset < MIN_QDQ_OPSET:
        raise ExportError(f"quantized models need opset >= {MIN_QDQ_OPSET} for per-channel DequantizeLinear (got {opset})")
    require_opset(packed, opset)
    return packed, opset


def _torch_export(deployed: Deployed, inputs: tuple[torch.Tensor, ...], path: Path, opset: int,
                  dynamic_batch: bool) -> None:
    """Run the deployed module once (it must return tensors) and write it with the TorchScript exporter."""
    with torch.no_grad():
        try:
            raw = deployed.model(*inputs)
            outputs = flatten_outputs(raw)
        except Exception as e:
            raise ExportError(f"the model does not run on the example inputs: {e}") from e
    if not outputs:
        raise ExportError("the model returns no tensor; nothing to export")
    exported = _exportable(deployed.model, len(inputs), _holds_dataclass(raw))
    input_names = _input_names(deployed.source, len(inputs))
    output_names = _output_names(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    _export(exported, deployed.source, inputs, path, min(opset, _TORCHSCRIPT_MAX_OPSET), input_names,
            output_names, dynamic_batch)


def _output_names(out: Any) -> list[str]:
    """ONNX output names: ``output`` for one tensor, the keys of a dict (or fields of a named tuple
    or a dataclass, joined by ``.`` when nested) when every tensor has one, else ``output_0``, ``output_1``...

    Example:
        >>> _output_names({"logits": y, "probs": p})
        ['logits', 'probs']
    """
    leaves = [path for path, leaf in tree_flatten_with_path(plain_outputs(out))[0] if isinstance(leaf, torch.Tensor)]
    if len(leaves) == 1:
        return ["output"]
    names = [".".join(str(getattr(k, "key", getattr(k, "name", ""))) for k in path) for path in leaves]
    named = all(path and all(isinstance(k, (MappingKey, GetAttrKey)) for k in path) for path in leaves)
    if named and len(set(names)) == len(names):
        return names
    return [f"output_{i}" for i in range(len(leaves))]


class _Positional(nn.Module):
    """Calls ``model`` with the example inputs only, so its other parameters keep their defaults,
    and returns its output with dataclasses made dicts (:func:`plain_outputs`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> Any:
        return plain_outputs(self.model(*inputs))


def _holds_dataclass(out: Any) -> bool:
    """Whether a model's output is, or holds in its tuples, lists and dicts, a dataclass instance."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return True
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return any(_holds_dataclass(v) for v in values)


def _exportable(model: nn.Module, count: int, dataclass_out: bool = False) -> nn.Module:
    """The module to hand the exporter: ``model`` with the parameters after the ``count`` example
    inputs fixed at their defaults (and, with ``dataclass_out``, its output made plain containers).

    Why: the TorchScript exporter turns a default it is not given (``scale: float = 1.0``) into a
    graph input that no caller feeds, and the file cannot run. An fx copy (what evefx.transform
    returns) gets the defaults written into its graph, keeping its module names, which the export
    and its checks read; another module is wrapped. A parameter without a default is left, and
    the model's run reports it.

    Example:
        >>> _exportable(deployed.model, 2)   # forward(image, table, scale=1.0): scale is 1.0
    """
    if not isinstance(model, fx.GraphModule):
        params = list(inspect.signature(model.forward).parameters.values())
        extra = [p for p in params[count:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                 and p.default is not p.empty]
        return _Positional(model) if extra or dataclass_out else model
    bound = False
    if dataclass_out:  # the graph returns plain containers; its module names stay as they are
        out = next(n for n in model.graph.nodes if n.op == "output")
        with model.graph.inserting_before(out):
            out.args = (model.graph.call_function(plain_outputs, out.args),)
        bound = True
    for node in [n for n in model.graph.nodes if n.op == "placeholder"][count:]:
        if str(node.target).startswith("*") or not node.args:  # *args/**kwargs, or no default
            continue
        default = node.args[0]

        def constant(arg: fx.Node, node: fx.Node = node, value: Any = default) -> Any:
            return value if arg is node else arg

        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, constant)
            user.kwargs = fx.node.map_arg(user.kwargs, constant)
        model.graph.erase_node(node)
        bound = True
    if bound:
        model.recompile()
    return model


def _rewrite(path: Path, deployed: Deployed, int32_bias: bool) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Load the exporter's file, apply the passes of :mod:`evefx.export.rewrite` and name the weight
    nodes after their layers; returns the model and the edit counts."""
    model, rewrites = rewrite(onnx.load(str(path)), int32_bias=int32_bias)
    name_weight_nodes(model, {n: m.codes.numpy() for n, m in deployed.model.named_modules()
                              if isinstance(m, QuantizedWeightLayer)})
    rewrites["pruned_channels_removed"] = deployed.channels_removed
    return model, rewrites


def _pack(model: onnx.ModelProto, path: Path, opset: int, packed: dict[str, tuple[int, str]],
          linear_form: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Convert to the asked opset and store the packed layers' weights as INT4/UINT4 or MatMulNBits."""
    try:
        model = upgrade_opset(model, opset)
        forms = pack_weights(model, packed, linear_form) if packed else {}
    except ExportError as e:
        failed = set_aside(path)  # the exporter's unpacked file is not what was asked for
        raise ExportError(f"{e}; the unfinished file was moved to {failed}") from e
    return model, forms


def _save(model: onnx.ModelProto, path: Path, deployed: Deployed, opset: int, rewrites: dict[str, int],
          packed: bool, kernels: bool) -> ExportReport:
    """Refuse float weights between Q/DQ, write the metadata, run ``onnx.checker`` and save; the report
    of the file (parity not checked yet)."""
    gm, quantized = deployed.source, deployed.quantized
    floating = float_weights_between_qdq(model) if quantized else []
    if floating:
        failed = set_aside(path)
        raise ExportError(
            f"{path}: layer {floating[0]} has float weights but a quantized input; onnxruntime would quantize "
            f"those weights itself and the file would not compute what PyTorch does. Quantize its weights too "
            f"(weight: {{bits: 8}}) or leave its input in float (quantize_inputs: false, or select.exclude it); "
            f"the file was moved to {failed}")
    bits = layer_bits(gm)
    target = deployment_target(gm) if quantized else "any"
    weights = weight_bytes(model) if quantized else {}
    _metadata(model, gm, bits, quantized, target, weights, packed)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        failed = set_aside(path)
        raise ExportError(f"{path}: the exported graph fails onnx.checker ({e}); the file was moved to {failed}; "
                          f"report a bug with this message") from e
    onnx.save(model, str(path))
    return ExportReport(
        path=str(path), opset=opset, file_bytes=path.stat().st_size, quantized=quantized,
        params=count_parameters(model), ops=dict(Counter(n.op_type for n in model.graph.node)),
        bits=bits, kernels=_kernel_histogram(path) if kernels else None, parity=None, rewrites=rewrites,
        target=target, weights=weights,
    )


def _check(deployed: Deployed, inputs: tuple[torch.Tensor, ...], path: Path, report: ExportReport,
           real_inputs: Any, tolerance: float | None, top1_min: float) -> ExportReport:
    """Compare the file with the PyTorch model (see :mod:`evefx.export.check`); a file that fails, or
    that cannot be checked, is set aside and an :class:`ExportError` raised."""
    gm = deployed.source
    if is_stochastic(gm):
        log.warning("%s: the model draws random spikes (Poisson encoder); PyTorch and onnxruntime cannot be "
                    "compared sample by sample, so parity was not checked", path)
        return replace(report, parity=Parity(0, 0.0, 0.0, "not checked: random Poisson encoder", 1.0, None, None,
                                             True, False))
    batches = [inputs, *_chunks(real_inputs if real_inputs is not None else stand_in_inputs(inputs))]
    why = degenerate_outputs(gm, batches)
    if why is not None:
        failed = set_aside(path)
        raise ExportError(
            f"{path}: cannot check the file: the model's {why} on the parity inputs, so any file would "
            f"agree with it; train or calibrate the model first (evefx.calibrate), or pass real_inputs. "
            f"The unchecked file was moved to {failed}"
        )
    report = check_file(gm, deployed.model, path, batches, report, tolerance, top1_min, graph_reference=deployed.graph_reference)
    if not report.passed:
        failed = set_aside(path)
        err = ExportError(f"{failure_text(report)}; the file was moved to {failed}")
        err.report = replace(report, path=str(failed))  # type: ignore[attr-defined]
        raise err
    return report


def onnx_accuracy(path: str | Path, loader: Iterable[Any], threads: int = 1) -> float:
    """Top-1 accuracy (percent) of an exported classifier on ``(x, y)`` batches, with onnxruntime.

    Example:
        >>> onnx_accuracy("demo.onnx", test_loader)
        97.6
    """
    from evefx.train import split_batch

    session = ort_session(str(path), threads)
    names = [i.name for i in session.get_inputs()]
    correct = total = 0
    for batch in loader:
        inputs, y = split_batch(batch)  # (x, y), or (token_ids, mask, y) for a file of two inputs
        if len(inputs) != len(names):
            raise ExportError(f"onnx_accuracy: {path} takes {len(names)} inputs ({', '.join(names)}) but a batch "
                              f"gives {len(inputs)} before its labels")
        logits = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        total += int(y.shape[0])
    if total == 0:
        raise ExportError("onnx_accuracy got an empty loader")
    return 100.0 * correct / total
