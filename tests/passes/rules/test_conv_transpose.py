"""Rule ``rules/conv_transpose.py`` alone: transposed convolutions in aten graphs built by hand
(``conv_transpose*d``, and ``convolution(transposed=True)``, which ``rules/conv.py`` hands to it).

A BN (or a scale, or a 1x1 conv) after a transposed convolution folds into it, with
any stride, output_padding, groups and dilation, and so does a per-channel scale
before it; with stride 1 and no output_padding it is a forward conv with the
flipped kernel, which merges like any conv. A shift before it, a spatial kernel
after it and branches of another geometry are refused with the reason.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
TRANSPOSED = {1: aten.conv_transpose1d.default, 2: aten.conv_transpose2d.input, 3: aten.conv_transpose3d.input}
CONV = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
CIN, COUT = 4, 8


def conv_transpose(g: GraphBuilder, x, *, stride=1, padding=0, output_padding=0, groups=1, dilation=1, bias=True,
                   kernel=3, cout=COUT):
    """``aten.conv_transpose{1,2,3}d`` with every argument written (weight ``[C_in, C_out/g, k...]``)."""
    rank = x.meta["val"].dim() - 2
    weight = g.randn(x.meta["val"].shape[1], cout // groups, *[kernel] * rank)
    return g.call(TRANSPOSED[rank], x, weight, g.randn(cout, name="bias") if bias else None, [stride] * rank,
                  [padding] * rank, [output_padding] * rank, groups, [dilation] * rank)


def transposed_then_bn(rank: int, **options):
    g = GraphBuilder()
    x = g.input("x", 2, CIN, *[5] * rank)
    return g.build(g.batch_norm(conv_transpose(g, x, **options)))


def one_transposed(rank: int, **options):
    g = GraphBuilder()
    x = g.input("x", 2, CIN, *[5] * rank)
    return g.build(conv_transpose(g, x, **{**options, "bias": True}))


def one_conv(rank: int, padding: int, dilation: int = 1, groups: int = 1):
    g = GraphBuilder()
    x = g.input("x", 2, CIN, *[5] * rank)
    weight, shift = g.randn(COUT, CIN // groups, *[3] * rank), g.randn(COUT)
    return g.build(g.call(CONV[rank], x, weight, shift, [1] * rank, [padding] * rank, [dilation] * rank, groups))


@pytest.mark.parametrize("rank, options", [
    pytest.param(1, {"stride": 2}, id="1d-stride2"),
    pytest.param(2, {"stride": 2, "padding": 1, "output_padding": 1}, id="2d-stride2-padding1-output_padding1"),
    pytest.param(2, {"stride": 3, "groups": 4, "bias": False}, id="2d-stride3-groups4-no-bias"),
    pytest.param(2, {"stride": 2, "dilation": 2, "output_padding": 1}, id="2d-dilation2-output_padding1"),
    pytest.param(2, {"padding": 3}, id="2d-stride1-padding-beyond-the-kernel"),
    pytest.param(3, {"stride": 2, "groups": 2, "dilation": 2}, id="3d-stride2-groups2-dilation2"),
])
def test_bn_folds_into_the_transposed_conv(rank, options):
    assert_folds(transposed_then_bn(rank, **options), one_transposed(rank, **options))


def convolution_transposed_then_bn(rank: int, *, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                                   bias=True):
    """The same op spelled ``aten.convolution(..., transposed=True, ...)``, as a TorchScript conversion writes it."""
    g = GraphBuilder()
    x = g.input("x", 2, CIN, *[5] * rank)
    weight = g.randn(CIN, COUT // groups, *[3] * rank)
    y = g.call(aten.convolution.default, x, weight, g.randn(COUT, name="bias") if bias else None, [stride] * rank,
               [padding] * rank, [dilation] * rank, True, [output_padding] * rank, groups)
    return g.build(g.batch_norm(y))


@pytest.mark.parametrize("rank, options", [
    pytest.param(2, {"stride": 2, "padding": 1, "output_padding": 1}, id="2d-stride2-padding1-output_padding1"),
    pytest.param(1, {"stride": 3, "groups": 4, "bias": False}, id="1d-stride3-groups4-no-bias"),
])
def test_bn_folds_into_a_transposed_convolution_call(rank, options):
    assert_folds(convolution_transposed_then_bn(rank, **options), one_transposed(rank, **options))


def test_a_stride_one_transposed_convolution_call_becomes_a_forward_conv():
    assert_folds(convolution_transposed_then_bn(2, padding=1), one_conv(2, padding=1))


@pytest.mark.parametrize("rank, options, padding", [
    pytest.param(1, {}, 2, id="1d-padding0"),
    pytest.param(2, {"padding": 1}, 1, id="2d-padding1"),
    pytest.param(3, {"padding": 1, "bias": False}, 1, id="3d-no-bias"),
])
def test_stride_one_transposed_conv_bn_becomes_a_forward_conv(rank, options, padding):
    assert_folds(transposed_then_bn(rank, **options), one_conv(rank, padding))


def test_grouped_dilated_stride_one_becomes_a_grouped_dilated_conv():
    options = {"dilation": 2, "groups": 2, "padding": 1}
    assert_folds(transposed_then_bn(2, **options), one_conv(2, padding=3, dilation=2, groups=2))


def stride_one_branches():
    """``bn(conv_transpose3x3(x, padding=1)) + bn(conv3x3(x)) + x``: all on one grid, one conv."""
    g = GraphBuilder()
    x = g.input("x", 2, COUT, 6, 6)
    a = g.batch_norm(conv_transpose(g, x, padding=1))
    b = g.batch_norm(g.conv(x, COUT, 3, padding=1))
    return g.build(g.call(aten.add.Tensor, g.call(aten.add.Tensor, a, b), x))


def one_square_conv():
    g = GraphBuilder()
    x = g.input("x", 2, COUT, 6, 6)
    return g.build(g.call(aten.conv2d.default, x, g.randn(COUT, COUT, 3, 3), g.randn(COUT), [1, 1], [1, 1], [1, 1], 1))


def scale_then_transposed():
    """A per-channel scale (no shift) before the transposed conv, a BN after it."""
    g = GraphBuilder()
    x = g.input("x", 2, CIN, 5, 5)
    scaled = g.call(aten.mul.Tensor, x, g.positive(CIN, 1, 1))
    return g.build(g.batch_norm(conv_transpose(g, scaled, stride=2)))


def same_geometry_branches():
    """Two stride-2 transposed convs of one input with equal geometry and different groups, each with a BN."""
    g = GraphBuilder()
    x = g.input("x", 2, CIN, 5, 5)
    a = g.batch_norm(conv_transpose(g, x, stride=2, padding=1))
    b = g.batch_norm(conv_transpose(g, x, stride=2, padding=1, groups=2))
    return g.build(g.call(aten.add.Tensor, a, b))


def transposed_then_pointwise():
    g = GraphBuilder()
    x = g.input("x", 2, CIN, 5, 5)
    return g.build(g.conv(conv_transpose(g, x, stride=2), COUT, 1, bias=True))


@pytest.mark.parametrize("before, expected", [
    pytest.param(stride_one_branches, one_square_conv, id="stride1-merges-with-a-conv-branch-and-identity"),
    pytest.param(scale_then_transposed, lambda: one_transposed(2, stride=2), id="scale-before"),
    pytest.param(same_geometry_branches, lambda: one_transposed(2, stride=2, padding=1), id="same-geometry-branches"),
    pytest.param(transposed_then_pointwise, lambda: one_transposed(2, stride=2), id="1x1-conv-after"),
])
def test_ops_around_a_transposed_conv_fold(before, expected):
    assert_folds(before(), expected(), cost="always")


def bn_then_transposed():
    g = GraphBuilder()
    return g.build(conv_transpose(g, g.batch_norm(g.input("x", 2, CIN, 5, 5)), stride=2))


def transposed_then_3x3():
    g = GraphBuilder()
    x = g.input("x", 2, CIN, 5, 5)
    return g.build(g.conv(conv_transpose(g, x, stride=2), COUT, 3, padding=1))


def different_geometry_branches():
    """Kernel 4 padding 1 and kernel 2 padding 0, both stride 2: equal output size, different taps."""
    g = GraphBuilder()
    x = g.input("x", 2, CIN, 5, 5)
    return g.build(g.call(aten.add.Tensor, conv_transpose(g, x, stride=2, kernel=4, padding=1),
                          conv_transpose(g, x, stride=2, kernel=2)))


def transposed_plus_conv():
    """A stride-1 transposed 1x1 conv whose padding crops (no forward form) and a 3x3 conv of the same input."""
    g = GraphBuilder()
    x = g.input("x", 2, CIN, 5, 5)
    return g.build(g.call(aten.add.Tensor, conv_transpose(g, x, padding=1, kernel=1), g.conv(x, COUT, 3)))


def transposed_bn_read_twice():
    g = GraphBuilder()
    y = conv_transpose(g, g.input("x", 2, CIN, 5, 5), stride=2)
    return g.build(g.batch_norm(y), g.call(aten.relu.default, y))


@pytest.mark.parametrize("before, reason", [
    pytest.param(bn_then_transposed, "not constant near the border", id="shift-before"),
    pytest.param(transposed_then_3x3, "only a per-channel affine or an unpadded 1x1", id="3x3-conv-after"),
    pytest.param(different_geometry_branches, "merge only with equal kernel size, stride, padding",
                 id="branches-of-different-geometry"),
    pytest.param(transposed_plus_conv, "merges with no forward convolution", id="transposed-plus-forward-branch"),
    pytest.param(transposed_bn_read_twice, "also used by", id="output-also-read-elsewhere"),
])
def test_transposed_conv_must_not_fold(before, reason):
    assert_unchanged(before(), cost="always", refused=reason)
