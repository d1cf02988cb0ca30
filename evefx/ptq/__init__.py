"""Post-training quantization: calibrators, corrections (cross-layer equalization, bias
correction, AdaRound) and per-layer sensitivity analysis, on models ``evefx.transform`` made
(the user's trained model is never touched: transform works on a copy).

* :mod:`evefx.ptq.calibrators`: ``evefx.calibrate(gm, batches)``, min-max/percentile/MSE/entropy ranges;
* :mod:`evefx.ptq.corrections`: :func:`equalize`, :func:`bias_correction`, :func:`adaround`;
* :mod:`evefx.ptq.run`: ``evefx.post_training_quantize(gm, batches)``, the steps the spec asks for;
* :mod:`evefx.ptq.sensitivity`: ``evefx.sensitivity(gm, evaluate)`` and ``to_overrides(avg_bits)``.

Example:
    >>> gm = evefx.transform(model, spec, torch.zeros(1, 1, 28, 28))
    >>> report = evefx.post_training_quantize(gm, calibration_batches)
"""
from __future__ import annotations

from evefx.ptq.calibrators import (
    CalibrationReport,
    Grid,
    Histogram,
    QuantizerCalibration,
    RangeObserver,
    calibrate,
    choose_range,
    entropy_range,
    mse_range,
    percentile_range,
)
from evefx.ptq.corrections import (
    AdaRoundResult,
    EqualizedPair,
    adaround,
    bake_batchnorm,
    bias_correction,
    equalization_pairs,
    equalize,
    float_reference,
)
from evefx.ptq.run import PTQReport, post_training_quantize
from evefx.ptq.sensitivity import SensitivityReport, SensitivityRow, sensitivity

__all__ = [
    "calibrate",
    "CalibrationReport",
    "QuantizerCalibration",
    "RangeObserver",
    "Histogram",
    "Grid",
    "choose_range",
    "percentile_range",
    "mse_range",
    "entropy_range",
    "equalize",
    "equalization_pairs",
    "EqualizedPair",
    "bias_correction",
    "adaround",
    "AdaRoundResult",
    "bake_batchnorm",
    "float_reference",
    "post_training_quantize",
    "PTQReport",
    "sensitivity",
    "SensitivityReport",
    "SensitivityRow",
]
