"""End to end (torch.export -> repfx): what must NOT merge, and that the refusal is reported with its reason.

Nonlinearities, intermediates used elsewhere, branches of different tensors or on
different grids, the border rule, non-zero padding modes, batch statistics and the
cost rule; refused results stay exact and idempotent. (Shared weights fold per use:
``test_shared_weights.py``.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repfx

from helpers import (C, HW, assert_folds_idempotently, assert_matches, assert_ops, assert_refused, build,
                     conv_bn, image, ops, rand, reparam, rewrite_kernels)


# ---------------------------------------------------------------------------------------------
# 1. must NOT merge
# ---------------------------------------------------------------------------------------------

class AcrossReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_no_merge_across_relu():
    model = build(AcrossReLU)
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=2, batch_norm=0, add=0)
    assert counts["relu"] + counts["relu_"] == 1  # the activation still runs once (in place when it may)


class ReturnsIntermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class IntermediateFeedsTwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


@pytest.mark.parametrize("factory, extra", [
    pytest.param(ReturnsIntermediate, {}, id="also-returned"),
    pytest.param(IntermediateFeedsTwoBranches, {"add": 1, "relu": 1}, id="also-feeds-relu-branch"),
])
def test_no_merge_when_intermediate_used_elsewhere(factory, extra):
    model = build(factory)
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=1, **extra)
    assert_refused(report, "also used by")


class ResidualOfOtherInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = conv_bn(C, C, 3, 1)

    def forward(self, x, y):
        return x + self.f(y)


def test_no_merge_of_branches_reading_different_tensors():
    model = build(ResidualOfOtherInput)
    x, y = image(seed=1), image(seed=2)
    gm, report = reparam(model, (x, y))
    assert_matches(model, gm, (x, y))
    assert_ops(gm, (x, y), convolution=1, batch_norm=0, add=1)
    assert_refused(report, "different tensors")


class DifferentStrides(nn.Module):
    """1x1 stride 2 and 4x4 stride 1 (padding 0) both map 7x7 to 4x4; the grids differ."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(C, C, 1, 0, stride=2), conv_bn(C, C, 4, 0, stride=1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class MisalignedCentres(nn.Module):
    """3x3 stride 2 padding 1 and 2x2 stride 2 padding 0 both map 8x8 to 4x4, centred differently."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3, 1, stride=2), conv_bn(C, C, 2, 0, stride=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("factory, size, keyword", [
    pytest.param(DifferentStrides, 7, "stride", id="different-strides"),
    pytest.param(MisalignedCentres, 8, "misaligned", id="misaligned-centres"),
])
def test_no_merge_of_branches_on_different_grids(factory, size, keyword):
    model = build(factory)
    x = image(size=size)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=1)
    assert_refused(report, keyword)


class BorderRule(nn.Module):
    """1x1 with a shift (bias or BN) -> zero-padded 3x3: the border would see the shift."""

    def __init__(self, shift: str) -> None:
        super().__init__()
        self.point = nn.Conv2d(C, C, 1, bias=shift == "bias")
        self.bn = nn.BatchNorm2d(C) if shift == "bn" else nn.Identity()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(self.point(x)))


@pytest.mark.parametrize("shift", [pytest.param("bias", id="1x1-bias"), pytest.param("bn", id="1x1-bn")])
def test_border_rule_keeps_two_convs(shift):
    model = build(lambda: BorderRule(shift))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=0)
    assert_refused(report, "border rule")


class ReflectPadded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.point = conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.point(x)


def test_reflect_padding_is_exact_and_not_treated_as_zero_padding():
    model = build(ReflectPadded)
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    counts = ops(gm, x)
    assert counts["batch_norm"] == 0  # each BN still folds into its own conv
    assert counts["convolution"] == 2  # the reflect-padded conv cannot absorb the 1x1 branch
    assert any("reflect" in name for name in counts), dict(counts)
    assert_refused(report, "reflect")


class BatchStatisticsBN(nn.Module):
    """A BN without running statistics normalizes with batch statistics even in eval(): not affine."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C, track_running_stats=False)
        self.point = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.point(x)


def test_batch_statistics_bn_is_left_in_place():
    model = build(BatchStatisticsBN)
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=1, add=1)


class DepthwisePlusDense(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.dw = conv_bn(channels, channels, 3, 1, groups=channels)
        self.point = conv_bn(channels, channels, 1, 0)

    def forward(self, x):
        return self.dw(x) + self.point(x)


def test_cost_rule_keeps_depthwise_and_dense_apart():
    model = build(DepthwisePlusDense)
    x = rand(2, 32, HW, HW)
    gm, report = reparam(model, x, cost="macs")  # at this size the latency rule merges (tests/targets)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=1)
    assert_refused(report, "cost rule")


def test_cost_always_forces_depthwise_and_dense_into_one_conv():
    model = build(DepthwisePlusDense)
    x = rand(2, 32, HW, HW)
    gm, report = reparam(model, x, cost="always")
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert rewrite_kernels(report) == [(32, 32, 3, 3)]


class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(64, 16, 1, bias=False)
        self.expand = nn.Conv2d(16, 64, 3, padding=1)

    def forward(self, x):
        return self.expand(self.reduce(x))


def test_cost_rule_keeps_bottleneck_apart():
    model = build(Bottleneck)
    x = rand(2, 64, HW, HW)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=0)
    assert_refused(report, "cost rule")
    forced, _ = reparam(model, x, cost="always")
    assert_matches(model, forced, x)
    assert_ops(forced, x, convolution=1, batch_norm=0, add=0)


def test_explain_reports_without_verifying():
    model = build(DepthwisePlusDense)
    x = rand(2, 32, HW, HW)
    report = repfx.explain(model, (x,), cost="macs")
    assert report.max_abs_error is None
    assert report.rewrites and report.ops_after["convolution"] == 2
    assert_refused(report, "cost rule")


# ---------------------------------------------------------------------------------------------
# 2. idempotence of refused results; activations in place only where safe
# ---------------------------------------------------------------------------------------------

IDEMPOTENCE_CASES = [
    pytest.param(DepthwisePlusDense, (2, 32, HW, HW), "macs", id="cost-rule-refused"),
    pytest.param(DepthwisePlusDense, (2, 32, HW, HW), "latency", id="latency-merged"),
    pytest.param(lambda: BorderRule("bn"), (2, C, HW, HW), "latency", id="border-rule-refused"),
]


@pytest.mark.parametrize("factory, shape, cost", IDEMPOTENCE_CASES)
def test_idempotent(factory, shape, cost):
    assert_folds_idempotently(factory, shape, cost=cost)


class ActivationReadTwice(nn.Module):
    """The pre-activation value is also returned: the ReLU must not overwrite it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y), y


def test_activation_runs_in_place_only_where_nothing_else_reads_its_input():
    x = image()
    plain_gm, _ = reparam(build(AcrossReLU), x)
    assert ops(plain_gm, x)["relu_"] == 1 and ops(plain_gm, x)["relu"] == 0
    model = build(ActivationReadTwice)
    gm, _ = reparam(model, x)
    assert ops(gm, x)["relu"] == 1 and ops(gm, x)["relu_"] == 0
    assert_matches(model, gm, x)
