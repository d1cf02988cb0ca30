"""evefx.modules quantizer, quant_layers, quant_functions: reference values computed by hand, gradients, trackers, errors, BN folding."""
from __future__ import annotations

import copy
import io
import math

import pytest
import numpy as np
import torch
from torch import nn

from evefx.errors import QuantizationError
from evefx.modules.protocol import EveRange
from evefx.modules import (
    QuantConv2d,
    Quantizer,
    QuantLinear,
    affine_from_range,
    levels,
    lsq_quantize,
)


def quantize_once(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """One training-mode forward: the range is taken from ``x`` itself."""
    return Quantizer(**kwargs).train()(x)


def manual(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """The affine mapping written out from ``qparams()`` (what an exporter reproduces)."""
    scale, zp, qmin, qmax, axis = q.qparams()
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


# ------------------------------------------------------------------ hand-computed values
def test_levels():
    assert levels(8, True) == (-128, 127)
    assert levels(8, False) == (0, 255)
    assert levels(2, True) == (-2, 1)
    assert levels(1, True) == (-1, 0) and levels(1, False) == (0, 1)
    assert levels(16, True) == (-32768, 32767)


def test_8bit_symmetric_per_channel():
    w = torch.tensor([[0.49, -1.0, 0.25], [2.0, 1.1, -0.3]])
    q = Quantizer(8, "round", "per_channel", num_channels=2, tracker="global").train()
    out = q(w)
    # channel 0: s = 1/127 -> codes 62.23->62, -127, 31.75->32; channel 1: s = 2/127 -> 127, 69.85->70, -19.05->-19
    expected = torch.tensor([[62 / 127, -1.0, 32 / 127], [2.0, 140 / 127, -38 / 127]])
    assert torch.allclose(out, expected, atol=1e-6)
    scale, zp, qmin, qmax, axis = q.qparams()
    assert torch.allclose(scale, torch.tensor([1 / 127, 2 / 127]))
    assert zp.dtype == torch.int64 and zp.tolist() == [0, 0]
    assert (qmin, qmax, axis) == (-128, 127, 0)


def test_4bit_asymmetric_unsigned():
    x = torch.tensor([-0.3, 0.0, 0.7, 1.2, 0.46, 0.04])
    q = Quantizer(4, symmetric=False, signed=False).train()
    out = q(x)
    # s = (1.2 + 0.3) / 15 = 0.1, z = 0 - round(-0.3 / 0.1) = 3
    assert torch.allclose(out, torch.tensor([-0.3, 0.0, 0.7, 1.2, 0.5, 0.0]), atol=1e-6)
    scale, zp, qmin, qmax, axis = q.qparams()
    assert math.isclose(float(scale), 0.1, rel_tol=1e-6) and int(zp) == 3 and (qmin, qmax, axis) == (0, 15, None)


def test_2bit_signed_symmetric_is_ternary():
    x = torch.tensor([-1.0, -0.4, 0.2, 0.6, 0.9])
    # levels [-2, 1], s = amax / max(qmax, 1) = 1.0
    assert quantize_once(x, bits=2).tolist() == [-1.0, 0.0, 0.0, 1.0, 1.0]


def test_2bit_unsigned_asymmetric():
    x = torch.tensor([0.0, 0.6, 1.4, 3.0])
    # s = 3 / 3 = 1, z = 0
    assert quantize_once(x, bits=2, signed=False, symmetric=False).tolist() == [0.0, 1.0, 1.0, 3.0]


def test_1bit():
    # unsigned symmetric: levels {0, 1}, s = max = 1.0; negatives clip to 0
    assert quantize_once(torch.tensor([0.2, 0.7, 1.0, -0.5]), bits=1, signed=False).tolist() == [0.0, 1.0, 1.0, 0.0]
    # signed symmetric: levels {-1, 0}, s = amax = 0.8; 0.6 / 0.8 = 0.75 rounds to 1 and clips to 0
    out = quantize_once(torch.tensor([-0.8, -0.3, 0.6]), bits=1)
    assert torch.allclose(out, torch.tensor([-0.8, 0.0, 0.0]))


@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, False), (True, False), (False, True)])
def test_constant_tensor_is_exact(signed, symmetric):
    x = torch.full((3, 4), 3.0)
    assert torch.allclose(quantize_once(x, bits=8, signed=signed, symmetric=symmetric), x, atol=1e-6)


def test_negative_constant_asymmetric_unsigned():
    # lo = -2, hi = 0 -> s = 2/15, z = 15: the single value maps to code 0 -> (0 - 15) * s = -2
    x = torch.full((5,), -2.0)
    q = Quantizer(4, symmetric=False, signed=False).train()
    assert torch.allclose(q(x), x, atol=1e-6)
    assert int(q.qparams()[1]) == 15


@pytest.mark.parametrize("fn", ["round", "lsq", "llsq"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_all_zero_tensor(fn, granularity):
    x = torch.zeros(2, 3)
    q = Quantizer(4, fn, granularity, num_channels=2, symmetric=False).train()
    out = q(x)
    assert torch.equal(out, x)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


def test_one_huge_outlier():
    x = torch.tensor([0.1, -0.2, 0.3, 1000.0])
    q = Quantizer(8).train()
    q(x)
    q.eval()
    out = q(x)
    # s = 1000 / 127 = 7.87: every small value rounds to 0, the outlier is kept
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.0, 1000.0]))
    obs = q.observations()
    assert math.isclose(obs["quant_error"], 0.15, rel_tol=1e-5)
    assert obs["clipped"] == 0.0 and obs["max"] == 1000.0 and obs["bits"] == 8.0


