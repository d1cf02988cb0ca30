"""QuantizerOptions: checked and normalised once, handed whole to a Quantizer (or built from its
fields), and the least-error grid search the learned scales start from."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from evefx.errors import QuantizationError
from evefx.modules import Quantizer, QuantizerOptions
from evefx.modules.quant_functions import least_error_grid
from evefx.passes.quantize import make_quantizer
from evefx.spec import QuantizerConfig


def test_options_whole_or_as_fields_build_the_same_quantizer():
    kwargs = dict(bits=4, fn="lsq", granularity="per_channel", ch_axis=1, num_channels=3, symmetric=False, init_steps=2,
                  name="fc")
    whole, fields = Quantizer(QuantizerOptions(**kwargs)), Quantizer(**kwargs)
    positional = Quantizer(4, "lsq", "per_channel", ch_axis=1, num_channels=3, symmetric=False, init_steps=2, name="fc")
    assert whole.options == fields.options == positional.options
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5)
    for q in (whole, fields, positional):
        q.train()
    outs = [q(x) for _ in range(3) for q in (whole, fields, positional)]
    assert torch.equal(outs[-3], outs[-2]) and torch.equal(outs[-2], outs[-1])
    assert whole.state_dict().keys() == fields.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), fields.state_dict().values()))


def test_options_are_frozen_and_read_as_attributes():
    q = Quantizer(QuantizerOptions(bits=8, code_range=(-64, 63), name="conv"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.options.bits = 4  # type: ignore[misc]
    with pytest.raises(AttributeError):
        q.signed = False  # type: ignore[misc]
    assert (q.name, q.code_range, q.num_channels, q.signed) == ("conv", (-64, 63), None, True)


def test_options_are_normalised_once():
    assert QuantizerOptions(fn="lsq").learnable_scale and QuantizerOptions(fn="llsq").learnable_scale
    assert not QuantizerOptions(fn="round").learnable_scale
    assert QuantizerOptions(granularity="per_tensor", num_channels=7).num_channels is None
    assert QuantizerOptions(bits=2, bits_schedule=[[0, 8], [10, 2]]).bits == 8
    assert QuantizerOptions(bits_schedule=[[0, 8], [10, 2]]).bits_schedule == ((0, 8), (10, 2))
    assert QuantizerOptions(bit_range=[2, 8]).bit_range == (2, 8)
    assert QuantizerOptions(name="").name == "<unnamed quantizer>"


@pytest.mark.parametrize("kwargs, message", [
    ({"fn": "floor"}, "fc: fn must be round, lsq or llsq (got 'floor')"),
    ({"granularity": "per_row"}, "fc: granularity must be per_tensor or per_channel (got 'per_row')"),
    ({"tracker": "median"}, "fc: tracker must be average or global (got 'median')"),
    ({"regularization": "l3"}, "fc: regularization must be l1 or l2 (got 'l3')"),
    ({"momentum": 0.0}, "fc: momentum must be in (0, 1] (got 0.0)"),
    ({"bits": 0}, "fc: bits must be between 1 and 16 (got 0)"),
    ({"bit_range": (4, 2)}, "fc: bit_range must satisfy 1 <= low <= high <= 16 (got (4, 2))"),
    ({"bits": 8, "bit_range": (2, 4)}, "fc: bits=8 lies outside bit_range (2, 4); pick bits inside it"),
    ({"code_range": (1, 5)}, "fc: code_range must contain 0 and two codes at least (got (1, 5))"),
    ({"init_steps": -1}, "fc: init_steps must be >= 0 (got -1)"),
    ({"ewgs": 1.5}, "fc: ewgs must be in [0, 1] (got 1.5)"),
    ({"bits_schedule": ((1, 8),)}, "fc: bits_schedule needs (step, bits) pairs with rising steps starting at 0"),
    ({"bits_schedule": ((0, 8), (5, 17))}, "fc: bits_schedule bits must be between 1 and 16"),
    ({"bits_schedule": ((0, 8),), "bit_range": (2, 8)}, "fc: bits_schedule and bit_range both set the bits; use one"),
    ({"granularity": "per_channel"}, "fc: per_channel quantization needs num_channels (the size of axis 0)"),
])
def test_every_option_is_checked_in_one_place(kwargs, message):
    with pytest.raises(QuantizationError) as err:
        QuantizerOptions(name="fc", **kwargs)
    assert str(err.value).startswith(message)
    with pytest.raises(QuantizationError) as same:  # the keyword form goes through the same check
        Quantizer(name="fc", **kwargs)
    assert str(same.value) == str(err.value)


def test_options_and_fields_together_are_an_error():
    with pytest.raises(QuantizationError, match="fc: pass either a QuantizerOptions or its fields, not both"):
        Quantizer(QuantizerOptions(name="fc"), bits=4)


def test_make_quantizer_hands_every_spec_option_through():
    cfg = QuantizerConfig(bits=3, fn="llsq", granularity="per_channel", symmetric=False, signed=False,
                          tracker="global", momentum=0.5, learnable_scale=True, regularization="l1", init_steps=7,
                          scale_domain="log", progressive={"start_bits": 8, "steps": 20}, ewgs=0.1)
    q = make_quantizer(cfg, name="fc (weight)", num_channels=5, ch_axis=0, bit_range=None, code_range=(-4, 3))
    expected = QuantizerOptions(bits=8, fn="llsq", granularity="per_channel", ch_axis=0, num_channels=5, symmetric=False,
                                signed=False, tracker="global", momentum=0.5, learnable_scale=True,
                                regularization="l1", code_range=(-4, 3), init_steps=7,
                                scale_domain="log", bits_schedule=((0, 8), (10, 4), (20, 3)), ewgs=0.1,
                                name="fc (weight)")
    assert q.options == expected
    # every field of the spec block is an option of the same name, except progressive (the schedule)
    spec_only = set(QuantizerConfig.model_fields) - {f.name for f in dataclasses.fields(QuantizerOptions)}
    assert spec_only == {"progressive"}


def test_least_error_grid_per_channel_is_the_per_tensor_choice_of_each_channel():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 6) * torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1)
    x[0, 2, 0] = 40.0  # an outlier the l2 search clips
    lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    for error in ("l1", "l2"):
        scale, zero = least_error_grid(x, lo, hi, 0, 15, symmetric=False, signed=False, axis=1, error=error)
        for c in range(3):
            s, z = least_error_grid(x[:, c], lo[c], hi[c], 0, 15, symmetric=False, signed=False, error=error)
            assert torch.equal(scale[c], s) and torch.equal(zero[c], z)
    s_full = (hi[2] - torch.clamp(lo[2], max=0)) / 15
    assert float(least_error_grid(x[:, 2], lo[2], hi[2], 0, 15, symmetric=False, signed=False)[0]) < float(s_full)
