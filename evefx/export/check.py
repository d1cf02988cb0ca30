"""The checks of an exported file: what ``export_onnx`` runs after writing it.

* :func:`deployment_target`: the CPUs a quantized model's file computes the same on;
* :func:`float_weights_between_qdq`: layers onnxruntime would quantize by itself (refused);
* :func:`check_file`: PyTorch vs the QDQ graph op by op, this CPU's kernels vs the graph, PyTorch
  vs what runs here, and the AVX2 u8s8 emulation (:mod:`evefx.export.emulate`);
* :func:`set_aside`: a file that failed moves to ``<name>.failed.onnx``.

Example:
    >>> report = check_file(gm, deploy, Path("m.onnx"), [x], report, None, 99.5)
    >>> report.passed, report.failing
    (True, ())
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import onnx
import torch
from torch import nn

from evefx.export.emulate import local_cpu_class, u8s8_saturation
from evefx.export.parity import check_parity, first_divergence, graph_parity
from evefx.export.qdq import QDQ
from evefx.export.report import ExportReport
from evefx.export.onnx_graph import consumers, producers, scope_of
from evefx.modules import QUANT_LAYER_TYPES
from evefx.spec.quantize import SATURATION_FREE_WEIGHT_CODES

__all__ = ["deployment_target", "float_weights_between_qdq", "check_file", "failure_text", "stand_in_inputs", "set_aside",
           "STAND_IN_SAMPLES"]

log = logging.getLogger(__name__)

STAND_IN_SAMPLES = 64
"""Parity inputs when the caller gives no real data."""


def deployment_target(model: nn.Module) -> str:
    """The CPUs a quantized model's int8 file computes the same on: ``portable`` when no signed weight
    code leaves ``[-64, 63]`` (no int16 pair sum of an AVX2 u8s8 kernel can saturate), otherwise the
    target its spec states (``x86-vnni`` or ``arm``; ``x86-vnni`` for a hand-built model).

    Example:
        >>> deployment_target(evefx.transform(net, {"passes": [{"kind": "quantize"}]}))
        'portable'
    """
    lo, hi = SATURATION_FREE_WEIGHT_CODES
    wide = False
    for m in model.modules():
        if isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer.enabled and m.weight_quantizer.signed:
            qmin, qmax = m.weight_quantizer.quant_range()
            wide = wide or qmin < lo or qmax > hi
    if not wide:
        return "portable"
    spec = getattr(model, "spec", None)
    stated = {p.target for p in getattr(spec, "passes", ()) if getattr(p, "kind", None) == "quantize"} - {"portable"}
    return sorted(stated)[0] if stated else "x86-vnni"


def stand_in_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """No real inputs given: 64 standard-normal samples shaped like the example (fixed seed)."""
    log.warning("export_onnx: no real_inputs; parity is checked on %d random samples, which may not exercise "
                "the model as data does (pass real_inputs=held-out data)", STAND_IN_SAMPLES)
    g = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        if t.is_floating_point():
            out.append(torch.randn((STAND_IN_SAMPLES, *t.shape[1:]), generator=g, dtype=t.dtype).to(t.device))
        else:
            out.append(t[:1].expand(STAND_IN_SAMPLES, *t.shape[1:]).clone())
    return tuple(out)


def check_file(gm: nn.Module, deploy: nn.Module, path: Path, batches: list[tuple[torch.Tensor, ...]],
               report: ExportReport, tolerance: float | None, top1_min: float,
               graph_reference: nn.Module | None = None) -> ExportReport:
    """The three comparisons and the emulation of the other CPU class (see :class:`ExportReport`).
    ``graph_reference``: the model whose quantizers match the file's op by op (the compacted model of
    a pruned one; ``gm`` by default); the end-to-end comparison is always with ``gm``."""
    here = local_cpu_class()
    graph = graph_parity(graph_reference if graph_reference is not None else gm, str(path), batches,
                         tolerance=tolerance, top1_min=top1_min)
    kernels = check_parity(None, str(path), batches, tolerance=tolerance, top1_min=top1_min)
    parity = check_parity(gm, str(path), batches, tolerance=tolerance, top1_min=top1_min)
    emulated = tuple(u8s8_saturation(str(path), batches)) if report.quantized else ()
    # a file built for VNNI/ARM kernels is not expected to run right on this CPU when it lacks them
    local_binding = not (report.target in ("x86-vnni", "arm") and here == "x86-avx2")
    failing = []
    if not graph.passed:
        failing.append("graph")
    if local_binding and not kernels.passed:
        failing.append("kernels")
    if local_binding and not parity.passed:
        failing.append("parity")
    if report.target == "portable" and any(r.saturated for r in emulated):
        failing.append("avx2_u8s8")
    kernel_ops = None
    if "graph" in failing:
        parity = replace(parity, first_divergence=graph.first_divergence or _divergence(gm, deploy, path, batches))
    elif "kernels" in failing or "parity" in failing:
        # op by op on this CPU's kernels: a kernel computing an op differently, or ties amplified end to end?
        kernel_ops = graph_parity(gm, str(path), batches, tolerance=tolerance, top1_min=top1_min, kernels=True)
        parity = replace(parity, first_divergence=kernel_ops.first_divergence or _divergence(gm, deploy, path, batches))
    if not local_binding:
        log.warning("%s targets %s; this CPU (%s) runs other kernels, so only the graph was checked against PyTorch",
                    path, report.target, here)
    return replace(report, parity=parity, graph=graph, kernel_check=kernels, kernel_ops=kernel_ops,
                   avx2_u8s8=emulated, cpu=here, failing=tuple(failing))


def _divergence(gm: nn.Module, deploy: nn.Module, path: Path, batches: list[tuple[torch.Tensor, ...]]) -> str | None:
    steps = {name: m.qp.step for name, m in deploy.named_modules() if isinstance(m, QDQ)} or None
    for batch in batches:
        # quantizer outputs first (each may differ by one step); then every module's output
        where = first_divergence(gm, str(path), batch, steps) if steps else None
        where = where or first_divergence(gm, str(path), batch, None)
        if where:
            return where
    return None


def failure_text(report: ExportReport) -> str:
    parts = []
    for name, what in (("graph", "the QDQ graph (onnxruntime, optimizations off) vs PyTorch"),
                       ("kernels", "this CPU's integer kernels vs the QDQ graph"),
                       ("parity", "this CPU's onnxruntime vs PyTorch")):
        p = {"graph": report.graph, "kernels": report.kernel_check, "parity": report.parity}[name]
        if name == "graph" and name in report.failing and p is not None and p.first_divergence:
            parts.append(f"{what}: {p.first_divergence}")
        elif name in report.failing and p is not None:
            top1 = f", top-1 agreement {p.top1_agreement:.2f}%" if p.top1_agreement is not None else ""
            steps = f" ({p.max_steps:.2f} steps)" if p.max_steps is not None else ""
            parts.append(f"{what}: max |diff| {p.max_abs_diff:.4g}{steps} > tolerance {p.tolerance:.4g} ({p.rule}); "
                         f"{100 * p.within_tolerance:.3f}% of the elements within tolerance{top1}")
    if "avx2_u8s8" in report.failing:
        bad = [r for r in report.avx2_u8s8 if r.saturated]
        parts.append("on x86 CPUs without VNNI the u8s8 kernels would saturate in "
                     + ", ".join(f"{r.layer} ({100 * r.outputs_changed:.1f}% of outputs)" for r in bad)
                     + "; quantize with target: portable (the default) or state target: x86-vnni")
    ops = report.kernel_ops
    if ops is not None and ops.first_divergence is None:
        parts.append(f"op by op every quantizer is within one step of PyTorch's on this CPU's kernels "
                     f"(max {ops.max_steps:.2f} steps given the same codes), so no op is computed wrongly: one-step "
                     f"rounding ties grow through the network end to end; state a budget "
                     f"(tolerance= and top1_min=, CLI --tolerance and --top1-min) if the figures above are acceptable, or raise the bits of the "
                     f"layers where the difference starts")
    where = report.parity.first_divergence if report.parity is not None else None
    if where and report.graph is not None and where == report.graph.first_divergence:
        where = None  # already named
    tail = f"; first diverging node: {where}" if where else ""
    return f"{report.path}: the exported file is wrong: " + "; ".join(parts) + tail


def float_weights_between_qdq(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul nodes between a ``DequantizeLinear`` input and a ``QuantizeLinear`` output
    (directly or after a ReLU) whose weight is a float initializer: onnxruntime's optimizer quantizes
    such weights itself (int8, a scale of its own choosing), so the file would not run what PyTorch
    computes. (With a float output it leaves the node in float.)"""
    inits = {i.name: i for i in model.graph.initializer}
    prod, users = producers(model.graph), consumers(model.graph)

    def quantized_after(tensor: str) -> bool:
        nxt = users.get(tensor, [])
        if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip"):
            nxt = users.get(nxt[0].output[0], [])
        return bool(nxt) and all(n.op_type == "QuantizeLinear" for n in nxt)

    hits = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            src = prod.get(node.input[0])
            weight = inits.get(node.input[1])
            if src is not None and src.op_type == "DequantizeLinear" and weight is not None \
                    and weight.data_type == onnx.TensorProto.FLOAT and quantized_after(node.output[0]):
                hits.append(scope_of(node) or node.name)
    return hits


def set_aside(path: Path) -> Path:
    """Move a file that failed its check out of the requested path (``x.onnx`` -> ``x.failed.onnx``)."""
    failed = path.with_name(path.stem + ".failed" + path.suffix)
    if path.exists():
        os.replace(path, failed)
    return failed
