"""Channels-last MLPs (issue 16, item 2): pointwise ops across a lone permute, a sum's shift into the next op.

* ``Linear -> permute(0, 3, 1, 2) -> BN2d / per-channel scale`` folds into the linear; the
  permute stays, once, after it (UniRepLKNet's FFN end).
* ``BN2d -> permute(0, 2, 3, 1) -> Linear`` folds into the linear; the permute stays before it.
* ``Linear(a + b + beta)`` is ``Linear(a + b)`` with ``W beta`` in its bias (ConvNeXt V2's GRN):
  the op adding ``beta`` goes, the sum of the two tensors stays.
* A ``[1, 1, 1, C]`` constant on ``[N, H, W, C]`` is a channel-last scale or shift (GRN's gamma).

Must not merge: a LayerNorm between, a shift that reads an input, a permute that moves the
channel to neither dim 1 nor the last dim, a zero-padded conv after a shifted sum.
Each fold is checked for structure, values (random BN) and a second fold changing nothing.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C, H, W = 8, 3, 4
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _nhwc(g: GraphBuilder):
    return g.call(aten.relu.default, g.input("x", 2, H, W, C))


def _nchw(g: GraphBuilder):
    return g.call(aten.relu.default, g.input("x", 2, C, H, W))


def linear_permute_then(after: str, cout: int = C):
    """``linear(relu(x))`` on ``[2, H, W, C]``, ``permute(0, 3, 1, 2)``, then ``after`` on the NCHW view."""
    g = GraphBuilder()
    y = g.call(aten.permute.default, g.call(aten.linear.default, _nhwc(g), g.randn(cout, C)), TO_NCHW)
    if after in ("bn2d", "bn2d+scale"):
        y = g.batch_norm(y)
    if after in ("scale", "bn2d+scale"):
        y = g.call(aten.mul.Tensor, g.positive(1, cout, 1, 1), y)
    if after == "layer_norm":
        y = g.call(aten.layer_norm.default, g.call(aten.permute.default, y, TO_NHWC), [cout])
    return g.build(g.call(aten.relu.default, y))


def linear_then_permute(cout: int = C):
    g = GraphBuilder()
    y = g.call(aten.linear.default, _nhwc(g), g.randn(cout, C), g.randn(cout))
    return g.build(g.call(aten.relu.default, g.call(aten.permute.default, y, TO_NCHW)))


def affine_permute_linear(before: str):
    """``before`` on NCHW ``relu(x)``, ``permute(0, 2, 3, 1)``, then a linear."""
    g = GraphBuilder()
    y = _nchw(g)
    y = g.batch_norm(y) if before == "bn2d" else g.call(aten.mul.Tensor, y, g.positive(C, 1, 1))
    y = g.call(aten.linear.default, g.call(aten.permute.default, y, TO_NHWC), g.randn(C, C), g.randn(C))
    return g.build(y)


def permute_then_linear():
    g = GraphBuilder()
    y = g.call(aten.permute.default, _nchw(g), TO_NHWC)
    return g.build(g.call(aten.linear.default, y, g.randn(C, C), g.randn(C)))


@pytest.mark.parametrize("before, expected", [
    pytest.param(lambda: linear_permute_then("bn2d"), linear_then_permute, id="linear-permute-bn2d"),
    pytest.param(lambda: linear_permute_then("scale"), linear_then_permute, id="linear-permute-scale"),
    pytest.param(lambda: linear_permute_then("bn2d+scale"), linear_then_permute, id="linear-permute-bn2d-layer-scale"),
    pytest.param(lambda: linear_permute_then("bn2d", 16), lambda: linear_then_permute(16), id="widening-linear"),
    pytest.param(lambda: affine_permute_linear("bn2d"), permute_then_linear, id="bn2d-permute-linear"),
    pytest.param(lambda: affine_permute_linear("scale"), permute_then_linear, id="scale-permute-linear"),
])
def test_pointwise_ops_fold_across_a_lone_permute(before, expected):
    assert_folds(before(), expected())


def grn_like(shift_from: str = "constant"):
    """``linear(mul(a, gamma) + beta + a)`` on ``[2, H, W, C]`` (``a = relu(x)``, ``t = a * a`` stands for
    GRN's data-dependent ``x * Nx``): beta is added to a sum of two tensors."""
    g = GraphBuilder()
    a = _nhwc(g)
    t = g.call(aten.mul.Tensor, g.call(aten.mul.Tensor, a, a), g.randn(1, 1, 1, C))
    beta = g.randn(1, 1, 1, C) if shift_from == "constant" else g.input("beta", 1, 1, 1, C)
    y = g.call(aten.add.Tensor, g.call(aten.add.Tensor, t, beta), a)
    return g.build(g.call(aten.linear.default, y, g.randn(C, C), g.randn(C)))


def grn_like_folded():
    g = GraphBuilder()
    a = _nhwc(g)
    t = g.call(aten.mul.Tensor, g.call(aten.mul.Tensor, a, a), g.randn(C))
    return g.build(g.call(aten.linear.default, g.call(aten.add.Tensor, t, a), g.randn(C, C), g.randn(C)))


def test_a_shift_added_to_a_sum_moves_into_the_linear_after_it():
    result = assert_folds(grn_like(), grn_like_folded())
    assert [rewrite.ops_before - rewrite.ops_after for rewrite in result.rewrites] == [1]


def grn_fused():
    """UniRepLKNet's GRN ends ``(gamma * Nx + 1) * x + beta``: beta shifts one tensor, then a linear."""
    g = GraphBuilder()
    a = _nhwc(g)
    y = g.call(aten.add.Tensor, g.call(aten.mul.Tensor, a, a), g.randn(1, 1, 1, C))
    return g.build(g.call(aten.linear.default, y, g.randn(C, C)))


def square_then_linear():
    g = GraphBuilder()
    a = _nhwc(g)
    return g.build(g.call(aten.linear.default, g.call(aten.mul.Tensor, a, a), g.randn(C, C), g.randn(C)))


def test_a_channels_last_constant_shift_folds_into_the_linear_after_it():
    assert_folds(grn_fused(), square_then_linear())


def bn_scale_after_relu():
    """A BN then a layer scale after a nonlinearity: no conv to fold into, yet one op does both."""
    g = GraphBuilder()
    y = g.batch_norm(_nchw(g))
    return g.build(g.call(aten.mul.Tensor, y, g.positive(C, 1, 1)))


def one_addcmul():
    g = GraphBuilder()
    return g.build(g.call(aten.addcmul.default, g.randn(C, 1, 1), _nchw(g), g.randn(C, 1, 1)))


def test_a_scale_and_shift_is_emitted_as_one_op():
    """Priced as one elementwise op, the merged affine is one op run (``addcmul``): before, it was emitted as a
    mul and an add, the same count as the BN and the mul as written, so it stayed (issue 16, item 2)."""
    assert_folds(bn_scale_after_relu(), one_addcmul())


def layer_norm_between():
    g = GraphBuilder()
    y = g.call(aten.linear.default, _nhwc(g), g.randn(C, C))
    y = g.call(aten.layer_norm.default, y, [C])
    y = g.batch_norm(g.call(aten.permute.default, y, TO_NCHW))
    return g.build(g.call(aten.relu.default, y))


def channel_to_a_spatial_dim():
    """``permute(0, 1, 3, 2)`` of ``[N, H, W, C]`` moves the linear's channel to dim 2: no BN2d acts there."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, _nhwc(g), g.randn(C, C))
    y = g.call(aten.permute.default, y, [0, 1, 3, 2])
    y = g.call(aten.mul.Tensor, y, g.positive(1, 1, C, 1))
    return g.build(g.call(aten.relu.default, y))


def padded_conv_after_shifted_sum():
    g = GraphBuilder()
    a = _nchw(g)
    y = g.call(aten.add.Tensor, g.call(aten.add.Tensor, g.call(aten.mul.Tensor, a, a), g.randn(C, 1, 1)), a)
    return g.build(g.conv(y, C, 3, padding=1))


@pytest.mark.parametrize("before, reason", [
    pytest.param(layer_norm_between, None, id="layer-norm-between"),
    pytest.param(lambda: grn_like("input"), None, id="shift-reads-an-input"),
    pytest.param(channel_to_a_spatial_dim, None, id="permute-moves-the-channel-to-a-spatial-dim"),
    pytest.param(padded_conv_after_shifted_sum, "zero-pads", id="padded-conv-after-a-shifted-sum"),
])
def test_must_not_merge(before, reason):
    assert_unchanged(before(), refused=reason)
