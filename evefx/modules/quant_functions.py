"""The arithmetic of fake quantization: integer ranges, scales from a real range, and the two
quantize-dequantize functions with their straight-through gradients.

Every quantizer in evefx implements the affine mapping used by integer hardware and by ONNX
``QuantizeLinear``/``DequantizeLinear``::

    q  = clamp(round(x / s) + z, qmin, qmax)        (integer code)
    x̂ = (q - z) * s                                 (what the float graph sees)

with ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`` (signed) or ``[0, 2^b - 1]`` (unsigned) for ``b`` bits,
and a zero point ``z`` that is 0 for symmetric quantizers.

Example:
    >>> scale, zero = affine_from_range(torch.tensor(0.0), torch.tensor(1.5), *levels(4, False), False, False)
    >>> ste_quantize(torch.tensor([0.0, 0.5, 1.5]), scale, zero, *levels(4, False)).tolist()
    [0.0, 0.5, 1.5]
"""
from __future__ import annotations

import torch

__all__ = ["levels", "affine_from_range", "least_error_grid", "ste_quantize", "lsq_quantize"]

_EPS = torch.finfo(torch.float32).eps


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


def least_error_grid(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, *, symmetric: bool, signed: bool,
    axis: int | None = None, error: str = "l2", candidates: int = 40,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point (as :func:`affine_from_range` gives them) of least mean l1 or l2
    quantization error of ``x`` among the ranges ``[lo, hi] * i / candidates``, ``i = 1 .. candidates``:
    one choice for the tensor (``axis`` None, scalar ``lo``/``hi``) or one per channel along ``axis``.

    Example:
        >>> x = torch.tensor([-1.0, -0.1, 0.0, 0.1, 8.0])
        >>> least_error_grid(x, x.min(), x.max(), -8, 7, symmetric=True, signed=True)[0]
        tensor(1.1429)
    """
    xd = x.detach().float()
    dims = None if axis is None else [d for d in range(xd.dim()) if d != axis]
    shape = [1] * xd.dim()
    if axis is not None:
        shape[axis] = -1
    best_err = best_scale = best_zero = None
    for i in range(1, candidates + 1):
        frac = i / candidates
        scale, zero = affine_from_range(lo * frac, hi * frac, qmin, qmax, symmetric, signed)
        s, z = (scale, zero.float()) if axis is None else (scale.reshape(shape), zero.float().reshape(shape))
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
    assert best_scale is not None and best_zero is not None, f"candidates must be >= 1 (got {candidates})"
    return best_scale, best_zero


def _ewgs(grad: torch.Tensor, frac: torch.Tensor, delta: float) -> torch.Tensor:
    """EWGS (Lee et al. 2021): ``g * (1 + delta * sign(g) * (v - round(v)))`` with ``frac = round(v) - v``:
    a value that rounded up gets a larger gradient towards falling back and a smaller one the other way."""
    return grad - delta * grad.abs() * frac


class _LSQ(torch.autograd.Function):
    """``s * clamp(round(x / s), lo, hi)`` with the LSQ gradients (Esser et al. 2019, eq. 3):
    ``dx̂/dx = 1`` for ``lo <= x/s <= hi`` else 0 (scaled element-wise by EWGS when ``ewgs > 0``);
    ``dx̂/ds = round(x/s) - x/s`` inside, ``lo`` below and ``hi`` above, multiplied by ``grad_factor``."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi, grad_factor, ewgs=0.0):
        v = x / scale
        r = torch.round(v)
        # bounds are integers, so clamping the rounded value equals rounding the clamped one
        below, above = v <= lo, v >= hi
        out = torch.where(below, lo, torch.where(above, hi, r)).mul_(scale)
        ctx.save_for_backward(r.sub_(v), below, above, scale, lo, hi)
        ctx.grad_factor, ctx.ewgs = grad_factor, ewgs
        return out

    @staticmethod
    def backward(ctx, grad):
        frac, below, above, scale, lo, hi = ctx.saved_tensors  # frac = round(v) - v
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = (_ewgs(grad, frac, ctx.ewgs) if ctx.ewgs else grad).masked_fill(below | above, 0.0)
        if ctx.needs_input_grad[1]:
            ds = torch.where(below, lo, torch.where(above, hi, frac))
            grad_s = (grad * ds).sum_to_size(scale.shape) * ctx.grad_factor
        return grad_x, grad_s, None, None, None, None


class _STE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; the gradient passes where the rounded
    code lies in ``[qmin, qmax]`` (scaled element-wise by EWGS when ``ewgs > 0``). Written with
    plain tensor ops: on CPU they vectorise, where ``torch.fake_quantize_*`` kernels run several
    times slower. ``may_clip=False`` promises that no code leaves the range (the caller checked the
    batch's min/max): no clamp, no mask."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, may_clip, ewgs=0.0):
        v = torch.div(x, scale)
        r = v.round() if ewgs else v.round_()
        ctx.ewgs = ewgs
        ctx.frac = (r - v) if ewgs else None  # not saved for backward: v is a fresh tensor, never changed in place
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
    def backward(ctx, grad):
        if ctx.ewgs:
            grad = _ewgs(grad, ctx.frac, ctx.ewgs)
        if not ctx.clipped:
            return grad, None, None, None, None, None, None
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, 0.0), None, None, None, None, None, None


def ste_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, may_clip: bool = True,
    ewgs: float = 0.0,
) -> torch.Tensor:
    """Quantize-dequantize with a fixed ``scale``/``zero`` (broadcastable to ``x``) and the
    straight-through estimator (with ``ewgs > 0``, EWGS's element-wise scaling of it).

    Example:
        >>> ste_quantize(torch.tensor([0.26, 9.0]), torch.tensor(0.5), torch.tensor(0), -8, 7).tolist()
        [0.5, 3.5]
    """
    return _STE.apply(x, scale, zero.to(x.dtype), qmin, qmax, may_clip, float(ewgs))


def lsq_quantize(
    x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, grad_factor: float = 1.0,
    ewgs: float = 0.0,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with a learnable ``scale`` (broadcastable to ``x``) and integer bounds
    ``lo``/``hi`` (``qmin - z``, ``qmax - z``), using the LSQ straight-through gradients (with
    ``ewgs > 0``, the input's gradient scaled element-wise as EWGS does).

    Example:
        >>> s = torch.tensor(0.5, requires_grad=True)
        >>> lsq_quantize(torch.tensor([0.3, 9.0]), s, -8, 7).tolist()
        [0.5, 3.5]
    """
    lo_t = torch.as_tensor(lo, dtype=x.dtype)
    hi_t = torch.as_tensor(hi, dtype=x.dtype)
    return _LSQ.apply(x, scale.to(x.dtype), lo_t, hi_t, float(grad_factor), float(ewgs))
