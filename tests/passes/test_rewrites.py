"""Re-parameterization rewrites, one behaviour per test.

Each case is a small training-form module written here. Every test checks the
numbers (against the original eager model in eval mode, tolerance relative to the
output magnitude) and the structure (exact executed op counts of the result);
must-not-merge cases also check that the refusal is reported with its reason.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repfx
from repfx import samples
from helpers import assert_idempotent, assert_matches, assert_ops, assert_refused, build, ops, rand, reparam

C = 8  # channels of most cases
HW = 8  # spatial size of most cases

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def image(channels: int = C, size: int = HW, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return rand(batch, channels, size, size, seed=seed)


def conv_bn(cin: int, cout: int, k, padding=0, groups: int = 1, stride: int = 1, dilation: int = 1,
            bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias), nn.BatchNorm2d(cout))


def only_rewrite_kernels(report: repfx.Report) -> list[tuple[int, ...]]:
    return [shape for rewrite in report.rewrites for shape in rewrite.kernel_shapes]


def emitted_convs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]


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
# 3. k-way sums: kernel sizes, dilations, groups
# ---------------------------------------------------------------------------------------------

class RepVGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.bn(x)


class ACBLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.square = conv_bn(C, C, 3, 1)
        self.hor = conv_bn(C, C, (1, 3), (0, 1))
        self.ver = conv_bn(C, C, (3, 1), (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class RepLKLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.large = conv_bn(C, C, 13, 6, groups=C)
        self.small = conv_bn(C, C, 5, 2, groups=C)

    def forward(self, x):
        return self.large(x) + self.small(x)


class FivePlusDilated(nn.Module):
    """5x5 and a dilation-2 3x3 span the same 5x5 window."""

    def __init__(self):
        super().__init__()
        self.five = conv_bn(C, C, 5, 2)
        self.dilated = conv_bn(C, C, 3, 2, dilation=2)

    def forward(self, x):
        return self.five(x) + self.dilated(x)


class DilatedPlusPointwise(nn.Module):
    """A dilated 3x3 plus a 1x1 (its centre tap): the merged kernel can stay a dilated 3x3."""

    def __init__(self):
        super().__init__()
        self.dilated = conv_bn(C, C, 3, 2, dilation=2)
        self.point = conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.dilated(x) + self.point(x)


class MixedGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = conv_bn(C, C, 3, 1)
        self.grouped = conv_bn(C, C, 1, 0, groups=2)

    def forward(self, x):
        return self.dense(x) + self.grouped(x)


class Rect(nn.Module):
    """A non-square 3x5 kernel summed with a 3x3."""

    def __init__(self):
        super().__init__()
        self.wide = conv_bn(C, C, (3, 5), (1, 2))
        self.square = conv_bn(C, C, 3, 1)

    def forward(self, x):
        return self.wide(x) + self.square(x)


class StridedBranches(nn.Module):
    """Stride 2 on every branch (RepVGG's first block of a stage)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(C, 2 * C, 3, 1, stride=2), conv_bn(C, 2 * C, 1, 0, stride=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


K_WAY_CASES = [
    pytest.param(RepVGGLike, (C, C, 3, 3), 1, id="3x3+1x1+bn-identity"),
    pytest.param(ACBLike, (C, C, 3, 3), 1, id="acb-1x3+3x1+3x3"),
    pytest.param(RepLKLike, (C, 1, 13, 13), C, id="replk-13x13dw+5x5dw"),
    pytest.param(FivePlusDilated, (C, C, 5, 5), 1, id="5x5+3x3-dilation2"),
    pytest.param(DilatedPlusPointwise, (C, C, 3, 3), 1, id="3x3-dilation2+1x1-stays-dilated"),
    pytest.param(MixedGroups, (C, C, 3, 3), 1, id="dense3x3+grouped1x1"),
    pytest.param(Rect, (C, C, 3, 5), 1, id="3x5+3x3"),
    pytest.param(StridedBranches, (2 * C, C, 3, 3), 1, id="stride2-3x3+1x1"),
]


@pytest.mark.parametrize("factory, kernel, groups", K_WAY_CASES)
def test_k_way_sum_becomes_one_conv(factory, kernel, groups):
    model = build(factory)
    x = image(size=16)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert only_rewrite_kernels(report) == [kernel]
    (conv,) = emitted_convs(gm)
    assert conv.args[-1] == groups


def test_dilated_merge_keeps_dilation():
    """3x3 dilation 2 + 1x1: the merged conv is a 3x3 with dilation 2, not a 5x5 of zeros."""
    model = build(DilatedPlusPointwise)
    x = image(size=12)
    gm, _ = reparam(model, x)
    (conv,) = emitted_convs(gm)
    weight, stride, padding, dilation = conv.args[1], conv.args[3], conv.args[4], conv.args[5]
    assert tuple(getattr(gm, weight.target).shape) == (C, C, 3, 3)
    assert list(dilation) == [2, 2] and list(padding) == [2, 2] and list(stride) == [1, 1]


class SumStyle(nn.Module):
    """Three conv-BN branches of one input, summed in different Python styles."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.branches = nn.ModuleList([conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0), conv_bn(C, C, (1, 3), (0, 1))])

    def forward(self, x):
        if self.style == "loop":
            out = 0
            for branch in self.branches:
                out = out + branch(x)
            return out
        a, b, c = (branch(x) for branch in self.branches)
        if self.style == "plus":
            return a + b + c
        if self.style == "torch.add":
            return torch.add(torch.add(a, b), c)
        if self.style == "builtin-sum":
            return sum([a, b, c])
        if self.style == "inplace":
            out = a
            out += b
            out += c
            return out
        raise ValueError(self.style)


@pytest.mark.parametrize("style", [
    pytest.param("plus", id="a+b+c"),
    pytest.param("torch.add", id="torch.add"),
    pytest.param("builtin-sum", id="sum-list"),
    pytest.param("inplace", id="inplace-+="),
    pytest.param("loop", id="modulelist-loop"),
])
def test_summation_style_does_not_matter(style):
    model = build(lambda: SumStyle(style))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert only_rewrite_kernels(report) == [(C, C, 3, 3)]


# ---------------------------------------------------------------------------------------------
# 4. BN after the sum
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
# 5. sequential chains
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
    assert only_rewrite_kernels(report) == [kernel]


# ---------------------------------------------------------------------------------------------
# 6. concat
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
    assert only_rewrite_kernels(report) == [(C + 4, C, 3, 3)]


def test_concat_3x3_and_1x1_refused_by_cost_rule():
    """Stacking a 1x1 into a 3x3 costs more MACs than the two convs: kept as 2 convs + cat."""
    model = build(lambda: CatBranches(1))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=2, batch_norm=0, add=0)
    assert counts["cat"] == 1
    assert_refused(report, "cost rule")


# ---------------------------------------------------------------------------------------------
# 7. linear layers
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
    assert only_rewrite_kernels(report) == [(C, C)]


# ---------------------------------------------------------------------------------------------
# 8. must NOT merge
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


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + self.conv(x)


class SharedConvWithBN(nn.Module):
    """The shared conv is followed by a BN on one use only: folding it would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x)), torch.relu(self.conv(x))