def test_16_bits_is_nearly_float():
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(quantize_once(x, bits=16), x, atol=float(x.abs().max()) / 32767)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=8),
        dict(bits=4, symmetric=False, signed=False),
        dict(bits=3, symmetric=False),
        dict(bits=6, granularity="per_channel", num_channels=3, ch_axis=1),
        dict(bits=4, fn="lsq"),
        dict(bits=5, fn="llsq", granularity="per_channel", num_channels=3, ch_axis=1, symmetric=False),
        dict(bits=4, fn="round", learnable_scale=True, signed=False, symmetric=False),
    ],
)
def test_eval_forward_matches_qparams(kwargs):
    g = torch.Generator().manual_seed(2)
    q = Quantizer(**kwargs).train()
    q(torch.randn(8, 3, 5, generator=g))
    q.eval()
    x = torch.randn(8, 3, 5, generator=g) * 1.5
    assert torch.allclose(q(x), manual(x, q), atol=1e-6)


# ------------------------------------------------------------------ gradients
def test_ste_passes_inside_and_zeroes_outside():
    q = Quantizer(4).train()
    q(torch.tensor([-1.0, 1.0]))  # s = 1/7, codes [-8, 7]
    q.eval()
    x = torch.tensor([-2.0, -1.2, 0.3, 1.05, 1.1, 3.0], requires_grad=True)
    q(x).sum().backward()
    # -1.2*7 = -8.4 -> -8 (inside); 1.05*7 = 7.35 -> 7 (inside); 1.1*7 = 7.7 -> 8 (outside)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def lsq_reference(x, s, qn, qp):
    """Esser et al. 2019, eq. 3: d x̂ / d s."""
    v = x / s
    return torch.where(v <= -qn, -qn, torch.where(v >= qp, qp, torch.round(v) - v))


def test_lsq_scale_gradient_matches_paper_per_tensor():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    q = Quantizer(3, "lsq").train()
    upstream = torch.randn(4, 6, generator=g)
    (q(x) * upstream).sum().backward()
    s = q.scale.detach()
    qmin, qmax = levels(3, True)
    # init: the symmetric grid of least squared error among max|x|·i/40, i = 1..40 (computed in numpy)
    xs = x.detach().double().numpy()
    candidates = [np.abs(xs).max() * i / 40 / qmax for i in range(1, 41)]
    errors = [np.mean((np.clip(np.round(xs / c), qmin, qmax) * c - xs) ** 2) for c in candidates]
    assert math.isclose(float(s), candidates[int(np.argmin(errors))], rel_tol=1e-5)
    grad_factor = 1 / math.sqrt(x.numel() * qmax)
    expected = (upstream * lsq_reference(x.detach(), s, -qmin, qmax)).sum() * grad_factor
    assert torch.allclose(q.scale.grad, expected, atol=1e-6)
    v = x.detach() / s
    assert torch.equal(x.grad, upstream * ((v > qmin) & (v < qmax)))


def test_lsq_scale_gradient_matches_paper_per_channel():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 2, 3, 3, generator=g, requires_grad=True)
    q = Quantizer(4, "lsq", "per_channel", num_channels=3).train()
    upstream = torch.randn(3, 2, 3, 3, generator=g)
    (q(w) * upstream).sum().backward()
    s = q.scale.detach().reshape(3, 1, 1, 1)
    qmin, qmax = levels(4, True)
    grad_factor = 1 / math.sqrt(18 * qmax)
    expected = (upstream * lsq_reference(w.detach(), s, -qmin, qmax)).sum(dim=(1, 2, 3)) * grad_factor
    assert torch.allclose(q.scale.grad, expected, atol=1e-6)


