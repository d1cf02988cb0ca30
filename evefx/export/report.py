"""``ExportReport``: what an ONNX export wrote, as data and as a rich table."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from rich.table import Table

from evefx.export.emulate import SaturationRow
from evefx.export.parity import Parity

__all__ = ["ExportReport", "count_parameters", "INTEGER_KERNELS"]

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearSoftmax", "QLinearReduceMean",
})
"""Operators of an onnxruntime-optimized graph that compute on integer codes."""


def count_parameters(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer elements by kind: ``int8`` (8-bit codes), ``int4`` (codes packed two per byte:
    INT4/UINT4 initializers and ``MatMulNBits`` weights), ``int32`` (bias codes), ``float`` (float
    weights and biases), ``qparams`` (scales and zero points of Q/DQ and ``MatMulNBits`` nodes).

    Example:
        >>> count_parameters(onnx.load("model.onnx"))["int8"]
    """
    qparam_names = {
        name
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        for name in n.input[1:]
    }
    nbits = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    qparam_names |= {name for n in model.graph.node if n.op_type == "MatMulNBits" for name in n.input[2:4]}
    out = Counter({"int8": 0, "int4": 0, "int32": 0, "float": 0, "qparams": 0})
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.name in qparam_names:
            out["qparams"] += size
        elif init.name in nbits:
            out["int4"] += 2 * size  # bytes of two 4-bit values (with the padding of the last block)
        elif init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            out["int4"] += size
        elif init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            out["int8"] += size
        elif init.data_type == onnx.TensorProto.INT32:
            out["int32"] += size
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            out["float"] += size
    return dict(out)