@pytest.mark.parametrize("factory, expected", [
    pytest.param(SharedConv, {"convolution": 2, "add": 1}, id="same-conv-twice-summed"),
    pytest.param(SharedConvWithBN, {"convolution": 2, "batch_norm": 1}, id="same-conv-one-use-has-bn"),
])
def test_no_fold_into_shared_weight(factory, expected):
    model = build(factory)
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, **expected)
    assert_refused(report, "shared")
    # the model's weights are still the graph's constants, not folded copies
    assert any(torch.equal(p, model.conv.weight) for p in gm.parameters())


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
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=1)
    assert_refused(report, "cost rule")


def test_cost_always_forces_depthwise_and_dense_into_one_conv():
    model = build(DepthwisePlusDense)
    x = rand(2, 32, HW, HW)
    gm, report = reparam(model, x, cost="always")
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert only_rewrite_kernels(report) == [(32, 32, 3, 3)]


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
    report = repfx.explain(model, (x,))
    assert report.max_abs_error is None
    assert report.rewrites and report.ops_after["convolution"] == 2
    assert_refused(report, "cost rule")


# ---------------------------------------------------------------------------------------------
# 9. idempotence, the user's model, training mode
# ---------------------------------------------------------------------------------------------

IDEMPOTENCE_CASES = [
    pytest.param(RepVGGLike, (2, C, HW, HW), id="repvgg-like"),
    pytest.param(lambda: samples.DiverseBranchBlock(4, 8), (2, 4, HW, HW), id="dbb-block"),
    pytest.param(DepthwisePlusDense, (2, 32, HW, HW), id="cost-rule-refused"),
    pytest.param(lambda: BorderRule("bn"), (2, C, HW, HW), id="border-rule-refused"),
    pytest.param(LinearBlock, (4, C), id="linear"),
]


@pytest.mark.parametrize("factory, shape", IDEMPOTENCE_CASES)
def test_idempotent(factory, shape):
    model = build(factory)
    x = rand(*shape)
    gm, _ = reparam(model, x)
    assert_idempotent(gm, x)


