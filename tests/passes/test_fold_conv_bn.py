"""End to end (torch.export -> repfx): conv + eval BN, single-op branches, a BN after the sum, channel concat.

Each case is a small training-form module written here. Every test checks the
numbers (against the original eager model in eval mode, tolerance relative to the
output magnitude) and the structure (exact executed op counts of the result).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import (C, assert_matches, assert_ops, assert_refused, build, conv_bn, image, rand, reparam,
                     rewrite_kernels)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ---------------------------------------------------------------------------------------------
# 1. conv + eval BN -> one conv
# ---------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    def __init__(self, rank: int, cin: int, cout: int, k: int, stride: int, dilation: int, groups: int,
                 bias: bool) -> None:
        super().__init__()
        self.conv = _CONV[rank](cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation,
                                groups=groups, bias=bias)
        self.bn = _BN[rank](cout)

    def forward(self, x):
        return self.bn(self.conv(x))


# (rank, cin, cout, groups, stride, dilation, bias)
CONV_BN_CASES = [
    pytest.param(1, 8, 8, 8, 1, 2, False, id="1d-depthwise-dilation2"),
    pytest.param(1, 4, 8, 2, 2, 1, True, id="1d-groups2-stride2-bias"),
    pytest.param(2, 4, 8, 1, 1, 1, False, id="2d"),
    pytest.param(2, 4, 8, 2, 1, 1, False, id="2d-groups2"),
    pytest.param(2, 4, 8, 1, 2, 2, True, id="2d-stride2-dilation2-bias"),
    pytest.param(2, 8, 8, 8, 1, 1, False, id="2d-depthwise"),
    pytest.param(2, 8, 16, 8, 1, 1, True, id="2d-depthwise-multiplier2-bias"),
    pytest.param(2, 8, 8, 2, 2, 2, True, id="2d-groups2-stride2-dilation2-bias"),
    pytest.param(3, 4, 8, 2, 2, 1, True, id="3d-groups2-stride2-bias"),
    pytest.param(3, 4, 4, 4, 1, 2, False, id="3d-depthwise-dilation2"),
]


@pytest.mark.parametrize("rank, cin, cout, groups, stride, dilation, bias", CONV_BN_CASES)
def test_conv_bn_folds_into_one_conv(rank, cin, cout, groups, stride, dilation, bias):
    model = build(lambda: ConvBN(rank, cin, cout, 3, stride, dilation, groups, bias))
    size = 6 if rank == 3 else 9
    x = rand(2, cin, *[size] * rank)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert len(report.rewrites) == 1
    (shape,) = report.rewrites[0].kernel_shapes
    assert shape == (cout, cin // groups) + (3,) * rank


# ---------------------------------------------------------------------------------------------
# 2. branch kinds merged with a conv branch
# ---------------------------------------------------------------------------------------------

class ConvPlusBranch(nn.Module):
    """``BN(conv3x3(x)) + branch(x)`` for a non-conv branch kind."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.main = conv_bn(C, C, 3, 1)
        self.bn = nn.BatchNorm2d(C)
        self.register_buffer("scale", torch.rand(C, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(C, 1, 1))

    def forward(self, x):
        if self.kind == "bn":
            other = self.bn(x)
        elif self.kind == "identity":
            other = x
        elif self.kind == "half":
            other = 0.5 * x
        elif self.kind == "affine":
            other = x * self.scale + self.shift
        elif self.kind == "neg":
            return self.main(x) - x
        else:
            raise ValueError(self.kind)
        return self.main(x) + other


@pytest.mark.parametrize("kind", [
    pytest.param("bn", id="bn-alone"),
    pytest.param("identity", id="identity"),
    pytest.param("half", id="scalar-scale-0.5"),
    pytest.param("affine", id="per-channel-affine-buffers"),
    pytest.param("neg", id="subtract-identity"),
])
def test_branch_kind_merges_with_conv(kind):
    model = build(lambda: ConvPlusBranch(kind))
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0, mul=0, sub=0, div=0)


# ---------------------------------------------------------------------------------------------
# 3. BN after the sum
# ---------------------------------------------------------------------------------------------

class PostSumBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(C, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


def test_bn_after_sum_folds():
    model = build(PostSumBN)
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


# ---------------------------------------------------------------------------------------------
# 4. concat
# ---------------------------------------------------------------------------------------------

class CatBranches(nn.Module):
    def __init__(self, second_kernel: int) -> None:
        super().__init__()
        self.a = conv_bn(C, C, 3, 1)
        self.b = conv_bn(C, 4, second_kernel, second_kernel // 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


@pytest.mark.parametrize("second_kernel, cost", [
    pytest.param(3, "macs", id="3x3+3x3"),
    pytest.param(1, "always", id="3x3+1x1-cost-always"),
])
def test_concat_becomes_one_conv_with_stacked_channels(second_kernel, cost):
    model = build(lambda: CatBranches(second_kernel))
    x = image()
    gm, report = reparam(model, x, cost=cost)
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert counts["cat"] == 0
    assert rewrite_kernels(report) == [(C + 4, C, 3, 3)]


def test_concat_3x3_and_1x1_refused_by_cost_rule():
    """Stacking a 1x1 into a 3x3 costs more MACs than the two convs: kept as 2 convs + cat (the MACs rule)."""
    model = build(lambda: CatBranches(1))
    x = image()
    gm, report = reparam(model, x, cost="macs")
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=2, batch_norm=0, add=0)
    assert counts["cat"] == 1
    assert_refused(report, "cost rule")
