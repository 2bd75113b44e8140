"""``normalizations``: the ops of a tensor normalized by its own statistics, and the look-alikes that are not."""

from __future__ import annotations

import pytest
import torch

from repfx.passes.dataflow import input_free
from repfx.passes.normalizations import normalizations
from pass_graphs import GraphBuilder

aten = torch.ops.aten
C = 8


def layer_norm_over_channels(g, x):
    """ConvNeXt's channels-first LayerNorm: centre, divide by the root of the variance plus eps."""
    centred = g.call(aten.sub.Tensor, x, g.call(aten.mean.dim, x, [1], True))
    variance = g.call(aten.mean.dim, g.call(aten.pow.Tensor_Scalar, centred, 2), [1], True)
    return g.call(aten.div.Tensor, centred, g.call(aten.sqrt.default, g.call(aten.add.Tensor, variance, 1e-6)))


def rms_norm(g, x):
    mean_square = g.call(aten.mean.dim, g.call(aten.pow.Tensor_Scalar, x, 2), [1], True)
    return g.call(aten.mul.Tensor, x, g.call(aten.rsqrt.default, g.call(aten.add.Tensor, mean_square, 1e-6)))


def softmax_over_channels(g, x):
    shifted = g.call(aten.exp.default, g.call(aten.sub.Tensor, x, g.call(aten.amax.default, x, [1], True)))
    return g.call(aten.div.Tensor, shifted, g.call(aten.sum.dim_IntList, shifted, [1], True))


def stacked_branches_added_to_their_input(g, x):
    """``x + stack([conv(x), conv(x)]).sum(0)``: the sum is not broadcast back, so this is a sum of branches."""
    stacked = g.call(aten.stack.default, [g.conv(x, C, 3, padding=1), g.conv(x, C, 1)])
    return g.call(aten.add.Tensor, x, g.call(aten.sum.dim_IntList, stacked, [0]))


def squeeze_excite(g, x):
    """``x * sigmoid(conv(mean(x)))``: the gate is a learnt function of the statistic, not the statistic."""
    gate = g.call(aten.sigmoid.default, g.conv(g.call(aten.mean.dim, x, [2, 3], True), C, 1))
    return g.call(aten.mul.Tensor, x, gate)


@pytest.mark.parametrize("write, expected", [
    pytest.param(layer_norm_over_channels, {"sub", "mean", "mean_1", "add", "sqrt", "div"}, id="layer-norm"),
    pytest.param(rms_norm, {"mean", "add", "rsqrt", "mul"}, id="rms-norm"),
    pytest.param(softmax_over_channels, {"sub", "amax", "sum_1", "div"}, id="softmax"),
    pytest.param(stacked_branches_added_to_their_input, set(), id="stacked-branches-not-a-normalization"),
    pytest.param(squeeze_excite, set(), id="squeeze-excite-not-a-normalization"),
])
def test_normalizations_are_the_ops_of_a_tensor_divided_or_shifted_by_its_own_statistics(write, expected):
    g = GraphBuilder()
    gm = g.build(write(g, g.conv(g.input("x", 2, C, 6, 6), C, 3, padding=1)))
    assert {node.name for node in normalizations(gm, input_free(gm))} == expected
