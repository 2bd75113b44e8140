"""Pass ``see_through_value_aliases`` alone, then with the fold: readers of ``x.detach()`` & co. read ``x``.

An alias that keeps values, dtype, device, layout, shape and strides is ``x``: its
readers are rerouted and it disappears, so branches that read it and branches that
read ``x`` merge. A cast, a copy into another memory layout, a returned copy, a copy
next to an in-place op and training dropout stay as written; so does an alias
whose source nothing else reads (its readers already read one node) and the
alias read by an op no region holds (``relu(x.clone())`` may run in place).
"""

from __future__ import annotations

import copy

import pytest
import torch

from repfx.passes import PIPELINE, run_pipeline
from repfx.passes.canonicalize import see_through_value_aliases
from pass_graphs import GraphBuilder, assert_same_values, structure

aten = torch.ops.aten
C = 8

# ``alias(x)`` as capture writes it
ALIASES = {
    "detach": lambda g, x: g.call(aten.detach.default, x),
    "alias": lambda g, x: g.call(aten.alias.default, x),
    "clone": lambda g, x: g.call(aten.clone.default, x),
    "clone-preserve-format": lambda g, x: g.call(aten.clone.default, x, memory_format=torch.preserve_format),
    "contiguous-of-contiguous": lambda g, x: g.call(aten.contiguous.default, x),
    "_to_copy-same-dtype": lambda g, x: g.call(aten._to_copy.default, x, dtype=torch.float32),
    "to.dtype-same-dtype": lambda g, x: g.call(aten.to.dtype, x, torch.float32),
    "to.dtype-copy": lambda g, x: g.call(aten.to.dtype, x, torch.float32, False, True),
    "to.dtype_layout": lambda g, x: g.call(aten.to.dtype_layout, x, dtype=torch.float32, layout=torch.strided,
                                           device=torch.device("cpu")),
    "to.device": lambda g, x: g.call(aten.to.device, x, torch.device("cpu"), torch.float32),
    "dropout-eval": lambda g, x: g.call(aten.dropout.default, x, 0.5, False),
    "detach-of-clone": lambda g, x: g.call(aten.detach.default, g.call(aten.clone.default, x)),
}


def branches(alias=None, permuted: bool = False, returned: bool = False, inplace: bool = False):
    """``conv3x3(y) + conv1x1(alias(y)) + alias(y)`` with ``y = relu(x)`` (transposed when ``permuted``)."""
    g = GraphBuilder()
    y = g.call(aten.relu.default, g.input("x", 2, C, 8, 8))
    if permuted:
        y = g.call(aten.transpose.int, y, 2, 3)
    read = alias(g, y) if alias else y
    total = g.call(aten.add.Tensor, g.call(aten.add.Tensor, g.conv(y, C, 3, padding=1), g.conv(read, C, 1)), read)
    outputs = [total]
    if returned:
        outputs.append(read)
    if inplace:
        outputs.append(g.call(aten.add_.Tensor, y, 1.0))  # written after the branches read it
    return g.build(*outputs)


@pytest.mark.parametrize("alias", [pytest.param(alias, id=name) for name, alias in ALIASES.items()])
def test_readers_of_an_alias_read_its_source(alias):
    gm = branches(alias)
    original = copy.deepcopy(gm)
    assert see_through_value_aliases(gm)
    assert structure(gm) == structure(branches())
    assert_same_values(original, gm)
    assert not see_through_value_aliases(gm)  # nothing left to do


def test_the_fold_then_merges_the_branches_into_one_conv():
    gm = branches(ALIASES["detach"])
    original = copy.deepcopy(gm)
    run_pipeline(gm, pipeline=[step for step in PIPELINE if step.name in ("see_through_value_aliases",
                                                                           "fold_linear_regions")])
    assert [str(node.target) for node in gm.graph.nodes if node.op == "call_function"] == [
        "aten.relu.default", "aten.conv2d.default"]
    assert_same_values(original, gm)


OTHER_TENSORS = {
    "cast-to-float16": lambda g, x: g.call(aten._to_copy.default, x, dtype=torch.float16),
    "channels-last-copy": lambda g, x: g.call(aten.clone.default, x, memory_format=torch.channels_last),
    "training-dropout": lambda g, x: g.call(aten.dropout.default, x, 0.5, True),
    "flip": lambda g, x: g.call(aten.flip.default, x, [-1]),
}


@pytest.mark.parametrize("before", [
    *[pytest.param(lambda alias=alias: _reading(alias), id=name) for name, alias in OTHER_TENSORS.items()],
    pytest.param(lambda: branches(lambda g, x: g.call(aten.contiguous.default, x), permuted=True),
                 id="layout-copy-of-a-transposed-tensor"),
])
def test_another_tensor_is_left_alone(before):
    gm = before()
    written = structure(gm)
    assert not see_through_value_aliases(gm)
    assert structure(gm) == written


def _reading(alias):
    """``conv1x1(alias(relu(x)))`` next to ``relu(x)``: the alias is read by a conv."""
    g = GraphBuilder()
    y = g.call(aten.relu.default, g.input("x", 2, C, 8, 8))
    read = alias(g, y)
    if read.meta["val"].dtype != torch.float32:
        read = g.call(aten._to_copy.default, read, dtype=torch.float32)
    return g.build(g.conv(read, C, 1), y)


def test_a_returned_copy_stays_the_output():
    gm = branches(ALIASES["clone"], returned=True)
    see_through_value_aliases(gm)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    assert output.args[0][1].target is aten.clone.default
    assert [user.op for user in output.args[0][1].users] == ["output"]  # the convs and the add read relu


def test_a_copy_next_to_an_in_place_op_stays():
    """An in-place op reads the copy's source: the copy may be what keeps its readers from seeing the write."""
    gm = branches(ALIASES["clone"], inplace=True)
    written = structure(gm)
    assert not see_through_value_aliases(gm)
    assert structure(gm) == written


def only_alias_reads_the_source():
    """``conv3x3(d) + conv1x1(d) + d`` with ``d = detach(relu(x))``: the branches already read one node."""
    g = GraphBuilder()
    d = g.call(aten.detach.default, g.call(aten.relu.default, g.input("x", 2, C, 8, 8)))
    return g.build(g.call(aten.add.Tensor, g.call(aten.add.Tensor, g.conv(d, C, 3, padding=1), g.conv(d, C, 1)), d))


def copy_read_by_an_activation():
    """``sigmoid(clone(y)) + conv(y)``: a sigmoid is no region op; the copy stays for it."""
    g = GraphBuilder()
    y = g.call(aten.relu.default, g.input("x", 2, C, 8, 8))
    copied = g.call(aten.sigmoid.default, g.call(aten.clone.default, y))
    return g.build(g.call(aten.add.Tensor, copied, g.conv(y, C, 3, padding=1)))


@pytest.mark.parametrize("before", [
    pytest.param(only_alias_reads_the_source, id="source-read-only-by-the-alias"),
    pytest.param(copy_read_by_an_activation, id="copy-read-by-an-activation"),
])
def test_an_alias_that_stops_no_merge_is_left_alone(before):
    gm = before()
    written = structure(gm)
    assert not see_through_value_aliases(gm)
    assert structure(gm) == written
