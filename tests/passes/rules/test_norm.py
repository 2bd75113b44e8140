"""Rules ``rules/norm.py`` alone: eval BatchNorm as a per-channel affine, in aten graphs built by hand.

Both spellings capture leaves are covered: ``aten.batch_norm`` (a graph without
mutations) and ``_native_batch_norm_legit_no_training`` + ``getitem`` (a
functionalized graph). Statistics and affine are random, so no BN is an identity.
"""

from __future__ import annotations

import operator

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten


def image(g: GraphBuilder, channels: int = 4):
    return g.input("x", 2, channels, 8, 8)


def conv3x3(cin: int = 4, cout: int = 8):
    g = GraphBuilder()
    x = image(g, cin)
    weight, shift = g.randn(cout, cin, 3, 3), g.randn(cout)
    return g.build(g.call(aten.conv2d.default, x, weight, shift, [1, 1], [1, 1], [1, 1], 1))


def conv_bn(functionalized: bool = False, eps: float = 1e-5, count: int = 1):
    g = GraphBuilder()
    y = g.conv(image(g), 8, 3, padding=1)
    for _ in range(count):
        y = g.batch_norm(y, functionalized=functionalized, eps=eps)
    return g.build(y)


def conv_bn_without_affine():
    """``BatchNorm2d(affine=False)``: weight and bias are None, the statistics still make it affine."""
    g = GraphBuilder()
    y = g.conv(image(g), 8, 3, padding=1)
    mean, var = g.randn(8, name="running_mean"), g.positive(8, name="running_var")
    return g.build(g.call(aten.batch_norm.default, y, None, None, mean, var, False, 0.1, 1e-5, False))


def conv_plus_bn_branch():
    """RepVGG's identity branch is a BN alone: ``conv3x3(x) + bn(x)``."""
    g = GraphBuilder()
    x = image(g, 8)
    return g.build(g.call(aten.add.Tensor, g.conv(x, 8, 3, padding=1), g.batch_norm(x)))


def bn_after_sum():
    g = GraphBuilder()
    x = image(g)
    total = g.call(aten.add.Tensor, g.conv(x, 8, 3, padding=1, bias=True), g.conv(x, 8, 1, bias=True))
    return g.build(g.batch_norm(total))


@pytest.mark.parametrize("before, expected", [
    pytest.param(conv_bn, conv3x3, id="batch_norm"),
    pytest.param(lambda: conv_bn(functionalized=True), conv3x3, id="native-batch-norm+getitem"),
    pytest.param(lambda: conv_bn(eps=1e-3), conv3x3, id="eps-1e-3"),
    pytest.param(lambda: conv_bn(count=2), conv3x3, id="two-bns-in-a-row"),
    pytest.param(conv_bn_without_affine, conv3x3, id="affine-false"),
    pytest.param(conv_plus_bn_branch, lambda: conv3x3(8, 8), id="bn-alone-as-a-branch"),
    pytest.param(bn_after_sum, conv3x3, id="bn-after-a-sum"),
])
def test_batch_norm_folds_into_the_conv(before, expected):
    assert_folds(before(), expected())


def training_bn():
    """``training=True``: batch statistics, not affine in x (also how ``track_running_stats=False`` exports)."""
    g = GraphBuilder()
    y = g.conv(image(g), 8, 3, padding=1)
    weight, bias = g.randn(8, name="bn_weight"), g.randn(8, name="bn_bias")
    return g.build(g.call(aten.batch_norm.default, y, weight, bias, None, None, True, 0.1, 1e-5, False))


def saved_statistics_read():
    """Output 1 of the functional BN is read too: the BN node cannot disappear into the conv."""
    g = GraphBuilder()
    y = g.conv(image(g), 8, 3, padding=1)
    stats = g.call(aten._native_batch_norm_legit_no_training.default, y, g.randn(8), g.randn(8), g.randn(8),
                   g.positive(8), 0.1, 1e-5)
    return g.build(g.call(operator.getitem, stats, 0), g.call(operator.getitem, stats, 1))


def bn_after_relu():
    g = GraphBuilder()
    return g.build(g.batch_norm(g.call(aten.relu.default, g.conv(image(g), 8, 3, padding=1))))


@pytest.mark.parametrize("before, reason", [
    pytest.param(training_bn, None, id="training-mode"),
    pytest.param(saved_statistics_read, None, id="saved-statistics-read"),
    pytest.param(bn_after_relu, None, id="lone-bn-after-relu"),
])
def test_batch_norm_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)
