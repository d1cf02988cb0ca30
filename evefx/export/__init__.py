"""ONNX export of evefx models: int8 QDQ for quantized models, plain ONNX otherwise, checked with onnxruntime;
NIR export/import of spiking models (:mod:`evefx.export.nir`).

Example:
    >>> from evefx.export import export_onnx
    >>> report = export_onnx(gm, torch.zeros(1, 1, 28, 28), "model.onnx")
    >>> report.parity.passed
    True
"""
from __future__ import annotations

from evefx.export.nir import NIRReport, export_nir, import_nir, spike_traces, to_nir
from evefx.export.onnx import MIN_QDQ_OPSET, export_onnx, layer_bits, onnx_accuracy
from evefx.export.parity import Parity, check_parity, first_divergence
from evefx.export.deploy import Deployed, deployable
from evefx.export.qdq import QDQ, QParams, QuantizedWeightLayer, calibrate
from evefx.export.report import ExportReport

__all__ = [
    "export_onnx",
    "onnx_accuracy",
    "layer_bits",
    "ExportReport",
    "Parity",
    "check_parity",
    "first_divergence",
    "deployable",
    "Deployed",
    "calibrate",
    "QParams",
    "QDQ",
    "QuantizedWeightLayer",
    "MIN_QDQ_OPSET",
    "export_nir",
    "import_nir",
    "to_nir",
    "spike_traces",
    "NIRReport",
]
