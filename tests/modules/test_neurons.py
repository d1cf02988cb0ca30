"""Spiking neurons: hand-computed dynamics, fused multi-step == step loop, modes, state, eve protocol."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from evefx.errors import OptionError, ShapeError
from evefx.modules.neurons import IFNeuron, LIFNeuron, PLIFNeuron, multi_step
from evefx.modules.surrogate import ATan

KINDS = {"if": IFNeuron, "lif": LIFNeuron, "plif": PLIFNeuron}


def seq(values):
    """A [T*1, 1] time-folded input of one neuron."""
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)


# -- dynamics against sequences computed by hand ------------------------------------------------------

def test_if_hard_reset_by_hand():
    # v: 0.6, 1.2 -> fire, reset 0; 0.6; 1.2 -> fire; 0.6
    n = IFNeuron(timesteps=5, threshold=1.0, reset=0.0)
    out = n(seq([0.6] * 5))
    assert out.flatten().tolist() == [0, 1, 0, 1, 0]


def test_if_soft_reset_by_hand():
    # h: 0.6, 1.2 (fire, v=0.2), 0.8, 1.4 (fire, v=0.4), 1.0 (fire, v=0)
    n = IFNeuron(timesteps=5, threshold=1.0, reset=None).eval()
    out = n(seq([0.6] * 5).float())
    assert out.flatten().tolist() == [0, 1, 0, 1, 1]
    assert n.observations()["firing_rate"] == pytest.approx(3 / 5)


def test_lif_hard_reset_by_hand():
    # tau=2, x=1.5: h = v + (x - v)/2: 0.75, 1.125 fire -> 0, 0.75, 1.125 fire
    n = LIFNeuron(timesteps=4, tau=2.0, threshold=1.0, reset=0.0, record_in_training=True)
    out = n(seq([1.5] * 4))
    assert out.flatten().tolist() == [0, 1, 0, 1]
    assert n.observations()["membrane"] == pytest.approx((0.75 + 1.125) / 2)


def test_lif_leaks_toward_reset_value():
    # reset=-0.5, tau=2, x=0: h = v + (0 - (v + 0.5))/2 = v/2 - 0.25 starting from v=-0.5: -0.5, -0.5
    n = LIFNeuron(timesteps=2, tau=2.0, reset=-0.5).eval()
    n(seq([0.0, 0.0]))
    assert n.observations()["membrane"] == pytest.approx(-0.5)
    # soft reset LIF leaks toward 0: x=2 gives h0 = 1 (fires, v = 0), h1 = 0 + 2/2 = 1 (fires)
    soft = LIFNeuron(timesteps=2, tau=2.0, reset=None)
    assert soft(seq([2.0, 2.0])).flatten().tolist() == [1, 1]


def test_non_binary_emits_membrane_above_threshold():
    n = IFNeuron(timesteps=3, threshold=1.0, reset=0.0, binary=False)
    out = n(seq([0.7, 0.8, 1.5]))
    # h: 0.7, 1.5 (fire: 0.5), 1.5 (fire: 0.5)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))


def test_learnable_threshold_gets_the_surrogate_gradient():
    n = IFNeuron(timesteps=1, threshold=1.0, learnable_threshold=True)
    x = seq([0.5])
    n(x).sum().backward()
    # d out / d th = -atan'(0.5 - 1) with alpha 2: -(1) / (1 + (pi/2)^2)
    expected = -1.0 / (1 + (torch.pi / 2) ** 2)
    assert n.threshold.grad.item() == pytest.approx(expected, rel=1e-6)
    assert isinstance(n.threshold, torch.nn.Parameter)
    # a fixed threshold is a buffer (in the state dict, no gradient)
    fixed = IFNeuron()
    assert "threshold" in dict(fixed.named_buffers()) and not list(fixed.parameters())


def test_plif_tau_is_learned():
    n = PLIFNeuron(timesteps=3, tau=3.0)
    assert float(n.tau) == pytest.approx(3.0)
    n(torch.rand(6, 4)).sum().backward()
    assert n.w.grad is not None and n.w.grad.item() != 0.0


# -- the fused multi-step function equals the step-by-step loop -----------------------------------------

CONFIGS = list(itertools.product(
    ["if", "lif", "plif"],          # kind
    [0.0, None, -0.2],              # reset (None = soft)
    [True, False],                  # binary
    [True, False],                  # time_dependent
))


def make(kind, reset, binary, time_dependent, learn=True, neuron_wise=True, T=5, C=3):
    torch.manual_seed(0)
    kw = dict(channels=C, neuron_wise=neuron_wise, learnable_threshold=learn,
              learnable_reset=learn and reset is not None, binary=binary, time_dependent=time_dependent)
    if kind != "if":
        kw["tau"] = 2.5
    n = KINDS[kind](T, 0.8, reset, **kw).double()
    if learn:
        with torch.no_grad():  # distinct per-channel values
            n.threshold.add_(torch.linspace(-0.2, 0.3, C) if neuron_wise else 0.1)
            if reset is not None:
                n.reset.add_(torch.linspace(-0.1, 0.1, C) if neuron_wise else 0.05)
    return n


def loop(neuron, x):
    """The reference: the same neuron driven one step at a time with ordinary autograd."""
    ref = copy.deepcopy(neuron)
    ref.set_mode(step="single")
    T = ref.timesteps
    steps = x.reshape(T, -1, *x.shape[1:])
    return torch.cat([ref(steps[t]) for t in range(T)]), ref


@pytest.mark.parametrize("kind,reset,binary,time_dependent", CONFIGS)
def test_multi_step_equals_step_loop(kind, reset, binary, time_dependent):
    n = make(kind, reset, binary, time_dependent)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5 * 4, 3, 2, 2, generator=g, dtype=torch.float64) * 1.6 - 0.2).requires_grad_()
    w = torch.randn(5 * 4, 3, 2, 2, generator=g, dtype=torch.float64)
    out = n(x)
    x_ref = x.detach().clone().requires_grad_()
    out_ref, ref = loop(n, x_ref)
    assert torch.equal(out, out_ref), "forward must match the loop bit for bit"
    assert 0 < float((out != 0).double().mean()) < 1, "test input should make some neurons fire"
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p), (_, q) in zip(n.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


def test_multi_step_equals_loop_in_float32_and_shared_parameters():
    n = make("lif", 0.0, True, True, neuron_wise=False, T=8).float()
    x = (torch.rand(8 * 2, 3, 4, generator=torch.Generator().manual_seed(2)) * 1.5).requires_grad_()
    out = n(x)
    x_ref = x.detach().clone().requires_grad_()
    out_ref, ref = loop(n, x_ref)
    assert torch.equal(out, out_ref)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n.threshold.grad, ref.threshold.grad, rtol=1e-5, atol=1e-5)


def test_fixed_parameters_still_give_input_gradient_like_the_loop():
    n = LIFNeuron(4, 1.0, 0.0, tau=2.0).double()
    x = (torch.rand(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    n(x).sum().backward()
    out_ref, _ = loop(n, x_ref)
    out_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,reset,time_dependent,neuron_wise,surrogate",
                         [(k, r, td, nw, sg) for k, r, td, nw, sg in itertools.product(
                             ("if", "lif"), (0.0, 0.3, None), (True, False), (True, False), ("atan", "sigmoid"))
                          if not (nw and sg == "sigmoid")])
def test_fixed_parameter_fast_backward_equals_the_loop(kind, reset, time_dependent, neuron_wise, surrogate):
    """Binary neurons with fixed parameters take the short backward (scale and leak folded into
    the multiply-adds); it must give the loop's input gradient for every reset and threshold shape."""
    kw = dict(channels=3, neuron_wise=neuron_wise, time_dependent=time_dependent, surrogate=surrogate, alpha=3.0)
    if kind == "lif":
        kw["tau"] = 2.5
    n = KINDS[kind](6, 0.8, reset, **kw).double()
    if neuron_wise:
        with torch.no_grad():
            n.threshold.copy_(torch.tensor([0.5, 0.8, 1.1], dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(6 * 3, 3, 2, generator=g, dtype=torch.float64) * 1.6 - 0.2).requires_grad_()
    w = torch.randn(6 * 3, 3, 2, generator=g, dtype=torch.float64)
    x_ref = x.detach().clone().requires_grad_()
    out = n(x)
    out_ref, _ = loop(n, x_ref)
    assert torch.equal(out, out_ref)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_multi_step_saves_only_the_membrane():
    """Memory: autograd keeps one float tensor [T, B, ...] (h) and not per-step graphs."""
    n = LIFNeuron(8, channels=4, neuron_wise=True)
    x = torch.rand(8 * 2, 4, 3, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        n(x)
    big = [t for t in saved if t.numel() > 4]
    assert len(big) == 1 and big[0].shape == (8, 2, 4, 3, 3) and big[0].dtype == torch.float32


def test_functional_multi_step_example():
    out, h = multi_step(torch.ones(3, 1), 1.0, 0.0, 0.5)
    assert out.flatten().tolist() == [0.0, 0.0, 0.0]
    assert h.flatten().tolist() == [0.5, 0.75, 0.875]


# -- state, modes, protocol ---------------------------------------------------------------------------------

def test_state_does_not_leak_between_forwards_or_models():
    x = torch.rand(4 * 3, 6, generator=torch.Generator().manual_seed(4)) * 2
    a, b = LIFNeuron(4), LIFNeuron(4)
    first = a(x)
    a(torch.ones_like(x) * 5)  # a different sequence in between
    assert torch.equal(a(x), first), "multi-step forwards start from a fresh membrane"
    assert torch.equal(b(x), first)
    # single-step: membrane kept between calls, cleared by reset_state, private to each model
    a.set_mode(step="single")
    b.set_mode(step="single")
    s1 = a(torch.full((1, 1), 0.6))
    b(torch.full((1, 1), 0.9))
    assert a._v is not None and not torch.equal(a._v, b._v)
    a.reset_state()
    assert torch.equal(a(torch.full((1, 1), 0.6)), s1)


def test_single_step_integrates_across_calls():
    n = IFNeuron(threshold=1.0)
    n.set_mode(step="single")
    outs = [n(torch.tensor([[0.6]])).item() for _ in range(4)]
    assert outs == [0, 1, 0, 1]
    assert n.observations()["firing_rate"] == pytest.approx(0.5)
    n.reset_state()
    assert n.observations()["firing_rate"] == pytest.approx(0.5), "stats stay readable after reset"
    n(torch.tensor([[0.0]]))
    assert n.observations()["firing_rate"] == 0.0, "the next step restarts them"


@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_non_spiking_mode_is_relu_or_leaky_relu(kind):
    n = KINDS[kind](4)
    n.set_mode(spiking=False)
    x = torch.randn(7, 3, 5)
    expected = F.relu(x) if kind == "if" else F.leaky_relu(x, 0.01)
    assert torch.equal(n(x), expected)
    n.set_mode(spiking=True)
    assert set(n(torch.randn(8, 3)).unique().tolist()) <= {0.0, 1.0}


def test_observations_per_channel_and_silent_fraction():
    n = IFNeuron(2, channels=3, neuron_wise=True)
    n(torch.ones(2, 3, 1))
    assert n.observations() == {}, "multi-step forwards in training mode record nothing by default"
    n.eval()
    x = torch.zeros(2 * 1, 3, 1)
    x[:, 0] = 2.0   # fires every step
    x[:, 1] = 0.6   # fires at the second step
    out = n(x)
    assert out[:, 0].sum() == 2 and out[:, 1].sum() == 1
    assert n.channel_firing_rates().tolist() == [1.0, 0.5, 0.0]
    obs = n.observations()
    assert obs["firing_rate"] == pytest.approx(0.5)
    assert obs["silent_channels"] == pytest.approx(1 / 3)


def test_eve_parameters_only_with_upgrade():
    assert LIFNeuron().eve_ranges() == {}
    n = LIFNeuron(threshold=0.5, tau=3.0, channels=2, neuron_wise=True, upgrade=True)
    assert set(n.eve_ranges()) == {"threshold", "tau"}
    n.set_eve("threshold", 1.5)
    with pytest.raises(OptionError, match=r"^LIFNeuron.tau must be between 1 and 16 \(got 100.0\)$"):
        n.set_eve("tau", 100.0)  # out of range: an error, never silently clipped (issue 12, item 5)
    n.set_eve("tau", 16.0)
    assert n.get_eve("threshold") == 1.5 and n.threshold.tolist() == [1.5, 1.5]
    assert n.get_eve("tau") == 16.0
    assert set(PLIFNeuron(upgrade=True).eve_ranges()) == {"threshold"}
    # the eve parameters travel with the state dict
    m = LIFNeuron(channels=2, neuron_wise=True, upgrade=True)
    m.load_state_dict(n.state_dict())
    assert m.get_eve("threshold") == 1.5 and m.get_eve("tau") == 16.0


def test_tau_changes_the_dynamics():
    # h_t = 1.2 (1 - (1 - 1/tau)^(t+1)): tau=1 fires at once, tau=8 needs 14 steps to reach 1
    x = seq([1.2] * 6)
    assert LIFNeuron(6, tau=1.0)(x).sum() == 6
    assert LIFNeuron(6, tau=8.0)(x).sum() == 0


def test_shape_errors_name_the_problem():
    with pytest.raises(ShapeError, match="T\\*batch"):
        LIFNeuron(4)(torch.rand(6, 2))
    with pytest.raises(ShapeError, match="channels=5"):
        LIFNeuron(2, channels=3, neuron_wise=True)(torch.rand(4, 5))
    with pytest.raises(ValueError, match="needs channels"):
        LIFNeuron(neuron_wise=True)
    with pytest.raises(ValueError, match="valid names"):
        LIFNeuron(surrogate="nope")


def test_surrogate_choice_reaches_the_fused_backward():
    n = IFNeuron(1, threshold=1.0, surrogate="atan", alpha=3.0)
    x = torch.tensor([[0.7]], dtype=torch.float64, requires_grad=True)
    n(x).sum().backward()
    assert x.grad.item() == pytest.approx(ATan.derivative(torch.tensor(-0.3, dtype=torch.float64), 3.0).item())


@pytest.mark.parametrize("cls, kw", [(IFNeuron, {"reset": 0.0}), (LIFNeuron, {"reset": None}),
                                     (PLIFNeuron, {"reset": 0.1, "threshold": 0.7})])
def test_a_half_precision_input_under_autocast_integrates_in_float32(cls, kw):
    # autocast hands the neuron bf16 conv outputs while its threshold and leak stay float32: the
    # fused recurrence wrote float32 values into a bf16 buffer and failed
    torch.manual_seed(0)
    neuron = cls(timesteps=4, **kw)
    x = (torch.randn(4 * 3, 5) * 2).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neuron(x)
    out.sum().backward()
    reference = copy.deepcopy(neuron)
    x32 = x.detach().float().requires_grad_()
    expected = reference(x32)
    expected.sum().backward()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert x.grad.dtype == torch.bfloat16 and torch.allclose(x.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)
