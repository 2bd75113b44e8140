"""Rules ``rules/pool_pad.py`` alone: average pooling, zero padding and DBB's border fill, in aten graphs built by hand.

The border fill is written as capture leaves DBB's BN-and-pad layer after
functionalization: the pad value computed in the graph from the BN's parameters,
a zero pad, and one ``slice``/``expand``/``copy``/``slice_scatter`` write per strip.
"""

from __future__ import annotations

import operator

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C = 8
POOL = {1: aten.avg_pool1d.default, 2: aten.avg_pool2d.default, 3: aten.avg_pool3d.default}
CONV = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
END = 9223372036854775807  # how export writes an open slice end
BORDER = [(2, 0, 1), (2, -1, END), (3, 0, 1), (3, -1, END)]  # (dim, start, end) of each strip, pad 1


def conv3x3(rank: int = 2, padding: int = 1, cin: int = C):
    g = GraphBuilder()
    x = g.input("x", 2, cin, *[8] * rank)
    weight, shift = g.randn(C, cin, *[3] * rank), g.randn(C)
    return g.build(g.call(CONV[rank], x, weight, shift, [1] * rank, [padding] * rank, [1] * rank, 1))


def pool_branch(rank: int):
    """``conv3x3(x) + bn(avg_pool3x3(x))``: the pool is a depthwise 3x3 of ninths."""
    g = GraphBuilder()
    x = g.input("x", 2, C, *[8] * rank)
    pooled = g.call(POOL[rank], x, [3] * rank, [1] * rank, [1] * rank)
    return g.build(g.call(aten.add.Tensor, g.conv(x, C, 3, padding=1), g.batch_norm(pooled)))


def pointwise_then_pool():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.avg_pool2d.default, g.conv(x, C, 1), [3, 3], [1, 1], [1, 1]))


def pool_then_pointwise():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.conv(g.call(aten.avg_pool2d.default, x, [3, 3], [1, 1], [1, 1]), C, 1, bias=True))


def zero_pad_then_conv(target):
    """``conv3x3(pad(x)) + conv1x1(x)``, padding 0 on the conv: one zero-padded 3x3."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    padded = g.call(target, x, [1, 1, 1, 1]) if target is aten.pad.default else g.call(target, x, [1, 1, 1, 1], 0.0)
    return g.build(g.call(aten.add.Tensor, g.conv(padded, C, 3), g.conv(x, C, 1)))


def zero_response(g: GraphBuilder, weight, bias, mean, var):
    """``bias - mean * weight / sqrt(var + eps)`` as [1, C, 1, 1], computed in the graph as DBB does."""
    scale = g.call(aten.div.Tensor, weight, g.call(aten.sqrt.default, g.call(aten.add.Tensor, var, 1e-5)))
    return g.call(aten.view.default, g.call(aten.sub.Tensor, bias, g.call(aten.mul.Tensor, mean, scale)), [1, -1, 1, 1])


def fill_border(g: GraphBuilder, padded, values, strips=BORDER):
    """Each strip of ``strips`` (of a zero pad 1) overwritten with a [1, C, 1, 1] value, as a slice assignment."""
    out = padded
    for (dim, start, end), value in zip(strips, values):
        strip = g.call(aten.slice.Tensor, out, dim, start, end)
        expanded = g.call(aten.expand.default, g.call(aten.view.default, value, [C, 1, 1]), list(strip.meta["val"].shape))
        out = g.call(aten.slice_scatter.default, out, g.call(aten.copy.default, strip, expanded), dim, start, end)
    return out


def dbb_chain(style: str):
    """DBB's 1x1 -> BN-and-pad -> 3x3 (padding 0) -> BN, the border written as slices or as ``pad(y - v) + v``."""
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, C, 8, 8), C, 1)
    weight, bias, mean, var = g.bn_parameters(C)
    value = zero_response(g, weight, bias, mean, var)
    if style == "slices":
        stats = g.call(aten._native_batch_norm_legit_no_training.default, y, weight, bias, mean, var, 0.1, 1e-5)
        padded = g.call(aten.pad.default, g.call(operator.getitem, stats, 0), [1, 1, 1, 1])
        padded = fill_border(g, padded, [value] * 4)
    else:
        normed = g.call(aten.batch_norm.default, y, weight, bias, mean, var, False, 0.1, 1e-5, False)
        shifted = g.call(aten.pad.default, g.call(aten.sub.Tensor, normed, value), [1, 1, 1, 1])
        padded = g.call(aten.add.Tensor, shifted, value)
    return g.build(g.batch_norm(g.conv(padded, C, 3)))


