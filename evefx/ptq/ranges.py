"""How a quantizer's range is chosen from what it saw: min-max, percentile, MSE and entropy.

A :class:`RangeObserver` watches the tensors that reach one quantizer. It first records their
extremes (per channel for per-channel quantizers), then, for the histogram methods, a histogram of
``bins`` bins per channel over those extremes, and finally chooses a range with
:func:`choose_range`:

* ``minmax``: the observed extremes;
* ``percentile``: the smallest bin edge below which ``percentile`` % of the values lie (of ``|x|``
  for symmetric grids; for asymmetric grids ``(100 - p) / 2`` % is cut from each tail, as
  onnxruntime does);
* ``mse``: among ranges shrunk from the observed one, the one of least expected squared
  quantization error on the histogram (each bin's values quantized at the bin's mean; exact when
  a bin's values share a code);
* ``entropy``: TensorRT's KL-divergence search (the threshold whose clipped, re-quantized histogram
  is closest to the original one), on ``|x|`` for symmetric grids.

Symmetric grids are calibrated on magnitudes (``|x|``, or ``max(x, 0)`` for unsigned grids), so the
chosen range is ``[-t, t]`` (``[0, t]`` unsigned).

Example:
    >>> obs = RangeObserver(quantizer, "entropy"); obs.observe_extremes(x); obs.observe(x)
    >>> lo, hi = obs.range()
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from evefx.errors import QuantizationError
from evefx.modules import Quantizer, affine_from_range

__all__ = [
    "Method",
    "METHODS",
    "Histogram",
    "Grid",
    "RangeObserver",
    "choose_range",
    "percentile_range",
    "mse_range",
    "entropy_range",
]

Method = Literal["minmax", "percentile", "mse", "entropy"]
METHODS = ("minmax", "percentile", "mse", "entropy")
MSE_GRID = 100  # shrink factors k/MSE_GRID tried by the symmetric MSE search
MSE_GRID_2D = 24  # per side, asymmetric MSE search


@dataclass(frozen=True)
class Grid:
    """The integer grid a range is chosen for: ``(qmin, qmax)``, symmetric, signed.

    Example:
        >>> Grid.of(Quantizer(bits=4, signed=False))
        Grid(qmin=0, qmax=15, symmetric=True, signed=False)
    """

    qmin: int
    qmax: int
    symmetric: bool
    signed: bool

    @classmethod
    def of(cls, q: Quantizer) -> Grid:
        qmin, qmax = q.quant_range()
        return cls(int(qmin), int(qmax), q.symmetric, q.signed)

    @property
    def magnitude(self) -> bool:
        """Symmetric grids are calibrated on magnitudes: the range is ``[-t, t]`` or ``[0, t]``."""
        return self.symmetric

    @property
    def magnitude_levels(self) -> int:
        """Codes covering ``[0, t]`` on a symmetric grid (128 for signed 8 bits, 256 unsigned)."""
        return max(self.qmax, 0) + 1

    def fake(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` (``[C, ...]``) on the grid of range ``[lo, hi]`` (``[C]``)."""
        scale, zero = affine_from_range(lo, hi, self.qmin, self.qmax, self.symmetric, self.signed)
        shape = [-1] + [1] * (x.dim() - 1)
        s, z = scale.reshape(shape).to(x.dtype), zero.reshape(shape).to(x.dtype)
        return ((torch.round(x / s) + z).clamp(self.qmin, self.qmax) - z) * s