def test_lsq_gradcheck_where_it_applies():
    # in the clipped regime x̂ = s * bound is smooth in s, so finite differences must agree
    x = torch.tensor([-9.0, -5.0, 4.0, 7.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lsq_quantize(a, b, -4, 3), (x, s))
    # and per channel with a broadcast scale
    xc = torch.tensor([[-9.0, 8.0], [6.0, -7.0]], dtype=torch.float64, requires_grad=True)
    sc = torch.tensor([[0.5], [0.25]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lsq_quantize(a, b, -4, 3), (xc, sc))


def test_learnable_round_uses_unscaled_gradient():
    x = torch.tensor([0.2, 0.9, -3.0], requires_grad=True)
    q = Quantizer(4, "round", learnable_scale=True).train()
    q(x).sum().backward()
    s = q.scale.detach()
    assert isinstance(q.scale, nn.Parameter)
    assert torch.allclose(q.scale.grad, lsq_reference(x.detach(), s, 8, 7).sum())


def test_llsq_init_beats_range_scale_and_regulariser():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, generator=g)
    x[0] = 40.0
    rnd, llsq = Quantizer(4).train(), Quantizer(4, "llsq", regularization="l2").train()
    err_round = (rnd(x) - x).square().mean()
    out = llsq(x)
    err_llsq = (out - x).square().mean()
    assert float(llsq.scale.detach()) < float(rnd.scale)  # clips the outlier
    assert err_llsq < 0.7 * err_round
    reg = llsq.regularization_loss()
    assert torch.allclose(reg, err_llsq.detach())
    reg.backward()
    assert llsq.scale.grad is not None and float(llsq.scale.grad.abs()) > 0
    l1 = Quantizer(4, "llsq", regularization="l1", reg_weight=0.5).train()
    o1 = l1(x)
    assert torch.allclose(l1.regularization_loss(), 0.5 * (o1 - x).abs().mean())
    assert float(l1.eval().regularization_loss()) == 0.0
    # a model holding the last regulariser (an autograd graph) still deep-copies and pickles
    l1.train()(x)
    clone = copy.deepcopy(l1)
    assert clone._reg is None and torch.equal(clone.scale, l1.scale)


# ------------------------------------------------------------------ trackers, modes, eve
def test_average_and_global_trackers():
    a = Quantizer(8, tracker="average", momentum=0.1, symmetric=False).train()
    g = Quantizer(8, tracker="global", symmetric=False).train()
    for q in (a, g):
        q(torch.tensor([-1.0, 1.0]))
        q(torch.tensor([-3.0, 2.0]))
    assert torch.allclose(a.range_min, torch.tensor(-1.2)) and torch.allclose(a.range_max, torch.tensor(1.1))
    assert float(g.range_min) == -3.0 and float(g.range_max) == 2.0
    # asymmetric scale follows the range: (1.1 + 1.2) / 255
    assert math.isclose(float(a.scale), 2.3 / 255, rel_tol=1e-6)
    a.eval()
    a(torch.tensor([-100.0, 100.0]))
    assert torch.allclose(a.range_max, torch.tensor(1.1))  # frozen in eval


def test_uninitialised_quantizer_calibrates_in_eval():
    q = Quantizer(8).eval()
    out = q(torch.tensor([0.5, -2.0]))
    assert bool(q.initialized) and torch.allclose(out, torch.tensor([32 * 2 / 127, -2.0]))  # s = 2/127: 31.75 -> 32


def test_disabled_is_exact_identity():
    q = Quantizer(2).train()
    x = torch.randn(5)
    q.set_mode(quantized=False, spiking=True)  # unknown flags are ignored
    assert q(x) is x and not q.enabled
    q.set_mode(quantized=True)
    assert q.enabled and not torch.equal(q(x), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_names_the_layer(bad):
    q = Quantizer(8, name="features.3").train()
    q(torch.tensor([1.0, -1.0]))
    before = q.scale.clone()
    with pytest.raises(QuantizationError, match=r"features\.3.*NaN or Inf"):
        q(torch.tensor([0.5, bad]))
    assert torch.equal(q.scale, before)


def test_bits_are_an_eve_parameter_with_bit_range():
    q = Quantizer(4, bit_range=(2, 8)).train()
    assert q.eve_ranges() == {"bits": EveRange(2, 8, integer=True)}
    assert Quantizer(4).eve_ranges() == {}
    q(torch.tensor([-2.0, 2.0]))
    q.set_eve("bits", 9.4)  # clipped to the range
    assert int(q.bits) == 8 and q.get_eve("bits") == 8.0
    assert math.isclose(float(q.scale), 2.0 / 127, rel_tol=1e-6)
    assert "bits" in q.state_dict() and int(q.state_dict()["bits"]) == 8
    with pytest.raises(QuantizationError, match="outside bit_range"):
        Quantizer(9, bit_range=(2, 8))


def test_learned_scale_keeps_clipping_range_when_bits_change():
    q = Quantizer(8, "lsq").train()
    q(torch.randn(100, generator=torch.Generator().manual_seed(6)))  # range about [-2.4, 2.6]
    with torch.no_grad():
        q.scale.fill_(0.01)  # a learned grid [-1.28, 1.27] that clips inside the data's range
    q.set_bits(4)
    assert math.isclose(float(q.scale.detach()) * 7, 1.28, rel_tol=1e-5) and int(q.zero_point) == 0


def test_learned_grid_wider_than_the_data_is_cut_to_the_tracked_range():
    q = Quantizer(8, "lsq").train()
    q(torch.randn(100, generator=torch.Generator().manual_seed(6)))
    with torch.no_grad():
        q.scale.fill_(0.2)  # a learned 8-bit grid [-25.6, 25.4], far beyond the data
    amax = max(-float(q.range_min), float(q.range_max))
    q.set_bits(4)
    assert math.isclose(float(q.scale.detach()) * 7, amax, rel_tol=1e-5)


RELU_DATA = torch.relu(torch.randn(4096, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_asymmetric_zero_point_is_qmin_for_non_negative_inputs(signed):
    q = Quantizer(8, "lsq", symmetric=False, signed=signed).train()
    q(RELU_DATA)
    qmin = levels(8, signed)[0]
    assert int(q.zero_point) == qmin  # 0 unsigned: every code represents a value >= 0
    # the initial grid [0, c·max] with c in {1/40, ..., 40/40} of least squared error, computed here in numpy
    x = RELU_DATA.double().numpy()
    candidates = [float(RELU_DATA.max()) * i / 40 / 255 for i in range(1, 41)]
    errors = [np.mean((np.clip(np.round(x / s), 0, 255) * s - x) ** 2) for s in candidates]
    assert math.isclose(float(q.scale.detach()), candidates[int(np.argmin(errors))], rel_tol=1e-5)


def test_lsq_asymmetric_init_covers_signed_logits():
    """LSQ's 2·mean/sqrt(Q) rule measured from the minimum spanned ~4x these logits at 4 bits (a
    handful of codes in use, the W4A4 regression of the quantization table); the least-squares
    grid covers them."""
    logits = torch.randn(512, 10, generator=torch.Generator().manual_seed(3)) * 4 - 6
    q = Quantizer(4, "lsq", symmetric=False, signed=False).train()
    out = q(logits)
    scale, zp, qmin, qmax, _ = q.qparams()
    span = float(scale) * (qmax - qmin)
    assert span < 1.1 * float(logits.max() - logits.min())
    assert len(torch.unique(out)) >= 12
    assert float((out.detach() - logits).abs().mean()) < float(scale) * 0.5


def test_lsq_asymmetric_places_the_minimum_on_qmin():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 2 + 1
    q = Quantizer(8, "lsq", symmetric=False, signed=False).train()
    q(x)
    scale, zp, qmin, _, _ = q.qparams()
    assert 0 < int(zp) < 128 and abs(float(x.min()) / float(scale) + int(zp) - qmin) <= 0.5


def test_lsq_unsigned_set_bits_8_to_3_matches_round():
    lsq = Quantizer(8, "lsq", symmetric=False, signed=False).train()
    rnd = Quantizer(8, "round", symmetric=False, signed=False).train()
    lsq(RELU_DATA), rnd(RELU_DATA)
    lsq.set_bits(3), rnd.set_bits(3)
    assert int(lsq.zero_point) == 0 and int(rnd.zero_point) == 0
    # the learned 8-bit grid covers the data, so the 3-bit grid spans the tracked range: max / 7
    assert math.isclose(float(lsq.scale.detach()), float(RELU_DATA.max()) / 7, rel_tol=1e-5)
    lsq.eval(), rnd.eval()
    err_lsq = float((lsq(RELU_DATA) - RELU_DATA).abs().mean().detach())
    err_rnd = float((rnd(RELU_DATA) - RELU_DATA).abs().mean())
    assert err_lsq <= 1.05 * err_rnd and err_lsq < 0.1  # (a grid kept at 85 codes below zero gave 0.22)


def test_llsq_model_deepcopies_and_pickles_after_a_training_forward():
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(1, 3, 3), Quantizer(4, "llsq", "per_channel", num_channels=3),
                                  nn.BatchNorm2d(3))
    model = nn.Sequential(conv, nn.ReLU(), Quantizer(4, "llsq", symmetric=False, signed=False)).train()
    x = torch.rand(4, 1, 8, 8)
    model(x)
    act = model[2]
    assert act.regularization_loss().grad_fn is not None  # the regulariser is live for the loss
    clone = copy.deepcopy(model)
    assert clone[2]._reg is None and clone[0].weight_quantizer._reg is None
    buf = io.BytesIO()
    torch.save(model, buf)
    model.eval(), clone.eval()
    assert act._reg is None  # eval releases the regulariser's graph
    assert torch.equal(clone(x), model(x))
    model.train()
    model(x)
    (act.regularization_loss() + model[0].weight_quantizer.regularization_loss()).backward()
    assert act.scale.grad is not None


def test_state_dict_round_trip():
    q = Quantizer(4, "lsq", "per_channel", num_channels=3, symmetric=False).train()
    q(torch.randn(3, 10, generator=torch.Generator().manual_seed(7)))
    fresh = Quantizer(4, "lsq", "per_channel", num_channels=3, symmetric=False)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 10)
    assert torch.equal(fresh.eval()(x), q.eval()(x))


def test_configuration_errors_are_quantization_errors():
    with pytest.raises(QuantizationError, match="num_channels"):
        Quantizer(8, granularity="per_channel")
    with pytest.raises(QuantizationError, match="between 1 and 16"):
        Quantizer(17)
    q = Quantizer(8, granularity="per_channel", num_channels=4, name="fc")
    with pytest.raises(QuantizationError, match="fc.*4 channels"):
        q(torch.zeros(3, 2))


def test_affine_from_range_includes_zero():
    scale, zp = affine_from_range(torch.tensor(1.0), torch.tensor(3.0), 0, 255, False, False)
    assert math.isclose(float(scale), 3 / 255, rel_tol=1e-6) and int(zp) == 0


# ------------------------------------------------------------------ BN folding
def _conv_bn(seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def _folded(conv, bn, **qkw):
    wq = Quantizer(8, "round", "per_channel", num_channels=conv.out_channels, tracker="global", **qkw)
    return QuantConv2d.from_float(copy.deepcopy(conv), wq, copy.deepcopy(bn))


def test_folded_bn_equals_conv_bn_with_quantization_off_train_and_eval():
    conv, bn = _conv_bn()
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).train()
    q = _folded(conv, bn).train()
    q.weight_quantizer.set_mode(quantized=False)
    g = torch.Generator().manual_seed(8)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_q = torch.optim.SGD(q.parameters(), lr=0.1)
    for _ in range(3):  # running statistics and parameters evolve identically
        x = torch.randn(6, 3, 8, 8, generator=g)
        target = torch.randn(6, 4, 8, 8, generator=g)
        out_ref, out_q = ref(x), q(x)
        assert torch.allclose(out_q, out_ref, atol=1e-5)
        for opt, out in ((opt_ref, out_ref), (opt_q, out_q)):
            opt.zero_grad()
            (out - target).square().mean().backward()
        assert torch.allclose(q.weight.grad, ref[0].weight.grad, atol=1e-5)
        assert torch.allclose(q.bn.weight.grad, ref[1].weight.grad, atol=1e-5)
        opt_ref.step()
        opt_q.step()
    assert torch.allclose(q.bn.running_mean, ref[1].running_mean, atol=1e-6)
    assert torch.allclose(q.bn.running_var, ref[1].running_var, atol=1e-5)
    assert int(q.bn.num_batches_tracked) == 3
    ref.eval(), q.eval()
    x = torch.randn(2, 3, 8, 8, generator=g)
    assert torch.allclose(q(x), ref(x), atol=1e-5)


def test_folded_bn_gradcheck_in_double_with_quantization_off():
    conv, bn = _conv_bn(1)
    q = _folded(conv, bn).double().train()
    q.weight_quantizer.set_mode(quantized=False)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: q(t), (x,))


def test_folded_eval_is_the_deployed_conv():
    conv, bn = _conv_bn(2)
    q = _folded(conv, bn).train()
    q(torch.randn(4, 3, 8, 8))
    q.eval()
    x = torch.randn(2, 3, 8, 8)
    w, b = q.folded_weight_bias()
    f = bn.weight / torch.sqrt(q.bn.running_var + bn.eps)
    assert torch.allclose(w, conv.weight * f.reshape(-1, 1, 1, 1))
    assert torch.allclose(b, bn.bias + (conv.bias - q.bn.running_mean) * f)
    deployed = nn.functional.conv2d(x, manual(w.detach(), q.weight_quantizer), b, padding=1)
    assert torch.allclose(q(x), deployed, atol=1e-5)


FOLD_QUANTIZERS = {
    "round per-channel": dict(bits=8, fn="round", granularity="per_channel", num_channels=4, tracker="global"),
    "lsq per-tensor asymmetric": dict(bits=4, fn="lsq", symmetric=False),
    "llsq per-channel": dict(bits=3, fn="llsq", granularity="per_channel", num_channels=4),
}


@pytest.mark.parametrize("config", list(FOLD_QUANTIZERS))
@pytest.mark.parametrize("negative_gamma", [False, True])
def test_folded_train_forward_matches_the_formula(config, negative_gamma):
    conv, bn = _conv_bn(5)
    if negative_gamma:
        with torch.no_grad():
            bn.weight[1] = -0.7  # takes the route that materialises W * f
    q = QuantConv2d.from_float(copy.deepcopy(conv), Quantizer(**FOLD_QUANTIZERS[config]), copy.deepcopy(bn)).train()
    x = torch.randn(4, 3, 8, 8)
    out = q(x)
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)  # running stats before the step
    w = manual((conv.weight * f).detach(), q.weight_quantizer) / f
    ref_bn = copy.deepcopy(bn).train()
    expected = ref_bn(nn.functional.conv2d(x, w, conv.bias, padding=1))
    assert torch.allclose(out, expected, atol=1e-5)
    # the tracked range is that of the folded weight
    wf = (conv.weight * f).detach().reshape(4, -1)
    rmin, rmax = q.weight_quantizer.range_min, q.weight_quantizer.range_max
    if rmin.dim() == 0:
        wf = wf.reshape(1, -1)
    assert torch.allclose(rmax, wf.amax(1).reshape(rmax.shape)) and torch.allclose(rmin, wf.amin(1).reshape(rmin.shape))


