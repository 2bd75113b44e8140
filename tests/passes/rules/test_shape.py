"""Rules ``rules/shape.py`` alone: channel-last reshapes and channel concat, in aten graphs built by hand.

LeViT's LinearNorm (``bn1d(linear(x).flatten(0, 1)).reshape(x.shape)``) folds into
one linear when the region ends in the input's layout again; branches of one input
concatenated on channels become one conv with stacked kernels.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C = 8
TOKENS = (2, 5, C)


def linear_norm(flatten: str, back: str | None = "reshape"):
    """Linear on [B, N, C] tokens, flattened to [B*N, C] for a BatchNorm1d, then (maybe) back to [B, N, C]."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C))
    flat = (g.call(aten.flatten.using_ints, y, 0, 1) if flatten == "flatten"
            else g.call(aten.view.default, y, [TOKENS[0] * TOKENS[1], C]))
    normed = g.batch_norm(flat)
    if back is None:
        return g.build(normed)
    target = {"reshape": aten.reshape.default, "view": aten.view.default, "_unsafe_view": aten._unsafe_view.default}
    return g.build(g.call(target[back], normed, list(TOKENS)))


def one_token_linear():
    g = GraphBuilder()
    return g.build(g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C), g.randn(C)))


def concat(kernels: tuple[int, int], dim: int = 1, inputs: int = 1):
    """``cat([bn(conv_a(x)), bn(conv_b(x or y))], dim)``, the second branch with 4 channels."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    y = x if inputs == 1 else g.input("y", 2, C, 8, 8)
    a = g.batch_norm(g.conv(x, C, kernels[0], padding=kernels[0] // 2))
    b = g.batch_norm(g.conv(y, 4, kernels[1], padding=kernels[1] // 2))
    return g.build(g.call(aten.cat.default, [a, b], dim))


def stacked_conv():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.conv2d.default, x, g.randn(C + 4, C, 3, 3), g.randn(C + 4), [1, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("before, expected, cost", [
    pytest.param(lambda: linear_norm("flatten"), one_token_linear, "macs", id="linear-flatten-bn1d-reshape"),
    pytest.param(lambda: linear_norm("view", "view"), one_token_linear, "macs", id="linear-view-bn1d-view"),
    pytest.param(lambda: linear_norm("flatten", "_unsafe_view"), one_token_linear, "macs", id="back-by-_unsafe_view"),
    pytest.param(lambda: concat((3, 3)), stacked_conv, "macs", id="cat-3x3+3x3"),
    pytest.param(lambda: concat((3, 3), dim=-3), stacked_conv, "macs", id="cat-dim-minus-3"),
    pytest.param(lambda: concat((3, 1)), stacked_conv, "always", id="cat-3x3+1x1-cost-always"),
])
def test_shape_op_inside_a_region_folds(before, expected, cost):
    assert_folds(before(), expected(), cost=cost)


def last_dim_changed():
    """A view that merges the channel dim into another: no longer an op on the last dim."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", *TOKENS), g.randn(C, C))
    return g.build(g.call(aten.mul.Tensor, g.call(aten.view.default, y, [TOKENS[0], TOKENS[1] * C]), 2.0))


def plain_convs_concat(kernels: tuple[int, int], dim: int = 1, inputs: int = 1):
    """Like ``concat`` without the BNs, so that nothing but the concat could fold."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    y = x if inputs == 1 else g.input("y", 2, C, 8, 8)
    channels = 4 if dim == 1 else C  # only the concat dim may differ
    a = g.conv(x, C, kernels[0], padding=kernels[0] // 2, bias=True)
    b = g.conv(y, channels, kernels[1], padding=kernels[1] // 2)
    return g.build(g.call(aten.cat.default, [a, b], dim))


@pytest.mark.parametrize("before, reason", [
    pytest.param(lambda: linear_norm("flatten", back=None), None, id="region-ends-in-another-layout"),
    pytest.param(last_dim_changed, None, id="view-changes-the-last-dim"),
    pytest.param(lambda: plain_convs_concat((3, 3), dim=2), None, id="cat-on-a-spatial-dim"),
    pytest.param(lambda: plain_convs_concat((3, 3), inputs=2), "not all single branches of one input",
                 id="cat-of-two-inputs"),
    pytest.param(lambda: plain_convs_concat((3, 1)), "cost rule", id="cat-3x3+1x1-cost-rule"),
])
def test_shape_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)
