"""Weights read by several ops: each use folds on its own, into new weights; the shared tensor is never written.

Pass level (graphs built by hand): a conv, a linear or BN statistics read twice fold
in the use that merges while the other use keeps the original constant, unchanged;
a constant whose every use folds leaves the graph; a use that would only be
re-emitted with copied weights is left as written, with the reason. End to end
(torch.export -> repfx): a conv module used in a foldable sum and after a ReLU, one
used twice in one sum, and one BN module after two convs, with numerics, executed
ops, the user's parameters unchanged, and the neighbours that must not merge.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import (C, assert_matches, assert_ops, assert_refused, build, conv_bn, image,
                     ops, rewrite_kernels, reparam)
from pass_graphs import GraphBuilder, assert_folds, fold_to_fixed_point, structure

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# 1. pass level: before / expected
# ---------------------------------------------------------------------------------------------

def shared_conv_one_use_with_bn():
    """One weight read by two convs; a BN follows one of them, a ReLU the other."""
    g = GraphBuilder()
    x, weight = g.input("x", 2, 4, 8, 8), g.randn(8, 4, 3, 3)
    a = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    b = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    return g.build(g.batch_norm(a), g.call(aten.relu.default, b))


def shared_conv_one_use_folded():
    """The use under ReLU keeps the shared weight; the BN use is a new conv (with the BN's shift as bias)."""
    g = GraphBuilder()
    x, weight = g.input("x", 2, 4, 8, 8), g.randn(8, 4, 3, 3)
    kept = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    folded = g.call(aten.conv2d.default, x, g.randn(8, 4, 3, 3), g.randn(8), [1, 1], [1, 1], [1, 1], 1)
    return g.build(folded, g.call(aten.relu.default, kept))


def shared_linear_one_use_with_bn():
    g = GraphBuilder()
    x, weight = g.input("x", 4, C), g.randn(C, C)
    a, b = g.call(aten.linear.default, x, weight), g.call(aten.linear.default, x, weight)
    return g.build(g.batch_norm(a), g.call(aten.relu.default, b))


def shared_linear_one_use_folded():
    g = GraphBuilder()
    x, weight = g.input("x", 4, C), g.randn(C, C)
    kept = g.call(aten.linear.default, x, weight)
    folded = g.call(aten.linear.default, x, g.randn(C, C), g.randn(C))
    return g.build(folded, g.call(aten.relu.default, kept))


def shared_conv_summed_twice():
    """``conv(x) + conv(x)`` with one weight: both uses merge into one conv (kernel 2w); w is read no more."""
    g = GraphBuilder()
    x, weight = g.input("x", 2, 4, 8, 8), g.randn(8, 4, 3, 3)
    a = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    b = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    return g.build(g.call(aten.add.Tensor, a, b))


def one_conv_8_from_4():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.call(aten.conv2d.default, x, g.randn(8, 4, 3, 3), g.randn(8), [1, 1], [1, 1], [1, 1], 1))


def shared_statistics():
    """Two BNs reading one running_mean and running_var, each after its own conv: both fold."""
    g = GraphBuilder()
    x = g.input("x", 2, 8, 8, 8)
    mean, var = g.randn(8, name="running_mean"), g.positive(8, name="running_var")
    a = g.call(aten.batch_norm.default, g.conv(x, 8, 3, padding=1), None, None, mean, var, False, 0.1, 1e-5, False)
    b = g.call(aten.batch_norm.default, g.conv(x, 8, 3, padding=1), None, None, mean, var, False, 0.1, 1e-5, False)
    return g.build(a, b)


def two_convs_with_bias():
    g = GraphBuilder()
    x = g.input("x", 2, 8, 8, 8)
    a = g.call(aten.conv2d.default, x, g.randn(8, 8, 3, 3), g.randn(8), [1, 1], [1, 1], [1, 1], 1)
    b = g.call(aten.conv2d.default, x, g.randn(8, 8, 3, 3), g.randn(8), [1, 1], [1, 1], [1, 1], 1)
    return g.build(a, b)


@pytest.mark.parametrize("before, expected, copied", [
    pytest.param(shared_conv_one_use_with_bn, shared_conv_one_use_folded, ["weight_0"], id="conv-one-use-has-bn"),
    pytest.param(shared_linear_one_use_with_bn, shared_linear_one_use_folded, ["weight_0"], id="linear-one-use-has-bn"),
    pytest.param(shared_conv_summed_twice, one_conv_8_from_4, [], id="conv-twice-in-one-sum"),
    pytest.param(shared_statistics, two_convs_with_bias, [], id="bn-statistics-after-two-convs"),
])
def test_each_use_of_a_shared_weight_folds_on_its_own(before, expected, copied):
    graph = before()
    shared = {name: value.clone() for name, value in graph.named_buffers()}
    originals = dict(graph.named_buffers())
    result = assert_folds(graph, expected())
    assert [name for rewrite in result.rewrites for name in rewrite.copied] == copied
    for name, value in originals.items():  # never written, whether still read or dropped
        assert torch.equal(value, shared[name]), f"{name} was modified"
    kept = dict(graph.named_buffers())
    assert all(kept[name] is originals[name] for name in copied)  # the other use reads the very same tensor
    read = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    assert set(kept) & set(originals) == read & set(originals), "a constant no node reads is still held"
    if copied:
        assert any("shared weight" in r.reason for r in result.refusals), result.refusals


