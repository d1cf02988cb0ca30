"""Per-layer sensitivity of a calibrated quantized model, and a bit allocation from it.

:func:`sensitivity` lowers one layer at a time to each of ``bits`` (every other quantizer as it
is) and records the metric ``evaluate(gm)`` returns, its drop from the model as configured, the
SQNR of the layer's weights and, given ``inputs``, of the model's output against the float model.
:meth:`SensitivityReport.to_overrides` turns the drops into per-layer spec overrides under an
average-bits budget (weighted by each layer's weight count): a greedy multiple-choice knapsack
that, starting from the widest option, repeatedly lowers the layer whose next step costs the least
drop per bit saved (HAWQ-style allocation; the baseline the RL search must beat).

Example:
    >>> report = evefx.sensitivity(gm, lambda m: accuracy(m, test_loader), bits=(8, 4, 2))
    >>> rich.print(report); report.plot("sensitivity.png")
    >>> overrides = report.to_overrides(4.0)
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from rich.table import Table
from torch import fx, nn

from evefx.errors import QuantizationError
from evefx.layers import eval_mode
from evefx.modules import Quantizer
from evefx.ptq.batches import quantizers_off, run_batch
from evefx.ptq.calibrators import quantizer_targets

__all__ = ["sensitivity", "SensitivityReport", "SensitivityRow"]

log = logging.getLogger(__name__)

What = Literal["weight", "activation", "both"]


@dataclass(frozen=True)
class SensitivityRow:
    """One layer at one bit width: the metric, its drop from the baseline, the weight SQNR (dB) and
    the model output's SQNR (dB) against the float model (None without ``inputs``)."""

    layer: str
    bits: int
    metric: float
    drop: float
    weight_sqnr: float | None
    output_sqnr: float | None


