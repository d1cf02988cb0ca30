"""Range calibration of evefx quantizers from calibration data (:func:`calibrate`).

:func:`calibrate` runs a model over calibration batches with every quantizer off (the float model,
BatchNorm and dropout in eval mode), watches each quantizer's input with a
:class:`~evefx.ptq.ranges.RangeObserver` (min-max, percentile, MSE or entropy, see
:mod:`evefx.ptq.ranges`) and sets its range through
:meth:`~evefx.modules.quantizer.Quantizer.set_range`.

Example:
    >>> report = evefx.calibrate(gm, [x for x, _ in loader][:8])
    >>> rich.print(report)
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import torch
from rich.table import Table
from torch import nn

from evefx.errors import QuantizationError
from evefx.graph import Provenance
from evefx.modules import QUANT_LAYER_TYPES, Quantizer
from evefx.ptq.batches import batch_size, inputs_only, progress_over, quantizers_off, run_batch
from evefx.ptq.ranges import Method, RangeObserver

__all__ = ["calibrate", "CalibrationReport", "QuantizerCalibration", "quantizer_targets", "section_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizerCalibration:
    """One quantizer's calibration: its method, the chosen range, the observed one, and on the
    first calibration batch with every quantizer on, the SQNR (dB) and the share of clipped values."""

    name: str
    layer: str
    role: str
    bits: int
    method: str
    lo: float
    hi: float
    observed_lo: float
    observed_hi: float
    sqnr_db: float | None = None
    clipped: float | None = None


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: one row per quantizer, the batches and the seconds it took.

    Example:
        >>> report = evefx.calibrate(gm, batches)
        >>> report.rows[0].method, report.seconds
    """

    rows: list[QuantizerCalibration] = field(default_factory=list)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples, "seconds": self.seconds,
                "rows": [asdict(r) for r in self.rows]}

    def table(self, title: str = "evefx calibration") -> Table:
        t = Table(title=f"{title} ({self.samples} samples in {self.batches} batches, {self.seconds:.2f} s)")
        for col in ("layer", "role", "bits", "method", "range", "SQNR dB", "clip %"):
            t.add_column(col, justify="left" if col in ("layer", "role", "method") else "right",
                         no_wrap=True, min_width=12 if col == "layer" else None)
        for r in self.rows:
            t.add_row(r.layer, r.role, str(r.bits), r.method, f"{r.lo:.3g}..{r.hi:.3g}",
                      "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
                      "-" if r.clipped is None else f"{100 * r.clipped:.2f}")
        return t

    def __rich__(self) -> Table:
        return self.table()


@dataclass(frozen=True)
class _Target:
    name: str
    layer: str
    role: str
    quantizer: Quantizer
    method: Method
    percentile: float
    bins: int
    batches: int | None
    weight_of: nn.Module | None  # the quantized layer whose (folded) weight this quantizer sees


_SPEC_PATH = re.compile(r"^passes\[(\d+)\]$")


def section_for(gm: nn.Module, prov: Provenance | None) -> Any:
    """The quantize section (as it applies to the provenance's layer) that put a quantizer there."""
    if prov is None:
        return None
    spec = getattr(gm, "meta", {}).get("evefx_spec") if isinstance(getattr(gm, "meta", None), dict) else None
    m = _SPEC_PATH.match(prov.spec_path)
    if spec is None or m is None or int(m.group(1)) >= len(spec.passes):
        return None
    section = spec.passes[int(m.group(1))]
    if getattr(section, "kind", None) != "quantize":
        return None
    return section.for_layer(prov.layer)