def test_rerun_on_result_does_not_warn():
    """The result is a graph with eval semantics: running repfx on it again must not warn about training mode."""
    model = build(RepVGGLike)
    x = image()
    gm, _ = reparam(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reparam(gm, x)
    assert not [w for w in caught if "training" in str(w.message).lower()], [str(w.message) for w in caught]


def test_result_supports_eval():
    """Deploy code calls .eval() on what it is given; the result must accept it and stay exact."""
    model = build(RepVGGLike)
    x = image()
    gm, _ = reparam(model, x)
    gm.eval()
    assert not gm.training
    assert_matches(model, gm, x)


@pytest.mark.parametrize("training", [pytest.param(False, id="eval-model"), pytest.param(True, id="train-model")])
def test_model_is_not_modified(training):
    model = build(RepVGGLike, train=training)
    x = image()
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reparam(model, x)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert after.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(after[name], value), name


def test_training_mode_model_warns_and_gets_eval_semantics():
    model = build(RepVGGLike, train=True)
    x = image()
    with pytest.warns(UserWarning, match=r"(?i)training.*batchnorm|batchnorm.*training"):
        gm, _ = reparam(model, x)
    assert model.training
    reference = copy.deepcopy(model).eval()
    assert_matches(reference, gm, x)
    with torch.no_grad():
        train_out = copy.deepcopy(model)(x)
    assert not torch.allclose(train_out, reference(x), atol=1e-3), "batch stats should differ from running stats"
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


# ---------------------------------------------------------------------------------------------
# 10. the result as a deployable graph
# ---------------------------------------------------------------------------------------------

def test_result_can_be_exported_again():
    model = build(RepVGGLike)
    x = image()
    gm, _ = reparam(model, x)
    program = torch.export.export(gm, (x,))
    assert_matches(model, program.module(), x)
    assert_ops(program.module(), x, convolution=1, batch_norm=0, add=0)


class VarArgsForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = RepVGGLike()

    def forward(self, *inputs):
        return self.block(inputs[0])


@pytest.mark.parametrize("factory, example_batch", [
    pytest.param(RepVGGLike, 2, id="repvgg-like"),
    pytest.param(RepVGGLike, 1, id="repvgg-like-example-batch-1"),
    pytest.param(lambda: PointwiseBNPadKxK("slices"), 2, id="1x1-bnpad-3x3"),
    pytest.param(VarArgsForward, 2, id="forward(*inputs)"),
])
def test_dynamic_batch(factory, example_batch):
    model = build(factory)
    gm, _ = reparam(model, rand(example_batch, C, HW, HW), dynamic_batch=True)
    for batch in (1, 3, 8):
        x = rand(batch, C, HW, HW, seed=batch)
        assert_matches(model, gm, x)
        assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


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


# -- regressions from an adversarial review ------------------------------------------------

class TokenLinearScaled(nn.Module):
    """Per-channel scale on a linear's [B, N, C] output: the scale broadcasts on the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.gain = nn.Parameter(torch.rand(6))

    def forward(self, x):
        y = self.linear(x)
        return torch.relu(y * self.gain + y)


class PromotedByBuffer(nn.Module):
    """fp32 conv times an fp64 buffer: the region would change dtype midway."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(4, 1, 1, dtype=torch.float64))

    def forward(self, x):
        return self.conv(x) * self.scale


class UnbatchedPool(nn.Module):
    def forward(self, x):
        return F.avg_pool1d(x, 3, 1, 1) * 2


class WritesIntoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x.div_(255)
        return self.bn(self.conv(x))


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


@pytest.mark.parametrize("factory,shape", [
    pytest.param(TokenLinearScaled, (2, 3, 4), id="channel-last-scale"),
    pytest.param(PromotedByBuffer, (1, 3, 8, 8), id="dtype-promotion"),
    pytest.param(UnbatchedPool, (4, 10), id="unbatched-avgpool"),
])
def test_reviewed_models_come_back_exact(factory, shape):
    model = build(factory)
    x = rand(*shape)
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)


def test_forward_writing_into_its_input_leaves_the_callers_tensor_alone():
    model = build(WritesIntoInput)
    x = image(3, 6)
    before = x.clone()
    gm, _ = reparam(model, x)
    assert torch.equal(x, before)
    assert_ops(gm, x.clone(), convolution=1, batch_norm=0)


def test_state_the_model_updates_is_not_folded_as_a_constant():
    model = Counter().eval()
    x = image(3, 8)
    program = torch.export.export(model, (x,))
    state = {k: v.clone() for k, v in program.state_dict.items()}
    gm, _ = reparam(program, x)  # would fail verification if calls were folded into the weights
    assert all(torch.equal(state[k], v) for k, v in program.state_dict.items())


def test_identity_region_does_not_return_its_input():
    class TimesOne(nn.Module):
        def forward(self, x):
            return x * 1.0

    x = image()
    gm, _ = reparam(TimesOne().eval(), x)
    assert gm(x).data_ptr() != x.data_ptr()


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


class HalvesSum(nn.Module):
    """``x*0.5 + x*0.5`` is exactly ``x``: one copy, never an alias of the input."""

    def forward(self, x):
        return x * 0.5 + x * 0.5


def test_region_equal_to_its_input_becomes_one_copy():
    x = image()
    model = HalvesSum().eval()
    gm, report = reparam(model, x)
    counts = ops(gm, x)
    assert counts["total"] == 1 and counts["clone"] == 1, dict(counts)
    assert gm(x).data_ptr() != x.data_ptr()
    assert_matches(model, gm, x)
    assert_idempotent(gm, x)