def shared_conv_carried_into_a_sum():
    """``conv_w(x) + bn(conv(y))`` and ``relu(conv_w(y))``: the sum would re-emit conv_w(x) with a copied
    weight and merge nothing into it; only the other branch folds."""
    g = GraphBuilder()
    x, y, weight = g.input("x", 2, 4, 8, 8), g.input("y", 2, 4, 8, 8), g.randn(8, 4, 3, 3)
    a = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    b = g.call(aten.conv2d.default, y, weight, None, [1, 1], [1, 1])
    other = g.batch_norm(g.conv(y, 8, 3, padding=1))
    return g.build(g.call(aten.add.Tensor, a, other), g.call(aten.relu.default, b))


def shared_conv_kept_other_branch_folded():
    g = GraphBuilder()
    x, y, weight = g.input("x", 2, 4, 8, 8), g.input("y", 2, 4, 8, 8), g.randn(8, 4, 3, 3)
    a = g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])
    b = g.call(aten.conv2d.default, y, weight, None, [1, 1], [1, 1])
    other = g.call(aten.conv2d.default, y, g.randn(8, 4, 3, 3), g.randn(8), [1, 1], [1, 1], [1, 1], 1)
    return g.build(g.call(aten.add.Tensor, other, a), g.call(aten.relu.default, b))


def test_a_use_that_would_only_copy_the_weight_is_left_as_written():
    result = assert_folds(shared_conv_carried_into_a_sum(), shared_conv_kept_other_branch_folded(),
                          refused="would only re-emit it with copied weights")
    assert [rewrite.copied for rewrite in result.rewrites] == [()]
    assert not any("shared weight" in r.reason for r in result.refusals)


def test_under_cost_always_too():
    graph = shared_conv_one_use_with_bn()
    fold_to_fixed_point(graph, "always")
    assert structure(graph) == structure(shared_conv_one_use_folded())


# ---------------------------------------------------------------------------------------------
# 2. end to end
# ---------------------------------------------------------------------------------------------

class ConvInSumAndAfterReLU(nn.Module):
    """One conv module twice: in a RepVGG-style sum (folds with the 1x1 branch), then after the ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.point = conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x) + self.point(x)))


class ConvTwiceInOneSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + self.conv(x)


class ConvOneUseHasBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x)), torch.relu(self.conv(x))


class BNAfterTwoConvs(nn.Module):
    """One BN module after two convs, one of them behind a ReLU (that use must not merge)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.b(x)), self.bn(torch.relu(self.a(x)))


class BNAfterTwoConvsBothFold(BNAfterTwoConvs):
    """The same modules; the ReLU comes after the BN, so both uses fold."""

    def forward(self, x):
        return torch.relu(self.bn(self.a(x))) + self.bn(self.b(x))


# module -> (executed ops besides the ReLUs, shared parameters the result still reads, kernels emitted)
CASES = [
    pytest.param(ConvInSumAndAfterReLU, dict(convolution=2, batch_norm=0, add=0), ["conv.weight"],
                 [(C, C, 3, 3)], id="conv-in-sum-and-after-relu"),
    pytest.param(ConvTwiceInOneSum, dict(convolution=1, batch_norm=0, add=0), [], [(C, C, 3, 3)],
                 id="conv-twice-in-one-sum"),
    pytest.param(ConvOneUseHasBN, dict(convolution=2, batch_norm=0), ["conv.weight"], [(C, C, 3, 3)],
                 id="conv-one-use-has-bn"),
    pytest.param(BNAfterTwoConvs, dict(convolution=2, batch_norm=1), ["bn.weight"], [(C, C, 1, 1)],
                 id="bn-after-two-convs-one-behind-relu"),
    pytest.param(BNAfterTwoConvsBothFold, dict(convolution=2, batch_norm=0, add=1), [],
                 [(C, C, 3, 3), (C, C, 1, 1)], id="bn-after-two-convs-both-fold"),
]


@pytest.mark.parametrize("factory, executed, kept, kernels", CASES)
def test_shared_module_folds_per_use(factory, executed, kept, kernels):
    model = build(factory)
    x = image()
    state = copy.deepcopy(model.state_dict())
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, **executed)
    assert counts["relu"] + counts["relu_"] == ops(model, x)["relu"]  # each activation still runs: no merge across
    assert sorted(rewrite_kernels(report)) == sorted(kernels)
    for name, value in model.state_dict().items():  # the user's shared parameters are untouched
        assert torch.equal(value, state[name]), f"{name} changed"
    params = dict(gm.named_parameters()) | dict(gm.named_buffers())
    for name in kept:  # the use that did not fold still reads the original values
        assert name in params and torch.equal(params[name], state[name]), sorted(params)
    if kept:
        assert_refused(report, "shared weight")
    else:
        assert not any(name in params for name in state if name.split(".")[0] in ("conv", "bn")), sorted(params)
    _, again = reparam(gm, x)
    assert again.rewrites == [], [rewrite.kind for rewrite in again.rewrites]  # idempotent


class ConvCarriedIntoASum(nn.Module):
    """``conv(x) + other(y)``: merging conv(x) into the sum would only copy its weight (the sum reads two tensors)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.other = conv_bn(C, C, 3, 1)

    def forward(self, x, y):
        return self.conv(x) + self.other(y), torch.relu(self.conv(y))


def test_shared_module_is_not_copied_where_that_saves_no_op():
    model = build(ConvCarriedIntoASum)
    inputs = (image(), image(seed=3))
    gm, report = reparam(model, inputs)
    assert_matches(model, gm, inputs)
    counts = assert_ops(gm, inputs, convolution=3, batch_norm=0, add=1)
    assert counts["relu"] + counts["relu_"] == 1
    assert_refused(report, "would only re-emit it with copied weights")
    assert not any("shared weight" in r.reason for r in report.refusals)
    assert report.parameters_after <= report.parameters_before
