"""Export stand-ins: plain modules that compute exactly what evefx's quantizers compute in eval mode
and that the TorchScript ONNX exporter writes as standard ``QuantizeLinear``/``DequantizeLinear``.

:func:`swap_stand_ins` swaps every :class:`~evefx.modules.quantizer.Quantizer` of a model for a
:class:`QDQ` and every quantized conv/linear for a :class:`QuantizedWeightLayer` (BatchNorm folded,
weights stored as integer codes). The result gives the same outputs as the original in eval mode, so
it is what ``torch.onnx.export`` traces; :func:`evefx.export.deploy.deployable` runs it on its copy.

Example:
    >>> deployed = deployable(gm)           # gm is untouched
    >>> torch.equal(deployed.model(x), gm.eval()(x))
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evefx.errors import ExportError
from evefx.modules import QUANT_LAYER_TYPES, Quantizer, QuantLinear
from evefx.export.spiking import spiking_standin

__all__ = ["QParams", "QDQ", "QuantizedWeightLayer", "swap_stand_ins", "calibrate", "MAX_EXPORT_BITS"]

MAX_EXPORT_BITS = 8
"""ONNX QDQ stores codes as int8/uint8 before opset 21; wider quantizers are refused with an ExportError."""


@dataclass(frozen=True, eq=False)
class QParams:
    """The affine mapping of one quantizer, frozen at export time.

    ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x̂ = (q - zero_point) * scale``;
    ``axis`` is None per tensor. Codes are stored in int8 (signed) or uint8 (unsigned); narrower
    widths use the same storage with ``[qmin, qmax]`` kept by a ``Clip`` on the codes.

    Example:
        >>> q = Quantizer(bits=4, signed=False)
        >>> _ = q(torch.rand(8))          # calibrates it
        >>> qp = QParams.of(q, "fc")
        >>> qp.storage, qp.narrow
        (torch.uint8, True)
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None
    bits: int
    name: str

    @classmethod
    def of(cls, quantizer: Quantizer, name: str) -> QParams:
        if not bool(quantizer.initialized):
            raise ExportError(
                f"{name}: quantizer {quantizer.name!r} was never calibrated (no batch has passed through it), "
                f"so it has no scale to export; train the model or run evefx.calibrate(gm, batches) first"
            )
        bits = int(quantizer.bits)
        if bits > MAX_EXPORT_BITS:
            raise ExportError(
                f"{name}: quantizer {quantizer.name!r} has {bits} bits; ONNX QDQ export stores codes in "
                f"8-bit integers, so use at most {MAX_EXPORT_BITS} bits for this layer (or disable the "
                f"quantizer with set_mode(quantized=False) to export it in float)"
            )
        scale, zp, qmin, qmax, axis = quantizer.qparams()
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ExportError(f"{name}: quantizer {quantizer.name!r} has a non-positive or non-finite scale")
        return cls(scale.float().contiguous(), zp.to(torch.int64).contiguous(), int(qmin), int(qmax),
                   axis, bits, name)

    @property
    def storage(self) -> torch.dtype:
        return torch.int8 if self.qmin < 0 else torch.uint8

    @property
    def narrow(self) -> bool:
        """True when the codes use only part of the storage type (bits < 8)."""
        info = torch.iinfo(self.storage)
        return self.qmin > info.min or self.qmax < info.max

    @property
    def step(self) -> float:
        """The largest quantization step (the scale, maximised over channels)."""
        return float(self.scale.max())

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.dim() == 0:
            return t
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = -1
        return t.reshape(shape)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` in the storage dtype."""
        s, z = self._view(self.scale, x), self._view(self.zero_point.to(x.dtype), x)
        return (torch.round(x / s) + z).clamp(self.qmin, self.qmax).to(self.storage)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s, z = self._view(self.scale, codes), self._view(self.zero_point.float(), codes)
        return (codes.float() - z) * s

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with the same float operations as the quantizer's eval forward."""
        s, z = self._view(self.scale.to(x.dtype), x), self._view(self.zero_point.to(x.dtype), x)
        return ((torch.round(x / s) + z).clamp(self.qmin, self.qmax) - z) * s

    # --------------------------------------------------------------- ONNX symbolic helpers
    def onnx_scale_zero(self, g: Any) -> tuple[Any, Any]:
        s = g.op("Constant", value_t=self.scale)
        z = g.op("Constant", value_t=self.zero_point.to(self.storage))
        return s, z

    def onnx_axis(self) -> dict[str, int]:
        return {} if self.axis is None or self.scale.dim() == 0 else {"axis_i": int(self.axis)}

    def onnx_clip_codes(self, g: Any, q: Any) -> Any:
        if not self.narrow:
            return q
        lo = g.op("Constant", value_t=torch.tensor(self.qmin, dtype=self.storage))
        hi = g.op("Constant", value_t=torch.tensor(self.qmax, dtype=self.storage))
        return g.op("Clip", q, lo, hi)


class _QDQFunction(torch.autograd.Function):
    """Fake quantization in PyTorch; ``QuantizeLinear -> [Clip] -> DequantizeLinear`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        return qp.fake(x)

    @staticmethod
    def symbolic(g: Any, x: Any, qp: QParams) -> Any:
        s, z = qp.onnx_scale_zero(g)
        axis = qp.onnx_axis()
        q = g.op("QuantizeLinear", x, s, z, **axis)
        q = qp.onnx_clip_codes(g, q)
        return g.op("DequantizeLinear", q, s, z, **axis)


class _Holder:
    """Carries tensors into a symbolic without making them graph inputs."""

    def __init__(self, codes: torch.Tensor, qp: QParams):
        self.codes = codes
        self.qp = qp