@pytest.mark.parametrize("before, expected, cost", [
    pytest.param(lambda: pool_branch(1), lambda: conv3x3(1), "macs", id="avg_pool1d-branch"),
    pytest.param(lambda: pool_branch(2), conv3x3, "macs", id="avg_pool2d-branch"),
    pytest.param(lambda: pool_branch(3), lambda: conv3x3(3), "macs", id="avg_pool3d-branch"),
    pytest.param(pointwise_then_pool, conv3x3, "always", id="1x1-then-avg_pool"),
    pytest.param(pool_then_pointwise, conv3x3, "always", id="avg_pool-then-1x1"),
    pytest.param(lambda: zero_pad_then_conv(aten.pad.default), conv3x3, "macs", id="pad-zeros"),
    pytest.param(lambda: zero_pad_then_conv(aten.constant_pad_nd.default), conv3x3, "macs", id="constant_pad_nd-zeros"),
    pytest.param(lambda: dbb_chain("slices"), conv3x3, "macs", id="dbb-border-fill-slices"),
    pytest.param(lambda: dbb_chain("shift"), conv3x3, "macs", id="dbb-border-fill-shift"),
])
def test_pool_and_pad_fold(before, expected, cost):
    assert_folds(before(), expected(), cost=cost)


def pool_with(**options):
    """``conv3x3(x) + avg_pool(x, **options)`` for options that make the pool no convolution."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    padding, ceil_mode = options.get("padding", 1), options.get("ceil_mode", False)
    pooled = g.call(aten.avg_pool2d.default, x, [3, 3], [1, 1], [padding] * 2, ceil_mode,
                    options.get("count_include_pad", True), options.get("divisor_override"))
    return g.build(g.call(aten.add.Tensor, g.conv(x, C, 3, padding=1), pooled))


def padded_with(pad: list[int], mode: str = "constant"):
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.conv(g.call(aten.pad.default, g.conv(x, C, 1), pad, mode), C, 3, bias=True))


def unbatched_pool():
    g = GraphBuilder()
    return g.build(g.call(aten.mul.Tensor, g.call(aten.avg_pool1d.default, g.input("x", 4, 10), [3], [1], [1]), 2.0))


def border_written(strips=BORDER, values: str = "equal"):
    """1x1 -> zero pad 1 -> border writes -> 3x3 (padding 0), for writes that are no padding with one value."""
    g = GraphBuilder()
    padded = g.call(aten.pad.default, g.conv(g.input("x", 2, C, 8, 8), C, 1), [1, 1, 1, 1])
    value = g.randn(1, C, 1, 1, name="value")
    fills = [value] * 4 if values == "equal" else [value, value, g.randn(1, C, 1, 1, name="other"), value]
    return g.build(g.conv(fill_border(g, padded, fills, strips), C, 3))


@pytest.mark.parametrize("before, reason", [
    pytest.param(lambda: pool_with(ceil_mode=True), "ceil_mode pooling", id="ceil_mode"),
    pytest.param(lambda: pool_with(count_include_pad=False), "count_include_pad=False", id="count_include_pad-false"),
    pytest.param(lambda: pool_with(divisor_override=4), "divisor_override", id="divisor_override"),
    pytest.param(unbatched_pool, None, id="unbatched-avg_pool1d"),
    pytest.param(lambda: padded_with([1, 1, 1, 1], "reflect"), "reflect padding is not zero padding", id="reflect-pad"),
    pytest.param(lambda: padded_with([0, 1, 0, 1]), "asymmetric or negative padding", id="asymmetric-pad"),
    pytest.param(lambda: border_written(values="differ"), "border strips hold different values",
                 id="border-strips-differ"),
    pytest.param(lambda: border_written(BORDER[:3]), "are not exactly the padded border", id="border-partly-written"),
])
def test_pool_and_pad_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)


def biased_pointwise_zero_padded():
    """The 1x1's bias is its output on zeros, which a zero border is not: the pad joins the 3x3 only."""
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, C, 8, 8), C, 1, bias=True)
    return g.build(g.conv(g.call(aten.pad.default, y, [1, 1, 1, 1]), C, 3))


def padded_sum_of_two_inputs():
    """A pad of a sum of branches of two inputs: the pad joins the 3x3 only."""
    g = GraphBuilder()
    x, y = g.input("x", 2, C, 8, 8), g.input("y", 2, C, 8, 8)
    total = g.call(aten.add.Tensor, g.conv(x, C, 1), g.conv(y, C, 1))
    return g.build(g.conv(g.call(aten.pad.default, total, [1, 1, 1, 1]), C, 3))


def padded_3x3_after(inputs: int):
    """The graph above with the pad folded into the 3x3 (padding 1) and everything before it as written."""
    g = GraphBuilder()
    if inputs == 1:
        y = g.conv(g.input("x", 2, C, 8, 8), C, 1, bias=True)
    else:
        x, y = g.input("x", 2, C, 8, 8), g.input("y", 2, C, 8, 8)
        y = g.call(aten.add.Tensor, g.conv(x, C, 1), g.conv(y, C, 1))
    return g.build(g.call(aten.conv2d.default, y, g.randn(C, C, 3, 3), g.randn(C), [1, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("before, expected, reason", [
    pytest.param(biased_pointwise_zero_padded, lambda: padded_3x3_after(1), "the pad value differs",
                 id="zero-pad-after-a-shift"),
    pytest.param(padded_sum_of_two_inputs, lambda: padded_3x3_after(2), "pads a sum of branches reading different",
                 id="pad-of-two-inputs"),
])
def test_pad_that_cannot_reach_back_folds_forward_only(before, expected, reason):
    assert_folds(before(), expected(), refused=reason)
