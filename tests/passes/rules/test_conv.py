"""Rule ``rules/conv.py`` alone: convolutions in aten graphs built by hand (no torch.export).

Each folding case states the graph before and the graph the fold must leave; the
fold's result must compute what the graph computed (seeded inputs, randomized BN)
and a second fold must change nothing. Must-not-fold cases leave the graph exactly
as written and say why.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
CONV = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


def conv_bn(rank: int, cin: int, cout: int, groups: int, stride: int, dilation: int, bias: bool):
    g = GraphBuilder()
    x = g.input("x", 2, cin, *[7] * rank)
    y = g.conv(x, cout, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=bias)
    return g.build(g.batch_norm(y))


def one_conv(rank: int, cin: int, cout: int, groups: int, stride: int, dilation: int, bias: bool):
    g = GraphBuilder()
    x = g.input("x", 2, cin, *[7] * rank)
    weight, shift = g.randn(cout, cin // groups, *[3] * rank), g.randn(cout)
    return g.build(g.call(CONV[rank], x, weight, shift, [stride] * rank, [dilation] * rank, [dilation] * rank, groups))


@pytest.mark.parametrize("rank, cin, cout, groups, stride, dilation, bias", [
    pytest.param(1, 8, 8, 8, 1, 2, False, id="1d-depthwise-dilation2"),
    pytest.param(2, 4, 8, 1, 1, 1, False, id="2d"),
    pytest.param(2, 4, 8, 2, 2, 1, True, id="2d-groups2-stride2-bias"),
    pytest.param(2, 8, 16, 8, 1, 2, True, id="2d-depthwise-multiplier2-dilation2-bias"),
    pytest.param(3, 4, 4, 4, 2, 1, False, id="3d-depthwise-stride2"),
])
def test_conv_then_bn_becomes_one_conv(rank, cin, cout, groups, stride, dilation, bias):
    args = (rank, cin, cout, groups, stride, dilation, bias)
    result = assert_folds(conv_bn(*args), one_conv(*args))
    assert result.rewrites[0].kernel_shapes == ((cout, cin // groups) + (3,) * rank,)


def generic_convolution_bn():
    """``aten.convolution`` (what some decompositions leave) with every argument written out."""
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    y = g.call(aten.convolution.default, x, g.randn(8, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    return g.build(g.batch_norm(y))


def padding_string_bn(padding: str):
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.batch_norm(g.call(aten.conv2d.padding, x, g.randn(8, 4, 3, 3), None, [1, 1], padding)))


def conv3x3(padding: int):
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    weight, shift = g.randn(8, 4, 3, 3), g.randn(8)
    return g.build(g.call(aten.conv2d.default, x, weight, shift, [1, 1], [padding] * 2, [1, 1], 1))


def pointwise_then_3x3():
    """1x1 without bias -> zero-padded 3x3: the 1x1 maps the zero border to zero, so one 3x3 is exact."""
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.conv(g.conv(x, 4, 1), 8, 3, padding=1, bias=True))


def three_by_three_then_pointwise():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.conv(g.conv(x, 8, 3, padding=1, bias=True), 8, 1, bias=True))


def conv3x3_8_to_8():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    weight, shift = g.randn(8, 4, 3, 3), g.randn(8)
    return g.build(g.call(aten.conv2d.default, x, weight, shift, [1, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("before, expected", [
    pytest.param(generic_convolution_bn, lambda: conv3x3(1), id="aten.convolution+bn"),
    pytest.param(lambda: padding_string_bn("same"), lambda: conv3x3(1), id="padding-same-odd-kernel+bn"),
    pytest.param(lambda: padding_string_bn("valid"), lambda: conv3x3(0), id="padding-valid+bn"),
    pytest.param(pointwise_then_3x3, conv3x3_8_to_8, id="1x1-then-3x3"),
    pytest.param(three_by_three_then_pointwise, conv3x3_8_to_8, id="3x3-then-1x1"),
])
def test_conv_variant_folds(before, expected):
    assert_folds(before(), expected())


def even_kernel_same_bn():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.batch_norm(g.call(aten.conv2d.padding, x, g.randn(8, 4, 2, 2), None, [1, 1], "same")))


def unbatched_conv_bn():
    """conv2d on a [C, H, W] tensor: dim 1 is not the channel dim, so the BN that follows cannot be folded in."""
    g = GraphBuilder()
    x = g.input("x", 4, 8, 8)
    y = g.call(aten.conv2d.default, x, g.randn(8, 4, 3, 3), None, [1, 1], [1, 1])
    return g.build(g.call(aten.mul.Tensor, y, 2.0))


def weight_from_input_bn():
    g = GraphBuilder()
    x, weight = g.input("x", 2, 4, 8, 8), g.input("weight", 8, 4, 3, 3)
    return g.build(g.batch_norm(g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])))


def biased_pointwise_then_padded_3x3():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.conv(g.conv(x, 4, 1, bias=True), 8, 3, padding=1))


def bottleneck():
    """A channel-reducing 1x1 before a 3x3: merged, the 3x3 would read all 32 channels."""
    g = GraphBuilder()
    x = g.input("x", 2, 32, 8, 8)
    return g.build(g.conv(g.conv(x, 8, 1), 32, 3, padding=1, bias=True))


@pytest.mark.parametrize("before, reason", [
    pytest.param(even_kernel_same_bn, "padding='same' with an even kernel pads asymmetrically", id="same-even-kernel"),
    pytest.param(unbatched_conv_bn, None, id="unbatched-input"),
    pytest.param(weight_from_input_bn, "weight is computed from graph inputs", id="weight-is-an-input"),
    pytest.param(biased_pointwise_then_padded_3x3, "border rule", id="border-rule-1x1-bias-then-padded-3x3"),
    pytest.param(bottleneck, "cost rule", id="cost-rule-bottleneck"),
])
def test_conv_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)


def test_bottleneck_folds_when_cost_is_ignored():
    g = GraphBuilder()
    x = g.input("x", 2, 32, 8, 8)
    expected = g.build(g.call(aten.conv2d.default, x, g.randn(32, 32, 3, 3), g.randn(32), [1, 1], [1, 1], [1, 1], 1))
    assert_folds(bottleneck(), expected, cost="always")
