"""Quantization-aware training modules: a fake quantizer and conv/linear layers that fold BatchNorm.

Every quantizer here implements the affine mapping used by integer hardware and by ONNX
``QuantizeLinear``/``DequantizeLinear``::

    q  = clamp(round(x / s) + z, qmin, qmax)        (integer code)
    x̂ = (q - z) * s                                 (what the float graph sees)

with ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`` (signed) or ``[0, 2^b - 1]`` (unsigned) for ``b`` bits,
and a zero point ``z`` that is 0 for symmetric quantizers. Nothing in this file knows about specs,
passes or tracing: a user can build these modules by hand.

Example:
    >>> q = Quantizer(bits=4, signed=False, symmetric=False)
    >>> q(torch.tensor([0.0, 0.5, 1.5])).tolist()
    [0.0, 0.5, 1.5]
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from evefx.errors import QuantizationError
from evefx.modules.protocol import EveHooks, EveRange

__all__ = [
    "Quantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "QUANT_LAYER_TYPES",
    "lsq_quantize",
    "ste_quantize",
    "affine_from_range",
    "levels",
]

log = logging.getLogger(__name__)

Fn = Literal["round", "lsq", "llsq"]
_EPS = torch.finfo(torch.float32).eps
_MIN_SPAN = 8.0  # a learned grid never spans less than 1/_MIN_SPAN of the tracked range
_LLSQ_GRID = 40  # candidate clipping ranges tried when llsq initialises its scale


def levels(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of ``bits``-bit codes.

    Example:
        >>> levels(8, True), levels(4, False), levels(1, True)
        ((-128, 127), (0, 15), (-1, 0))
    """
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def affine_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, int32) zero point that map the real range ``[lo, hi]`` onto the codes.

    * symmetric: ``z = 0`` and ``s = a / max(qmax, 1)`` with ``a = max(-lo, hi)`` when signed and
      ``a = hi`` when unsigned (so the largest value is exactly representable);
    * asymmetric: the range is widened to contain 0 (zero stays exact), ``s = (hi - lo) / (qmax - qmin)``
      and ``z = clamp(qmin - round(lo / s), qmin, qmax)``.

    ``s`` is at least float32 epsilon, so an all-zero tensor quantizes to zeros.

    Example:
        >>> affine_from_range(torch.tensor(-1.0), torch.tensor(2.0), -128, 127, True, True)[0]
        tensor(0.0157)
    """
    if symmetric:
        amax = torch.maximum(-lo, hi) if signed else hi
        scale = (amax.clamp_min(0.0) / max(qmax, 1)).clamp_min(_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo = lo.clamp_max(0.0)
    hi = hi.clamp_min(0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


class _LSQ(torch.autograd.Function):
    """``s * clamp(round(x / s), lo, hi)`` with the LSQ gradients (Esser et al. 2019, eq. 3):
    ``dx̂/dx = 1`` for ``lo <= x/s <= hi`` else 0; ``dx̂/ds = round(x/s) - x/s`` inside,
    ``lo`` below and ``hi`` above, multiplied by ``grad_factor``."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi, grad_factor):  # type: ignore[override]
        v = x / scale
        r = torch.round(v)
        # bounds are integers, so clamping the rounded value equals rounding the clamped one
        below, above = v <= lo, v >= hi
        out = torch.where(below, lo, torch.where(above, hi, r)).mul_(scale)
        ctx.save_for_backward(r.sub_(v), below, above, scale, lo, hi)
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        frac, below, above, scale, lo, hi = ctx.saved_tensors  # frac = round(v) - v
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.masked_fill(below | above, 0.0)
        if ctx.needs_input_grad[1]:
            ds = torch.where(below, lo, torch.where(above, hi, frac))
            grad_s = (grad * ds).sum_to_size(scale.shape) * ctx.grad_factor
        return grad_x, grad_s, None, None, None


class _STE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; the gradient passes where the rounded
    code lies in ``[qmin, qmax]``. Written with plain tensor ops: on CPU they vectorise, where
    ``torch.fake_quantize_*`` kernels run several times slower. ``may_clip=False`` promises that
    no code leaves the range (the caller checked the batch's min/max): no clamp, no mask."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, may_clip):  # type: ignore[override]
        r = torch.div(x, scale).round_()
        if not may_clip:  # round(x/s) + z - z: the zero point cancels when nothing clips
            ctx.clipped = False
            return r.mul_(scale)
        symmetric = zero.dim() == 0 and float(zero) == 0.0
        if not symmetric:
            r.add_(zero)
        c = r.clamp(qmin, qmax)
        ctx.clipped = True
        ctx.save_for_backward(r != c)
        if not symmetric:
            c.sub_(zero)
        return c.mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.clipped:
            return grad, None, None, None, None, None
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, 0.0), None, None, None, None, None