@dataclass
class Histogram:
    """Per-channel histograms: ``counts``, ``sums`` (of the values) and ``squares`` (of their
    squares), each ``[C, bins]`` in float64, over ``[lo[c], hi[c]]`` with equal-width bins (the last
    bin is closed; values outside are clamped into the end bins).

    Example:
        >>> h = Histogram.of(torch.arange(1000.0) + 0.5, lo=0.0, hi=1000.0, bins=1000)
        >>> float(h.edges()[0, 990])
        990.0
    """

    counts: torch.Tensor
    sums: torch.Tensor
    squares: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    zeros: torch.Tensor | None = None
    """``[C]``: how many of the counted values are exactly 0 (ReLU outputs); they are in ``counts`` too."""

    @classmethod
    def empty(cls, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> Histogram:
        lo, hi = lo.double().reshape(-1), hi.double().reshape(-1)
        z = torch.zeros(lo.numel(), bins, dtype=torch.float64)
        return cls(z, z.clone(), z.clone(), lo, hi, torch.zeros(lo.numel(), dtype=torch.float64))

    @classmethod
    def of(cls, x: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor, bins: int) -> Histogram:
        """Histogram of ``x`` (``[C, N]``, or any shape for one channel) over ``[lo, hi]``."""
        x = x.reshape(1, -1) if x.dim() < 2 else x
        h = cls.empty(torch.as_tensor(lo).expand(x.shape[0]), torch.as_tensor(hi).expand(x.shape[0]), bins)
        h.add(x)
        return h

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    @property
    def channels(self) -> int:
        return self.counts.shape[0]

    def edges(self) -> torch.Tensor:
        """``[C, bins + 1]`` bin edges."""
        steps = torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64)
        return self.lo[:, None] + (self.hi - self.lo)[:, None] * steps[None, :]

    def add(self, x: torch.Tensor) -> None:
        """Count ``x`` (``[C, N]``)."""
        x = x.detach().double()
        width = (self.hi - self.lo).clamp_min(1e-300)[:, None]
        idx = ((x - self.lo[:, None]) / width * self.bins).floor().clamp_(0, self.bins - 1).long()
        flat = (idx + torch.arange(self.channels)[:, None] * self.bins).reshape(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(x).reshape(-1))
        self.sums.view(-1).index_add_(0, flat, x.reshape(-1))
        self.squares.view(-1).index_add_(0, flat, x.square().reshape(-1))
        zeros = (x == 0).sum(dim=1).double()
        self.zeros = zeros if self.zeros is None else self.zeros + zeros


