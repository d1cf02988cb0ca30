"""Post-training quantization: calibrators, corrections (bias correction, cross-layer equalization,
AdaRound) and per-layer sensitivity analysis.

Example:
    >>> gm = evefx.transform(model, spec, torch.zeros(1, 1, 28, 28))   # model is never touched
    >>> report = evefx.calibrate(gm, calibration_batches)
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
]
