"""Rule ``rules/permute.py`` alone: per-channel ops between a transpose (or permute) and its inverse.

``bn1d(linear(x).transpose(1, 2)).transpose(1, 2)`` on ``[B, N, C]`` tokens is one
linear; so is a channels-last ``bn2d(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)``
and a 1x1 conv1d between transposes; a linear between transposes of a conv1d's
output is a 1x1 conv. A wide kernel between the two and tensors read outside the pair
stay as written; a BN between permutations that do not undo each other folds into the
linear through the first (``test_lone_permute.py`` holds the lone permutes).
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C = 8
TOKENS = (2, 5, C)


def transpose(g: GraphBuilder, y, spelling: str = "transpose"):
    if spelling == "permute":
        return g.call(aten.permute.default, y, [0, 2, 1])
    return g.call(aten.transpose.int, y, 1, 2) if spelling == "transpose" else g.call(aten.transpose.int, y, -1, 1)


def linear_then(between: str, spelling: str = "transpose", tail: str | None = None):
    """``linear(x)`` on tokens, ``between`` on ``[B, C, N]`` between two transposes, then ``tail``."""
    g = GraphBuilder()
    y = transpose(g, g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C)), spelling)
    if between == "bn1d":
        y = g.batch_norm(y)
    elif between == "bn1d-functionalized":
        y = g.batch_norm(y, functionalized=True)
    elif between == "scale+shift":
        y = g.call(aten.add.Tensor, g.call(aten.mul.Tensor, y, g.positive(C, 1)), g.randn(C, 1))
    elif between.startswith("conv1d"):
        y = g.conv(y, C, int(between[-1]), padding=int(between[-1]) // 2, bias=True)
    y = transpose(g, y, spelling)
    if tail == "plus-one":
        y = g.call(aten.add.Tensor, y, 1.0)
    return g.build(g.call(aten.relu.default, y))


def one_linear_then_relu():
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C))
    return g.build(g.call(aten.relu.default, y))


def channels_last_bn2d():
    """``bn2d(linear(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)`` on ``[B, H, W, C]``."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", 2, 3, 4, C), g.randn(C, C), g.randn(C))
    y = g.batch_norm(g.call(aten.permute.default, y, [0, 3, 1, 2]))
    return g.build(g.call(aten.permute.default, y, [0, 2, 3, 1]))


def one_linear_hwc():
    g = GraphBuilder()
    return g.build(g.call(aten.linear.default, g.input("x", 2, 3, 4, C), g.randn(C, C), g.randn(C)))


def conv1d_then_token_linear():
    """``linear(conv1d(x).transpose(1, 2)).transpose(1, 2)``: the linear is a 1x1 conv on ``[B, C, N]``."""
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, C, 5), C, 3, padding=1, bias=True)
    y = g.call(aten.linear.default, g.call(aten.transpose.int, y, 1, 2), g.randn(C, C), g.randn(C))
    return g.build(g.call(aten.transpose.int, y, 1, 2))


def one_conv1d():
    g = GraphBuilder()
    x = g.input("x", 2, C, 5)
    return g.build(g.call(aten.conv1d.default, x, g.randn(C, C, 3), g.randn(C), [1], [1], [1], 1))


def double_transpose_after_a_shift():
    """What functionalizing ``y += 1`` on a transposed view leaves: ``(t + 1).transpose(1, 2).transpose(1, 2)``."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C))
    y = g.call(aten.add.Tensor, y, 1.0)
    y = g.call(aten.transpose.int, g.call(aten.transpose.int, y, 1, 2), 1, 2)
    return g.build(g.call(aten.relu.default, y))


@pytest.mark.parametrize("before, expected", [
    pytest.param(lambda: linear_then("bn1d"), one_linear_then_relu, id="linear-transpose-bn1d-transpose"),
    pytest.param(lambda: linear_then("bn1d-functionalized"), one_linear_then_relu, id="functionalized-bn1d"),
    pytest.param(lambda: linear_then("bn1d", "permute"), one_linear_then_relu, id="permute-0-2-1"),
    pytest.param(lambda: linear_then("bn1d", "negative-dims"), one_linear_then_relu, id="transpose-minus1-1"),
    pytest.param(lambda: linear_then("scale+shift"), one_linear_then_relu, id="per-channel-scale-and-shift"),
    pytest.param(lambda: linear_then("conv1d-1"), one_linear_then_relu, id="1x1-conv1d-between"),
    pytest.param(lambda: linear_then("bn1d", tail="plus-one"), one_linear_then_relu, id="bn1d-then-a-shift"),
    pytest.param(channels_last_bn2d, one_linear_hwc, id="channels-last-bn2d"),
    pytest.param(conv1d_then_token_linear, one_conv1d, id="linear-between-transposes-of-a-conv1d"),
    pytest.param(double_transpose_after_a_shift, one_linear_then_relu, id="transpose-of-a-transpose"),
])
def test_ops_between_a_transpose_and_its_inverse_fold(before, expected):
    assert_folds(before(), expected())


def not_inverse():
    """``permute(0, 2, 1)`` then ``transpose(0, 1)``: the second does not undo the first."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C))
    y = g.batch_norm(g.call(aten.permute.default, y, [0, 2, 1]))
    return g.build(g.call(aten.relu.default, g.call(aten.transpose.int, y, 0, 1)))


def transposed_read_twice():
    g = GraphBuilder()
    t = transpose(g, g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C)))
    return g.build(g.call(aten.relu.default, transpose(g, g.batch_norm(t))), t)


def lone_transpose():
    g = GraphBuilder()
    return g.build(g.call(aten.relu.default, transpose(g, g.input("x", *TOKENS))))


def spatial_dims_swapped():
    """``transpose(2, 3)`` twice around a BN2d on ``[B, C, H, W]``: the channel dim stays where it is."""
    g = GraphBuilder()
    y = g.call(aten.transpose.int, g.call(aten.relu.default, g.input("x", 2, C, 4, 5)), 2, 3)
    return g.build(g.call(aten.transpose.int, g.batch_norm(y), 2, 3))


def relu_scale_shift():
    """A scale and shift is emitted as one ``addcmul`` (``test_lone_permute.test_a_scale_and_shift_is_emitted_as_one_op``)."""
    g = GraphBuilder()
    x = g.call(aten.relu.default, g.input("x", 2, C, 4, 5))
    return g.build(g.call(aten.addcmul.default, g.randn(C, 1, 1), x, g.randn(C, 1, 1)))


def test_bn_between_swaps_of_spatial_dims_is_a_bn_in_place():
    assert_folds(spatial_dims_swapped(), relu_scale_shift())


def not_inverse_folded():
    """``not_inverse`` with its BN folded into the linear: the permutations stay, as written."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C))
    y = g.call(aten.transpose.int, g.call(aten.permute.default, y, [0, 2, 1]), 0, 1)
    return g.build(g.call(aten.relu.default, y))


def test_bn_between_permutations_that_do_not_undo_each_other_folds_into_the_linear():
    """The BN acts on the linear's channel, moved to dim 1: it folds through the lone permute (issue 16, item 2);
    the transpose after it moves that channel to dim 0 and stays a layout change."""
    assert_folds(not_inverse(), not_inverse_folded())


@pytest.mark.parametrize("before, reason", [
    pytest.param(lambda: linear_then("conv1d-3"), "does not commute with a transpose", id="3-tap-conv1d-between"),
    pytest.param(transposed_read_twice, None, id="transposed-tensor-read-twice"),
    pytest.param(lone_transpose, None, id="lone-transpose"),
])
def test_permutations_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)
