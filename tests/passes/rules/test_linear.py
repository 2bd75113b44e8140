"""Rule ``rules/linear.py`` alone: ``aten.linear`` on [N, C] and on tokens [B, N, C], in aten graphs built by hand.

A linear is a rank-0 form acting on the last dim: parallel linears, an identity,
BatchNorm1d and per-channel scales after it collapse into one linear.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C = 8


def linear(g: GraphBuilder, x, out_features: int = C, bias: bool = True):
    weight = g.randn(out_features, x.meta["val"].shape[-1])
    return g.call(aten.linear.default, x, weight, g.randn(out_features, name="bias")) if bias else (
        g.call(aten.linear.default, x, weight))


def one_linear(*shape: int):
    g = GraphBuilder()
    return g.build(g.call(aten.linear.default, g.input("x", *shape), g.randn(C, shape[-1]), g.randn(C)))


def linear_block():
    """``bn1d(linear(x) + linear_nobias(x) + x)`` on [N, C]."""
    g = GraphBuilder()
    x = g.input("x", 4, C)
    total = g.call(aten.add.Tensor, g.call(aten.add.Tensor, linear(g, x), linear(g, x, bias=False)), x)
    return g.build(g.batch_norm(total))


def linear_then(op: str):
    g = GraphBuilder()
    y = linear(g, g.input("x", 4, C))
    if op == "bn1d":
        return g.build(g.batch_norm(y))
    if op == "scale":
        return g.build(g.call(aten.mul.Tensor, y, 0.25))
    if op == "linear":
        return g.build(linear(g, y))
    raise ValueError(op)


def token_linear_scaled():
    """``relu(y * gain + y)`` with ``y = linear(x)`` on [B, N, C]: the [C] gain broadcasts on the last dim."""
    g = GraphBuilder()
    y = linear(g, g.input("x", 2, 3, 4), out_features=6)
    scaled = g.call(aten.mul.Tensor, y, g.positive(6, name="gain"))
    return g.build(g.call(aten.relu.default, g.call(aten.add.Tensor, scaled, y)))


def token_linear_then_relu():
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", 2, 3, 4), g.randn(6, 4), g.randn(6))
    return g.build(g.call(aten.relu.default, y))


def test_linear_read_twice_folds_in_a_second_round():
    """``y`` is read twice, so round 1 keeps the linear and makes ``y * gain + y`` one scale ``y * (gain + 1)``;
    the scale is then the linear's only reader, and round 2 folds it in."""
    assert_folds(token_linear_scaled(), token_linear_then_relu(), rounds=2)


@pytest.mark.parametrize("before, expected", [
    pytest.param(linear_block, lambda: one_linear(4, C), id="two-linears+identity+bn1d"),
    pytest.param(lambda: linear_then("bn1d"), lambda: one_linear(4, C), id="linear+bn1d"),
    pytest.param(lambda: linear_then("scale"), lambda: one_linear(4, C), id="linear*0.25"),
    pytest.param(lambda: linear_then("linear"), lambda: one_linear(4, C), id="linear-then-linear"),
])
def test_linear_region_becomes_one_linear(before, expected):
    assert_folds(before(), expected())


def across_relu():
    g = GraphBuilder()
    return g.build(linear(g, g.call(aten.relu.default, linear(g, g.input("x", 4, C)))))


def weight_from_input():
    g = GraphBuilder()
    x, weight = g.input("x", 4, C), g.input("weight", C, C)
    return g.build(g.batch_norm(g.call(aten.linear.default, x, weight)))


def bottleneck():
    """16 -> 2 -> 16: one 16x16 linear needs 256 MACs against 64."""
    g = GraphBuilder()
    return g.build(linear(g, linear(g, g.input("x", 4, 16), out_features=2), out_features=16))


@pytest.mark.parametrize("before, reason", [
    pytest.param(across_relu, None, id="across-relu"),
    pytest.param(weight_from_input, "weight is computed from graph inputs", id="weight-is-an-input"),
    pytest.param(bottleneck, "cost rule", id="cost-rule-bottleneck"),
])
def test_linear_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)
