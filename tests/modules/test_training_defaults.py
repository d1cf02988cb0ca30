"""The options that make spiking and low-bit networks train under a plain recipe: data-dependent
thresholds, the threshold-relative surrogate, the learned-step warm-up and progressive bits."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from evefx.errors import OptionError, QuantizationError
from evefx.modules.neurons import IFNeuron, LIFNeuron, multi_step
from evefx.modules import Quantizer, affine_from_range
from evefx.modules.surrogate import ATan


# -- data-dependent threshold -----------------------------------------------------------------------

@pytest.mark.parametrize("cls, k", [(LIFNeuron, 0.5), (IFNeuron, 1.0)])
def test_data_init_sets_threshold_from_first_batch_std(cls, k):
    torch.manual_seed(0)
    x = torch.randn(4 * 8, 3, 5, 5) * 3.0 + 1.0
    n = cls(timesteps=4, threshold=1.0, channels=3, neuron_wise=True, threshold_std=1.5).train()
    assert not bool(n.threshold_ready)
    n(x)
    expected = 1.5 * float(x.std()) * k  # LIF (tau 2) sees x / tau
    assert n.threshold.tolist() == pytest.approx([expected] * 3, rel=1e-5)
    assert bool(n.threshold_ready)
    n(x * 10)  # only the first batch counts
    assert n.threshold.tolist() == pytest.approx([expected] * 3, rel=1e-5)


def test_data_init_survives_state_dict_and_is_off_by_default():
    a = LIFNeuron(timesteps=2, threshold_std=1.0)
    a(torch.randn(2 * 4, 6))
    b = LIFNeuron(timesteps=2, threshold_std=1.0)
    b.load_state_dict(a.state_dict())
    b(torch.randn(2 * 4, 6) * 100)
    assert float(b.threshold) == float(a.threshold)
    plain = LIFNeuron(timesteps=2, threshold=0.7)
    plain(torch.randn(2 * 4, 6))
    assert float(plain.threshold) == pytest.approx(0.7) and "threshold_ready" not in plain.state_dict()
    with pytest.raises(OptionError, match="threshold_std must be > 0"):
        LIFNeuron(threshold_std=0.0)


# -- threshold-relative surrogate ---------------------------------------------------------------------


@pytest.mark.parametrize("reset", [0.0, -0.5, None])
def test_learned_threshold_stays_above_the_reset(reset):
    """A learnable threshold pushed to or below its reset (Adam's fixed-size steps did it in ~100
    steps from a data-dependent 0.09) is put back just above it before the next forward."""
    n = LIFNeuron(timesteps=2, threshold=0.2, reset=reset, channels=3, neuron_wise=True, learnable_threshold=True)
    with torch.no_grad():
        n.threshold.copy_(torch.tensor([-1.0, 0.5, -0.5 if reset is None else reset]))
    n(torch.rand(4, 3))
    floor = (0.0 if reset is None else reset) + 1e-3
    assert torch.allclose(n.threshold.detach(), torch.tensor([floor, 0.5, floor]))
    fixed = LIFNeuron(timesteps=2, threshold=-1.0, reset=0.0)  # a buffer the user set: left as it is
    fixed(torch.rand(4, 3))
    assert float(fixed.threshold) == -1.0

@pytest.mark.parametrize("th", [0.25, torch.tensor([0.2, 0.5, 2.0]).reshape(1, 3)])
def test_relative_surrogate_is_g_of_u_over_th_divided_by_th(th):
    h = torch.tensor([[0.1, 0.45, 1.0], [-0.3, 0.6, 2.5]], dtype=torch.float64)
    x = h.unsqueeze(0).clone().requires_grad_(True)  # T = 1, IF: h = x
    th64 = th if isinstance(th, float) else th.double()
    out, _ = multi_step(x, th64, 0.0, None, surrogate="atan", alpha=2.0, relative=True)
    out.sum().backward()
    expected = ATan.derivative((h - th64) / th64, 2.0) / th64
    assert torch.allclose(x.grad[0], expected)


def test_relative_surrogate_changes_nothing_at_threshold_one_and_matches_the_step_loop():
    torch.manual_seed(1)
    x = torch.randn(5 * 3, 4, dtype=torch.float64)
    grads = []
    for relative in (False, True):
        xi = x.clone().requires_grad_(True)
        LIFNeuron(timesteps=5, threshold=1.0, relative_surrogate=relative).double()(xi).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    # at threshold 0.3, fused (fast and full backward) == single-step autograd
    for learnable in (False, True):
        fused = LIFNeuron(timesteps=5, threshold=0.3, relative_surrogate=True, learnable_threshold=learnable).double()
        loop = LIFNeuron(timesteps=5, threshold=0.3, relative_surrogate=True, learnable_threshold=learnable).double()
        loop.set_mode(step="single")
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fused(xa).pow(2).sum().backward()
        torch.stack([loop(s) for s in xb.reshape(5, 3, 4)]).pow(2).sum().backward()
        assert torch.allclose(xa.grad, xb.grad)
        if learnable:
            assert torch.allclose(fused.threshold.grad, loop.threshold.grad)


# -- learned-step warm-up ---------------------------------------------------------------------------

def test_init_steps_follow_the_range_then_initialise_the_learned_step():
    torch.manual_seed(0)
    q = Quantizer(2, "lsq", init_steps=3, momentum=0.5).train()
    for step in range(3):
        x = torch.randn(64, requires_grad=True)
        out = q(x)
        scale, _ = affine_from_range(q.range_min, q.range_max, *q.quant_range(), True, True)
        assert torch.allclose(q.scale.detach(), scale), step  # the range's grid during the warm-up
        out.sum().backward()
        assert q.scale.grad is None  # straight-through: the step is not trained yet
    assert int(q.steps) == 3
    x = torch.randn(64)
    settled = copy.deepcopy(q)
    settled._track(*settled._batch_range(x))  # this batch updates the range first
    expected, _ = settled._llsq_search(x, *q.quant_range(), error="l2")  # LSQ+'s search from the settled range
    q(x)
    assert torch.allclose(q.scale.detach(), expected)
    q(torch.randn(64) * 5).sum().backward()
    assert q.scale.grad is not None  # now learned


def test_lsq_gradient_scale_is_one_over_sqrt_n_qp():
    x = torch.tensor([0.3, -0.7, 1.4, 0.05])
    q = Quantizer(4, "lsq").train()
    q(x)  # initialise
    q.scale.grad = None
    q(x).sum().backward()
    s = q.scale.detach()
    v = x / s
    qmin, qmax = q.quant_range()
    ds = torch.where(v <= qmin, float(qmin), torch.where(v >= qmax, float(qmax), torch.round(v) - v))
    assert float(q.scale.grad) == pytest.approx(float(ds.sum()) / math.sqrt(4 * 7), rel=1e-5)


# -- progressive bits ---------------------------------------------------------------------------------

def test_bits_schedule_lowers_bits_at_the_given_steps():
    q = Quantizer(2, "lsq", bits_schedule=((0, 8), (2, 4), (4, 2))).train()
    seen = []
    for _ in range(6):
        q(torch.randn(32))
        seen.append(int(q.bits))
    assert seen == [8, 8, 4, 4, 2, 2]
    q.eval()(torch.randn(32))
    assert int(q.bits) == 2 and int(q.steps) == 6  # eval forwards do not count


def test_bits_schedule_errors():
    with pytest.raises(QuantizationError, match="rising steps starting at 0"):
        Quantizer(2, bits_schedule=((1, 8), (2, 2)))
    with pytest.raises(QuantizationError, match="bits_schedule and bit_range"):
        Quantizer(2, bits_schedule=((0, 8), (2, 2)), bit_range=(2, 8))


def test_each_schedule_stage_warms_up_again():
    torch.manual_seed(0)
    q = Quantizer(2, "lsq", init_steps=2, bits_schedule=((0, 8), (4, 2))).train()
    warm = []
    for _ in range(8):
        x = torch.randn(32, requires_grad=True)
        q(x).sum().backward()
        warm.append(q.scale.grad is None)
        q.scale.grad = None
    # steps 0-1 and 4-5 follow the range (straight-through), the others train the step
    assert warm == [True, True, False, False, True, True, False, False]
