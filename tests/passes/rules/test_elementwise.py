"""Rules ``rules/elementwise.py`` alone: add/sub, mul/div/neg and identity-like ops, in aten graphs built by hand.

A branch that is one of these ops of the block's input merges with a 3x3 conv
branch into one conv; the ops that are not affine in their input (a product of
activations, a rounding division, training dropout, a layout change) stay as written.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged, emitted_conv

aten = torch.ops.aten
C = 8


def conv3x3():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    weight, shift = g.randn(C, C, 3, 3), g.randn(C)
    return g.build(g.call(aten.conv2d.default, x, weight, shift, [1, 1], [1, 1], [1, 1], 1))


# ``conv3x3(x)`` -> the graph's output, for a branch of ``x`` that folds into the conv
MERGING = {
    "add-identity": lambda g, x, y: g.call(aten.add.Tensor, y, x),
    "sub-identity": lambda g, x, y: g.call(aten.sub.Tensor, y, x),
    "sub-alpha2": lambda g, x, y: g.call(aten.sub.Tensor, y, x, alpha=2),
    "scalar-scale": lambda g, x, y: g.call(aten.add.Tensor, y, g.call(aten.mul.Tensor, x, 0.5)),
    "per-channel-affine": lambda g, x, y: g.call(aten.add.Tensor, y, g.call(
        aten.add.Tensor, g.call(aten.mul.Tensor, x, g.positive(C, 1, 1, name="scale")),
        g.randn(C, 1, 1, name="shift"))),
    "neg": lambda g, x, y: g.call(aten.add.Tensor, y, g.call(aten.neg.default, x)),
    "div-scalar": lambda g, x, y: g.call(aten.add.Tensor, y, g.call(aten.div.Tensor, x, 4.0)),
    "plus-constant": lambda g, x, y: g.call(aten.add.Tensor, g.call(aten.add.Tensor, y, 1.5), x),
    "add.Scalar": lambda g, x, y: g.call(aten.add.Tensor, g.call(aten.add.Scalar, y, 1.5), x),
    "rsub.Scalar": lambda g, x, y: g.call(aten.add.Tensor, g.call(aten.rsub.Scalar, y, 1.0), x),  # 1 - y + x
    "rsub-alpha": lambda g, x, y: g.call(aten.rsub.Tensor, y, x, alpha=2),  # x - 2 * y
}


def conv_and(branch) -> torch.fx.GraphModule:
    """``branch(builder, x, conv3x3(x))`` as the graph's output."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(branch(g, x, g.conv(x, C, 3, padding=1)))


@pytest.mark.parametrize("branch", [pytest.param(branch, id=name) for name, branch in MERGING.items()])
def test_elementwise_branch_merges_into_the_conv(branch):
    assert_folds(conv_and(branch), conv3x3())


def conv_then(op: str):
    """``conv3x3(x)``, a value-preserving op, then ``* 2``: the op disappears with the scale into the conv."""
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, C, 8, 8), C, 3, padding=1)
    kept = {"clone": lambda: g.call(aten.clone.default, y),
            "alias": lambda: g.call(aten.alias.default, y),
            "dropout-eval": lambda: g.call(aten.dropout.default, y, 0.5, False),
            "contiguous": lambda: g.call(aten.contiguous.default, y),
            "clone-preserve-format": lambda: g.call(aten.clone.default, y, memory_format=torch.preserve_format)}[op]()
    return g.build(g.call(aten.mul.Tensor, kept, 2.0))


@pytest.mark.parametrize("op", ["clone", "alias", "dropout-eval", "contiguous", "clone-preserve-format"])
def test_identity_like_op_inside_a_region_folds(op):
    assert_folds(conv_then(op), conv3x3())


def halves():
    """``x*0.5 + x*0.5`` is ``x`` exactly: one copy, never an alias of the input."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.add.Tensor, g.call(aten.mul.Tensor, x, 0.5), g.call(aten.mul.Tensor, x, 0.5)))


def one_copy():
    g = GraphBuilder()
    return g.build(g.call(aten.clone.default, g.input("x", 2, C, 8, 8)))


def twice_plus_once():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.add.Tensor, g.call(aten.mul.Tensor, x, 2.0), x))


def one_scale():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.mul.Tensor, x, g.randn(C, 1, 1)))


@pytest.mark.parametrize("before, expected", [
    pytest.param(halves, one_copy, id="x*0.5+x*0.5-is-one-copy"),
    pytest.param(twice_plus_once, one_scale, id="x*2+x-is-one-scale"),
])
def test_scales_of_one_input_merge_without_a_conv(before, expected):
    assert_folds(before(), expected())


# ``conv3x3(x)`` -> the graph's output, for an op after the conv that is not affine in it
NOT_AFFINE = {
    "product-of-activations": lambda g, x, y: g.call(aten.mul.Tensor, y, y),
    "rounding-division": lambda g, x, y: g.call(aten.div.Tensor_mode, y, 2.0, rounding_mode="floor"),
    "training-dropout": lambda g, x, y: g.call(aten.mul.Tensor, g.call(aten.dropout.default, y, 0.5, True), 2.0),
    "layout-change": lambda g, x, y: g.call(
        aten.mul.Tensor, g.call(aten.clone.default, y, memory_format=torch.channels_last), 2.0),
    "per-pixel-constant": lambda g, x, y: g.call(aten.mul.Tensor, y, g.randn(1, 1, 8, 8)),
}


def broadcasting_add():
    """A [2, C, 8, 8] branch plus a [2, C, 1, 1] branch of the same input."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.add.Tensor, g.conv(x, C, 3, padding=1), g.conv(x, C, 8, stride=8)))


