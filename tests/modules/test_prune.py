"""ChannelPruner on hand-made activations: each statistic against values computed by hand, masks,
schedule, modes, eve protocol, state. Choosing masks is evefx.prune_step's (tests/channels/test_selection.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evefx.errors import OptionError, ShapeError, UnknownNameError
from evefx.modules.protocol import EveRange
from evefx.modules.prune import ChannelPruner


def test_fire_rate_is_fraction_of_positive_outputs():
    p = ChannelPruner(3, criterion="fire_rate", ratio=0.34).train()
    # [N=2, C=3, 2 positions]: channel 0 fires 4/4, channel 1 fires 1/4, channel 2 fires 2/4
    x = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [1.0, -1.0]],
                      [[3.0, 1.0], [0.0, -2.0], [-1.0, 4.0]]])
    p(x)
    assert p.importance().tolist() == [1.0, 0.25, 0.5]
    p.set_mask(torch.tensor([1, 0, 1]))
    assert p.observations() == pytest.approx({"pruned": 1 / 3, "ratio": 0.34, "fire_rate": 1.75 / 3})


def test_statistics_accumulate_over_batches_only_in_training():
    p = ChannelPruner(2, criterion="fire_rate").train()
    p(torch.tensor([[1.0, -1.0]]))
    p(torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]]))
    assert p.importance().tolist() == [0.75, 0.25]
    p.eval()
    p(torch.ones(10, 2))
    assert p.importance().tolist() == [0.75, 0.25]
    p.reset_statistics()
    assert p.importance() is None


def test_kl_div_matches_the_gaussian_formula_by_hand():
    p = ChannelPruner(3, criterion="kl_div").train()
    # channel values over the batch: c0 = c1 = {-1, 1} (mean 0, var 1); c2 = {3, 5} (mean 4, var 1)
    p(torch.tensor([[-1.0, -1.0, 3.0], [1.0, 1.0, 5.0]]))
    mu_l = (-1 + 1 - 1 + 1 + 3 + 5) / 6
    var_l = (1 + 1 + 1 + 1 + 9 + 25) / 6 - mu_l**2

    def kl(mu, var):
        return 0.5 * (math.log(var_l / var) + (var + (mu - mu_l) ** 2) / var_l - 1)

    assert p.importance().tolist() == pytest.approx([kl(0, 1), kl(0, 1), kl(4, 1)], rel=1e-5)


def test_kl_div_scores_a_constant_channel_zero():
    p = ChannelPruner(2, criterion="kl_div").train()
    p(torch.tensor([[7.0, 0.0], [7.0, 2.0], [7.0, 4.0]]))
    imp = p.importance()
    assert imp[0] == 0 and imp[1] > 0


def test_taylor_is_mean_abs_activation_times_gradient():
    p = ChannelPruner(2, criterion="taylor", ratio=0.5).train()
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]], [[-2.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    w = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # d loss / d activation at each position
    (p(x) * w).sum().backward()
    # sample 0: c0 |1*.5 + 2*1| = 2.5, c1 |3*-1 + -1*2| = 5; sample 1: c0 |-1| = 1, c1 |-1 + 2| = 1
    assert p.importance().tolist() == pytest.approx([1.75, 3.0])
    # no gradient, no statistic
    q = ChannelPruner(2, criterion="taylor").train()
    with torch.no_grad():
        q(torch.ones(1, 2))
    assert q.importance() is None


def test_l1_norm_gathers_no_statistic():
    p = ChannelPruner(4, criterion="l1_norm", ratio=0.5).train()
    p(torch.ones(1, 4))
    assert p.importance() is None


def test_mask_multiplies_the_channel_axis_and_mode_lifts_it():
    p = ChannelPruner(3, dim=1)
    p.set_mask(torch.tensor([True, False, True]))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = p(x)
    assert torch.equal(y[:, 1], torch.zeros(2, 4, 4)) and torch.equal(y[:, [0, 2]], x[:, [0, 2]])
    p.set_mode(pruned=False, quantized=True)
    assert torch.equal(p(x), x)
    p.set_mode(pruned=None)
    assert torch.equal(p(x), x)
    p.set_mode(pruned=True)
    assert torch.equal(p(x), y)
    last = ChannelPruner(3, dim=-1)
    last.set_mask(torch.tensor([0, 1, 1]))
    assert last(torch.ones(2, 3)).tolist() == [[0.0, 1.0, 1.0]] * 2


def test_iterative_schedule_target_ratio():
    q = ChannelPruner(8, ratio=0.5, steps=2)
    assert q.target_ratio() == 0.25
    q.steps_done += 1
    assert q.target_ratio() == 0.5
    q.steps_done += 1
    assert q.target_ratio() == 0.5  # the schedule stays at the target


def test_eve_protocol_ratio_only_when_upgradable():
    assert ChannelPruner(4).eve_ranges() == {}
    p = ChannelPruner(4, ratio=0.25, max_ratio=0.8)
    assert p.eve_ranges() == {"ratio": EveRange(0.0, 0.8)}
    p.set_eve("ratio", 0.8)
    assert p.get_eve("ratio") == pytest.approx(0.8)
    with pytest.raises(OptionError, match=r"^ChannelPruner.ratio must be between 0 and 0.8 \(got 0.95\)$"):
        p.set_eve("ratio", 0.95)
    with pytest.raises(UnknownNameError, match=r"^ChannelPruner has no eve parameter 'ratio'; it has none$"):
        ChannelPruner(4).set_eve("ratio", 0.1)


def test_state_travels_with_state_dict_and_instances_share_nothing():
    a = ChannelPruner(3, criterion="fire_rate", ratio=0.34).train()
    b = ChannelPruner(3, criterion="fire_rate", ratio=0.34).train()
    a(torch.tensor([[1.0, -1.0, 1.0]]))
    a.set_mask(torch.tensor([1, 0, 1]))
    assert b.importance() is None and b.mask.tolist() == [1, 1, 1]
    b.load_state_dict(a.state_dict())
    assert b.mask.tolist() == a.mask.tolist() and torch.equal(b.importance(), a.importance())
    assert set(a.state_dict()) == {"mask", "ratio", "steps_done", "stat_sum", "stat_sq", "stat_count"}


def test_bad_arguments():
    # EvefxErrors that are still ValueErrors (issue 12, item 11)
    with pytest.raises(OptionError, match=r"^ChannelPruner: unknown criterion 'magic'; use one of l1_norm, fire_rate, kl_div, taylor$"):
        ChannelPruner(3, criterion="magic")
    with pytest.raises(OptionError, match=r"^ChannelPruner: ratio must be in \[0, 1\) \(got 1.0\)$"):
        ChannelPruner(3, ratio=1.0)
    with pytest.raises(ShapeError, match=r"^ChannelPruner expects 3 channels on dim 1, got shape \(1, 4\)$"):
        ChannelPruner(3)(torch.ones(1, 4))
    assert issubclass(OptionError, ValueError) and issubclass(ShapeError, ValueError)
