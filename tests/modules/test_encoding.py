"""Encoders and decoder: shapes, time layout, randomness, modes."""
from __future__ import annotations

import copy

import pytest
import torch

from evefx.errors import OptionError, ShapeError
from evefx.modules.encoding import DirectEncoder, MeanDecoder, PoissonEncoder


def test_direct_encoder_repeats_step_major():
    x = torch.arange(6.0).reshape(2, 3)
    out = DirectEncoder(3)(x)
    assert out.shape == (6, 3)
    assert torch.equal(out.reshape(3, 2, 3), x.expand(3, 2, 3))


def test_mean_decoder_inverts_direct_encoder():
    x = torch.randn(4, 5)
    assert torch.allclose(MeanDecoder(7)(DirectEncoder(7)(x)), x)
    assert MeanDecoder(2)(torch.tensor([[1.0], [3.0], [5.0], [7.0]])).tolist() == [[3.0], [5.0]]
    with pytest.raises(ShapeError, match="T\\*batch"):
        MeanDecoder(3)(torch.zeros(4, 1))


def test_poisson_rate_and_extremes():
    p = torch.tensor([[0.0, 0.25, 0.5, 1.0, 1.7, -0.3]])
    out = PoissonEncoder(4000, seed=0)(p)
    assert out.shape == (4000, 6) and set(out.unique().tolist()) <= {0.0, 1.0}
    rates = out.mean(0)
    assert rates[0] == 0 and rates[3] == 1 and rates[4] == 1 and rates[5] == 0
    assert torch.allclose(rates[1:3], torch.tensor([0.25, 0.5]), atol=0.03)


def test_poisson_seed_is_reproducible_and_private():
    x = torch.rand(3, 10)
    a, b = PoissonEncoder(5, seed=7), PoissonEncoder(5, seed=7)
    first = a(x)
    torch.manual_seed(123)  # the global RNG does not affect a seeded encoder
    assert torch.equal(b(x), first)
    assert not torch.equal(a(x), first), "the stream moves on between calls"
    clone = copy.deepcopy(a)
    assert torch.equal(clone(x), a(x)), "deepcopy copies the generator state"
    a.reseed()
    assert torch.equal(a(x), first)


def test_poisson_without_seed_follows_global_rng():
    x = torch.rand(3, 10)
    enc = PoissonEncoder(5)
    torch.manual_seed(1)
    first = enc(x)
    torch.manual_seed(1)
    assert torch.equal(enc(x), first)


def test_decoder_gain_in_every_mode_and_only_on_floats():
    dec = MeanDecoder(2, gain=3.0)
    assert dec(torch.tensor([[1.0], [3.0]])).tolist() == [[6.0]]
    dec.set_mode(spiking=False)
    assert dec(torch.tensor([[1.0]])).tolist() == [[3.0]]
    ids = torch.tensor([[1, 2]])
    assert dec(ids) is ids  # integer outputs (indices) pass unscaled
    with pytest.raises(OptionError, match="gain must be > 0"):
        MeanDecoder(2, gain=0.0)


def test_modes():
    x = torch.rand(2, 3)
    for enc in (PoissonEncoder(4, seed=0), DirectEncoder(4), MeanDecoder(4)):
        enc.set_mode(spiking=False)
        assert torch.equal(enc(x), x)
        enc.set_mode(spiking=True, step="single")
        assert enc(x).shape == x.shape