@dataclass(frozen=True)
class ExportReport:
    """The result of :func:`evefx.export_onnx`.

    * ``file_bytes``: size of the ``.onnx`` file;
    * ``params``: initializer elements by kind (see :func:`count_parameters`);
    * ``ops``: op histogram of the file; ``kernels``: op histogram after onnxruntime's graph
      optimizations (``QLinearConv``... show that Q/DQ were fused into integer kernels), or None;
    * ``bits``: per layer, the true weight/activation bit widths (also in the file's metadata);
    * ``weights``: per quantized layer, its weight storage (``int8``, ``int4``: INT4/UINT4 codes
      behind a DequantizeLinear, ``matmulnbits``) and the bytes of codes, scales and zero points
      (also in the metadata, ``evefx.weight_bytes``);
    * ``parity``: PyTorch vs onnxruntime as deployed on this CPU (integer kernels), or None with
      ``check=False``; ``graph``: PyTorch vs the QDQ graph as written (onnxruntime with optimizations
      off: float Q/DQ, no integer kernel), which shows an export that computes something else;
      ``kernel_check``: this CPU's kernels vs that graph (``kernel_ops``: the same op by op, run when
      it or ``parity`` fails, to tell a wrong kernel from ties amplified end to end); ``avx2_u8s8``: per integer layer, what an
      x86 CPU without VNNI would compute differently (:mod:`evefx.export.emulate`), so a VNNI
      machine sees it too;
    * ``target`` (``portable``, ``x86-vnni``, ``arm``; ``any`` for float files), ``cpu`` (this
      CPU's class), ``failing`` (the checks that failed) and ``passed``.

    Example:
        >>> report = evefx.export_onnx(gm, x, "model.onnx")
        >>> rich.print(report.table())
        >>> report.to_dict()["params"]["int8"]
    """

    path: str
    opset: int
    file_bytes: int
    quantized: bool
    params: dict[str, int]
    ops: dict[str, int]
    bits: dict[str, dict[str, int | None]] = field(default_factory=dict)
    kernels: dict[str, int] | None = None
    parity: Parity | None = None
    rewrites: dict[str, int] = field(default_factory=dict)
    target: str = "any"
    graph: Parity | None = None
    kernel_check: Parity | None = None
    kernel_ops: Parity | None = None
    avx2_u8s8: tuple[SaturationRow, ...] = ()
    cpu: str | None = None
    failing: tuple[str, ...] = ()
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        """True when some layer's weights are stored as 4-bit codes."""
        return any(w.get("form") in ("int4", "matmulnbits") for w in self.weights.values())

    @property
    def passed(self) -> bool | None:
        """True when every check passed, None when nothing was checked (``check=False``)."""
        if self.parity is None:
            return None
        return self.parity.passed if self.graph is None else not self.failing

    @property
    def integer_kernels(self) -> int | None:
        """Nodes onnxruntime runs on integer codes after fusing Q/DQ (None when not measured)."""
        if self.kernels is None:
            return None
        return sum(v for k, v in self.kernels.items() if k in INTEGER_KERNELS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "opset": self.opset,
            "file_bytes": self.file_bytes,
            "quantized": self.quantized,
            "params": dict(self.params),
            "ops": dict(self.ops),
            "kernels": None if self.kernels is None else dict(self.kernels),
            "integer_kernels": self.integer_kernels,
            "bits": {k: dict(v) for k, v in self.bits.items()},
            "weights": {k: dict(v) for k, v in self.weights.items()},
            "parity": None if self.parity is None else self.parity.to_dict(),
            "rewrites": dict(self.rewrites),
            "target": self.target,
            "cpu": self.cpu,
            "graph": None if self.graph is None else self.graph.to_dict(),
            "kernel_check": None if self.kernel_check is None else self.kernel_check.to_dict(),
            "kernel_ops": None if self.kernel_ops is None else self.kernel_ops.to_dict(),
            "avx2_u8s8": [r.to_dict() for r in self.avx2_u8s8],
            "failing": list(self.failing),
            "passed": self.passed,
        }

    def table(self) -> Table:
        """A two-column rich table of the figures."""
        t = Table(title=f"ONNX export: {self.path}", show_header=False)
        t.add_column("what")
        t.add_column("value", justify="right")
        kind = ("QDQ, 4-bit weights packed" if self.packed else "int8 QDQ") if self.quantized else "float"
        t.add_row("format", f"{kind}, opset {self.opset}")
        t.add_row("file size", f"{self.file_bytes:,} bytes")
        p = self.params
        int4 = f"{p.get('int4', 0):,} int4, " if p.get("int4") else ""
        t.add_row("parameters", f"{int4}{p.get('int8', 0):,} int8, {p.get('int32', 0):,} int32, {p.get('float', 0):,} float"
                  f" (+{p.get('qparams', 0):,} scales/zero points)")
        if self.weights:
            by_form: dict[str, list[int]] = {}
            for w in self.weights.values():
                by_form.setdefault(w["form"], []).append(int(w["bytes"]))
            t.add_row("weight bytes", ", ".join(f"{form} {sum(b):,} ({len(b)} layers)" for form, b in sorted(by_form.items())))
        t.add_row("ops in file", ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])))
        if self.kernels is not None:
            top = ", ".join(f"{k} {v}" for k, v in sorted(self.kernels.items(), key=lambda kv: -kv[1]))
            t.add_row("ops after onnxruntime fusion", top)
            t.add_row("integer kernels", str(self.integer_kernels))
        if self.bits:
            t.add_row("bits (weight/activation)", ", ".join(
                f"{layer} {b.get('weight') or 'f'}/{b.get('activation') or 'f'}" for layer, b in self.bits.items()))
        if self.parity is not None:
            par = self.parity
            t.add_row("parity samples", str(par.samples))
            steps = f" ({par.max_steps:.2f} steps)" if par.max_steps is not None else ""
            t.add_row("max |PyTorch - onnxruntime|", f"{par.max_abs_diff:.3g}{steps}, tolerance {par.tolerance:.3g}")
            t.add_row("tolerance rule", par.rule)
            t.add_row("elements within tolerance", f"{100 * par.within_tolerance:.3f}%")
            if par.top1_agreement is not None:
                t.add_row("top-1 agreement", f"{par.top1_agreement:.2f}%")
            for label, check in (("PyTorch vs QDQ graph (optimizations off)", self.graph),
                                 (f"kernels vs graph (this CPU: {self.cpu})", self.kernel_check),
                                 ("kernels vs PyTorch, op by op", self.kernel_ops)):
                if check is not None:
                    t.add_row(label, _verdict(check))
            if self.quantized and self.graph is not None:
                hit = [r.layer for r in self.avx2_u8s8 if r.saturated]
                t.add_row("AVX2 u8s8 emulation", f"{len(self.avx2_u8s8)} integer layers, "
                          + (f"[red]saturates in {', '.join(hit)}[/]" if hit else "no int16 saturation"))
            t.add_row("target", self.target)
            ok = self.passed
            t.add_row("parity", "[green]passed[/]" if ok else "[red]FAILED[/]" + (f" ({', '.join(self.failing)})" if self.failing else ""))
        return t

    def __rich__(self) -> Table:
        return self.table()


def _verdict(p: Parity) -> str:
    top1 = f", top-1 {p.top1_agreement:.2f}%" if p.top1_agreement is not None else ""
    steps = f" ({p.max_steps:.2f} steps)" if p.max_steps is not None else ""
    state = "[green]ok[/]" if p.passed else "[red]differs[/]"
    return f"{state}: max {p.max_abs_diff:.3g}{steps}, {100 * p.within_tolerance:.2f}% within{top1}"