def broadcasting_sub():
    """``y - mean(y)`` over channels (a LayerNorm's centring): a broadcast, not a channel mismatch."""
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, C, 8, 8), C, 3, padding=1)
    return g.build(g.call(aten.sub.Tensor, y, g.call(aten.mean.dim, y, [1], True)))


def other_input_residual():
    g = GraphBuilder()
    x, y = g.input("x", 2, C, 8, 8), g.input("y", 2, C, 8, 8)
    return g.build(g.call(aten.add.Tensor, x, g.conv(y, C, 3, padding=1)))


def lone_clone():
    g = GraphBuilder()
    return g.build(g.call(aten.clone.default, g.input("x", 2, C, 8, 8)))


def scale_then_shift():
    """``x * 2 + 1``: a mul and an add, which one ``addcmul`` computes (issue 16, item 2)."""
    g = GraphBuilder()
    return g.build(g.call(aten.add.Tensor, g.call(aten.mul.Tensor, g.input("x", 2, C, 8, 8), 2.0), 1.0))


def one_addcmul():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.addcmul.default, g.constant(torch.ones(C, 1, 1)), x, g.constant(torch.ones(C, 1, 1))))


def test_scale_then_shift_is_one_addcmul():
    assert_folds(scale_then_shift(), one_addcmul())


def lone_shift():
    """``x + 1`` is already the fewest ops."""
    g = GraphBuilder()
    return g.build(g.call(aten.add.Tensor, g.input("x", 2, C, 8, 8), 1.0))


@pytest.mark.parametrize("before, reason", [
    *[pytest.param(lambda op=op: conv_and(op), None, id=name) for name, op in NOT_AFFINE.items()],
    pytest.param(broadcasting_add, "add broadcasts", id="broadcasting-add"),
    pytest.param(broadcasting_sub, "add broadcasts (1, 8, 8) to (8, 8, 8)", id="broadcasting-sub"),
    pytest.param(other_input_residual, "branches read different tensors", id="branches-of-different-inputs"),
    pytest.param(lone_clone, None, id="lone-clone-of-an-input"),
    pytest.param(lone_shift, None, id="no-fewer-ops"),
])
def test_elementwise_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)


# ---------------------------------------------------------------------------------------------
# activations that are the identity (VanillaNet anneals its leaky_relu slope to 1): the convs
# on both sides chain into one; any other slope, weight or bound is a nonlinearity
# ---------------------------------------------------------------------------------------------

INF = float("inf")
# y -> the activation of y, between two 1x1 conv + BN
IDENTITY_ACTIVATIONS = {
    "leaky_relu-slope-1": lambda g, y: g.call(aten.leaky_relu.default, y, 1.0),
    "prelu-all-ones": lambda g, y: g.call(aten.prelu.default, y, g.constant(torch.ones(C), name="prelu")),
    "hardtanh-infinite": lambda g, y: g.call(aten.hardtanh.default, y, -INF, INF),
    "clamp-min-only-infinite": lambda g, y: g.call(aten.clamp.default, y, -INF),
    "clamp-both-infinite": lambda g, y: g.call(aten.clamp.default, y, -INF, INF),
    "times-one": lambda g, y: g.call(aten.mul.Tensor, y, 1),
    "plus-zero": lambda g, y: g.call(aten.add.Tensor, y, 0),
    "dropout-eval": lambda g, y: g.call(aten.dropout.default, y, 0.5, False),
}
NONLINEAR = {
    "leaky_relu-slope-0.99": lambda g, y: g.call(aten.leaky_relu.default, y, 0.99),
    "prelu-one-weight-not-1": lambda g, y: g.call(aten.prelu.default, y, g.constant(
        torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]), name="prelu")),
    "hardtanh-finite": lambda g, y: g.call(aten.hardtanh.default, y, -INF, 6.0),
    "clamp-finite-bound": lambda g, y: g.call(aten.clamp.default, y, -INF, 6.0),
    "prelu-weight-from-the-input": lambda g, y: g.call(aten.prelu.default, y, g.call(aten.mean.dim, y, [0, 2, 3])),
}


def pointwise_act_pointwise(activation):
    """conv1x1 + BN -> activation -> conv1x1 + BN, as VanillaNet's deep-training block writes it."""
    g = GraphBuilder()
    y = g.batch_norm(g.conv(g.input("x", 2, C, 8, 8), C, 1))
    return g.build(g.batch_norm(g.conv(activation(g, y), C, 1)))


@pytest.mark.parametrize("activation", [pytest.param(a, id=name) for name, a in IDENTITY_ACTIVATIONS.items()])
def test_identity_activation_chains_the_convs_around_it(activation):
    assert_folds(pointwise_act_pointwise(activation), emitted_conv(C, 1))


def two_pointwise(activation):
    """Each conv + BN folded, the activation kept between them."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    y = g.call(aten.conv2d.default, x, g.randn(C, C, 1, 1), g.randn(C), [1, 1], [0, 0], [1, 1], 1)
    return g.build(g.call(aten.conv2d.default, activation(g, y), g.randn(C, C, 1, 1), g.randn(C), [1, 1], [0, 0],
                          [1, 1], 1))


@pytest.mark.parametrize("activation", [pytest.param(a, id=name) for name, a in NONLINEAR.items()])
def test_a_nonlinear_activation_keeps_the_convs_apart(activation):
    assert_folds(pointwise_act_pointwise(activation), two_pointwise(activation))
