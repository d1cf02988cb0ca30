"""Post-training quantization: calibrators, corrections (cross-layer equalization, bias
correction, AdaRound) and per-layer sensitivity analysis, on models ``evefx.transform`` made
(the user's trained model is never touched: transform works on a copy).

* :mod:`evefx.ptq.calibrators`: ``evefx.calibrate(gm, batches)``, with the min-max/percentile/MSE/entropy
  ranges of :mod:`evefx.ptq.ranges`;
* :mod:`evefx.ptq.equalization`: :func:`equalize`; :mod:`evefx.ptq.corrections`: :func:`bias_correction`,
  :func:`reestimate_bn` (after QAT) and what the corrections share; :mod:`evefx.ptq.adaround`: :func:`adaround`;
* :mod:`evefx.ptq.batches`: the batches, calls and modes every calibration/correction run shares;
* :mod:`evefx.ptq.run`: ``evefx.post_training_quantize(gm, batches)``, the steps the spec asks for;
* :mod:`evefx.ptq.sensitivity`: ``evefx.sensitivity(gm, evaluate)`` and ``to_overrides(avg_bits)``.

Example:
    >>> gm = evefx.transform(model, spec, torch.zeros(1, 1, 28, 28))
    >>> report = evefx.post_training_quantize(gm, calibration_batches)
"""
from __future__ import annotations

from evefx.ptq.adaround import AdaRoundResult, adaround
from evefx.ptq.calibrators import CalibrationReport, QuantizerCalibration, calibrate
from evefx.ptq.corrections import bake_batchnorm, bias_correction, float_reference, reestimate_bn
from evefx.ptq.equalization import EqualizedPair, equalization_pairs, equalize
from evefx.ptq.run import PTQReport, post_training_quantize
from evefx.ptq.ranges import Grid, Histogram, RangeObserver, choose_range, entropy_range, mse_range, percentile_range
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
    "reestimate_bn",
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
