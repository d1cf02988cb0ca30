"""The options of a :class:`~evefx.modules.quantizer.Quantizer`, checked in one place.

A plain frozen dataclass: the quantize pass builds one from a spec's ``weight``/``activation``
block and hands it whole to the quantizer; a user writing a quantizer by hand builds it (or passes
its fields to ``Quantizer``) directly. It knows nothing of specs.

Example:
    >>> QuantizerOptions(bits=4, fn="lsq", name="fc").learnable_scale
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from evefx.errors import QuantizationError

__all__ = ["QuantizerOptions", "Fn", "Granularity", "Tracker", "Regularization", "ScaleDomain", "check_bits"]

Fn = Literal["round", "lsq", "llsq"]
Granularity = Literal["per_tensor", "per_channel"]
Tracker = Literal["average", "global"]
Regularization = Literal["l1", "l2"]
ScaleDomain = Literal["linear", "log", "range"]


def check_bits(bits: int, name: str) -> int:
    """``bits`` as an int, or a :class:`QuantizationError` naming ``name`` outside 1..16.

    Example:
        >>> check_bits(4, "fc")
        4
    """
    if not 1 <= int(bits) <= 16:
        raise QuantizationError(f"{name}: bits must be between 1 and 16 (got {bits})")
    return int(bits)


@dataclass(frozen=True)
class QuantizerOptions:
    """How a :class:`~evefx.modules.quantizer.Quantizer` quantizes: every field is checked (and
    normalised) when the options are built, so a quantizer never checks them again.

    Fields:
        bits: 1 to 16. With ``bit_range=(lo, hi)`` it is an eve parameter the upgrader sets.
        fn: how the scale ``s`` is obtained and trained:

            * ``round``: ``s``, ``z`` follow the tracked range (see
              :func:`~evefx.modules.quant_functions.affine_from_range`), updated at every training
              step and frozen in eval. Straight-through estimator: the gradient passes where
              ``round(x/s) + z`` falls in ``[qmin, qmax]`` and is zero elsewhere.
              ``learnable_scale=True`` instead initialises ``s`` from the first batch's range and
              trains it with the LSQ gradient (without LSQ's gradient scale).
            * ``lsq`` (Esser et al. 2019): learned ``s``, initialised as LSQ+ does to the grid of
              least squared error among 40 ranges shrunk from the observed one (asymmetric: the
              minimum, widened to contain 0, sits on ``qmin``: the zero point is ``qmin`` for
              non-negative inputs); ``ds`` as in the paper's eq. 3, times ``1 / sqrt(N Qp)`` with
              ``N`` the number of elements one scale covers in a forward and ``Qp = max(qmax, 1)``.
            * ``llsq`` (Zhao et al. 2020): learned ``s`` with the plain straight-through gradient,
              initialised by choosing, among 40 clipping ranges (fractions of the observed range),
              the one with the lowest l1/l2 quantization error; ``regularization_loss()`` is that
              error on the last training batch, ``mean|x - x̂|`` (l1) or ``mean (x - x̂)^2`` (l2),
              times ``reg_weight``.

            For lsq/llsq the zero point is fixed at initialisation (0 when ``symmetric``).
        granularity: ``per_tensor`` or ``per_channel`` along ``ch_axis`` (needs ``num_channels``;
            per tensor, ``num_channels`` becomes None).
        symmetric: ``z = 0`` (unsigned and symmetric: negative values clip to 0, right after a
            ReLU); else ``z`` places the tracked minimum on ``qmin``.
        signed: codes ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``.
        tracker: ``average`` (EMA of the batch min/max with ``momentum``) or ``global`` (running
            min/max). Ranges update in training only; an uninitialised quantizer run in eval
            initialises from that batch.
        learnable_scale: train ``s`` for ``round`` too (always True for lsq/llsq).
        scale_domain: how a learned ``s`` is a parameter: ``linear`` (``s`` itself) or ``log``
            (``log s``, as TQT trains log thresholds, Jain et al. 2019): Adam moves a parameter by
            about its learning rate whatever the gradient, so a linear ``s`` of 0.05 moves 2% per
            step at lr 1e-3 and a log one 0.1%, whatever its size. The learned tensor is then
            ``scale_log_ratio`` (with ``scale = scale_base * exp(scale_log_ratio)``; a scale that is set, e.g.
            from the range, goes to the buffer ``scale_base`` exactly, the ratio to 0), or ``range``
            (``log`` relative to the tracked range: ``scale_base`` is the range's step, refreshed
            every training forward, so the step follows ranges that grow in training while the
            learned ratio moves 0.1% per step).
        regularization, reg_weight: llsq's error norm (``l1``/``l2``) and the weight of its penalty.
        bit_range: ``(low, high)`` bits the upgrader may choose (``bits`` must lie inside).
        code_range: ``(lo, hi)`` further limits the codes to ``[max(qmin, lo), min(qmax, hi)]``.
            ``(-64, 63)`` on int8 weights keeps every pair of u8 x s8 products of an x86 AVX2
            integer kernel inside int16 (``2 * 255 * 64 <= 32767``), so the file computes the same
            on CPUs with and without VNNI; training sees the same limited grid.
        init_steps: lsq/llsq/learned scales only: the first ``init_steps`` training forwards
            quantize with the tracked range's grid (as ``round`` does, straight-through) while the
            range settles; the learned scale is then initialised from that range and the batch
            (instead of from the very first batch) and trained from there. 0: first batch.
        bits_schedule: ``((step, bits), ...)`` with steps rising from 0: progressive bit lowering.
            At every training forward the quantizer takes the bits of the last entry whose step
            it has reached (counting its own training forwards); a learned scale then starts over
            as at initialisation (``init_steps`` of range tracking, then the least-squares step).
            E.g. ``((0, 8), (100, 4), (200, 2))``. The first entry's bits replace ``bits``.
        ewgs: element-wise gradient scaling (EWGS, Lee et al. 2021) of the straight-through
            gradient of the input, in ``[0, 1]``: ``g * (1 + ewgs * sign(g) * (v - round(v)))`` with
            ``v = x/s``, so a value's gradient grows when it points back across the rounding
            boundary the value crossed and shrinks the other way. 0 (default): the plain estimator.
        name: the layer the quantizer belongs to, for error messages.

    Example:
        >>> QuantizerOptions(bits=8, granularity="per_channel", num_channels=16, code_range=(-64, 63))
        >>> QuantizerOptions(bits=2, bits_schedule=((0, 8), (100, 4), (200, 2))).bits
        8
    """

    bits: int = 8
    fn: Fn = "round"
    granularity: Granularity = "per_tensor"
    ch_axis: int = 0
    num_channels: int | None = None
    symmetric: bool = True
    signed: bool = True
    tracker: Tracker = "average"
    momentum: float = 0.1
    learnable_scale: bool = False
    scale_domain: ScaleDomain = "linear"
    regularization: Regularization = "l2"
    reg_weight: float = 1.0
    bit_range: tuple[int, int] | None = None
    code_range: tuple[int, int] | None = None
    init_steps: int = 0
    bits_schedule: tuple[tuple[int, int], ...] | None = None
    ewgs: float = 0.0
    name: str = "<unnamed quantizer>"

    def __post_init__(self) -> None:
        name = self.name or "<unnamed quantizer>"
        for field, value, valid in (("fn", self.fn, get_args(Fn)), ("granularity", self.granularity, get_args(Granularity)),
                                    ("tracker", self.tracker, get_args(Tracker)),
                                    ("regularization", self.regularization, get_args(Regularization)),
                                    ("scale_domain", self.scale_domain, get_args(ScaleDomain))):
            if value not in valid:
                raise QuantizationError(f"{name}: {field} must be {', '.join(valid[:-1])} or {valid[-1]} (got {value!r})")
        if not 0.0 < self.momentum <= 1.0:
            raise QuantizationError(f"{name}: momentum must be in (0, 1] (got {self.momentum})")
        bits = check_bits(self.bits, name)
        bit_range = self.bit_range
        if bit_range is not None:
            lo, hi = int(bit_range[0]), int(bit_range[1])
            if not 1 <= lo <= hi <= 16:
                raise QuantizationError(f"{name}: bit_range must satisfy 1 <= low <= high <= 16 (got {bit_range})")
            if not lo <= bits <= hi:
                raise QuantizationError(f"{name}: bits={bits} lies outside bit_range {bit_range}; pick bits inside it")
            bit_range = (lo, hi)
        code_range = self.code_range
        if code_range is not None:
            code_range = (int(code_range[0]), int(code_range[1]))
            if not code_range[0] <= 0 <= code_range[1] or code_range[0] == code_range[1]:
                raise QuantizationError(f"{name}: code_range must contain 0 and two codes at least (got {code_range})")
        if int(self.init_steps) < 0:
            raise QuantizationError(f"{name}: init_steps must be >= 0 (got {self.init_steps})")
        if not 0.0 <= float(self.ewgs) <= 1.0:
            raise QuantizationError(f"{name}: ewgs must be in [0, 1] (got {self.ewgs})")
        schedule = self.bits_schedule
        if schedule is not None:
            schedule = tuple((int(st), int(b)) for st, b in schedule)
            starts = [st for st, _ in schedule]
            if not schedule or starts[0] != 0 or starts != sorted(set(starts)):
                raise QuantizationError(f"{name}: bits_schedule needs (step, bits) pairs with rising steps "
                                        f"starting at 0 (got {schedule})")
            if not all(1 <= b <= 16 for _, b in schedule):
                raise QuantizationError(f"{name}: bits_schedule bits must be between 1 and 16 (got {schedule})")
            if bit_range is not None:
                raise QuantizationError(f"{name}: bits_schedule and bit_range both set the bits; use one")
            bits = schedule[0][1]
        per_channel = self.granularity == "per_channel"
        if per_channel and (self.num_channels is None or self.num_channels < 1):
            raise QuantizationError(f"{name}: per_channel quantization needs num_channels (the size of axis {self.ch_axis})")
        normal = {
            "bits": bits, "bit_range": bit_range, "code_range": code_range, "bits_schedule": schedule, "name": name,
            "ch_axis": int(self.ch_axis), "num_channels": int(self.num_channels) if per_channel else None,
            "symmetric": bool(self.symmetric), "signed": bool(self.signed), "momentum": float(self.momentum),
            "learnable_scale": bool(self.learnable_scale) or self.fn in ("lsq", "llsq"),
            "reg_weight": float(self.reg_weight), "init_steps": int(self.init_steps), "ewgs": float(self.ewgs),
        }
        for key, setting in normal.items():  # frozen: the normal form is written once, here
            object.__setattr__(self, key, setting)
