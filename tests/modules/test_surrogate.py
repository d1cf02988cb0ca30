"""Surrogate spike functions: Heaviside forward, backward equal to the documented formula and to
the true derivative of the documented primitive (gradcheck in double)."""
from __future__ import annotations

import math

import pytest
import torch

from evefx.modules.surrogate import SURROGATES, heaviside, spike_fn, surrogate

A = 2.0
# The derivative of each surrogate, written out independently of the library code.
FORMULAS = {
    "sigmoid": lambda u, a: a * torch.sigmoid(a * u) * (1 - torch.sigmoid(a * u)),
    "piecewise_quadratic": lambda u, a: torch.where(u.abs() < 1 / a, a - a * a * u.abs(), torch.zeros_like(u)),
    "soft_sign": lambda u, a: a / (2 * (1 + a * u.abs()) ** 2),
    "atan": lambda u, a: a / 2 / (1 + (math.pi / 2 * a * u) ** 2),
    "nonzero_sign_log_abs": lambda u, a: a / (1 + a * u.abs()),
    "erf": lambda u, a: a / math.sqrt(math.pi) * torch.exp(-(a * u) ** 2),
    "piecewise_leaky_relu": lambda u, a: torch.where(u.abs() <= 1 / a, torch.full_like(u, a / 2), torch.full_like(u, 0.01)),
    "fast_sigmoid": lambda u, a: 1 / (1 + a * u.abs()) ** 2,
    "triangle": lambda u, a: torch.where(u.abs() < 1 / a, 1 - a * u.abs(), torch.zeros_like(u)),
}
# Points away from the kinks of the piecewise surrogates (|u| = 0, 1/alpha = 0.5 for alpha 2).
POINTS = torch.tensor([-1.7, -0.9, -0.45, -0.3, -0.1, 0.07, 0.2, 0.35, 0.48, 0.8, 1.3], dtype=torch.float64)


def test_the_nine_surrogates_are_registered():
    assert set(SURROGATES) == set(FORMULAS)
    from evefx.spec.spike import SURROGATES as SPEC_NAMES

    assert set(SPEC_NAMES) == set(SURROGATES), "spec and modules must offer the same names"


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_forward_is_heaviside(name):
    u = torch.tensor([-2.0, -1e-7, 0.0, 1e-7, 3.0], requires_grad=True)
    out = surrogate(name).apply(u, A)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert torch.equal(spike_fn(name, A)(u), out)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_backward_matches_formula(name, alpha):
    u = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    grad_out = torch.linspace(0.5, 1.5, 41, dtype=torch.float64)
    surrogate(name).apply(u, alpha).backward(grad_out)
    expected = grad_out * FORMULAS[name](u.detach(), alpha)
    torch.testing.assert_close(u.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_derivative_is_the_derivative_of_the_primitive(name):
    """gradcheck a function whose forward is the documented primitive and whose backward is the
    surrogate's derivative: it fails when the derivative is not the primitive's (the seed's erf bug)."""
    cls = surrogate(name)

    class Smooth(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return cls.primitive(u, A)

        @staticmethod
        def backward(ctx, g):
            (u,) = ctx.saved_tensors
            return g * cls.derivative(u, A)

    u = POINTS.clone().requires_grad_()
    assert torch.autograd.gradcheck(Smooth.apply, (u,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sigmoid", "piecewise_quadratic", "soft_sign", "atan", "erf", "piecewise_leaky_relu"])
def test_primitive_approaches_the_step(name):
    """The primitives that are smoothed steps go from 0 to 1 (so they agree with the forward far from 0)."""
    cls = surrogate(name)
    far = torch.tensor([-50.0, 50.0], dtype=torch.float64)
    lo, hi = cls.primitive(far, A).tolist()
    if name == "piecewise_leaky_relu":  # leaks with slope 0.01 outside its window
        lo, hi = lo + 0.01 * (50 - 0.5), hi - 0.01 * (50 - 0.5)
    assert lo == pytest.approx(0.0, abs=1e-2) and hi == pytest.approx(1.0, abs=1e-2)
    assert cls.primitive(torch.tensor(0.0, dtype=torch.float64), A).item() == pytest.approx(0.5)


def test_erf_integrates_to_one_like_atan():
    """The corrected erf surrogate is a proper density: its derivative integrates to 1."""
    u = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    for name in ("erf", "atan", "sigmoid", "piecewise_quadratic"):
        area = torch.trapezoid(surrogate(name).derivative(u, A), u).item()
        assert area == pytest.approx(1.0, abs=2e-2), name


def test_alpha_sharpens():
    u = torch.tensor(0.0)
    assert surrogate("atan").derivative(u, 4.0) > surrogate("atan").derivative(u, 2.0)
    near = torch.tensor(0.3)
    assert surrogate("erf").derivative(near, 4.0) < surrogate("erf").derivative(near, 2.0)


def test_errors_and_helpers():
    with pytest.raises(ValueError, match="valid names: sigmoid"):
        surrogate("gauss")
    with pytest.raises(ValueError, match="> 0"):
        spike_fn("atan", 0.0)
    assert heaviside(torch.tensor([-1.0, 0.0])).tolist() == [0.0, 1.0]


def test_documented_overlaps_between_families():
    u = torch.linspace(-2, 2, 101, dtype=torch.float64)
    assert torch.allclose(surrogate("fast_sigmoid").derivative(u, 2.0), surrogate("soft_sign").derivative(u, 2.0))
    assert torch.allclose(surrogate("triangle").derivative(u, 1.0), surrogate("piecewise_quadratic").derivative(u, 1.0))
    # and they differ elsewhere: fast_sigmoid keeps peak 1, soft_sign's peak is alpha/2
    zero = torch.zeros(1, dtype=torch.float64)
    assert surrogate("fast_sigmoid").derivative(zero, 4.0).item() == 1.0
    assert surrogate("soft_sign").derivative(zero, 4.0).item() == 2.0


@pytest.mark.parametrize("alpha", [0.5, 3.0])
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_derivative_parts_multiply_to_the_formula(name, alpha):
    """The fused neuron backward uses ``scale * d`` from ``derivative_parts``: it must be the derivative."""
    d, scale = surrogate(name).derivative_parts(POINTS.clone(), alpha)
    torch.testing.assert_close(d * scale, FORMULAS[name](POINTS, alpha), rtol=1e-12, atol=1e-14)
