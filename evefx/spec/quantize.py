"""``kind: quantize``: quantization-aware training of conv/linear layers."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from evefx.spec.base import Bounded, Section, StrictModel

__all__ = ["QuantizerConfig", "QuantizeSection", "TARGETS", "SATURATION_FREE_WEIGHT_CODES"]

TARGETS = ("portable", "x86-vnni", "arm")
"""CPU classes an int8 file can be built for (see ``QuantizeSection.target``)."""

SATURATION_FREE_WEIGHT_CODES = (-64, 63)
"""Signed weight codes of the ``portable`` target: ``2 * 255 * 64 <= 32767``, so the pair sums of
u8 x s8 products that x86 AVX2 kernels (``vpmaddubsw``) keep in int16 never saturate."""


class QuantizerConfig(StrictModel):
    """One quantizer (of the weights or of the activations)."""

    bits: Bounded(int, 1, 16) = 8
    """Bit width, 1 to 16. With ``upgrade_bits`` it is the starting value of the eve parameter."""
    fn: Literal["round", "lsq", "llsq"] = "round"
    """round: uniform rounding with the straight-through estimator; lsq: learned step size
    (Esser et al. 2019); llsq: learned linear symmetric quantizer (Zhao et al. 2020)."""
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    """One scale for the tensor, or one per output channel (the seed's neuron_wise)."""
    symmetric: bool = True
    """Symmetric range (zero point 0) or asymmetric range with a zero point."""
    signed: bool = True
    """Signed levels [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    tracker: Literal["average", "global"] = "average"
    """Range tracker: exponential moving average of min/max, or running (global) min/max."""
    momentum: Bounded(float, 0.0, 1.0, low_open=True) = 0.1
    """EMA momentum of the ``average`` tracker."""
    learnable_scale: bool = False
    """Make the scale a trained parameter for ``round`` too (always true for lsq/llsq)."""
    regularization: Literal["l1", "l2"] = "l2"
    """Only for ``llsq``: the norm of the quantization-error regulariser."""


class QuantizeSection(Section):
    """Insert weight and/or activation quantizers at the selected conv/linear layers.

    Example (YAML):
        - kind: quantize
          select: {types: [Conv2d, Linear]}
          weight: {bits: 8, granularity: per_channel}
          activation: {bits: 8, signed: false, symmetric: false}
    """

    kind: Literal["quantize"]
    weight: QuantizerConfig | None = QuantizerConfig(granularity="per_channel", tracker="global")
    """Weight quantizer; ``null`` leaves the weights in float."""
    activation: QuantizerConfig | None = QuantizerConfig(symmetric=False, signed=False)
    """Activation quantizer after the layer's output block; ``null`` leaves activations in float."""
    quantize_inputs: bool = True
    """Also quantize each selected layer's input when it is not already the output of an evefx
    activation quantizer (network inputs, residual sums, pooled features), so that onnxruntime
    runs every selected layer as an integer kernel. The input quantizer takes the ``activation``
    settings, per tensor; a symmetric unsigned ``activation`` becomes signed unless the input
    comes straight from a ReLU (asymmetric grids cover negative inputs through the zero point).
    Its bits stay fixed under ``upgrade_bits``. Needs ``activation``."""
    target: Literal["portable", "x86-vnni", "arm"] = "portable"
    """The CPUs the exported int8 file must compute the same on. ``portable`` (default): every
    x86 (AVX2, AVX-512, VNNI) and ARM CPU; signed weights of more than 7 bits keep their codes in
    [-64, 63], because onnxruntime's u8s8 kernels on x86 without VNNI add pairs of products in
    int16 and saturate beyond it (onnxruntime's ``reduce_range`` does the same). Training and
    calibration use that grid, so nothing changes at export. ``x86-vnni`` / ``arm``: the full
    int8 range, for CPUs whose kernels accumulate in int32 (AVX-512 VNNI, AVX-VNNI, AMX; ARM
    NEON/SDOT); the file records its target and the export check reports what an AVX2 CPU would
    compute differently."""
    fold_bn: bool = True
    """Fold the BatchNorm that follows a conv into it during training (Jacob et al. 2018)."""
    upgrade_bits: bool = False
    """Expose the bit widths as eve parameters in [min_bits, max_bits] for the upgrader."""
    min_bits: Bounded(int, 1, 16) = 2
    """Lowest bit width the upgrader may choose."""
    max_bits: Bounded(int, 1, 16) = 8
    """Highest bit width the upgrader may choose."""

    @model_validator(mode="after")
    def _bits_range(self) -> QuantizeSection:
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) must not exceed max_bits ({self.max_bits})")
        if self.weight is None and self.activation is None:
            raise ValueError("weight and activation are both null: nothing to quantize (remove the section)")
        return self
