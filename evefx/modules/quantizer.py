"""The fake quantizer: ``x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) * s`` with a tracked range,
a learned or derived scale, and the observations and export interface the rest of evefx reads.

Its options live in :class:`~evefx.modules.quantizer_options.QuantizerOptions`; the arithmetic in
:mod:`evefx.modules.quant_functions`. Nothing here knows about specs, passes or tracing.

Example:
    >>> q = Quantizer(bits=4, signed=False, symmetric=False)
    >>> q(torch.tensor([0.0, 0.5, 1.5])).tolist()
    [0.0, 0.5, 1.5]
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from evefx.errors import QuantizationError
from evefx.modules.protocol import EveHooks, EveRange
from evefx.modules.quant_functions import affine_from_range, least_error_grid, levels, lsq_quantize, ste_quantize
from evefx.modules.quantizer_options import QuantizerOptions, check_bits

__all__ = ["Quantizer"]

log = logging.getLogger(__name__)

_MIN_SPAN = 8.0  # a learned grid never spans less than 1/_MIN_SPAN of the tracked range
_LLSQ_GRID = 40  # candidate clipping ranges tried when llsq initialises its scale


def _option(field: str) -> Any:
    """A read-only attribute that reads ``options.<field>``. A quantizer's options may be replaced
    (``q.options = dataclasses.replace(q.options, bit_range=None)``) except those that shaped its
    buffers when it was built: ``granularity``, ``num_channels``, ``learnable_scale``, ``fn``,
    ``scale_domain``."""
    return property(lambda self: getattr(self.options, field), doc=f"``options.{field}``")


class Quantizer(EveHooks, nn.Module):
    """Fake quantization ``x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) * s`` of any tensor.

    Built from a :class:`~evefx.modules.quantizer_options.QuantizerOptions` (whose docstring says
    what every option does), or from the options' fields directly: ``Quantizer(4, "lsq", name="fc")``
    is ``Quantizer(QuantizerOptions(4, "lsq", name="fc"))``. The options are read through
    ``q.options`` or as attributes (``q.num_channels``); ``bits`` is the current bit width (a buffer
    that the upgrader and a bits schedule change), ``options.bits`` the starting one.

    Observations (updated by forwards in eval mode, so training steps pay nothing for them):
    ``min``, ``max`` (tracked range), ``scale`` and ``zero_point`` (means over channels),
    ``quant_error`` (mean ``|x - x̂|``), ``clipped`` (fraction of values outside the grid), ``bits``.

    Example:
        >>> q = Quantizer(QuantizerOptions(bits=8, granularity="per_channel", num_channels=16, tracker="global"))
        >>> q.options == Quantizer(bits=8, granularity="per_channel", num_channels=16, tracker="global").options
        True
        >>> w_hat = q(conv.weight)
        >>> scale, zero_point, qmin, qmax, axis = q.qparams()
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: torch.Tensor
    steps: torch.Tensor  # only with a bits schedule or init_steps
    options: QuantizerOptions

    # the options, read as attributes (``bits`` is the buffer of the current bit width)
    fn = _option("fn")
    granularity = _option("granularity")
    ch_axis = _option("ch_axis")
    num_channels = _option("num_channels")
    symmetric = _option("symmetric")
    signed = _option("signed")
    tracker = _option("tracker")
    momentum = _option("momentum")
    learnable_scale = _option("learnable_scale")
    scale_domain = _option("scale_domain")
    regularization = _option("regularization")
    reg_weight = _option("reg_weight")
    bit_range = _option("bit_range")
    code_range = _option("code_range")
    init_steps = _option("init_steps")
    bits_schedule = _option("bits_schedule")
    ewgs = _option("ewgs")
    name = _option("name")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        if args and isinstance(args[0], QuantizerOptions):
            if len(args) > 1 or kwargs:
                raise QuantizationError(f"{args[0].name}: pass either a QuantizerOptions or its fields, not both")
            options = args[0]
        else:
            options = QuantizerOptions(*args, **kwargs)
        self.options = options
        self._enabled = True
        self._reg: torch.Tensor | None = None
        self._stats: dict[str, float] = {}
        shape = () if options.num_channels is None else (options.num_channels,)
        self.register_buffer("bits", torch.tensor(options.bits, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))
        if options.init_steps or options.bits_schedule:  # only these need to know how far training has gone
            self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("range_min", torch.zeros(shape))
        self.register_buffer("range_max", torch.zeros(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        if self.learnable_scale and self.scale_domain in ("log", "range"):
            # scale = scale_base * exp(scale_log_ratio): the optimizer trains the logarithm. log: a
            # scale that is set (from the range, by set_bits, at the floor) is held exactly in the
            # base with a ratio of 0, so an untrained learned grid is the range's grid bit for bit.
            # range: the base is the tracked range's step, refreshed every training forward, and
            # the ratio is learnt relative to it (a range's own step is a ratio of exactly 0)
            self.register_buffer("scale_base", torch.ones(shape))
            self.scale_log_ratio = nn.Parameter(torch.zeros(shape))
        elif self.learnable_scale:
            self.scale = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("scale", torch.ones(shape))

    def __getattr__(self, name: str) -> Any:
        # a scale learnt in the log domain is ``scale_base * exp(scale_log_ratio)``; ``scale`` reads
        # it, with its gradient, so every reader sees the scale the last optimizer step left
        if name == "scale":
            params = self.__dict__.get("_parameters", {})
            if "scale_log_ratio" in params:
                return self.__dict__["_buffers"]["scale_base"] * params["scale_log_ratio"].exp()
        return super().__getattr__(name)

    @property
    def _log_ratio(self) -> nn.Parameter | None:
        """The learned ``scale_log_ratio`` of a log or range-domain scale; None in the linear domain."""
        return self._parameters.get("scale_log_ratio")

    def _set_scale(self, value: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Write the scale (under no_grad), only ``where`` that mask is true if one is given."""
        ratio = self._log_ratio
        if ratio is not None and self.scale_domain == "range":
            base = self._range_step()
            new = torch.log(value / base)
            self.scale_base.copy_(base)
            ratio.copy_(new if where is None else torch.where(where, new, ratio))
        elif ratio is not None:
            if where is None:
                self.scale_base.copy_(value)
                ratio.zero_()
            else:
                self.scale_base.copy_(torch.where(where, value, self.scale_base))
                ratio.masked_fill_(where, 0.0)
        else:
            self.scale.copy_(value if where is None else torch.where(where, value, self.scale))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a state saved in the other scale domain (e.g. before ``scale_domain`` existed) loads too
        linear, base, ratio = prefix + "scale", prefix + "scale_base", prefix + "scale_log_ratio"
        if self._log_ratio is not None and linear in state_dict and ratio not in state_dict:
            state_dict[base] = state_dict.pop(linear)
            state_dict[ratio] = torch.zeros_like(state_dict[base])
        elif "scale" in self._parameters and ratio in state_dict and linear not in state_dict:
            state_dict[linear] = state_dict.pop(base) * state_dict.pop(ratio).exp()
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.scale_domain == "range" and self._log_ratio is not None and bool(self.initialized):
            with torch.no_grad():  # the same scale, split again against the loaded range's step
                self._set_scale(self.scale.detach().clone())

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
        scale = self.scale.detach().float().clone()
        if self.learnable_scale and bool(self.initialized):  # as the next forward would use it
            scale = torch.maximum(scale, self._scale_floor().float())
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
        bits = check_bits(bits, self.name)
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
                s = self.scale
                lo = torch.maximum((old[0] - self.zero_point.to(s.dtype)) * s, self.range_min)
                hi = torch.minimum((old[1] - self.zero_point.to(s.dtype)) * s, self.range_max)
                scale, zero = affine_from_range(lo, hi, qmin, qmax, self.symmetric, self.signed)
                self._set_scale(scale)
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
            self._refresh_from_range()

    def stretch_grid(self, factor: torch.Tensor) -> None:
        """Multiply the grid by ``factor`` (> 0; per channel, or one number): the tracked range and
        the scale (learned or not) scale with it and the zero point stays, so ``x * factor`` maps to
        the codes ``x`` did. What keeps a folded layer's weight codes when its BatchNorm's statistics
        are re-estimated (the fold factor changes by ``factor`` per output channel).

        Example:
            >>> q.stretch_grid(torch.tensor([2.0, 0.5]))   # a per_channel quantizer of 2 channels
        """
        with torch.no_grad():
            f = torch.as_tensor(factor, dtype=self.range_min.dtype).expand_as(self.range_min)
            if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
                raise QuantizationError(f"{self.name}: stretch_grid needs finite factors > 0 (got {factor})")
            scale = self.scale.detach() * f.to(self.scale.dtype)
            self.range_min.mul_(f)
            self.range_max.mul_(f)
            self._set_scale(scale)  # after the range: a range-domain scale is written against its new step

    def set_mode(self, **flags: Any) -> None:
        if flags.get("quantized") is not None:
            self._enabled = bool(flags["quantized"])

    def observations(self) -> dict[str, float]:
        out = {"bits": float(int(self.bits))}
        if bool(self.initialized):
            out.update(
                min=float(self.range_min.min()),
                max=float(self.range_max.max()),
                scale=float(self.scale.detach().float().mean()),
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

    def _range_step(self) -> torch.Tensor:
        """The step of the grid the tracked range gives (what ``round`` uses)."""
        qmin, qmax = self.quant_range()
        return affine_from_range(self.range_min, self.range_max, qmin, qmax, self.symmetric, self.signed)[0]

    def _refresh_from_range(self) -> None:
        qmin, qmax = self.quant_range()
        scale, zero = affine_from_range(self.range_min, self.range_max, qmin, qmax, self.symmetric, self.signed)
        self._set_scale(scale)
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
        self._set_scale(scale)
        self.zero_point.copy_(zero)
        log.debug("%s: initialised scale (mean %.4g)", self.name, float(scale.mean()))

    def _llsq_search(self, x: torch.Tensor, qmin: int, qmax: int, error: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid of least l1 (l2) error among the tracked range shrunk by 1/40 .. 40/40."""
        axis = None if self._reduce_dims(x) is None else self.ch_axis % x.dim()  # (checks the channels)
        return least_error_grid(x, self.range_min, self.range_max, qmin, qmax, symmetric=self.symmetric,
                                signed=self.signed, axis=axis, error=error or self.regularization, candidates=_LLSQ_GRID)

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
                                qmin, qmax, may_clip, self.ewgs)
        zero_f = (view(zero) if per_row and zero.dim() else zero).to(x.dtype)
        if self.fn == "lsq":
            n = x.numel() if self.num_channels is None else x.numel() // self.num_channels
            grad_factor = 1.0 / math.sqrt(n * max(qmax, 1))
        else:
            grad_factor = 1.0
        return lsq_quantize(x, view(scale), qmin - zero_f, qmax - zero_f, grad_factor, self.ewgs)

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
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            # autocast's bf16/fp16 activations: x / s in 8 bits of mantissa rounds codes above 128
            # to the wrong integer, so the grid is computed in float32 (as eval and the file do)
            x = x.float()
        return self._run(x, None)

    @torch.no_grad()
    def _scale_floor(self) -> torch.Tensor:
        """The least a learned scale may be: 1/_MIN_SPAN of the tracked range's scale. Why: an
        optimizer step may push a learned scale through zero (Adam moves it by about its learning
        rate whatever the gradient, more than a small weight scale); trained grids do not come near
        it (the least-squares 2-bit step of Gaussian values is 1/3 to 1/2 of the range's)."""
        return self._range_step() / _MIN_SPAN

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
        bits = next(b for st, b in reversed(self.bits_schedule) if st <= step)
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
                elif self.training and self.scale_domain == "range":
                    self.scale_base.copy_(self._range_step())  # the learned ratio rides on the range
                self.initialized.fill_(True)
            if self.training and hasattr(self, "steps"):
                self.steps += 1
            if self.learnable_scale and not warming:
                # in eval too: the last optimizer step before eval may have left it below the floor
                if self._log_ratio is not None and self.scale_domain == "range":
                    # every write keeps the base at the range's step, so the floor bounds the ratio
                    self._log_ratio.clamp_(min=-math.log(_MIN_SPAN))
                elif self._log_ratio is not None:  # only the channels below: the rest keep their ratio
                    floor = self._scale_floor()
                    self._set_scale(floor, where=self.scale < floor)
                else:
                    torch.maximum(self.scale, self._scale_floor(), out=self.scale)
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
        s = self._view(self.scale.to(x.dtype), x)
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
        parts += [f"{key}={getattr(self.options, key)}" for key in ("bit_range", "code_range", "init_steps", "bits_schedule")
                  if getattr(self.options, key)]
        if not self._enabled:
            parts.append("disabled")
        return ", ".join(parts)