def quantizer_targets(gm: nn.Module) -> list[tuple[str, Provenance | None, Quantizer, nn.Module | None]]:
    """``(qualified name, provenance or None, quantizer, owning quantized layer or None)`` of every
    quantizer in ``gm`` in module order."""
    from evefx.api import eve_modules

    prov_of: dict[str, Provenance] = {}
    if hasattr(gm, "graph"):
        prov_of = {name: prov for name, prov, _ in eve_modules(gm)}
    owners: dict[str, nn.Module] = {f"{name}.weight_quantizer" if name else "weight_quantizer": m
              for name, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    out = []
    for name, m in gm.named_modules():
        if isinstance(m, Quantizer):
            out.append((name, prov_of.get(name), m, owners.get(name)))
    return out


def _targets(gm: nn.Module, method: Method | None, percentile: float | None, bins: int | None,
             weight_method: str | None) -> list[_Target]:
    from evefx.spec import CalibrationConfig

    default = CalibrationConfig()
    out = []
    for name, prov, q, owner in quantizer_targets(gm):
        section = section_for(gm, prov)
        cfg = section.calibration if section is not None else default
        role = prov.role if prov else ("weight" if owner is not None else "activation")
        layer = prov.layer if prov else name.rsplit(".weight_quantizer", 1)[0]
        if owner is not None:
            m = weight_method or cfg.weight_method
        else:
            m = method or cfg.method
        out.append(_Target(name, layer, role, q, m, percentile or cfg.percentile, bins or cfg.bins, cfg.batches, owner))
    return out


@torch.no_grad()
def calibrate(
    gm: nn.Module,
    batches: Iterable[Any],
    *,
    progress: bool = True,
    method: Method | None = None,
    percentile: float | None = None,
    bins: int | None = None,
    weight_method: Literal["minmax", "mse"] | None = None,
    num_batches: int | None = None,
) -> CalibrationReport:
    """Post-training calibration of every quantizer in ``gm``, in place; returns a :class:`CalibrationReport`.

    ``batches`` are model inputs (tensors or tuples of tensors; ``(x, labels)`` pairs from a
    labelled loader are taken as ``x``). The model runs in eval mode (BatchNorm uses its running
    statistics, dropout is off) with every quantizer off, so every activation quantizer sees the
    float model's values; weight quantizers are calibrated on their layer's (BatchNorm-folded)
    weight. Each quantizer's method comes from its quantize section's ``calibration`` (with
    per-layer overrides) unless given here. The model is left in eval mode; quantizers keep
    whether they were on or off.

    Example:
        >>> report = evefx.calibrate(gm, [torch.rand(64, 1, 28, 28) for _ in range(8)], method="entropy")
        >>> report.rows[0].lo
    """
    start = time.perf_counter()
    targets = _targets(gm, method, percentile, bins, weight_method)
    if not targets:
        raise QuantizationError("calibrate: the model has no evefx quantizer (transform it with a quantize section first)")
    data = inputs_only(batches, gm)
    limits = [t.batches for t in targets]
    limit = num_batches or (max(limits) if limits and None not in limits else None)  # type: ignore[type-var]
    if limit is not None:
        data = data[:limit]
    if not data:
        raise QuantizationError("calibrate: no calibration batches were given")
    observers = {t.name: RangeObserver(t.quantizer, t.method, percentile=t.percentile, bins=t.bins) for t in targets}
    weights = [t for t in targets if t.weight_of is not None]
    acts = [t for t in targets if t.weight_of is None]
    for t in weights:
        w = t.weight_of.folded_weight_bias()[0].detach()
        obs = observers[t.name]
        obs.observe_extremes(w)
        if obs.needs_histogram:
            obs.observe(w)
    gm.eval()
    with quantizers_off(gm):
        for phase in ("extremes", "histograms"):
            watch = [t for t in acts if phase == "extremes" or observers[t.name].needs_histogram]
            if not watch:
                continue
            hooks = []
            for t in watch:
                obs = observers[t.name]
                fn = obs.observe_extremes if phase == "extremes" else obs.observe
                hooks.append(t.quantizer.register_forward_hook(lambda _m, inp, _out, fn=fn: fn(inp[0])))
            try:
                for batch in progress_over(data, f"calibration ({phase})", progress):
                    run_batch(gm, batch)
            finally:
                for h in hooks:
                    h.remove()
    rows = []
    for t in targets:
        obs = observers[t.name]
        try:
            lo, hi = obs.range()
        except QuantizationError as e:
            log.warning("%s; its range is left as it was", e)
            continue
        t.quantizer.set_range(lo, hi)
        assert obs.mn is not None and obs.mx is not None
        o_lo = float(obs.mn.min()) if not obs.grid.magnitude else (-float(obs.mx.max()) if obs.grid.signed else 0.0)
        rows.append(QuantizerCalibration(t.name, t.layer, t.role, int(t.quantizer.bits), t.method,
                                         float(lo.min()), float(hi.max()), o_lo, float(obs.mx.max())))
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r.layer, len(order))
    roles = {"input": 0, "weight": 1, "activation": 2}
    rows.sort(key=lambda r: (order[r.layer], roles.get(r.role, 3)))
    rows = _with_errors(gm, rows, data[0])
    report = CalibrationReport(rows, len(data), sum(batch_size(b) for b in data), time.perf_counter() - start)
    log.info("calibrated %d quantizers on %d batches in %.2f s", len(rows), len(data), report.seconds)
    return report


def _with_errors(gm: nn.Module, rows: list[QuantizerCalibration], batch: Any) -> list[QuantizerCalibration]:
    """SQNR and clipped share of every quantizer on one batch with all quantizers on."""
    by_name = dict(gm.named_modules())
    stats: dict[str, tuple[float, float]] = {}
    hooks = []
    for r in rows:
        q = by_name[r.name]

        def hook(m: Quantizer, inp: Any, out: torch.Tensor, key: str = r.name) -> None:
            x = inp[0].detach().float()
            err = (out.detach().float() - x).square().sum()
            sqnr = 10 * math.log10(max(float(x.square().sum()), 1e-30) / max(float(err), 1e-30))
            stats[key] = (sqnr, float(m.observations().get("clipped", 0.0)))

        hooks.append(q.register_forward_hook(hook))
    try:
        with quantizers_off(gm, quantized=True):
            run_batch(gm, batch)
    finally:
        for h in hooks:
            h.remove()
    return [QuantizerCalibration(**{**asdict(r), "sqnr_db": stats.get(r.name, (None, None))[0],
                                    "clipped": stats.get(r.name, (None, None))[1]}) for r in rows]