def ste_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, may_clip: bool = True
) -> torch.Tensor:
    """Quantize-dequantize with a fixed ``scale``/``zero`` (broadcastable to ``x``) and the
    straight-through estimator.

    Example:
        >>> ste_quantize(torch.tensor([0.26, 9.0]), torch.tensor(0.5), torch.tensor(0), -8, 7).tolist()
        [0.5, 3.5]
    """
    return _STE.apply(x, scale, zero.to(x.dtype), qmin, qmax, may_clip)


def lsq_quantize(
    x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, grad_factor: float = 1.0
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with a learnable ``scale`` (broadcastable to ``x``) and integer bounds
    ``lo``/``hi`` (``qmin - z``, ``qmax - z``), using the LSQ straight-through gradients.

    Example:
        >>> s = torch.tensor(0.5, requires_grad=True)
        >>> lsq_quantize(torch.tensor([0.3, 9.0]), s, -8, 7).tolist()
        [0.5, 3.5]
    """
    lo_t = torch.as_tensor(lo, dtype=x.dtype)
    hi_t = torch.as_tensor(hi, dtype=x.dtype)
    return _LSQ.apply(x, scale.to(x.dtype), lo_t, hi_t, float(grad_factor))


class Quantizer(EveHooks, nn.Module):
    """Fake quantization ``x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) * s`` of any tensor.

    Options:
        bits: 1 to 16. With ``bit_range=(lo, hi)`` it is an eve parameter the upgrader sets.
        fn: how the scale ``s`` is obtained and trained:

            * ``round``: ``s``, ``z`` follow the tracked range (see :func:`affine_from_range`), updated
              at every training step and frozen in eval. Straight-through estimator: the gradient
              passes where ``round(x/s) + z`` falls in ``[qmin, qmax]`` and is zero elsewhere.
              ``learnable_scale=True`` instead initialises ``s`` from the first batch's range and
              trains it with the LSQ gradient (without LSQ's gradient scale).
            * ``lsq`` (Esser et al. 2019): learned ``s``, initialised as LSQ+ does to the grid of
              least squared error among 40 ranges shrunk from the observed one (asymmetric: the
              minimum, widened to contain 0, sits on ``qmin``: the zero point is ``qmin`` for
              non-negative inputs); ``ds`` as in the paper's eq. 3, times ``1 / sqrt(N Qp)`` with ``N`` the number of
              elements one scale covers in a forward and ``Qp = max(qmax, 1)``.
            * ``llsq`` (Zhao et al. 2020): learned ``s`` with the plain straight-through gradient,
              initialised by choosing, among 40 clipping ranges (fractions of the observed range),
              the one with the lowest l1/l2 quantization error; :meth:`regularization_loss` is that
              error on the last training batch, ``mean|x - x̂|`` (l1) or ``mean (x - x̂)^2`` (l2),
              times ``reg_weight``.

            For lsq/llsq the zero point is fixed at initialisation (0 when ``symmetric``).
        granularity: ``per_tensor`` or ``per_channel`` along ``ch_axis`` (needs ``num_channels``).
        symmetric: ``z = 0`` (unsigned and symmetric: negative values clip to 0, right after a
            ReLU); else ``z`` places the tracked minimum on ``qmin``.
        signed: codes ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``.
        tracker: ``average`` (EMA of the batch min/max with ``momentum``) or ``global`` (running
            min/max). Ranges update in training only; an uninitialised quantizer run in eval
            initialises from that batch.
        init_steps: lsq/llsq/learned scales only: the first ``init_steps`` training forwards
            quantize with the tracked range's grid (as ``round`` does, straight-through) while the
            range settles; the learned scale is then initialised from that range and the batch
            (instead of from the very first batch) and trained from there. 0: first batch.
        bits_schedule: ``((step, bits), ...)`` with steps rising from 0: progressive bit lowering.
            At every training forward the quantizer takes the bits of the last entry whose step
            it has reached (counting its own training forwards); a learned scale then starts over
            as at initialisation (``init_steps`` of range tracking, then the least-squares step). E.g. ``((0, 8), (100, 4), (200, 2))``.
            The first entry's bits replace ``bits``.
            The count is the buffer ``steps`` (saved with the state dict).
        code_range: ``(lo, hi)`` further limits the codes to ``[max(qmin, lo), min(qmax, hi)]``.
            ``(-64, 63)`` on int8 weights keeps every pair of u8 x s8 products of an x86 AVX2
            integer kernel inside int16 (``2 * 255 * 64 <= 32767``), so the file computes the same
            on CPUs with and without VNNI; training sees the same limited grid.
        name: the layer this quantizer belongs to, for error messages.

    Observations (updated by forwards in eval mode, so training steps pay nothing for them):
    ``min``, ``max`` (tracked range), ``scale`` and ``zero_point`` (means over channels),
    ``quant_error`` (mean ``|x - x̂|``), ``clipped`` (fraction of values outside the grid), ``bits``.

    Example:
        >>> q = Quantizer(bits=8, granularity="per_channel", num_channels=16, tracker="global")
        >>> w_hat = q(conv.weight)
        >>> scale, zero_point, qmin, qmax, axis = q.qparams()
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: torch.Tensor

    def __init__(
        self,
        bits: int = 8,
        fn: Fn = "round",
        granularity: Literal["per_tensor", "per_channel"] = "per_tensor",
        *,
        ch_axis: int = 0,
        num_channels: int | None = None,
        symmetric: bool = True,
        signed: bool = True,
        tracker: Literal["average", "global"] = "average",
        momentum: float = 0.1,
        learnable_scale: bool = False,
        regularization: Literal["l1", "l2"] = "l2",
        reg_weight: float = 1.0,
        bit_range: tuple[int, int] | None = None,
        code_range: tuple[int, int] | None = None,
        init_steps: int = 0,
        bits_schedule: tuple[tuple[int, int], ...] | None = None,
        name: str = "",
    ):
        super().__init__()
        self.name = name or "<unnamed quantizer>"
        if fn not in ("round", "lsq", "llsq"):
            raise QuantizationError(f"{self.name}: fn must be round, lsq or llsq (got {fn!r})")
        if granularity not in ("per_tensor", "per_channel"):
            raise QuantizationError(f"{self.name}: granularity must be per_tensor or per_channel (got {granularity!r})")
        if tracker not in ("average", "global"):
            raise QuantizationError(f"{self.name}: tracker must be average or global (got {tracker!r})")
        if regularization not in ("l1", "l2"):
            raise QuantizationError(f"{self.name}: regularization must be l1 or l2 (got {regularization!r})")
        if not 0.0 < momentum <= 1.0:
            raise QuantizationError(f"{self.name}: momentum must be in (0, 1] (got {momentum})")
        if not 1 <= int(bits) <= 16:
            raise QuantizationError(f"{self.name}: bits must be between 1 and 16 (got {bits})")
        if bit_range is not None:
            lo, hi = int(bit_range[0]), int(bit_range[1])
            if not 1 <= lo <= hi <= 16:
                raise QuantizationError(f"{self.name}: bit_range must satisfy 1 <= low <= high <= 16 (got {bit_range})")
            if not lo <= int(bits) <= hi:
                raise QuantizationError(f"{self.name}: bits={bits} lies outside bit_range {bit_range}; pick bits inside it")
            bit_range = (lo, hi)
        if code_range is not None:
            code_range = (int(code_range[0]), int(code_range[1]))
            if not code_range[0] <= 0 <= code_range[1] or code_range[0] == code_range[1]:
                raise QuantizationError(f"{self.name}: code_range must contain 0 and two codes at least (got {code_range})")
        if int(init_steps) < 0:
            raise QuantizationError(f"{self.name}: init_steps must be >= 0 (got {init_steps})")
        if bits_schedule is not None:
            bits_schedule = tuple((int(st), int(b)) for st, b in bits_schedule)
            starts = [st for st, _ in bits_schedule]
            if not bits_schedule or starts[0] != 0 or starts != sorted(set(starts)):
                raise QuantizationError(f"{self.name}: bits_schedule needs (step, bits) pairs with rising steps "
                                        f"starting at 0 (got {bits_schedule})")
            if not all(1 <= b <= 16 for _, b in bits_schedule):
                raise QuantizationError(f"{self.name}: bits_schedule bits must be between 1 and 16 (got {bits_schedule})")
            if bit_range is not None:
                raise QuantizationError(f"{self.name}: bits_schedule and bit_range both set the bits; use one")
            bits = bits_schedule[0][1]
        per_channel = granularity == "per_channel"
        if per_channel and (num_channels is None or num_channels < 1):
            raise QuantizationError(
                f"{self.name}: per_channel quantization needs num_channels (the size of axis {ch_axis})"
            )
        self.fn: Fn = fn
        self.granularity = granularity
        self.ch_axis = int(ch_axis)
        self.num_channels = int(num_channels) if per_channel else None
        self.symmetric = bool(symmetric)
        self.signed = bool(signed)
        self.tracker = tracker
        self.momentum = float(momentum)
        self.learnable_scale = bool(learnable_scale) or fn in ("lsq", "llsq")
        self.regularization = regularization
        self.reg_weight = float(reg_weight)
        self.bit_range = bit_range
        self.code_range = code_range
        self.init_steps = int(init_steps)
        self.bits_schedule = bits_schedule
        self._enabled = True
        self._reg: torch.Tensor | None = None
        self._stats: dict[str, float] = {}
        shape = (self.num_channels,) if per_channel else ()
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))
        if self.init_steps or bits_schedule:  # only these need to know how far training has gone
            self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("range_min", torch.zeros(shape))
        self.register_buffer("range_max", torch.zeros(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        if self.learnable_scale:
            self.scale = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("scale", torch.ones(shape))

    def __getstate__(self) -> dict[str, Any]:
        # the last regulariser value holds an autograd graph, which cannot be copied or pickled
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_reg": None}

    def train(self, mode: bool = True) -> "Quantizer":
        if not mode:
            self._reg = None  # the regulariser is a training-time loss; let its graph (and activations) go
        return super().train(mode)

    # ----------------------------------------------------------------- export interface
    @property
    def enabled(self) -> bool:
        """False after ``set_mode(quantized=False)``: the forward is then the exact identity."""
        return self._enabled

    def quant_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` at the current bit width, cut to ``code_range`` when one is set.

        Example:
            >>> Quantizer(bits=8, code_range=(-64, 63)).quant_range()   # saturation-free int8 weights
            (-64, 63)
        """
        qmin, qmax = levels(int(self.bits), self.signed)
        if self.code_range is not None:
            qmin, qmax = max(qmin, self.code_range[0]), min(qmax, self.code_range[1])
        return qmin, qmax

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor, int, int, int | None]:
        """``(scale float32, zero_point int64, qmin, qmax, axis)`` of the eval-mode mapping
        ``q = clamp(round(x/scale) + zero_point, qmin, qmax)``; ``axis`` is None per tensor.

        Example:
            >>> scale, zp, qmin, qmax, axis = Quantizer(bits=8).qparams()
        """
        qmin, qmax = self.quant_range()
        scale = self._effective_scale().detach().float().clone()
        axis = self.ch_axis if self.num_channels is not None else None
        return scale, self.zero_point.detach().to(torch.int64).clone(), qmin, qmax, axis

    # ----------------------------------------------------------------- eve protocol
    def eve_ranges(self) -> dict[str, EveRange]:
        if self.bit_range is None:
            return {}
        return {"bits": EveRange(self.bit_range[0], self.bit_range[1], integer=True)}

    def set_eve(self, name: str, value: float) -> None:
        if name == "bits":
            self.set_bits(int(self.eve_ranges()["bits"].clip(value)) if self.bit_range else int(value))
            return
        super().set_eve(name, value)

    def set_bits(self, bits: int) -> None:
        """Change the bit width; the scale is recomputed from the tracked range (round) or set so that
        the new grid spans the old grid's clipping range cut to the tracked range (lsq/llsq), so a
        quantizer stays usable without retraining. Asymmetric grids keep the range's minimum on
        ``qmin`` (zero point ``qmin`` for non-negative inputs).

        Example:
            >>> q.set_bits(4)
        """
        if not 1 <= int(bits) <= 16:
            raise QuantizationError(f"{self.name}: bits must be between 1 and 16 (got {bits})")
        old = self.quant_range()
        with torch.no_grad():
            self.bits.fill_(int(bits))
            if not bool(self.initialized):
                return
            qmin, qmax = self.quant_range()
            if self.learnable_scale:
                # the new grid covers what the old one represented (its learned clipping range),
                # cut to the tracked range: a learned grid wider than the data (as the step LSQ's
                # paper starts from spans at 8 bits) would otherwise waste most of the few levels
                s = self._effective_scale()
                lo = torch.maximum((old[0] - self.zero_point.to(s.dtype)) * s, self.range_min)
                hi = torch.minimum((old[1] - self.zero_point.to(s.dtype)) * s, self.range_max)
                scale, zero = affine_from_range(lo, hi, qmin, qmax, self.symmetric, self.signed)
                self.scale.copy_(scale)
                self.zero_point.copy_(zero)
            else:
                self._refresh_from_range()

    def set_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        """Set the tracked range to ``[lo, hi]`` (scalars, or per-channel vectors) chosen by a
        calibrator, mark the quantizer initialised and derive the scale and zero point from it
        (as :func:`affine_from_range` does, also for a learned scale, which training may then refine).

        Example:
            >>> q = Quantizer(bits=8); q.set_range(-1.0, 2.0); float(q.scale)
            0.015748...
        """
        with torch.no_grad():
            lo_t = torch.as_tensor(lo, dtype=self.range_min.dtype).expand_as(self.range_min)
            hi_t = torch.as_tensor(hi, dtype=self.range_max.dtype).expand_as(self.range_max)
            if not (bool(torch.isfinite(lo_t).all()) and bool(torch.isfinite(hi_t).all())) or bool((lo_t > hi_t).any()):
                raise QuantizationError(f"{self.name}: set_range needs finite lo <= hi (got {lo}, {hi})")
            self.range_min.copy_(lo_t)
            self.range_max.copy_(hi_t)
            self.initialized.fill_(True)
            qmin, qmax = self.quant_range()
            scale, zero = affine_from_range(self.range_min, self.range_max, qmin, qmax, self.symmetric, self.signed)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)

    def set_mode(self, **flags: Any) -> None:
        if flags.get("quantized") is not None:
            self._enabled = bool(flags["quantized"])

    def observations(self) -> dict[str, float]:
        out = {"bits": float(int(self.bits))}
        if bool(self.initialized):
            out.update(
                min=float(self.range_min.min()),
                max=float(self.range_max.max()),
                scale=float(self._effective_scale().detach().float().mean()),
                zero_point=float(self.zero_point.float().mean()),
            )
        out.update(self._stats)
        return out

    def regularization_loss(self) -> torch.Tensor:
        """llsq's quantization-error penalty on the last training batch (0 otherwise); add it to the loss."""
        if self._reg is None or not self.training or not self._enabled:
            return torch.zeros(())
        return self._reg

    # ----------------------------------------------------------------- internals
    def _effective_scale(self) -> torch.Tensor:
        return self.scale

    def _reduce_dims(self, x: torch.Tensor) -> list[int] | None:
        if self.num_channels is None:
            return None
        axis = self.ch_axis % x.dim()
        if x.shape[axis] != self.num_channels:
            raise QuantizationError(
                f"{self.name}: per_channel quantizer expects {self.num_channels} channels on axis "
                f"{self.ch_axis}, got a tensor of shape {list(x.shape)}"
            )
        return [d for d in range(x.dim()) if d != axis]

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a per-channel vector so that it broadcasts along ``ch_axis`` of ``x``."""
        if self.num_channels is None:
            return t
        shape = [1] * x.dim()
        shape[self.ch_axis % x.dim()] = -1
        return t.reshape(shape)

    def _batch_range(self, x: torch.Tensor, fold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch min/max at the quantizer's granularity (of ``x * fold`` when a fold factor is given)."""
        xd = x.detach()
        if fold is not None:
            # range of x * fold (fold > 0 per row of axis 0) from the per-row range of x
            rows = xd.reshape(x.shape[0], -1)
            f = fold.detach().reshape(-1)
            mn, mx = rows.amin(dim=1) * f, rows.amax(dim=1) * f
            if self.num_channels is None:
                mn, mx = mn.min(), mx.max()
            elif self.ch_axis % x.dim() != 0 or self.num_channels != x.shape[0]:
                raise QuantizationError(f"{self.name}: a folded weight needs a per_tensor or axis-0 per_channel quantizer")
        else:
            dims = self._reduce_dims(x)
            if dims is None:
                mn, mx = torch.aminmax(xd)
            elif self.ch_axis % x.dim() == 0 and xd.is_contiguous():
                # amin and amax separately: on CPU they are several times faster than aminmax(dim=...)
                rows = xd.reshape(x.shape[0], -1)
                mn, mx = rows.amin(dim=1), rows.amax(dim=1)
            else:
                mn, mx = torch.amin(xd, dim=dims), torch.amax(xd, dim=dims)
        mn, mx = mn.float(), mx.float()
        if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(mx).all())):
            raise QuantizationError(
                f"{self.name}: the tensor reaching this quantizer contains NaN or Inf "
                f"(min {float(mn.min())}, max {float(mx.max())}); the scale was left unchanged. "
                f"Check the input data, lower the learning rate, or quantize fewer layers."
            )
        return mn, mx

    def _track(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        if not bool(self.initialized):
            self.range_min.copy_(mn)
            self.range_max.copy_(mx)
        elif self.tracker == "global":
            torch.minimum(self.range_min, mn, out=self.range_min)
            torch.maximum(self.range_max, mx, out=self.range_max)
        else:
            self.range_min.lerp_(mn, self.momentum)
            self.range_max.lerp_(mx, self.momentum)

    def _refresh_from_range(self) -> None:
        qmin, qmax = self.quant_range()
        scale, zero = affine_from_range(self.range_min, self.range_max, qmin, qmax, self.symmetric, self.signed)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)

    def _initialise(self, x: torch.Tensor) -> None:
        """First batch: set the learned scale (lsq/llsq/learnable round) from the batch's statistics."""
        qmin, qmax = self.quant_range()
        lo, hi = self.range_min, self.range_max
        if self.fn == "lsq":
            # Not LSQ's 2·mean|x|/sqrt(Qp): at 2 bits that step is ~1.5x the least-squares one for
            # Gaussian weights, and measured from the minimum of an asymmetric grid on signed
            # logits it spans ~4x the data, leaving a handful of codes in use (on the demo network
            # W4A4 went from -2.2 to +1.2 points and W2A2 from -18 to -4.3 with this change,
            # docs/quantization.md). The start is instead the grid of least squared error among
            # ranges shrunk from the observed one (LSQ+'s initialisation; llsq's search with the
            # l2 norm); an asymmetric grid keeps its minimum (widened to contain 0) on qmin, so
            # after a ReLU z = qmin and onnxruntime can fuse the ReLU.
            scale, zero = self._llsq_search(x, qmin, qmax, error="l2")
        elif self.fn == "llsq":
            scale, zero = self._llsq_search(x, qmin, qmax)
        else:
            scale, zero = affine_from_range(lo, hi, qmin, qmax, self.symmetric, self.signed)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)
        log.debug("%s: initialised scale (mean %.4g)", self.name, float(scale.mean()))

    def _llsq_search(self, x: torch.Tensor, qmin: int, qmax: int, error: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point of least l1 (l2) error among the tracked range shrunk by 1/G .. G/G."""
        error = error or self.regularization
        dims = self._reduce_dims(x)
        xd = x.detach().float()
        best_err = best_scale = best_zero = None
        for i in range(1, _LLSQ_GRID + 1):
            frac = i / _LLSQ_GRID
            scale, zero = affine_from_range(self.range_min * frac, self.range_max * frac, qmin, qmax,
                                            self.symmetric, self.signed)
            s, z = self._view(scale, xd), self._view(zero.float(), xd)
            err = ((torch.round(xd / s) + z).clamp(qmin, qmax) - z).mul(s).sub(xd).abs()
            if error == "l2":
                err = err.square()
            err = err.mean() if dims is None else err.mean(dim=dims)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def _fake_quant(
        self, x: torch.Tensor, fold: torch.Tensor | None = None, batch_range: tuple[torch.Tensor, torch.Tensor] | None = None,
        ste: bool = False,
    ) -> torch.Tensor:
        qmin, qmax = self.quant_range()
        scale = self.scale if fold is None else self.scale / fold.detach().reshape(-1)
        per_row = fold is not None or self.num_channels is not None
        view = (lambda t: t.reshape([-1] + [1] * (x.dim() - 1))) if fold is not None else (lambda t: self._view(t, x))
        zero = self.zero_point
        if self.symmetric:
            zero = torch.zeros((), dtype=torch.int32)  # lets the STE skip two passes
        elif per_row and zero.dim() == 0 and fold is not None:
            zero = zero.expand(scale.shape)
        if not self.learnable_scale or ste:
            may_clip = True
            if batch_range is not None:
                # codes of the batch's extremes (in the quantizer's domain); within half a step of
                # the range nothing can round outside it
                mn, mx = batch_range
                z = self.zero_point.float()
                may_clip = not bool(((mn / self.scale + z) >= qmin - 0.49).all() and ((mx / self.scale + z) <= qmax + 0.49).all())
            return ste_quantize(x, view(scale.detach()).to(x.dtype), view(zero) if per_row and zero.dim() else zero,
                                qmin, qmax, may_clip)
        zero_f = (view(zero) if per_row and zero.dim() else zero).to(x.dtype)
        if self.fn == "lsq":
            n = x.numel() if self.num_channels is None else x.numel() // self.num_channels
            grad_factor = 1.0 / math.sqrt(n * max(qmax, 1))
        else:
            grad_factor = 1.0
        return lsq_quantize(x, view(scale), qmin - zero_f, qmax - zero_f, grad_factor)

    def quantize_folded(self, weight: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
        """``Q(weight * f) / f`` for a per-output-channel fold factor ``f`` (shape ``[C, 1, ...]``),
        computed as a quantization of ``weight`` with scale ``s / f``, so the folded weight is
        never materialised. The gradient reaches ``weight`` (straight-through) and the scale,
        not ``f`` (whose gradient through this path is only the quantization error's)."""
        if not self._enabled:
            return weight
        if not bool((fold > 0).all()):  # a negative BN gamma: take the plain route
            return self(weight * fold) / fold
        return self._run(weight, fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return x
        return self._run(x, None)

    def _stage_step(self) -> int:
        """Training forwards since the current bits began (since the start without a schedule)."""
        step = int(self.steps)
        start = max((st for st, _ in self.bits_schedule if st <= step), default=0) if self.bits_schedule else 0
        return step - start

    def _warming_up(self) -> bool:
        """A learned scale still following the tracked range (the first ``init_steps`` training
        forwards of the run, and of every stage of a bits schedule)."""
        return self.learnable_scale and self.init_steps > 0 and self._stage_step() < self.init_steps

    def _follow_schedule(self) -> bool:
        """Take the bits the schedule gives at the current step (training forwards only); True
        when they changed."""
        step = int(self.steps)
        bits = next(b for st, b in reversed(self.bits_schedule) if st <= step)  # type: ignore[arg-type]
        if bits == int(self.bits):
            return False
        log.debug("%s: step %d, bits %d -> %d", self.name, step, int(self.bits), bits)
        self.set_bits(bits)
        return True

    def _run(self, x: torch.Tensor, fold: torch.Tensor | None) -> torch.Tensor:
        mn, mx = self._batch_range(x, fold)
        with torch.no_grad():
            # each stage starts as a fresh quantizer would (warm-up, then the least-squares step):
            # a learned step carried over from 4 to 2 bits (set_bits) collapsed the demo network
            restart = self.training and self.bits_schedule is not None and self._follow_schedule() and not self.init_steps
            warming = self._warming_up()
            if self.training or not bool(self.initialized):
                self._track(mn, mx)
                if not self.learnable_scale or warming:
                    self._refresh_from_range()
                elif (not bool(self.initialized) or restart
                      or (self.init_steps and self.training and self._stage_step() == self.init_steps)):
                    self._initialise(x if fold is None else x * fold)
                self.initialized.fill_(True)
            if self.training and hasattr(self, "steps"):
                self.steps += 1
            if self.learnable_scale and self.training and not warming:
                # An optimizer step may push a learned scale through zero (Adam moves it by about
                # its learning rate whatever the gradient, more than a small 8-bit weight scale):
                # keep the step at least 1/_MIN_SPAN of the tracked range's, which trained grids do
                # not come near (the least-squares 2-bit step of Gaussian values is 1/3 to 1/2 of it)
                qmin, qmax = self.quant_range()
                floor = affine_from_range(self.range_min, self.range_max, qmin, qmax, self.symmetric, self.signed)[0]
                torch.maximum(self.scale, floor / _MIN_SPAN, out=self.scale)
        out = self._fake_quant(x, fold, (mn, mx), ste=warming)
        if self.training and self.fn == "llsq" and torch.is_grad_enabled():
            err = (out - x).abs() if self.regularization == "l1" else (out - x).square()
            if fold is not None:
                err = err * fold.detach().square() if self.regularization == "l2" else err * fold.detach()
            self._reg = self.reg_weight * err.mean()
        if not self.training and fold is None:
            self._record(x, out, mn, mx)
        return out

    @torch.no_grad()
    def _record(self, x: torch.Tensor, out: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        qmin, qmax = self.quant_range()
        s = self._view(self._effective_scale().to(x.dtype), x)
        z = self._view(self.zero_point.to(x.dtype), x)
        q = torch.round(x / s) + z
        self._stats = {
            "quant_error": float((out - x).abs().mean()),
            "clipped": float(((q < qmin) | (q > qmax)).float().mean()),
            "batch_min": float(mn.min()),
            "batch_max": float(mx.max()),
        }

    def extra_repr(self) -> str:
        gran = f"per_channel(axis={self.ch_axis}, C={self.num_channels})" if self.num_channels else "per_tensor"
        parts = [f"bits={int(self.bits)}", f"fn={self.fn}", gran, "symmetric" if self.symmetric else "asymmetric",
                 "signed" if self.signed else "unsigned", f"tracker={self.tracker}"]
        if self.bit_range:
            parts.append(f"bit_range={self.bit_range}")
        if self.code_range:
            parts.append(f"code_range={self.code_range}")
        if self.init_steps:
            parts.append(f"init_steps={self.init_steps}")
        if self.bits_schedule:
            parts.append(f"bits_schedule={self.bits_schedule}")
        if not self._enabled:
            parts.append("disabled")
        return ", ".join(parts)


class _QuantLayerMixin:
    """Weight quantization plus simulated BatchNorm folding, shared by the conv and linear layers.

    Folding (the form of Krishnamoorthi 2018, sec. 3.2, and torch.ao's ConvBn modules): with
    ``f = gamma / sqrt(running_var + eps)`` the deployable weight is ``W_f = W * f`` and bias
    ``b_f = beta + (b - running_mean) * f``.

    * train: ``y = BN_batch(conv(x, Q(W_f) / f) + b)``, which equals ``BN_batch(conv(x, Q(W_f)) / f + b)``
      because conv is linear per output channel. The weights are quantized exactly as they
      deploy, the division by ``f`` undoes the fold so that BatchNorm sees the float model's
      pre-activation, and BN's batch statistics (and running-statistics updates) are the float
      model's. With quantization off this equals ``BN(conv(x))`` up to float rounding.
    * eval: ``y = conv(x, Q(W_f), b_f)``: a single conv, exactly the exported graph. With the
      quantizer of its input known (:meth:`set_input_quantizer`), ``b_f`` is rounded to the grid
      ``s_x * s_w`` on which integer kernels store it as int32, as the exported file does.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: Quantizer
    bn: nn.modules.batchnorm._BatchNorm | None

    def _adopt(self, module: nn.Module, weight_quantizer: Quantizer, bn: nn.Module | None) -> Any:
        """Take over ``module``'s parameters (shared, not copied) and mode; attach the quantizer and BN."""
        self.weight = module.weight
        self.bias = module.bias
        self.train(module.training)
        self.weight_quantizer = weight_quantizer
        self.bn = bn
        return self

    def set_input_quantizer(self, quantizer: Quantizer | None) -> None:
        """Name the quantizer whose codes this layer reads (per tensor). In eval mode the bias is then
        rounded to ``s_x * s_w``, the int32 grid integer kernels (and the exported file) keep it on:
        left in float, it is what most separates PyTorch from onnxruntime in a deep network (each
        output channel shifted by up to half a unit, every rounding after it moved with it).

        Example:
            >>> qconv.set_input_quantizer(input_quantizer)
        """
        # a plain reference, not a submodule: the quantizer is registered where it runs
        object.__setattr__(self, "_input_quantizer", quantizer)

    def _deployed_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        q = self.__dict__.get("_input_quantizer")
        wq = self.weight_quantizer
        if bias is None or q is None or not (q.enabled and wq.enabled) or q.num_channels is not None \
                or not (bool(q.initialized) and bool(wq.initialized)):
            return bias
        step = (q.scale.detach().reshape(()) * wq.scale.detach()).to(bias.dtype)
        return torch.round(bias / step) * step

    def _fold_factor(self) -> torch.Tensor:
        bn = self.bn
        assert bn is not None and bn.running_var is not None
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return bn.weight * inv_std if bn.affine else inv_std

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval-mode folded float ``(weight, bias)`` before weight quantization (the layer's own
        weight and bias when no BatchNorm is folded).

        Example:
            >>> w, b = qconv.folded_weight_bias()
        """
        if self.bn is None:
            return self.weight, self.bias
        f = self._fold_factor()
        w = self.weight * f.reshape([-1] + [1] * (self.weight.dim() - 1))
        bias = self.bias if self.bias is not None else torch.zeros_like(f)
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(f)
        return w, beta + (bias - self.bn.running_mean) * f

    def _forward_quant(self, x: torch.Tensor, apply: Any) -> torch.Tensor:
        if not self.training:
            w, b = self.folded_weight_bias()
            return apply(x, self.weight_quantizer(w), self._deployed_bias(b))
        if self.bn is None:
            return apply(x, self.weight_quantizer(self.weight), self.bias)
        f = self._fold_factor().reshape([-1] + [1] * (self.weight.dim() - 1))
        # conv(x, Q(W f)) / f == conv(x, Q(W f) / f), and Q(W f) / f is W quantized with scale s / f:
        # one pass over the weights, none over the activations
        y = apply(x, self.weight_quantizer.quantize_folded(self.weight, f), self.bias)
        return self.bn(y)

    @staticmethod
    def _check_bn(layer: nn.Module, bn: nn.Module | None, out_features: int, name: str) -> None:
        if bn is None:
            return
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise QuantizationError(f"{name}: can only fold a BatchNorm (got {type(bn).__name__})")
        if bn.num_features != out_features:
            raise QuantizationError(
                f"{name}: BatchNorm has {bn.num_features} features but the layer has {out_features} outputs"
            )
        if not bn.track_running_stats or bn.running_var is None:
            raise QuantizationError(
                f"{name}: cannot fold a BatchNorm without running statistics (track_running_stats=False); "
                f"set fold_bn: false for this layer"
            )

    def extra_repr(self) -> str:  # noqa: D401 - appended to the float layer's repr
        return super().extra_repr() + (", bn_folded=True" if self.bn is not None else "")  # type: ignore[misc]


def _make_quant_conv(base: type[nn.modules.conv._ConvNd]) -> type:
    class QuantConv(_QuantLayerMixin, base):  # type: ignore[valid-type, misc]
        __doc__ = f"""``{base.__name__}`` whose weights pass through ``weight_quantizer`` (per channel on axis 0),
        optionally folding the BatchNorm that followed it (see :class:`_QuantLayerMixin` for the
        folding formulas).

        Example:
            >>> q = Quant{base.__name__}.from_float(conv, Quantizer(8, "round", "per_channel", num_channels=conv.out_channels), bn)
            >>> w, b = q.folded_weight_bias()
        """

        @classmethod
        def from_float(cls, module: nn.Module, weight_quantizer: Quantizer, bn: nn.Module | None = None):
            """Wrap ``module`` (its parameters are shared, not copied) and optionally fold ``bn``."""
            if not isinstance(module, base):
                raise QuantizationError(f"{weight_quantizer.name}: Quant{base.__name__}.from_float needs a {base.__name__} (got {type(module).__name__})")
            cls._check_bn(module, bn, module.out_channels, weight_quantizer.name)
            # build on the meta device so no time goes into initialising weights we replace anyway
            new = cls(
                module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups,
                bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
            )
            return new._adopt(module, weight_quantizer, bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._forward_quant(x, self._conv_forward)

    QuantConv.__name__ = QuantConv.__qualname__ = f"Quant{base.__name__}"
    QuantConv.__module__ = __name__
    return QuantConv


QuantConv1d = _make_quant_conv(nn.Conv1d)
QuantConv2d = _make_quant_conv(nn.Conv2d)
QuantConv3d = _make_quant_conv(nn.Conv3d)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose weights pass through ``weight_quantizer`` (per channel on axis 0), optionally
    folding a following ``BatchNorm1d`` (inputs ``[N, features]``; formulas in :class:`_QuantLayerMixin`).

    Example:
        >>> q = QuantLinear.from_float(fc, Quantizer(8, "round", "per_channel", num_channels=fc.out_features))
    """

    @classmethod
    def from_float(cls, module: nn.Linear, weight_quantizer: Quantizer, bn: nn.Module | None = None) -> "QuantLinear":
        """Wrap ``module`` (its parameters are shared, not copied) and optionally fold ``bn``."""
        if not isinstance(module, nn.Linear):
            raise QuantizationError(f"{weight_quantizer.name}: QuantLinear.from_float needs a Linear (got {type(module).__name__})")
        cls._check_bn(module, bn, module.out_features, weight_quantizer.name)
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        return new._adopt(module, weight_quantizer, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and x.dim() != 2:
            raise QuantizationError(
                f"{self.weight_quantizer.name}: a Linear with a folded BatchNorm1d takes [N, features] inputs "
                f"(got shape {list(x.shape)})"
            )
        return self._forward_quant(x, F.linear)


QUANT_LAYER_TYPES: tuple[type[nn.Module], ...] = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)
"""The layer classes the quantize pass puts in place of conv/linear layers."""
