"""Surrogate spike functions: a Heaviside step forward, a smooth derivative backward.

A spiking neuron emits ``H(u) = 1 if u >= 0 else 0`` where ``u = v - threshold``. The step has
no useful gradient, so training replaces its derivative by the derivative ``g'(u)`` of a smooth
primitive ``g`` that approaches the step as ``alpha`` grows. Each surrogate below is a
``torch.autograd.Function`` (``Surrogate.apply(u, alpha)``) and also exposes, as plain static
methods, ``primitive(u, alpha)`` (the smooth ``g``) and ``derivative(u, alpha)`` (``g'``), which
the fused neuron backward calls directly.

=====================  =========================================================  ============================
name                   derivative ``g'(u)``                                       primitive ``g(u)``
=====================  =========================================================  ============================
sigmoid                ``a * sig(a u) * (1 - sig(a u))``                          ``sig(a u)``
piecewise_quadratic    ``a - a^2 |u|`` for ``|u| < 1/a``, else 0                  piecewise quadratic, 0 to 1
soft_sign              ``a / (2 (1 + a|u|)^2)``                                   ``(1 + a u / (1 + a|u|)) / 2``
atan                   ``(a/2) / (1 + (pi/2 a u)^2)``                             ``1/2 + atan(pi/2 a u) / pi``
nonzero_sign_log_abs   ``a / (1 + a|u|)``                                         ``sign(u) log(1 + a|u|)``
erf                    ``a / sqrt(pi) * exp(-(a u)^2)``                           ``(1 + erf(a u)) / 2``
piecewise_leaky_relu   ``a/2`` for ``|u| <= 1/a``, else ``0.01``                  leaky ramp, 0 to 1 inside
fast_sigmoid           ``1 / (1 + a|u|)^2`` (SuperSpike, Zenke & Ganguli 2018)    ``u / (1 + a|u|)``
triangle               ``max(0, 1 - a|u|)`` (peak 1, Bellec et al. 2018)          piecewise quadratic
=====================  =========================================================  ============================

(``a`` is ``alpha``, ``sig`` the logistic function.) ``erf`` uses the true derivative of its
primitive: a Gaussian of width ``1/a`` that integrates to 1. Some families overlap: fast_sigmoid
is soft_sign rescaled to peak 1 (equal at ``a = 2``), and triangle equals piecewise_quadratic at
``a = 1``.

Example:
    >>> u = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    >>> fn = spike_fn("atan", 2.0)
    >>> fn(u)
    tensor([0., 1., 1.], grad_fn=<ATanBackward>)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from evefx.errors import OptionError

__all__ = [
    "Surrogate",
    "Sigmoid",
    "PiecewiseQuadratic",
    "SoftSign",
    "ATan",
    "NonzeroSignLogAbs",
    "Erf",
    "PiecewiseLeakyReLU",
    "FastSigmoid",
    "Triangle",
    "SURROGATES",
    "surrogate",
    "spike_fn",
    "heaviside",
]

_LEAK = 0.01  # slope of piecewise_leaky_relu outside its window
_Fn = Callable[[torch.Tensor, float], torch.Tensor]


def heaviside(u: torch.Tensor) -> torch.Tensor:
    """``1`` where ``u >= 0`` else ``0``, in ``u``'s dtype (the forward of every surrogate).

    Example:
        >>> heaviside(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([0., 1., 1.])
    """
    return (u >= 0).to(u.dtype)


class Surrogate(torch.autograd.Function):
    """Base of the surrogate functions: Heaviside forward, ``derivative(u, alpha)`` backward.

    Subclasses define ``derivative`` and ``primitive`` as static methods; ``alpha`` is a float
    and gets no gradient.

    Example:
        >>> ATan.apply(torch.zeros(2, requires_grad=True), 2.0)
    """

    @staticmethod
    def derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def primitive(u: torch.Tensor, alpha: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def derivative_parts(cls, u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
        """``(d, scale)`` with ``derivative(u, alpha) == scale * d``: the fused neuron backward folds
        ``scale`` into its other multiplications instead of spending a pass on it.

        Example:
            >>> d, scale = ATan.derivative_parts(torch.tensor(0.0), 2.0); float(d * scale)
            1.0
        """
        return cls.derivative(u, alpha), 1.0

    @staticmethod
    def forward(ctx, u, alpha):
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return heaviside(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        # the subclass's derivative: autograd gives ctx the class it was applied from
        return grad * ctx._forward_cls.derivative(u, ctx.alpha), None


def _define(name: str, doc: str, primitive: _Fn, derivative: _Fn,
            parts: Callable[[torch.Tensor, float], tuple[torch.Tensor, float]] | None = None) -> type[Surrogate]:
    """The :class:`Surrogate` subclass ``name`` with these static ``primitive`` and ``derivative``
    (and ``derivative_parts`` when given); autograd names its backward ``<name>Backward``."""
    body: dict[str, Any] = {"__doc__": doc, "__module__": __name__, "__qualname__": name,
                            "primitive": staticmethod(primitive), "derivative": staticmethod(derivative)}
    if parts is not None:
        body["derivative_parts"] = classmethod(lambda cls, u, alpha: parts(u, alpha))
    # built by Surrogate's metaclass (autograd's FunctionMeta), which mypy cannot call
    return type(Surrogate)(name, (Surrogate,), body)  # type: ignore[misc]


# Each surrogate's primitive g and derivative g' (in place where the input is a fresh tensor: the
# fused neuron backward calls them on [T, B, ...] tensors, where every full pass costs).

def _sigmoid_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    s = torch.sigmoid(alpha * u)
    return s.mul_(1 - s).mul_(alpha)


def _quadratic_pieces(u: torch.Tensor, alpha: float, top: float) -> torch.Tensor:
    """0 below ``-1/alpha``, ``top`` above ``1/alpha``, two parabolas (scaled by ``top``) between."""
    w = 1.0 / alpha
    inner = torch.where(u < 0, 0.5 * (alpha * u + 1) ** 2, 1 - 0.5 * (alpha * u - 1) ** 2) * top
    return torch.where(u <= -w, torch.zeros_like(u), torch.where(u >= w, torch.full_like(u, top), inner))


def _soft_sign_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    d = u.abs().mul_(alpha).add_(1.0)
    return d.mul_(d).reciprocal_().mul_(alpha / 2)


def _atan_parts(u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
    # 1 + (c u)^2 in one pass (addcmul on a 0-dim one), the reciprocal in place, the factor
    # alpha/2 left to the caller
    c = math.pi / 2 * alpha
    one = torch.ones((), dtype=u.dtype, device=u.device)
    return torch.addcmul(one, u, u, value=c * c).reciprocal_(), alpha / 2


def _atan_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    d, scale = _atan_parts(u, alpha)
    return d.mul_(scale)


def _sign_log_primitive(u: torch.Tensor, alpha: float) -> torch.Tensor:
    sign = torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))
    return sign * torch.log1p(alpha * u.abs())


def _erf_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    au = u * alpha
    return au.mul_(au).neg_().exp_().mul_(alpha / math.sqrt(math.pi))


def _leaky_ramp(u: torch.Tensor, alpha: float) -> torch.Tensor:
    w = 1.0 / alpha
    inside = 0.5 * alpha * u + 0.5
    return torch.where(u < -w, _LEAK * (u + w), torch.where(u > w, 1 + _LEAK * (u - w), inside))


def _fast_sigmoid_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    d = u.abs().mul_(alpha).add_(1.0)
    return d.mul_(d).reciprocal_()


Sigmoid = _define("Sigmoid", """``g(u) = sigmoid(alpha u)``; ``g'(u) = alpha s (1 - s)`` with ``s = g(u)``.

    Example:
        >>> Sigmoid.derivative(torch.tensor(0.0), 4.0)
        tensor(1.)
    """, lambda u, alpha: torch.sigmoid(alpha * u), _sigmoid_derivative)

PiecewiseQuadratic = _define(
    "PiecewiseQuadratic", """``g'(u) = alpha - alpha^2 |u|`` inside ``|u| < 1/alpha``, 0 outside (a triangle of area 1).

    ``g`` is 0 below ``-1/alpha``, 1 above ``1/alpha`` and two parabolas in between.

    Example:
        >>> PiecewiseQuadratic.derivative(torch.tensor([0.0, 0.25, 1.0]), 2.0)
        tensor([2., 1., 0.])
    """,
    lambda u, alpha: _quadratic_pieces(u, alpha, 1.0),
    lambda u, alpha: u.abs().mul_(-alpha * alpha).add_(alpha).clamp_min_(0.0),
)

SoftSign = _define("SoftSign", """``g(u) = (1 + alpha u / (1 + alpha |u|)) / 2``; ``g'(u) = alpha / (2 (1 + alpha|u|)^2)``.

    Example:
        >>> SoftSign.derivative(torch.tensor(0.0), 2.0)
        tensor(1.)
    """, lambda u, alpha: 0.5 * (1 + alpha * u / (1 + (alpha * u).abs())), _soft_sign_derivative)

ATan = _define("ATan", """``g(u) = 1/2 + atan(pi/2 alpha u) / pi``; ``g'(u) = (alpha/2) / (1 + (pi/2 alpha u)^2)``.

    Example:
        >>> ATan.derivative(torch.tensor(0.0), 2.0)
        tensor(1.)
    """, lambda u, alpha: 0.5 + torch.atan((math.pi / 2 * alpha) * u) / math.pi, _atan_derivative, _atan_parts)

NonzeroSignLogAbs = _define(
    "NonzeroSignLogAbs", """``g(u) = sign(u) log(1 + alpha |u|)`` (sign(0) = 1); ``g'(u) = alpha / (1 + alpha |u|)``.

    Example:
        >>> NonzeroSignLogAbs.derivative(torch.tensor(0.5), 2.0)
        tensor(1.)
    """,
    _sign_log_primitive,
    lambda u, alpha: u.abs().mul_(alpha).add_(1.0).reciprocal_().mul_(alpha),
)

Erf = _define("Erf", """``g(u) = (1 + erf(alpha u)) / 2``; ``g'(u) = alpha / sqrt(pi) * exp(-(alpha u)^2)``.

    This is the exact derivative of ``g`` (a Gaussian integrating to 1).

    Example:
        >>> Erf.derivative(torch.tensor(0.0), 2.0)
        tensor(1.1284)
    """, lambda u, alpha: 0.5 * (1 + torch.erf(alpha * u)), _erf_derivative)

PiecewiseLeakyReLU = _define(
    "PiecewiseLeakyReLU", """``g'(u) = alpha / 2`` for ``|u| <= 1/alpha``, ``0.01`` outside; ``g`` rises from 0 to 1
    across the window and leaks with slope 0.01 beyond it.

    Example:
        >>> PiecewiseLeakyReLU.derivative(torch.tensor([0.0, 2.0]), 2.0)
        tensor([1.0000, 0.0100])
    """,
    _leaky_ramp,
    lambda u, alpha: torch.full_like(u, _LEAK).masked_fill_(u.abs() <= 1.0 / alpha, alpha / 2),
)

FastSigmoid = _define("FastSigmoid", """SuperSpike's ``g'(u) = 1 / (1 + alpha |u|)^2`` (peak 1); ``g(u) = u / (1 + alpha |u|)``.

    Example:
        >>> FastSigmoid.derivative(torch.tensor(0.5), 2.0)
        tensor(0.2500)
    """, lambda u, alpha: u / (1 + alpha * u.abs()), _fast_sigmoid_derivative)

Triangle = _define(
    "Triangle", """``g'(u) = max(0, 1 - alpha |u|)``: a triangle of height 1 and half-width ``1/alpha``
    (Bellec et al.'s pseudo-derivative, undamped). Unlike ``piecewise_quadratic`` its peak stays
    1 whatever ``alpha``; its area is ``1/alpha`` (``g`` is piecewise_quadratic's ``g / alpha``).

    Example:
        >>> Triangle.derivative(torch.tensor([0.0, 0.25, 1.0]), 2.0)
        tensor([1.0000, 0.5000, 0.0000])
    """,
    lambda u, alpha: _quadratic_pieces(u, alpha, 1.0 / alpha),
    lambda u, alpha: u.abs().mul_(-alpha).add_(1.0).clamp_min_(0.0),
)


SURROGATES: dict[str, type[Surrogate]] = {
    "sigmoid": Sigmoid,
    "piecewise_quadratic": PiecewiseQuadratic,
    "soft_sign": SoftSign,
    "atan": ATan,
    "nonzero_sign_log_abs": NonzeroSignLogAbs,
    "erf": Erf,
    "piecewise_leaky_relu": PiecewiseLeakyReLU,
    "fast_sigmoid": FastSigmoid,
    "triangle": Triangle,
}
"""Surrogate name (as in the spec) -> its autograd function."""


def surrogate(name: str) -> type[Surrogate]:
    """The surrogate class called ``name``; an unknown name lists the valid ones.

    Example:
        >>> surrogate("erf").derivative(torch.tensor(0.0), 1.0)
        tensor(0.5642)
    """
    try:
        return SURROGATES[name]
    except KeyError:
        raise OptionError(f"unknown surrogate {name!r}; valid names: {', '.join(SURROGATES)}") from None


def spike_fn(name: str, alpha: float = 2.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``u -> H(u)`` whose backward is surrogate ``name`` with sharpness ``alpha``.

    Example:
        >>> spike_fn("sigmoid", 4.0)(torch.tensor([0.3]))
        tensor([1.])
    """
    cls = surrogate(name)
    if not alpha > 0:
        raise OptionError(f"surrogate alpha must be > 0 (got {alpha})")
    alpha = float(alpha)

    def fn(u: torch.Tensor) -> torch.Tensor:
        return cls.apply(u, alpha)

    fn.__name__ = f"{name}_spike"
    fn.__doc__ = f"Heaviside forward, {name} surrogate (alpha={alpha}) backward."
    return fn
