"""Rule ``rules/stack.py`` alone: ``stack([...]).sum(d)`` / ``.mean(d)`` of branches, in aten graphs built by hand.

Reducing a stack over its stacked dim is a sum of branches (a mean: times exactly
1/n), so a 3x3 conv, a 1x1 conv and a BN of one input become one 3x3 conv; a
reduction over any other dim, a stack read twice or a kept dim stay as written.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten
C = 8


def stacked(reduce: str = "sum", stack_dim: int = 0, dims=(0,), keepdim: bool = False, extra_reader: bool = False,
            inputs: int = 1, count: int = 3):
    """``reduce(stack([conv3x3(x), conv1x1(x), bn(x or y)][:count], stack_dim), dims)``."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    y = x if inputs == 1 else g.input("y", 2, C, 8, 8)
    branches = [g.conv(x, C, 3, padding=1, bias=True), g.conv(x, C, 1), g.batch_norm(y)][:count]
    stack = g.call(aten.stack.default, branches, stack_dim) if stack_dim else g.call(aten.stack.default, branches)
    target = aten.sum.dim_IntList if reduce == "sum" else aten.mean.dim
    args = (stack, list(dims), True) if keepdim else (stack, list(dims))
    outputs = [g.call(target, *args)]
    if extra_reader:
        outputs.append(g.call(aten.relu.default, stack))
    return g.build(*outputs)


def one_conv():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.call(aten.conv2d.default, x, g.randn(C, C, 3, 3), g.randn(C), [1, 1], [1, 1], [1, 1], 1))


def stacked_linears(reduce: str):
    """Two linears and the identity of [4, C] rows, averaged or summed through a stack."""
    g = GraphBuilder()
    x = g.input("x", 4, C)
    branches = [g.call(aten.linear.default, x, g.randn(C, C), g.randn(C)), g.call(aten.linear.default, x, g.randn(C, C)),
                x]
    target = aten.sum.dim_IntList if reduce == "sum" else aten.mean.dim
    return g.build(g.call(target, g.call(aten.stack.default, branches), [0]))


def one_linear():
    g = GraphBuilder()
    return g.build(g.call(aten.linear.default, g.input("x", 4, C), g.randn(C, C), g.randn(C)))


@pytest.mark.parametrize("before, expected", [
    pytest.param(stacked, one_conv, id="stack-sum-0"),
    pytest.param(lambda: stacked("mean"), one_conv, id="stack-mean-0-of-3"),
    pytest.param(lambda: stacked("mean", count=2), one_conv, id="stack-mean-0-of-2"),
    pytest.param(lambda: stacked(stack_dim=2, dims=(2,)), one_conv, id="stack-dim2-sum-dim2"),
    pytest.param(lambda: stacked(stack_dim=-1, dims=(-1,)), one_conv, id="stack-last-sum-minus1"),
    pytest.param(lambda: stacked_linears("sum"), one_linear, id="linear-rows-sum"),
    pytest.param(lambda: stacked_linears("mean"), one_linear, id="linear-rows-mean"),
])
def test_stacked_branches_fold_into_one_op(before, expected):
    assert_folds(before(), expected())


@pytest.mark.parametrize("before, reason", [
    pytest.param(lambda: stacked(dims=(1,)), "not a sum of the stacked branches", id="sum-over-channels"),
    pytest.param(lambda: stacked("mean", dims=(0, 2)), "not a sum of the stacked branches", id="mean-over-two-dims"),
    pytest.param(lambda: stacked(extra_reader=True), "is also read by relu", id="stack-read-twice"),
    pytest.param(lambda: stacked(keepdim=True), None, id="keepdim"),
])
def test_stack_must_not_fold(before, reason):
    """Nothing merges: the BN branch stays (it has no conv to join but the stack's)."""
    assert_unchanged(before(), refused=reason)


def test_stack_of_two_inputs_merges_only_the_branches_of_one():
    """``bn(y)`` reads another tensor: the two convs of ``x`` become one, the BN stays a term of its own."""
    g = GraphBuilder()
    x, y = g.input("x", 2, C, 8, 8), g.input("y", 2, C, 8, 8)
    conv = g.call(aten.conv2d.default, x, g.randn(C, C, 3, 3), g.randn(C), [1, 1], [1, 1], [1, 1], 1)
    scaled = g.call(aten.mul.Tensor, y, g.randn(C, 1, 1))
    expected = g.build(g.call(aten.add.Tensor, conv, scaled))
    result = assert_folds(stacked(inputs=2), expected, refused="branches read different tensors")
    assert [rewrite.ops_after for rewrite in result.rewrites] == [3]