class _WeightConstFunction(torch.autograd.Function):
    """The dequantized weight in PyTorch; ``DequantizeLinear(integer codes)`` in ONNX. ``anchor`` is
    an unused tensor: the TorchScript exporter records a Function call only when it has a tensor argument."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, held: _Holder) -> torch.Tensor:
        return held.qp.dequantize(held.codes)

    @staticmethod
    def symbolic(g: Any, anchor: Any, held: _Holder) -> Any:
        qp = held.qp
        w = g.op("Constant", value_t=held.codes)
        s, z = qp.onnx_scale_zero(g)
        if qp.scale.dim() > 0:
            z = g.op("Constant", value_t=qp.zero_point.to(qp.storage).expand(qp.scale.shape).contiguous())
        return g.op("DequantizeLinear", w, s, z, **qp.onnx_axis())


class QDQ(nn.Module):
    """Stand-in of an activation :class:`Quantizer`: the same eval output, exported as Q/DQ.

    Example:
        >>> QDQ(QParams.of(quantizer, "features.0"))(x)
    """

    def __init__(self, qp: QParams):
        super().__init__()
        self.qp = qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQFunction.apply(x, self.qp)

    def extra_repr(self) -> str:
        return f"bits={self.qp.bits}, qmin={self.qp.qmin}, qmax={self.qp.qmax}, axis={self.qp.axis}"


class QuantizedWeightLayer(nn.Module):
    """Stand-in of a quantized conv/linear: integer weight codes (BatchNorm folded) and a float bias.

    In ONNX the weight is an int8/uint8 initializer behind ``DequantizeLinear`` (per channel on axis 0).

    Example:
        >>> QuantizedWeightLayer(qconv, "features.0")(x)
    """

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        with torch.no_grad():
            weight, bias = layer.folded_weight_bias()
            weight = weight.detach().float()
            self.qp = QParams.of(layer.weight_quantizer, name)
            if self.qp.axis not in (None, 0):
                raise ExportError(f"{name}: weight quantizer is per channel on axis {self.qp.axis}; export needs axis 0")
            self._held = _Holder(self.qp.codes(weight).contiguous(), self.qp)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self.is_linear = isinstance(layer, QuantLinear)
        if not self.is_linear:
            # runs the convolution with the layer's geometry; its own weight is never read
            self.conv = _float_layer(layer)

    @property
    def codes(self) -> torch.Tensor:
        return self._held.codes

    def weight(self) -> torch.Tensor:
        return self.qp.dequantize(self._held.codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _WeightConstFunction.apply(self._anchor, self._held)
        if self.is_linear:
            return F.linear(x, w, self.bias)
        return self.conv._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"bits={self.qp.bits}, codes={tuple(self.codes.shape)} {self.qp.storage}"


def _plain_conv_class(layer: nn.Module) -> type[nn.Module]:
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(layer, base):
            return base
    raise ExportError(f"unsupported quantized layer type {type(layer).__name__}")


def _float_layer(layer: nn.Module) -> nn.Module:
    """A quantized layer whose weight quantizer is off: a float layer with the BatchNorm folded."""
    with torch.no_grad():
        weight, bias = layer.folded_weight_bias()
        if isinstance(layer, QuantLinear):
            new: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        else:
            new = _plain_conv_class(layer)(
                layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=bias is not None,
                padding_mode=layer.padding_mode, device="meta",
            )
        new.weight = nn.Parameter(weight.detach().clone())
        new.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
    return new


def calibrate(model: nn.Module, batches: Any) -> nn.Module:
    """Calibrate every quantizer of ``model`` in place and return the model (in eval mode).

    The older name of :func:`evefx.calibrate`, kept so existing scripts keep working: it runs the
    same calibration (each quantizer's method from its spec section, BatchNorm and dropout in eval
    mode) without a progress bar, and returns the model instead of the report. A model without
    quantizers is returned unchanged.

    Example:
        >>> calibrate(gm, [torch.rand(8, 1, 28, 28) for _ in range(4)])
    """
    from evefx.ptq import calibrate as calibrate_with_report  # the PTQ package builds on export

    if any(isinstance(m, Quantizer) for m in model.modules()):
        calibrate_with_report(model, batches, progress=False)
    return model.eval()


def swap_stand_ins(model: nn.Module) -> tuple[str, ...]:
    """Replace, in ``model`` itself, every quantizer by an export stand-in; returns the names replaced.

    The caller owns ``model`` (:func:`evefx.export.deploy.deployable` passes its copy). Quantizers
    switched off (``set_mode(quantized=False)``) become identities; quantized layers whose weight
    quantizer is off become float layers with their BatchNorm folded; spiking neurons and Poisson
    encoders get the stand-ins of :mod:`evefx.export.spiking`.

    Example:
        >>> swap_stand_ins(copy_of_gm)
        ('features.0', 'features_0_act_quant', 'fc')
    """
    replacements: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, QUANT_LAYER_TYPES):
            wq = module.weight_quantizer
            new = QuantizedWeightLayer(module, name) if wq.enabled else _float_layer(module)
            replacements.append((name, new))
            skip.append(name)
        elif isinstance(module, Quantizer):
            replacements.append((name, QDQ(QParams.of(module, name)) if module.enabled else nn.Identity()))
        else:
            standin = spiking_standin(module, name)
            if standin is not None:
                replacements.append((name, standin))
                skip.append(name)
    for name, new in replacements:
        if not name:
            raise ExportError("the model itself is a quantizer; wrap it in a module to export it")
        model.set_submodule(name, new.eval())
    return tuple(name for name, _ in replacements)
