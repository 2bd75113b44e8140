"""Rule ``identity`` of ``rules/elementwise.py`` for ``detach`` and same-dtype casts, in aten graphs built by hand.

Inside a region (after a real conv) ``detach``, ``_to_copy`` and ``to`` to the same
dtype and device are the value unchanged and disappear into the conv. A cast to
another dtype, or a layout copy, of a tensor that other ops read too is another
tensor: branches reading it do not merge with branches of the tensor, and the
report says so (the fold alone; ``see_through_value_aliases`` runs before it in the
pipeline and has its own tests).
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C = 8

SAME_VALUE = {
    "detach": lambda g, y: g.call(aten.detach.default, y),
    "_to_copy-same-dtype": lambda g, y: g.call(aten._to_copy.default, y, dtype=torch.float32),
    "to.dtype-same-dtype": lambda g, y: g.call(aten.to.dtype, y, torch.float32),
    "to.dtype_layout": lambda g, y: g.call(aten.to.dtype_layout, y, dtype=torch.float32, layout=torch.strided),
    "to.device": lambda g, y: g.call(aten.to.device, y, torch.device("cpu"), torch.float32),
}


def conv3x3():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.conv2d.default, x, g.randn(C, C, 3, 3), g.randn(C), [1, 1], [1, 1], [1, 1], 1))


def conv_then(op):
    """``op(conv3x3(x)) * 2``."""
    g = GraphBuilder()
    y = op(g, g.conv(g.input("x", 2, C, 8, 8), C, 3, padding=1))
    return g.build(g.call(aten.mul.Tensor, y, 2.0))


@pytest.mark.parametrize("op", [pytest.param(op, id=name) for name, op in SAME_VALUE.items()])
def test_same_value_op_inside_a_region_folds(op):
    assert_folds(conv_then(op), conv3x3())


def conv_plus(read, permuted: bool = False):
    """``conv3x3(y) + read(y)`` with ``y = relu(x)`` (transposed when ``permuted``)."""
    g = GraphBuilder()
    y = g.call(aten.relu.default, g.input("x", 2, C, 8, 8))
    if permuted:
        y = g.call(aten.transpose.int, y, 2, 3)
    return g.build(g.call(aten.add.Tensor, g.conv(y, C, 3, padding=1), read(g, y)))


def through_float16(g, y):
    half = g.call(aten._to_copy.default, y, dtype=torch.float16)
    return g.call(aten._to_copy.default, half, dtype=torch.float32)


@pytest.mark.parametrize("before, reason", [
    pytest.param(lambda: conv_plus(through_float16), "is relu converted to torch.float16", id="through-float16"),
    pytest.param(lambda: conv_plus(lambda g, y: g.call(aten.contiguous.default, y), permuted=True),
                 "copied into another memory layout", id="layout-copy-of-a-transposed-tensor"),
    pytest.param(lambda: conv_plus(lambda g, y: g.call(aten.clone.default, y, memory_format=torch.channels_last)),
                 "copied to torch.channels_last", id="channels-last-copy"),
    pytest.param(lambda: conv_plus(lambda g, y: g.call(aten.flip.default, y, [-1])), "branches read different tensors",
                 id="flip"),
    pytest.param(lambda: conv_then(lambda g, y: g.call(aten._to_copy.default, y, dtype=torch.float16)), None,
                 id="cast-of-a-region-output"),
])
def test_another_tensor_must_not_fold(before, reason):
    assert_unchanged(before(), refused=reason)