def test_folded_train_with_16_bits_is_close_to_float():
    conv, bn = _conv_bn(3)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).train()
    q = QuantConv2d.from_float(copy.deepcopy(conv), Quantizer(16, "round", "per_channel", num_channels=4), copy.deepcopy(bn))
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(q.train()(x), ref(x), atol=1e-3)


def test_quant_linear_with_bn1d_and_without_bn():
    torch.manual_seed(9)
    fc, bn = nn.Linear(5, 3), nn.BatchNorm1d(3)
    ref = nn.Sequential(copy.deepcopy(fc), copy.deepcopy(bn)).train()
    q = QuantLinear.from_float(copy.deepcopy(fc), Quantizer(8, "round", "per_channel", num_channels=3), copy.deepcopy(bn))
    q.weight_quantizer.set_mode(quantized=False)
    x = torch.randn(7, 5)
    assert torch.allclose(q.train()(x), ref(x), atol=1e-5)
    assert torch.allclose(q.eval()(x), ref.eval()(x), atol=1e-5)
    plain = QuantLinear.from_float(copy.deepcopy(fc), Quantizer(8, "round", "per_channel", num_channels=3)).train()
    out = plain(x)
    assert plain.weight is not fc.weight  # from the deep copy
    wq = plain.weight_quantizer
    assert torch.allclose(out, nn.functional.linear(x, manual(plain.weight.detach(), wq), fc.bias), atol=1e-6)
    assert plain.folded_weight_bias()[0] is plain.weight