def percentile_range(h: Histogram, percentile: float, magnitude: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The range keeping ``percentile`` % of the values: on magnitudes the smallest edge ``t`` with
    at least that share at or below it (range ``[-t, t]`` is the caller's); two-sided, the edges
    cutting ``(100 - p) / 2`` % from each tail.

    Example:
        >>> percentile_range(Histogram.of(torch.arange(1000.0) + 0.5, 0.0, 1000.0, 1000), 99.0, True)
        (tensor([0.], dtype=torch.float64), tensor([990.], dtype=torch.float64))
    """
    edges = h.edges()
    total = h.counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    cdf = h.counts.cumsum(dim=1) / total
    tol = 1e-12
    if magnitude:
        k = torch.searchsorted(cdf, torch.full((h.channels, 1), percentile / 100.0 - tol, dtype=torch.float64))
        k = k.clamp_max(h.bins - 1)
        return torch.zeros(h.channels, dtype=torch.float64), edges.gather(1, k + 1).reshape(-1)
    cut = (100.0 - percentile) / 200.0
    k_hi = torch.searchsorted(cdf, torch.full((h.channels, 1), 1.0 - cut - tol, dtype=torch.float64)).clamp_max(h.bins - 1)
    # the lower edge: the first bin whose cumulative share (before it) exceeds the cut
    before = cdf - h.counts / total
    k_lo = (torch.searchsorted(before, torch.full((h.channels, 1), cut + tol, dtype=torch.float64)) - 1).clamp(0, h.bins - 1)
    return edges.gather(1, k_lo).reshape(-1), edges.gather(1, k_hi + 1).reshape(-1)


def _bin_means(h: Histogram) -> torch.Tensor:
    centres = (h.edges()[:, :-1] + h.edges()[:, 1:]) / 2
    return torch.where(h.counts > 0, h.sums / h.counts.clamp_min(1.0), centres)


def _expected_error(h: Histogram, grid: Grid, lo: torch.Tensor, hi: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``sum_b [S2_b - 2 q_b S1_b + n_b q_b^2]`` per channel, ``q_b`` the bin mean quantized on ``[lo, hi]``."""
    q = grid.fake(means, lo, hi)
    return (h.squares - 2 * q * h.sums + h.counts * q.square()).sum(dim=1)


def mse_range(h: Histogram, grid: Grid, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of least expected squared quantization error among ranges shrunk from the
    histogram's: ``[0, hi * k / steps]`` on magnitudes and one-sided data (``steps`` = 100), else
    ``[lo * a / steps, hi * b / steps]`` (``steps`` = 24 per side). Ties keep the wider range.

    Example:
        >>> x = torch.cat([torch.ones(10000), torch.tensor([100.0])])
        >>> mse_range(Histogram.of(x, 0.0, 100.0, 2048), Grid(0, 3, True, False))[1]
        tensor([3.], dtype=torch.float64)
    """
    means = _bin_means(h)
    best_err = best_lo = best_hi = None
    if grid.magnitude or bool((h.lo == 0).all()):  # magnitudes, or one-sided data (after a ReLU)
        n = steps or MSE_GRID
        candidates = [(torch.zeros_like(h.lo), h.hi * k / n) for k in range(n, 0, -1)]
    else:
        n = steps or MSE_GRID_2D
        candidates = [(h.lo * a / n, h.hi * b / n) for a in range(n, 0, -1) for b in range(n, 0, -1)]
    for lo, hi in candidates:
        err = _expected_error(h, grid, lo, hi, means)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
            continue
        better = err < best_err * (1 - 1e-12)
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    assert best_lo is not None and best_hi is not None
    return best_lo, best_hi


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """onnxruntime's ``smooth_distribution``: give empty bins ``eps`` of mass, taken evenly from the
    others; ``eps`` shrinks when that would empty a small bin (onnxruntime gives up there)."""
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), p.size - int(zeros.sum())
    if n_nonzero == 0:
        return None
    eps = min(eps, 0.5 * float(p[~zeros].min()) * n_nonzero / max(n_zero, 1))
    out = p.astype(np.float64) + eps * zeros - (eps * n_zero / n_nonzero) * ~zeros
    return out if (out > 0).all() else None


def _kl(p: np.ndarray, sliced: np.ndarray, levels: int) -> float:
    """KL(P || Q) of TensorRT's entropy calibration: P the reference (clipped outliers included),
    Q the ``sliced`` bins merged into ``levels`` chunks whose counts are spread evenly over their
    non-empty bins; both normalised and smoothed as onnxruntime does."""
    i = sliced.size
    if i < levels or p.sum() == 0:
        return math.inf
    nonzero = sliced != 0
    bounds = np.floor(np.linspace(0, i, levels + 1)).astype(np.int64)
    chunk = np.repeat(np.arange(levels), np.diff(bounds))
    chunk_sum = np.bincount(chunk, weights=sliced, minlength=levels)
    chunk_nz = np.bincount(chunk, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, chunk_sum[chunk] / np.maximum(chunk_nz[chunk], 1.0), 0.0)
    if q.sum() == 0:
        return math.inf
    ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum())
    if ps is None or qs is None:
        return math.inf
    return float(np.sum(ps * np.log(ps / qs)))


def _kl_threshold_bin(counts: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration on one histogram of magnitudes: the number of bins ``i``
    (``levels`` <= i <= bins) minimising KL(P || Q), with P the first ``i`` bins plus the clipped
    outliers in the last of them (see :func:`_kl`)."""
    bins = counts.size
    if bins <= levels or counts.sum() == 0:
        return bins
    best_i, best_kl = bins, math.inf
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])
    stride = max(1, (bins - levels) // 512)  # at most ~512 candidate thresholds (and always the last bin)
    candidates = list(range(levels, bins + 1, stride))
    if candidates[-1] != bins:
        candidates.append(bins)
    for i in candidates:
        p = counts[:i].astype(np.float64).copy()
        p[-1] += tail[i]
        kl = _kl(p, counts[:i], levels)
        if kl < best_kl - 1e-12:
            best_kl, best_i = kl, i
    return best_i


def entropy_range(h: Histogram, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-divergence threshold (TensorRT, onnxruntime's Entropy calibrator) of each channel.

    Exact zeros are left out (0 is on every grid). On magnitudes the search runs over the
    histogram of ``|x|`` with as many quantized levels as
    the grid has codes on ``[0, t]``; asymmetric grids on one-sided data (``lo = 0``, after a ReLU)
    search ``[0, t]`` with all ``qmax - qmin + 1`` levels, on two-sided data ranges shrunk
    symmetrically (in bins) from both ends of the histogram.

    Example:
        >>> entropy_range(Histogram.of(torch.randn(10000).abs(), 0.0, 5.0, 2048), Grid(-128, 127, True, True))
    """
    # exact zeros (half of a ReLU's outputs) are exact on every grid: left out of the search, where
    # their spike in the first bin would dominate the divergence of every candidate
    counts = h.counts.numpy().copy()
    if h.zeros is not None:
        first = 0 if grid.magnitude else None
        for c in range(h.channels):
            k = first if first is not None else int(((0.0 - h.lo[c]) / (h.hi[c] - h.lo[c]).clamp_min(1e-300) * h.bins)
                                                     .floor().clamp(0, h.bins - 1))
            counts[c, k] -= float(h.zeros[c])
    edges = h.edges()
    lo_out, hi_out = torch.zeros(h.channels, dtype=torch.float64), torch.zeros(h.channels, dtype=torch.float64)
    for c in range(h.channels):
        if grid.magnitude:
            i = _kl_threshold_bin(counts[c], grid.magnitude_levels)
            lo_out[c], hi_out[c] = 0.0, edges[c, i]
            continue
        if float(h.lo[c]) == 0.0:  # one-sided data (after a ReLU): every code lies on [0, t]
            i = _kl_threshold_bin(counts[c], grid.qmax - grid.qmin + 1)
            lo_out[c], hi_out[c] = 0.0, edges[c, i]
            continue
        # asymmetric: fold the histogram about the bin holding 0 is not possible in general, so
        # shrink both ends by the same number of bins around the histogram's centre
        levels = grid.qmax - grid.qmin + 1
        best, best_kl = (h.lo[c], h.hi[c]), math.inf
        bins = h.bins
        for keep in range(max(levels, 1), bins + 1, max(1, (bins - levels) // 128 or 1)):
            cut = bins - keep
            left = cut // 2
            right = bins - (cut - left)
            p = counts[c, left:right].astype(np.float64).copy()
            p[0] += counts[c, :left].sum()
            p[-1] += counts[c, right:].sum()
            kl = _kl(p, counts[c, left:right], levels)
            if kl < best_kl - 1e-12:
                best_kl, best = kl, (edges[c, left], edges[c, right])
        lo_out[c], hi_out[c] = best[0], best[1]
    return lo_out, hi_out


def choose_range(h: Histogram, method: Method, grid: Grid, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`percentile_range`, :func:`mse_range` or :func:`entropy_range`; ``minmax``
    returns the histogram's own range."""
    if method == "minmax":
        return h.lo.clone(), h.hi.clone()
    if method == "percentile":
        return percentile_range(h, percentile, grid.magnitude)
    if method == "mse":
        return mse_range(h, grid)
    if method == "entropy":
        return entropy_range(h, grid)
    raise QuantizationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")


class RangeObserver:
    """Observes the tensors reaching one quantizer and chooses its range.

    Use: :meth:`observe_extremes` on every batch, then (for histogram methods) :meth:`observe`
    on every batch again, then :meth:`range`.

    Example:
        >>> obs = RangeObserver(q, "entropy")
        >>> for x in xs: obs.observe_extremes(x)
        >>> for x in xs: obs.observe(x)
        >>> q.set_range(*obs.range())
    """

    def __init__(self, quantizer: Quantizer, method: Method = "minmax", *, percentile: float = 99.99, bins: int = 2048):
        if method not in METHODS:
            raise QuantizationError(f"{quantizer.name}: unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
        self.quantizer = quantizer
        self.method: Method = method
        self.percentile = float(percentile)
        self.bins = int(bins)
        self.grid = Grid.of(quantizer)
        self.mn: torch.Tensor | None = None
        self.mx: torch.Tensor | None = None
        self.hist: Histogram | None = None

    @property
    def needs_histogram(self) -> bool:
        return self.method != "minmax"

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[C, N]`` along the quantizer's channel axis, as magnitudes for symmetric grids."""
        q = self.quantizer
        x = x.detach().float()
        if q.num_channels is not None:
            axis = q.ch_axis % x.dim()
            if x.shape[axis] != q.num_channels:
                raise QuantizationError(f"{q.name}: per_channel quantizer expects {q.num_channels} channels on axis "
                                        f"{q.ch_axis}, got a tensor of shape {list(x.shape)}")
            rows = x.movedim(axis, 0).reshape(q.num_channels, -1)
        else:
            rows = x.reshape(1, -1)
        if self.grid.magnitude:
            rows = rows.abs() if self.grid.signed else rows.clamp_min(0.0)
        return rows

    def observe_extremes(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        mn, mx = rows.amin(dim=1), rows.amax(dim=1)
        if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(mx).all())):
            raise QuantizationError(f"{self.quantizer.name}: calibration data reaching this quantizer holds NaN or Inf")
        self.mn = mn if self.mn is None else torch.minimum(self.mn, mn)
        self.mx = mx if self.mx is None else torch.maximum(self.mx, mx)

    def observe(self, x: torch.Tensor) -> None:
        if self.mn is None or self.mx is None:
            raise QuantizationError(f"{self.quantizer.name}: observe_extremes must see the data before observe")
        if self.hist is None:
            lo, hi = self.mn.clamp_max(0.0), self.mx.clamp_min(0.0)  # ranges always contain 0
            self.hist = Histogram.empty(lo, hi, self.bins)
        self.hist.add(self._rows(x))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` in the quantizer's domain (float32; per channel or scalars)."""
        if self.mn is None or self.mx is None:
            raise QuantizationError(f"{self.quantizer.name}: no calibration data reached this quantizer")
        if self.method == "minmax" or self.hist is None:
            lo, hi = self.mn.double(), self.mx.double()
        else:
            lo, hi = choose_range(self.hist, self.method, self.grid, self.percentile)
        if self.grid.magnitude:
            lo = -hi if self.grid.signed else torch.zeros_like(hi)
        lo, hi = lo.float(), hi.float()
        if self.quantizer.num_channels is None:
            lo, hi = lo.reshape(()), hi.reshape(())
        return lo, hi
