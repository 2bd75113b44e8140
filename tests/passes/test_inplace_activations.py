"""Pass ``inplace_activations`` alone: an activation runs in place only where nothing else can see it."""

from __future__ import annotations

import copy

import pytest
import torch

from repfx.passes.inplace_activations import inplace_activations
from pass_graphs import GraphBuilder, assert_same_values, op_counts, structure

aten = torch.ops.aten


@pytest.mark.parametrize("activation, in_place", [
    pytest.param(aten.relu.default, "relu_", id="relu"),
    pytest.param(aten.silu.default, "silu_", id="silu"),
    pytest.param(aten.hardswish.default, "hardswish_", id="hardswish"),
    pytest.param(aten.sigmoid.default, "sigmoid_", id="sigmoid"),
])
def test_activation_of_a_fresh_tensor_runs_in_place(activation, in_place):
    g = GraphBuilder()
    gm = g.build(g.call(activation, g.conv(g.input("x", 2, 4, 8, 8), 4, 3, padding=1, bias=True)))
    original = copy.deepcopy(gm)
    assert inplace_activations(gm) == 1
    assert op_counts(gm) == {"conv2d": 1, in_place: 1}
    assert_same_values(original, gm)
    assert inplace_activations(gm) == 0  # idempotent


def of_an_input():
    g = GraphBuilder()
    return g.build(g.call(aten.relu.default, g.input("x", 2, 4, 8, 8)))


def of_a_view():
    g = GraphBuilder()
    view = g.call(aten.view.default, g.conv(g.input("x", 2, 4, 8, 8), 4, 3, padding=1), [2, 256])
    return g.build(g.call(aten.relu.default, view))


def read_twice():
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, 4, 8, 8), 4, 3, padding=1)
    return g.build(g.call(aten.relu.default, y), y)


def of_a_weight():
    g = GraphBuilder()
    return g.build(g.call(aten.relu.default, g.randn(4, 4)))


@pytest.mark.parametrize("build", [
    pytest.param(of_an_input, id="graph-input"),
    pytest.param(of_a_view, id="view"),
    pytest.param(read_twice, id="input-also-returned"),
    pytest.param(of_a_weight, id="weight"),
])
def test_activation_stays_out_of_place(build):
    gm = build()
    written = structure(gm)
    assert inplace_activations(gm) == 0
    assert structure(gm) == written