@dataclass
class SensitivityReport:
    """Result of :func:`sensitivity`.

    Example:
        >>> report.drop("features.0", 2)
        3.1
        >>> report.to_overrides(3.0)
        ({'names': ['features.0'], 'weight': {'bits': 4}}, ...)
    """

    layers: list[str]
    bits: tuple[int, ...]
    what: str
    baseline: float
    float_metric: float
    params: dict[str, int]
    current_bits: dict[str, int]
    rows: list[SensitivityRow] = field(default_factory=list)

    def drop(self, layer: str, bits: int) -> float:
        """The measured drop of ``layer`` at ``bits`` (0 at its current bits)."""
        for r in self.rows:
            if r.layer == layer and r.bits == bits:
                return r.drop
        if bits == self.current_bits[layer]:
            return 0.0
        raise KeyError(f"no measurement of {layer} at {bits} bits; measured: {self.bits}")

    def ranking(self, bits: int | None = None) -> list[str]:
        """Layers from most to least sensitive at ``bits`` (default: the lowest measured)."""
        b = min(self.bits) if bits is None else bits
        return sorted(self.layers, key=lambda layer: -self.drop(layer, b))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "bits": list(self.bits), "what": self.what, "baseline": self.baseline,
                "float_metric": self.float_metric, "params": self.params, "current_bits": self.current_bits,
                "rows": [asdict(r) for r in self.rows]}

    def table(self, title: str = "evefx sensitivity") -> Table:
        t = Table(title=f"{title} (baseline {self.baseline:.4g}, float {self.float_metric:.4g}; {self.what} lowered)")
        t.add_column("layer")
        t.add_column("params", justify="right")
        for b in self.bits:
            t.add_column(f"drop @{b}", justify="right")
        for b in self.bits:
            t.add_column(f"W SQNR @{b}", justify="right")
        has_out = any(r.output_sqnr is not None for r in self.rows)
        if has_out:
            for b in self.bits:
                t.add_column(f"out SQNR @{b}", justify="right")
        by = {(r.layer, r.bits): r for r in self.rows}
        for layer in self.layers:
            cells = [layer, str(self.params[layer])]
            cells += [f"{by[(layer, b)].drop:.4g}" for b in self.bits]
            cells += ["-" if by[(layer, b)].weight_sqnr is None else f"{by[(layer, b)].weight_sqnr:.1f}" for b in self.bits]
            if has_out:
                cells += ["-" if by[(layer, b)].output_sqnr is None else f"{by[(layer, b)].output_sqnr:.1f}" for b in self.bits]
            t.add_row(*cells)
        return t

    def __rich__(self) -> Table:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of the drop of each layer at each bit width."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(self.layers) + 2), 3.5))
        width = 0.8 / max(len(self.bits), 1)
        for i, b in enumerate(self.bits):
            xs = [j + (i - (len(self.bits) - 1) / 2) * width for j in range(len(self.layers))]
            ax.bar(xs, [self.drop(layer, b) for layer in self.layers], width, label=f"{b} bits")
        ax.set_xticks(range(len(self.layers)))
        ax.set_xticklabels(self.layers, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("metric drop")
        ax.set_title(f"sensitivity ({self.what} lowered one layer at a time)")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def allocate(self, avg_bits: float, method: Literal["greedy", "knapsack"] = "greedy") -> dict[str, int]:
        """Bits per layer with a weight-count-weighted average of at most ``avg_bits`` and the least
        summed drop: ``greedy`` (see the module docstring), or ``knapsack``, the exact
        multiple-choice knapsack by dynamic programming over the budget in 1/2000 steps (layer
        costs rounded up, so the budget always holds), ties broken by the SQNR lost."""
        if method not in ("greedy", "knapsack"):
            raise QuantizationError(f"allocate: method must be greedy or knapsack (got {method!r})")
        options = {layer: sorted(set(self.bits) | {self.current_bits[layer]}, reverse=True) for layer in self.layers}
        total = sum(self.params.values())
        if total == 0:
            raise QuantizationError("to_overrides: the layers have no weights to budget")
        lowest = sum(self.params[layer] * options[layer][-1] for layer in self.layers) / total
        if lowest > avg_bits + 1e-9:
            raise QuantizationError(f"to_overrides: a budget of {avg_bits} average bits is below the lowest "
                                    f"reachable ({lowest:.3g} with every layer at its fewest bits); measure lower bits")
        if method == "knapsack":
            return self._knapsack(options, avg_bits * total)
        index = {layer: 0 for layer in self.layers}

        def avg() -> float:
            return sum(self.params[layer] * options[layer][index[layer]] for layer in self.layers) / total

        while avg() > avg_bits + 1e-9:
            best: str | None = None
            best_cost: tuple[float, float] = (math.inf, math.inf)
            for layer in self.layers:
                i = index[layer]
                if i + 1 >= len(options[layer]) or self.params[layer] == 0:
                    continue
                hi_b, lo_b = options[layer][i], options[layer][i + 1]
                extra = self.drop(layer, lo_b) - self.drop(layer, hi_b)
                saved = self.params[layer] * (hi_b - lo_b)
                # ties in the metric (a coarse metric, or drops of 0) are broken by the SQNR lost
                q_hi, q_lo = self._sqnr(layer, hi_b), self._sqnr(layer, lo_b)
                lost = (q_hi - q_lo) if q_hi is not None and q_lo is not None else 0.0
                cost = (max(extra, 0.0) / saved, lost / saved)
                if best is None or cost < best_cost:
                    best, best_cost = layer, cost
            if best is None:
                break
            index[best] += 1
        return {layer: options[layer][index[layer]] for layer in self.layers}

    def _knapsack(self, options: dict[str, list[int]], budget: float, units: int = 2000) -> dict[str, int]:
        unit = budget / units
        top = {layer: self._sqnr(layer, options[layer][0]) for layer in self.layers}

        def value(layer: str, b: int) -> tuple[float, float]:
            q, q0 = self._sqnr(layer, b), top[layer]
            return (max(self.drop(layer, b), 0.0), (q0 - q) if q is not None and q0 is not None else 0.0)

        # best[c] = (drop, sqnr lost, choices) using at most c units
        inf = (math.inf, math.inf)
        best: list[tuple[tuple[float, float], dict[str, int]]] = [((0.0, 0.0), {}) for _ in range(units + 1)]
        for layer in self.layers:
            new: list[tuple[tuple[float, float], dict[str, int]]] = [(inf, {}) for _ in range(units + 1)]
            for b in options[layer]:
                cost = math.ceil(self.params[layer] * b / unit - 1e-9) if unit > 0 else 0
                v = value(layer, b)
                for c in range(cost, units + 1):
                    (d, lost), choice = best[c - cost]
                    if d == math.inf:
                        continue
                    cand = (d + v[0], lost + v[1])
                    if cand < new[c][0]:
                        new[c] = (cand, {**choice, layer: b})
            best = new
        (d, _), choice = min(best, key=lambda t: t[0])
        if d == math.inf:
            raise QuantizationError("to_overrides: no allocation fits the budget after rounding; raise it slightly")
        return choice

    def _sqnr(self, layer: str, bits: int) -> float | None:
        for r in self.rows:
            if r.layer == layer and r.bits == bits:
                return r.output_sqnr if r.output_sqnr is not None else r.weight_sqnr
        return None

    def to_overrides(self, avg_bits: float, method: Literal["greedy", "knapsack"] = "greedy") -> tuple[dict[str, Any], ...]:
        """Spec overrides (``{names: [layer], weight: {bits: b}}``, and ``activation`` too when the
        activations were lowered) for the allocation of :meth:`allocate`; layers keeping their
        current bits get none. Append them to the quantize section's ``overrides``.

        Example:
            >>> section = spec.passes[0]
            >>> section.model_copy(update={"overrides": section.overrides + report.to_overrides(3.0)})
        """
        out = []
        for layer, b in self.allocate(avg_bits, method).items():
            if b == self.current_bits[layer]:
                continue
            patch: dict[str, Any] = {"names": [layer]}
            if self.what in ("weight", "both"):
                patch["weight"] = {"bits": int(b)}
            if self.what in ("activation", "both"):
                patch["activation"] = {"bits": int(b)}
            out.append(patch)
        return tuple(out)


def _layer_quantizers(gm: nn.Module, what: What) -> dict[str, dict[str, Any]]:
    """layer -> {"weight": quantizer or None, "activation": quantizer or None, "owner": layer module}."""
    out: dict[str, dict[str, Any]] = {}
    for name, prov, q, owner in quantizer_targets(gm):
        role = prov.role if prov else ("weight" if owner is not None else None)
        layer = prov.layer if prov else (name.rsplit(".weight_quantizer", 1)[0] if owner is not None else None)
        if layer is None or role not in ("weight", "activation"):
            continue
        entry = out.setdefault(layer, {"weight": None, "activation": None, "owner": None})
        entry[role] = q
        if owner is not None:
            entry["owner"] = owner
    keep = {}
    for layer, e in out.items():
        if (what in ("weight", "both") and e["weight"] is not None) or (what == "activation" and e["activation"] is not None):
            keep[layer] = e
    return keep


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    signal = float(ref.double().square().sum())
    noise = float((got.double() - ref.double()).square().sum())
    return 10 * math.log10(max(signal, 1e-30) / max(noise, 1e-30))


@torch.no_grad()
def sensitivity(
    gm: fx.GraphModule,
    evaluate: Callable[[nn.Module], float],
    bits: tuple[int, ...] = (8, 4, 2),
    *,
    what: What = "weight",
    inputs: Any = None,
) -> SensitivityReport:
    """Lower each quantized layer's ``what`` quantizers (weight, activation or both) to each of
    ``bits``, one layer at a time, and measure ``evaluate(gm)`` (higher is better, e.g. accuracy);
    every quantizer is restored afterwards. ``gm`` must be calibrated (``evefx.calibrate``).

    Example:
        >>> report = evefx.sensitivity(gm, lambda m: accuracy(m, loader), bits=(8, 4, 2), inputs=x)
        >>> report.ranking()[:3]
    """
    if what not in ("weight", "activation", "both"):
        raise QuantizationError(f"sensitivity: what must be weight, activation or both (got {what!r})")
    layers = _layer_quantizers(gm, what)
    if not layers:
        raise QuantizationError("sensitivity: the model has no quantized layer")
    for layer, e in layers.items():
        for role in ("weight", "activation"):
            q = e[role]
            if q is not None and not bool(q.initialized):
                raise QuantizationError(f"sensitivity: {layer}'s {role} quantizer is not calibrated; run evefx.calibrate first")
    with eval_mode(gm):
        x = None
        if inputs is not None:
            x = inputs
        y_float = None
        with quantizers_off(gm, quantized=False):
            float_metric = float(evaluate(gm))
            if x is not None:
                y_float = run_batch(gm, x)
        gm.eval()
        baseline = float(evaluate(gm))
        params = {layer: int(e["owner"].weight.numel()) if e["owner"] is not None else 0 for layer, e in layers.items()}
        current = {layer: int((e["weight"] if e["weight"] is not None and what != "activation" else e["activation"]).bits)
                   for layer, e in layers.items()}
        rows = []
        for layer, e in layers.items():
            quants: list[Quantizer] = [q for role, q in (("weight", e["weight"]), ("activation", e["activation"]))
                                       if q is not None and (what == "both" or what == role)]
            saved = [{k: v.clone() for k, v in q.state_dict().items()} for q in quants]
            try:
                for b in bits:
                    for q in quants:
                        q.set_bits(int(b))
                    gm.eval()
                    metric = float(evaluate(gm))
                    w_sqnr = None
                    wq = e["weight"]
                    if wq is not None and wq in quants and e["owner"] is not None:
                        w = e["owner"].folded_weight_bias()[0].detach()
                        w_sqnr = _sqnr(w, wq(w))
                    o_sqnr = None
                    if x is not None and y_float is not None:
                        gm.eval()
                        o_sqnr = _sqnr(y_float, run_batch(gm, x))
                    rows.append(SensitivityRow(layer, int(b), metric, baseline - metric, w_sqnr, o_sqnr))
                    log.info("sensitivity %s @%d bits: metric %.4g (drop %.4g)", layer, b, metric, baseline - metric)
            finally:
                for q, state in zip(quants, saved):
                    q.load_state_dict(state)
    return SensitivityReport(list(layers), tuple(int(b) for b in bits), what, baseline, float_metric, params, current, rows)