def test_from_float_shares_parameters_and_rejects_bad_bn():
    conv, bn = _conv_bn(4)
    q = QuantConv2d.from_float(conv, Quantizer(8, "round", "per_channel", num_channels=4))
    assert q.weight is conv.weight and q.weight.device.type == "cpu"
    with pytest.raises(QuantizationError, match="running statistics"):
        QuantConv2d.from_float(conv, Quantizer(8, name="c"), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(QuantizationError, match="3 features"):
        QuantConv2d.from_float(conv, Quantizer(8, name="c"), nn.BatchNorm2d(3))


def test_ste_fast_path_when_nothing_can_clip():
    from evefx.modules import ste_quantize

    g = torch.Generator().manual_seed(10)
    x = torch.randn(50, generator=g)
    s, z = torch.tensor(float(x.abs().max()) / 7), torch.tensor(2)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    slow, fast = ste_quantize(xs[0], s, z, -8 + 2, 7 + 2), ste_quantize(xs[1], s, z, -8 + 2, 7 + 2, may_clip=False)
    assert torch.allclose(slow, fast)
    slow.sum().backward(), fast.sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad) and bool((xs[1].grad == 1).all())
    # a training step with the global tracker covers the batch: every gradient passes
    w = torch.randn(4, 9, generator=g, requires_grad=True)
    Quantizer(4, "round", "per_channel", num_channels=4, tracker="global").train()(w).sum().backward()
    assert bool((w.grad == 1).all())


