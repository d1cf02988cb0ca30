"""The post-training path as the spec asks for it: equalize, calibrate, AdaRound, bias correction.

Example:
    >>> gm = evefx.transform(model, "examples/specs/ptq.yaml", torch.zeros(1, 1, 28, 28))
    >>> report = evefx.post_training_quantize(gm, calibration_batches)
    >>> rich.print(report)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from rich.console import Group
from rich.table import Table
from torch import fx

from evefx.errors import QuantizationError
from evefx.ptq.adaround import AdaRoundResult, adaround
from evefx.ptq.batches import inputs_only
from evefx.ptq.calibrators import CalibrationReport, calibrate, quantizer_targets, section_for
from evefx.ptq.corrections import bias_correction, float_reference
from evefx.ptq.equalization import EqualizedPair, equalize

__all__ = ["post_training_quantize", "PTQReport"]

log = logging.getLogger(__name__)


@dataclass
class PTQReport:
    """What :func:`post_training_quantize` did, step by step, and the seconds of each step."""

    calibration: CalibrationReport
    equalized: list[EqualizedPair] = field(default_factory=list)
    adaround: dict[str, AdaRoundResult] = field(default_factory=dict)
    bias_deltas: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"calibration": self.calibration.to_dict(), "equalized": [asdict(p) for p in self.equalized],
                "adaround": {k: asdict(v) for k, v in self.adaround.items()}, "bias_deltas": self.bias_deltas,
                "seconds": self.seconds}

    def table(self) -> Table:
        t = Table(title="evefx post-training corrections")
        t.add_column("step")
        t.add_column("layer")
        t.add_column("detail")
        for p in self.equalized:
            t.add_row("equalize", f"{p.first} -> {p.second}", f"range ratio {p.before:.3g} -> {p.after:.3g}")
        for name, r in self.adaround.items():
            t.add_row("adaround", name, f"loss {r.loss_nearest:.3g} -> {r.loss_final:.3g}"
                      f" ({100 * r.flipped:.1f}% flipped{'' if r.kept else ', nearest kept'}), {r.seconds:.1f} s")
        for name, d in self.bias_deltas.items():
            t.add_row("bias correction", name, f"|delta| max {d:.3g}")
        for step, s in self.seconds.items():
            t.add_row("time", step, f"{s:.2f} s")
        return t

    def __rich__(self) -> Group:
        return Group(self.calibration.table(), self.table())


def _layer_sections(gm: fx.GraphModule) -> dict[str, Any]:
    """The quantize section (with overrides applied) of every weight-quantized layer."""
    out = {}
    for _name, prov, _q, owner in quantizer_targets(gm):
        if owner is not None and prov is not None:
            section = section_for(gm, prov)
            if section is not None:
                out[prov.layer] = section
    return out


def post_training_quantize(gm: fx.GraphModule, batches: Iterable[Any], *, progress: bool = True) -> PTQReport:
    """Run the post-training steps the spec's quantize sections ask for, in place, on a transformed
    model: cross-layer equalization of the pairs whose layers both have ``equalize``, calibration
    (each quantizer with its ``calibration``), AdaRound of the layers with ``adaround``, and bias
    correction of the layers with ``bias_correction``. The corrections aim at the float model as it
    was after equalization. The model is left in eval mode.

    Example:
        >>> report = evefx.post_training_quantize(gm, [x for x, _ in calibration_loader])
    """
    data = inputs_only(batches, gm)
    if not data:
        raise QuantizationError("post_training_quantize: no calibration batches were given")
    sections = _layer_sections(gm)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    eq_layers = [name for name, s in sections.items() if s.equalize]
    equalized = equalize(gm, layers=eq_layers) if eq_layers else []
    seconds["equalize"] = time.perf_counter() - t
    calib = calibrate(gm, data, progress=progress)
    seconds["calibrate"] = calib.seconds
    ada_layers = {name: s.adaround for name, s in sections.items() if s.adaround is not None}
    bc_layers = [name for name, s in sections.items() if s.bias_correction]
    reference = float_reference(gm) if ada_layers or bc_layers else None
    results: dict[str, AdaRoundResult] = {}
    if ada_layers:
        t = time.perf_counter()
        results = adaround(gm, data, layers=list(ada_layers), configs=ada_layers, reference=reference, progress=progress)
        seconds["adaround"] = time.perf_counter() - t
    deltas: dict[str, float] = {}
    if bc_layers:
        t = time.perf_counter()
        got = bias_correction(gm, data, layers=bc_layers, reference=reference)
        deltas = {k: float(v.abs().max()) for k, v in got.items()}
        seconds["bias_correction"] = time.perf_counter() - t
    gm.eval()
    return PTQReport(calib, equalized, results, deltas, seconds)
