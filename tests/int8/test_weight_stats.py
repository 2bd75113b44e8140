"""Weight statistics on hand-built weights whose every number is known, and matched across folding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import repfx
from repfx import samples
from repfx.capture.export import capture
from repfx.int8.weight_stats import identity_tap_share, int8_sqnr_db, max_over_std, spread, weight_stats
from repfx.samples.repvgg import RepVGGBlock


def test_max_over_std_per_channel_largest_and_median():
    weight = torch.tensor([[1.0, -1, 1, -1],  # std 1, max 1
                           [2.0, -2, 0, 0],  # std sqrt(2), max 2
                           [3.0, -1, -1, -1],  # std sqrt(3), max 3
                           [5.0, 5, 5, 5]])  # std 0: left out
    ratios = max_over_std(weight)
    assert torch.allclose(ratios[:3], torch.tensor([1.0, math.sqrt(2), math.sqrt(3)], dtype=torch.float64))
    assert math.isnan(ratios[3])
    assert (spread(ratios).largest, spread(ratios).median) == pytest.approx((math.sqrt(3), math.sqrt(2)))


def test_identity_tap_share_counts_centre_taps_on_the_own_channel():
    weight = torch.full((4, 4, 3, 3), 0.5)
    for channel in range(3):
        weight[channel, channel, 1, 1] = 10.0
    weight[3, 0, 1, 1] = 10.0  # channel 3's largest tap reads channel 0: not an identity tap
    assert identity_tap_share(weight) == 0.75


def test_identity_tap_share_in_groups_and_where_it_does_not_apply():
    depthwise = torch.zeros(4, 1, 3, 3)
    depthwise[:, 0, 1, 1] = 1.0
    depthwise[0, 0, 0, 0] = 2.0
    assert identity_tap_share(depthwise, groups=4) == 0.75
    assert identity_tap_share(torch.eye(6)) == 1.0  # a linear with an identity folded in
    assert identity_tap_share(torch.ones(8, 4, 3, 3)) is None  # 4 inputs, 8 outputs
    assert identity_tap_share(torch.ones(4, 4, 2, 2)) is None  # no centre tap


def test_sqnr_of_symmetric_per_channel_int8():
    assert int8_sqnr_db(torch.tensor([[127.0, -3.0], [0.0, 0.0]])) == math.inf  # on the grid; a zero channel
    # scale 1: 0.5 rounds to 0 (to even), an error of 0.5
    assert int8_sqnr_db(torch.tensor([[127.0, 0.5]])) == pytest.approx(10 * math.log10((127 ** 2 + 0.25) / 0.25))
    # scale 254 / 127 = 2: 1.0 -> 0.5 of a step rounds to 0; 3.0 -> 1.5 rounds to 2 (4.0): errors 1 and 1
    assert int8_sqnr_db(torch.tensor([[254.0, 1.0, 3.0]])) == pytest.approx(
        10 * math.log10((254 ** 2 + 1 + 9) / 2))


def test_worst_channel_sqnr():
    weight = torch.tensor([[127.0, 0.5], [254.0, 1.0]])  # errors 0.5 and 1.0 (scales 1 and 2)
    assert int8_sqnr_db(weight, worst_channel=True) == pytest.approx(10 * math.log10((254 ** 2 + 1) / 1.0))


def injected_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepVGGBlock(8, 8), RepVGGBlock(8, 8)).eval()
    samples.randomize_bn_(model, 0)
    model[2].identity.weight.data[:3] = 300.0
    return model


def test_folding_is_matched_to_the_kxk_conv_it_came_from():
    model = injected_net()
    x = torch.randn(2, 3, 12, 12)
    plain = repfx.reparameterize(model, (x,), cost="always")
    stats = weight_stats(plain, training=capture(model, (x,)).graph, rewrites=plain.repfx_report.rewrites)
    assert [s.module for s in stats] == ["0", "1", "2"]
    stem, first, injected = stats
    assert stem.before_from == "not folded" and stem.before == stem.max_over_std
    assert stem.identity_tap_share is None  # 3 -> 8 channels
    assert first.before_from.endswith("[8, 8, 3, 3]") and first.before is not None
    want = spread(max_over_std(model[2].dense.conv.weight))  # what max/std was in the training form
    assert (injected.before.largest, injected.before.median) == pytest.approx((want.largest, want.median))
    assert injected.max_over_std.largest > 3 * injected.before.largest  # the 300s widen the folded kernel
    assert injected.identity_tap_share >= 3 / 8
    assert injected.worst_channel_sqnr_db <= injected.sqnr_db
    assert injected.channel_range_spread > 50 > first.channel_range_spread


def test_before_is_unknown_without_the_training_graph():
    model = injected_net()
    x = torch.randn(1, 3, 8, 8)
    plain = repfx.reparameterize(model, (x,), cost="always")
    stats = weight_stats(plain)
    assert stats[1].before is None and stats[1].before_from == "unknown: no training-form graph given"
    assert weight_stats(plain, training=capture(model, (x,)).graph)[1].before_from.startswith(
        "unknown: the region")