def test_learned_scale_pushed_through_zero_is_held_at_an_eighth_of_the_range():
    """Adam moves a scale by about its learning rate whatever the gradient: more than an 8-bit
    weight scale, so a step can take it through zero (every weight then quantized to 0 when the
    floor was float epsilon: W4A4 lsq from random weights lost 32 points, 2 with the floor)."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(9))
    q = Quantizer(8, "lsq").train()
    q(x)
    with torch.no_grad():
        q.scale.fill_(-1e-3)
    out = q(x)
    amax = max(-float(x.min()), float(x.max()))
    assert math.isclose(float(q.scale.detach()), amax / 127 / 8, rel_tol=1e-5)
    assert float(out.detach().abs().max()) > 0


def test_a_learned_step_pushed_below_zero_by_the_last_optimizer_step_is_floored_in_eval_and_export():
    """mobilenet_v3_small, 4-bit lsq weights, Adam 1e-3: a per-channel step of ~1e-3 went negative
    after the last step and the model was evaluated (and nearly exported) with it."""
    q = Quantizer(4, "lsq", init_steps=0)
    x = torch.randn(64, 8)
    q.train()(x)  # initialised: learned step from the data
    with torch.no_grad():
        q.scale.fill_(-1e-3)  # what an optimizer step did
    scale, *_ = q.qparams()
    assert float(scale) > 0  # export reads the step the next forward would use
    out = q.eval()(x)
    assert torch.isfinite(out).all() and float(q.scale) > 0
    assert torch.equal(q.scale.detach(), q._scale_floor()) and torch.equal(scale, q.scale.detach().float())


def _coarse_input_quantizer(x: torch.Tensor) -> Quantizer:
    """A 2-bit input grid (step about 0.8 on unit Gaussians): with 2-bit weights the int32 bias grid is coarse."""
    q = Quantizer(2, "round", symmetric=False, signed=False).train()
    q(x)
    return q


@pytest.mark.parametrize("train_int32_bias", [True, False])
def test_training_adds_the_deployed_bias_rounding_to_a_folded_layer(train_int32_bias):
    conv, bn = _conv_bn(11)
    q = QuantConv2d.from_float(copy.deepcopy(conv), Quantizer(2, "round", "per_channel", num_channels=4, tracker="global"),
                               copy.deepcopy(bn))
    q.train_int32_bias = train_int32_bias
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    q.set_input_quantizer(_coarse_input_quantizer(x))
    q.train()(x)  # weight range and running statistics settle
    q.bn.eval()   # BatchNorm on running statistics: training then computes what eval computes
    train_out = q(x)
    q.eval()
    eval_out = q(x)
    _, b = q.folded_weight_bias()
    step = q._input_quantizer.scale * q.weight_quantizer.scale
    rounding = (torch.round(b / step) * step - b).detach()
    assert rounding.abs().max() > 1e-3  # the grid is coarse enough to matter
    if train_int32_bias:
        assert torch.allclose(train_out, eval_out, atol=1e-5)
    else:
        assert torch.allclose(eval_out - train_out, rounding.reshape(1, -1, 1, 1).expand_as(eval_out), atol=1e-5)


@pytest.mark.parametrize("train_int32_bias", [True, False])
def test_training_adds_the_deployed_bias_rounding_to_a_linear_with_a_straight_through_gradient(train_int32_bias):
    torch.manual_seed(12)
    fc = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    outs, grads = [], []
    for flag in (train_int32_bias, not train_int32_bias):
        q = QuantLinear.from_float(copy.deepcopy(fc), Quantizer(2, "round", "per_channel", num_channels=3, tracker="global"))
        q.train_int32_bias = flag
        q.set_input_quantizer(_coarse_input_quantizer(x))
        out = q.train()(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(q.bias.grad)
        if flag:
            assert torch.allclose(out.detach(), q.eval()(x), atol=1e-6)  # training computes the deployed layer
    assert not torch.allclose(outs[0], outs[1])
    # the bias gradient is the float bias's (straight-through): d(sum y^2)/db = 2 * sum_n y
    for out, grad in zip(outs, grads):
        assert torch.allclose(grad, 2 * out.sum(0), atol=1e-5)


def test_bn_running_stats_trains_on_the_frozen_running_statistics_as_eval():
    conv, bn = _conv_bn(14)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    def two_bit():
        wq = Quantizer(2, "round", "per_channel", num_channels=4, tracker="global")
        return QuantConv2d.from_float(copy.deepcopy(conv), wq, copy.deepcopy(bn))
    frozen, batch = two_bit(), two_bit()
    frozen.bn_running_stats = True
    for q in (frozen, batch):
        q.set_input_quantizer(_coarse_input_quantizer(x))
    before = (frozen.bn.running_mean.clone(), frozen.bn.running_var.clone(), int(frozen.bn.num_batches_tracked))
    train_out = frozen.train()(x)
    train_out.sum().backward()
    assert torch.equal(frozen.bn.running_mean, before[0]) and torch.equal(frozen.bn.running_var, before[1])
    assert int(frozen.bn.num_batches_tracked) == before[2]
    assert frozen.bn.weight.grad is not None and frozen.weight.grad is not None  # gamma and W still learn
    assert torch.allclose(train_out.detach(), frozen.eval()(x), atol=1e-5)  # the deployed layer, bias rounding included
    # on batch statistics (the default of the module) training differs from eval and the statistics move
    batch_out = batch.train()(x)
    assert not torch.allclose(batch_out.detach(), batch.eval()(x), atol=1e-2)
    assert not torch.equal(batch.bn.running_mean, before[0])


def test_without_an_input_quantizer_training_keeps_the_float_bias():
    conv, bn = _conv_bn(13)
    q = _folded(conv, bn).train()
    ref = _folded(conv, bn).train()
    ref.train_int32_bias = False
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(q(x), ref(x))


def test_log_scale_domain_learns_log_s_with_the_chain_rule_gradient():
    x = torch.randn(256, generator=torch.Generator().manual_seed(3))
    lin = Quantizer(4, "lsq", init_steps=0).train()
    log_ = Quantizer(4, "lsq", init_steps=0, scale_domain="log").train()
    assert [n for n, _ in log_.named_parameters()] == ["scale_log_ratio"] and "scale_base" in dict(log_.named_buffers())
    lin(x).square().sum().backward()
    log_(x).square().sum().backward()
    # the same least-squares start, bit for bit (held in the base, ratio 0); d/d(log s) = s * d/ds
    assert torch.equal(log_.scale.detach(), lin.scale.detach())
    torch.testing.assert_close(log_.scale_log_ratio.grad, lin.scale.grad * lin.scale.detach())
    torch.testing.assert_close(log_.eval()(x), lin.eval()(x), rtol=0, atol=0)
    assert torch.equal(log_.qparams()[0], lin.qparams()[0])


def test_log_scale_domain_makes_an_adam_step_relative_to_the_scale():
    """Adam moves a parameter by about lr: a linear scale of ~0.03 moves by ~3% per step at lr 1e-3,
    a log one by ~0.1% whatever its size."""
    x = 0.1 * torch.randn(512, generator=torch.Generator().manual_seed(4))
    moves = {}
    for domain in ("linear", "log"):
        q = Quantizer(4, "lsq", init_steps=0, scale_domain=domain).train()
        q(x)
        before = float(q.scale.detach())
        opt = torch.optim.Adam(q.parameters(), lr=1e-3)
        (q(x) - 0.5 * x).square().sum().backward()
        opt.step()
        moves[domain] = abs(float(q.scale.detach()) / before - 1)
    assert 0.02 < moves["linear"] < 0.05, moves
    assert math.isclose(moves["log"], 1e-3, rel_tol=0.01), moves


def test_a_state_dict_loads_across_scale_domains():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(7))
    kwargs = dict(granularity="per_channel", num_channels=3, symmetric=False, init_steps=0)
    lin = Quantizer(4, "lsq", **kwargs).train()
    lin(x)
    log_ = Quantizer(4, "lsq", scale_domain="log", **kwargs)
    log_.load_state_dict(lin.state_dict())  # e.g. a checkpoint from before the option
    torch.testing.assert_close(log_.scale.detach(), lin.scale.detach())
    back = Quantizer(4, "lsq", **kwargs)
    back.load_state_dict(log_.state_dict())
    torch.testing.assert_close(back.eval()(x), lin.eval()(x))


def test_log_scale_domain_floors_only_the_channels_below_it():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    q = Quantizer(4, "lsq", "per_channel", num_channels=4, init_steps=0, scale_domain="log").train()
    q(x)
    with torch.no_grad():
        q.scale_log_ratio.copy_(torch.tensor([0.01, -30.0, 0.0, -0.02]))
    before = q.scale.detach().clone()
    q(x)
    floor = q._scale_floor()
    assert torch.equal(q.scale_log_ratio.detach(), torch.tensor([0.01, 0.0, 0.0, -0.02]))
    assert torch.equal(q.scale.detach()[[0, 2, 3]], before[[0, 2, 3]]) and torch.equal(q.scale.detach()[1], floor[1])


def test_log_scale_domain_is_floored_and_set_bits_and_set_range_write_it():
    x = torch.randn(64, generator=torch.Generator().manual_seed(9))
    q = Quantizer(4, "lsq", init_steps=0, scale_domain="log").train()
    q(x)
    with torch.no_grad():
        q.scale_log_ratio.fill_(-30.0)  # far below the floor
    q(x)
    assert torch.equal(q.scale.detach(), q._scale_floor()) and float(q.scale_log_ratio) == 0.0
    q.set_range(-1.0, 2.0)
    assert torch.equal(q.scale.detach(), torch.tensor(2.0 / 7))  # symmetric signed 4 bits: 2 / 7, exactly
    with torch.no_grad():
        q.scale_log_ratio.fill_(0.1)  # trained a little
    q.set_bits(2)
    torch.testing.assert_close(q.scale.detach(), torch.tensor(2.0 / 1))  # the same range on codes -2..1
    with pytest.raises(QuantizationError, match="scale_domain must be linear, log or range"):
        Quantizer(4, "lsq", scale_domain="exp")


def test_range_scale_domain_learns_a_ratio_to_the_range_step_and_follows_the_range():
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(11))
    kwargs = dict(granularity="per_channel", num_channels=3, tracker="global", init_steps=0)
    lin = Quantizer(4, "lsq", **kwargs).train()
    rel = Quantizer(4, "lsq", scale_domain="range", **kwargs).train()
    lin(w).square().sum().backward()
    rel(w).square().sum().backward()
    # the same least-squares start (up to the log/exp round trip); the base is the range's step
    torch.testing.assert_close(rel.scale.detach(), lin.scale.detach())
    assert torch.equal(rel.scale_base, rel._range_step())
    torch.testing.assert_close(rel.scale_log_ratio.grad, lin.scale.grad * lin.scale.detach())
    ratio = rel.scale_log_ratio.detach().clone()
    assert bool((ratio <= 0).all()) and bool((ratio < 0).any())  # least-squares steps: at most the range's
    rel(3 * w)  # the weights grow: the range triples, so does the step; the learned ratio stays
    assert torch.equal(rel.scale_log_ratio.detach(), ratio)
    torch.testing.assert_close(rel.scale.detach(), 3 * lin.scale.detach())
    rel.eval()(w)  # eval neither tracks nor moves it
    torch.testing.assert_close(rel.scale.detach(), 3 * lin.scale.detach())


def test_range_scale_domain_set_range_floor_and_state_dicts():
    x = torch.randn(64, generator=torch.Generator().manual_seed(12))
    q = Quantizer(4, "lsq", init_steps=0, scale_domain="range").train()
    q(x)
    with torch.no_grad():
        q.scale_log_ratio.fill_(-30.0)  # far below the floor: the ratio of 1/8 of the range's step
    q(x)
    torch.testing.assert_close(q.scale.detach(), q._scale_floor())
    assert math.isclose(float(q.scale_log_ratio.detach()), -math.log(8.0), rel_tol=1e-6)
    q.set_range(-1.0, 2.0)  # a range's own step is a ratio of exactly 0
    assert torch.equal(q.scale.detach(), torch.tensor(2.0 / 7)) and float(q.scale_log_ratio.detach()) == 0.0
    with torch.no_grad():
        q.scale_log_ratio.fill_(-0.2)
    lin = Quantizer(4, "lsq", init_steps=0)
    lin.load_state_dict(q.state_dict())
    torch.testing.assert_close(lin.scale.detach(), q.scale.detach())
    back = Quantizer(4, "lsq", init_steps=0, scale_domain="range")
    back.load_state_dict(lin.state_dict())
    torch.testing.assert_close(back.scale_log_ratio.detach(), torch.tensor(-0.2))
    torch.testing.assert_close(back.eval()(x), q.eval()(x))


@pytest.mark.parametrize("fn,domain", [("round", "linear"), ("lsq", "linear"), ("lsq", "log"), ("lsq", "range")])
def test_stretch_grid_keeps_the_codes_of_stretched_inputs(fn, domain):
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(3, 4, 3, 3, generator=gen)
    q = Quantizer(4, fn, granularity="per_channel", num_channels=3, init_steps=0, scale_domain=domain).train()
    q(w)
    with torch.no_grad():  # a learned step away from the range's own
        q._set_scale(q.scale.detach() * torch.tensor([0.7, 1.0, 1.3]))
    q.eval()
    factor = torch.tensor([2.0, 0.5, 1.25])
    scale, zero, qmin, qmax, _ = q.qparams()
    codes = torch.clamp(torch.round(w / scale.reshape(-1, 1, 1, 1)) + zero.reshape(-1, 1, 1, 1), qmin, qmax)
    q.stretch_grid(factor)
    scale2, zero2, _, _, _ = q.qparams()
    torch.testing.assert_close(scale2, scale * factor)
    assert torch.equal(zero2, zero)
    stretched = w * factor.reshape(-1, 1, 1, 1)
    codes2 = torch.clamp(torch.round(stretched / scale2.reshape(-1, 1, 1, 1)) + zero2.reshape(-1, 1, 1, 1), qmin, qmax)
    assert torch.equal(codes2, codes)
    torch.testing.assert_close(q(stretched), q.eval()(stretched))  # eval uses the stretched grid
    torch.testing.assert_close(q(stretched), (codes - zero.reshape(-1, 1, 1, 1)) * scale2.reshape(-1, 1, 1, 1))
    with pytest.raises(QuantizationError, match=r"stretch_grid needs finite factors > 0 \(got tensor\(\[ 1\., -1\.,  1\.\]\)\)"):
        q.stretch_grid(torch.tensor([1.0, -1.0, 1.0]))


def test_a_layer_pickled_with_the_old_bn_running_stats_flag_loads_its_choice():
    conv, bn = _conv_bn(15)
    layer = QuantConv2d.from_float(copy.deepcopy(conv), Quantizer(8, "round", "per_channel", num_channels=4),
                                   copy.deepcopy(bn))
    layer.__dict__.pop("bn_statistics", None)  # as saved before the option: a plain flag in the instance
    layer.__dict__["bn_running_stats"] = True
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.bn_statistics == "running" and loaded.bn_running_stats


def test_autocast_activations_are_quantized_in_float32():
    # in bf16, x / s has 8 bits of mantissa: codes above 128 rounded to the wrong integer (1.16 steps off)
    torch.manual_seed(0)
    q = Quantizer(8, "lsq", "per_tensor", symmetric=False, signed=False)
    x = torch.rand(4096) * 6
    q.train()
    q(x)
    q.eval()
    half = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(half)
    assert out.dtype == torch.float32 and torch.equal(out, q(half.float()))
    codes = out.detach() / q.scale.detach() + q.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)


@pytest.mark.parametrize("fn", ["lsq", "round"])
def test_ewgs_scales_each_elements_gradient_by_its_rounding_residual(fn):
    """EWGS (Lee et al. 2021): g * (1 + delta * sign(g) * (x/s - round(x/s))), zero outside the grid; 0 is the plain STE.
    Reference values by hand, s = 0.5: 0.26 -> v 0.52, residual -0.48; 0.74 -> +0.48; -0.3 -> v -0.6, residual +0.4."""
    from evefx.modules.quant_functions import ste_quantize

    x = torch.tensor([0.26, 0.74, -0.3, 9.0], requires_grad=True)
    g = torch.tensor([1.0, 1.0, -2.0, 1.0])
    grads = {}
    for delta in (0.0, 0.5):
        x.grad = None
        if fn == "lsq":
            out = lsq_quantize(x, torch.tensor(0.5), -8, 7, 1.0, ewgs=delta)
        else:
            out = ste_quantize(x, torch.tensor(0.5), torch.tensor(0), -8, 7, may_clip=True, ewgs=delta)
        assert out.tolist() == [0.5, 0.5, -0.5, 3.5]  # the forward does not change
        out.backward(g)
        grads[delta] = x.grad.tolist()
    assert grads[0.0] == [1.0, 1.0, -2.0, 0.0]
    assert grads[0.5] == pytest.approx([1 - 0.5 * 0.48, 1 + 0.5 * 0.48, -2 * (1 - 0.5 * 0.4), 0.0])
    # the no-clip path of the STE (the caller checked the range) scales the same way
    y = torch.tensor([0.26, 0.74, -0.3], requires_grad=True)
    ste_quantize(y, torch.tensor(0.5), torch.tensor(0), -8, 7, may_clip=False, ewgs=0.5).backward(g[:3])
    assert y.grad.tolist() == pytest.approx(grads[0.5][:3])


def test_ewgs_reaches_the_weights_of_a_quantized_layer_through_the_spec():
    import evefx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    grads = {}
    for delta in (0.0, 0.3):
        spec = {"trace": {"input_shape": [1, 1, 6, 6]}, "passes": [{"kind": "quantize", "weight": {"bits": 3, "fn": "lsq", "ewgs": delta},
                                                                     "activation": {"bits": 3, "ewgs": delta}}]}
        gm = evefx.transform(net, spec).train()
        assert {m.ewgs for m in gm.modules() if isinstance(m, Quantizer)} == {delta}
        gm(x).square().sum().backward()
        grads[delta] = gm.get_submodule("0").weight.grad.clone()
    change = float((grads[0.3] - grads[0.0]).norm() / grads[0.0].norm())
    assert 0.0 < change < 0.3, change  # rescaled element by element, not a different gradient
