"""End to end (torch.export -> repfx): sequential chains, linear layers, token layouts.

kxk -> 1x1, 1x1 -> kxk, avg-pool and zero-pad branches and DBB's BN-and-pad chain
become one conv; linear branches with BatchNorm1d become one linear, on [N, C] and on
[B, N, C] tokens across a flatten; a layout copy a later view needs is kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repfx import samples

from helpers import (C, HW, assert_dynamic_batch_folds, assert_folds_idempotently, assert_idempotent,
                     assert_matches, assert_ops, build, conv_bn, image, ops, rand, reparam, rewrite_kernels)


# ---------------------------------------------------------------------------------------------
# 1. sequential chains
# ---------------------------------------------------------------------------------------------

class PointwiseBNPadKxK(nn.Module):
    """DBB chain: 1x1 -> BN -> pad with BN's zero response -> 3x3 (padding 0) -> BN."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 1, bias=False)
        self.bnpad = samples.BNAndPad(1, C, style=style)
        self.conv2 = nn.Conv2d(C, C, 3, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv2(self.bnpad(self.conv1(x))))


class PointwiseThenKxK(nn.Module):
    """1x1 (no bias) -> 3x3 with zero padding: exact as one 3x3 since the 1x1 maps 0 to 0."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 1, bias=False)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class KxKThenPointwise(nn.Module):
    """3x3 conv-BN -> 1x1 conv-BN."""

    def __init__(self):
        super().__init__()
        self.first = conv_bn(C, C, 3, 1)
        self.second = conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.second(self.first(x))


class AvgPoolBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv_bn(C, C, 3, 1)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.conv(x) + self.bn(self.pool(x))


class ExplicitZeroPad(nn.Module):
    """F.pad (zeros) then a padding-0 3x3, plus a 1x1 branch of the unpadded input."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(C, C, 3, 0)
        self.point = conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.conv(F.pad(x, [1, 1, 1, 1])) + self.point(x)


SEQUENTIAL_CASES = [
    pytest.param(lambda: PointwiseBNPadKxK("slices"), (C, C, 3, 3), id="1x1-bn-pad(slices)-3x3"),
    pytest.param(lambda: PointwiseBNPadKxK("shift"), (C, C, 3, 3), id="1x1-bn-pad(shift)-3x3"),
    pytest.param(PointwiseThenKxK, (C, C, 3, 3), id="1x1-3x3"),
    pytest.param(KxKThenPointwise, (C, C, 3, 3), id="3x3bn-1x1bn"),
    pytest.param(AvgPoolBranch, (C, C, 3, 3), id="avgpool3x3+3x3"),
    pytest.param(ExplicitZeroPad, (C, C, 3, 3), id="F.pad-zeros-3x3+1x1"),
    pytest.param(lambda: samples.DiverseBranchBlock(4, 8), (8, 4, 3, 3), id="dbb-block"),
    pytest.param(lambda: samples.DiverseBranchBlock(4, 8, pad_style="shift"), (8, 4, 3, 3), id="dbb-block-shift"),
]


@pytest.mark.parametrize("factory, kernel", SEQUENTIAL_CASES)
def test_sequential_chain_becomes_one_conv(factory, kernel):
    model = build(factory)
    x = rand(2, kernel[1], HW, HW)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert rewrite_kernels(report) == [kernel]


# ---------------------------------------------------------------------------------------------
# 2. linear layers
# ---------------------------------------------------------------------------------------------

class LinearBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C, bias=False)
        self.bn = nn.BatchNorm1d(C)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x) + x)


def test_linear_sum_and_bn1d_become_one_linear():
    model = build(LinearBlock)
    x = rand(4, C)
    before = ops(model.eval(), x)
    assert before["addmm"] + before["mm"] == 2
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=0, batch_norm=0, add=0)
    assert counts["addmm"] + counts["mm"] == 1, dict(counts)
    assert rewrite_kernels(report) == [(C, C)]


# ---------------------------------------------------------------------------------------------
# 3. layouts: tokens, a copy before a view
# ---------------------------------------------------------------------------------------------

class ConvBNThenLayoutChange(nn.Module):
    """conv-BN, an in-place ReLU (forces functionalization), then transpose + contiguous + view:
    the contiguous copy is what makes the view legal and must survive the rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        y = torch.relu_(self.bn(self.conv(x)))
        return y.transpose(2, 3).contiguous().view(y.shape[0], -1)


def test_layout_copy_before_a_view_is_kept():
    model = build(ConvBNThenLayoutChange)
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0)


class LinearNormTokens(nn.Module):
    """timm's LeViT LinearNorm: a linear on [B, N, C] tokens, BatchNorm1d over flatten(0, 1), reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(C, C, bias=False)
        self.bn = nn.BatchNorm1d(C)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearNormTokensNotReshapedBack(LinearNormTokens):
    def forward(self, x):
        return self.bn(self.linear(x).flatten(0, 1))


def test_linear_batchnorm_across_a_token_flatten_becomes_one_linear():
    model = build(LinearNormTokens)
    x = rand(2, 5, C)
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    counts = ops(gm, x)
    assert counts["batch_norm"] == 0 and counts["linear"] + counts["addmm"] + counts["mm"] == 1
    assert_idempotent(gm, x)


def test_region_ending_in_another_layout_is_left_alone():
    """Emitting linear(x) would give [B, N, C], not the region's [B*N, C]: nothing is rewritten."""
    model = build(LinearNormTokensNotReshapedBack)
    x = rand(2, 5, C)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert ops(gm, x)["batch_norm"] == 1 and not report.rewrites


# ---------------------------------------------------------------------------------------------
# 4. idempotence, dynamic batch
# ---------------------------------------------------------------------------------------------

IDEMPOTENCE_CASES = [
    pytest.param(lambda: samples.DiverseBranchBlock(4, 8), (2, 4, HW, HW), id="dbb-block"),
    pytest.param(LinearBlock, (4, C), id="linear"),
]


@pytest.mark.parametrize("factory, shape", IDEMPOTENCE_CASES)
def test_idempotent(factory, shape):
    assert_folds_idempotently(factory, shape)


@pytest.mark.parametrize("factory, example_batch", [
    pytest.param(lambda: PointwiseBNPadKxK("slices"), 2, id="1x1-bnpad-3x3"),
])
def test_dynamic_batch(factory, example_batch):
    assert_dynamic_batch_folds(factory, example_batch)
