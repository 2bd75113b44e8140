"""Pass ``reshape_as_to_static_shape`` alone: a shape-only edge becomes a static reshape, a symbolic one stays."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from repfx.passes.canonicalize import reshape_as_to_static_shape
from pass_graphs import GraphBuilder, assert_same_values, structure

aten = torch.ops.aten


def reads_shape_of(target):
    """``target(relu(a), b)``: ``b`` is read only for its shape."""
    g = GraphBuilder()
    a, b = g.input("a", 4, 6), g.input("b", 2, 2, 6)
    return g.build(g.call(target, g.call(aten.relu.default, a), b)), b


@pytest.mark.parametrize("target", [aten.reshape_as.default, aten.view_as.default])
def test_shape_only_edge_becomes_a_static_reshape(target):
    gm, like = reads_shape_of(target)
    original = copy.deepcopy(gm)
    assert reshape_as_to_static_shape(gm)
    assert structure(gm) == [("aten.relu.default", ("%a",), ()), ("aten.reshape.default", ("#0", (2, 2, 6)), ()),
                             ("output", (("#1",),), ())]
    assert not like.users
    assert_same_values(original, gm)
    assert not reshape_as_to_static_shape(gm)  # nothing left to do


def test_symbolic_shape_keeps_the_edge():
    gm, like = reads_shape_of(aten.reshape_as.default)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    like.meta["val"] = mode.from_tensor(torch.empty(2, 2, 6), static_shapes=False)  # every size a SymInt
    assert not isinstance(like.meta["val"].shape[0], int)
    written = structure(gm)
    assert not reshape_as_to_static_shape(gm)
    assert structure(gm) == written
