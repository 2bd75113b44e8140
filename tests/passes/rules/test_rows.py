"""Partitions (``regions/rows.py``, ``algebra/dense.py``): RepMLP's locality injection, graphs built by hand.

A map ``[2, 4, 8, 8]`` is cut into ``4x4`` partitions as export writes RepMLP's
``partition``: view, permute, then a copy viewed as ``[8, 64, 1, 1]`` for the partition
perceptron (a 1x1 conv, groups 4) and as ``[8, 4, 4, 4]`` for the local perceptron
(depthwise kxk convs with BN); both reshaped to ``[2, 2, 2, 4, 4, 4]`` and added. The
convs are exact matrices on each partition's values, so the region is one grouped 1x1
(then one reshape). Must not merge: a conv applied before the map is cut (its padding reads
across partition borders), a nonlinearity between, partitions of another size; a lone conv
before a reshape of its partitions is never made a matrix.
"""

from __future__ import annotations

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged, fold_to_fixed_point, op_counts
from pass_graphs import assert_same_values

aten = torch.ops.aten
C, H, P = 4, 8, 4  # channels (= share-sets), map size, partition size
ROWS = 2 * (H // P) ** 2  # partitions of a batch of 2
GRID = [2, H // P, H // P, C, P, P]


def partitions(g, x, h=P, w=P):
    """RepMLP's ``partition``: ``[N, C, H, W]`` -> ``[N, H/h, W/w, C, h, w]`` (a permuted view)."""
    return g.call(aten.permute.default, g.call(aten.view.default, x, [-1, C, H // h, h, H // w, w]), [0, 2, 4, 1, 3, 5])


def rows(g, parts, *layout):
    """``parts.reshape(-1, *layout)`` as export writes it for a permuted tensor: a copy, then a view."""
    copy = g.call(aten.clone.default, parts, memory_format=torch.contiguous_format)
    return g.call(aten._unsafe_view.default, copy, [ROWS, *layout])


def fc(g, parts, bias=False):
    """The partition perceptron: a 1x1 conv (groups C) on each flattened partition, BN over C on the grid."""
    flat = rows(g, parts, C * P * P, 1, 1)
    out = g.conv(flat, C * P * P, 1, groups=C, bias=bias)
    return g.call(aten.view.default, g.batch_norm(g.call(aten.view.default, out, [-1, C, P, P])), GRID)


def local(g, parts, kernels=(1, 3), between=None):
    """The local perceptron: depthwise kxk convs with BN on the same partitions, summed."""
    x = rows(g, parts, C, P, P)
    total = None
    for k in kernels:
        y = g.batch_norm(g.conv(x, C, k, padding=k // 2, groups=C))
        total = y if total is None else g.call(aten.add.Tensor, total, y)
    if between is not None:
        total = g.call(between, total)
    return g.call(aten.view.default, total, GRID)


def unpartition(g, y):
    out = g.call(aten.clone.default, g.call(aten.permute.default, y, [0, 3, 1, 4, 2, 5]),
                 memory_format=torch.contiguous_format)
    return g.call(aten._unsafe_view.default, out, [2, C, H, H])


def repmlp(kernels=(1, 3), between=None):
    g = GraphBuilder()
    x = g.input("x", 2, C, H, H)
    parts = partitions(g, x)
    return g.build(unpartition(g, g.call(aten.add.Tensor, fc(g, parts), local(g, parts, kernels, between))))


def one_fc():
    """What the fold leaves: the partition perceptron alone, with a bias, then the reshape back."""
    g = GraphBuilder()
    x = g.input("x", 2, C, H, H)
    flat = rows(g, partitions(g, x), C * P * P, 1, 1)
    out = g.call(aten.conv2d.default, flat, g.randn(C * P * P, P * P, 1, 1), g.randn(C * P * P), [1, 1], [0, 0],
                 [1, 1], C)
    return g.build(unpartition(g, g.call(aten.reshape.default, out, [-1, *GRID[1:]])))


@pytest.mark.parametrize("kernels", [(3,), (1, 3), (1, 3, 5)])
def test_local_convs_fold_into_the_partition_perceptron(kernels):
    before = repmlp(kernels)
    counts = op_counts(before)
    assert counts["conv2d"] == 1 + len(kernels) and counts["batch_norm"] == 1 + len(kernels)
    result = assert_folds(before, one_fc())
    assert result.rewrites[0].kernel_shapes == ((C * P * P, P * P, 1, 1),)  # the FC's matrix: it does not grow
    assert result.rewrites[0].params_after <= result.rewrites[0].params_before


def test_a_conv_after_the_fc_on_its_output_grid_folds_into_it():
    """The other way round: the FC's output reshaped back to the grid, then a depthwise 3x3 and a BN."""
    g = GraphBuilder()
    x = g.input("x", ROWS, C * P * P, 1, 1)
    out = g.call(aten.view.default, g.conv(x, C * P * P, 1, groups=C), [-1, C, P, P])
    before = g.build(g.batch_norm(g.conv(out, C, 3, padding=1, groups=C)))
    g = GraphBuilder()
    x = g.input("x", ROWS, C * P * P, 1, 1)
    out = g.call(aten.conv2d.default, x, g.randn(C * P * P, P * P, 1, 1), g.randn(C * P * P), [1, 1], [0, 0], [1, 1], C)
    assert_folds(before, g.build(g.call(aten.reshape.default, out, [-1, C, P, P])))


def test_a_lone_conv_before_a_reshape_of_its_partitions_stays_a_conv():
    """No FC to absorb it: made a matrix, the 3x3 would hold 16x its taps. Its BN folds; the reshape stays."""
    g = GraphBuilder()
    x = g.input("x", ROWS, C, P, P)
    before = g.build(g.call(aten.view.default, g.batch_norm(g.conv(x, C, 3, padding=1)), [ROWS, C * P * P, 1, 1]))
    g = GraphBuilder()
    x = g.input("x", ROWS, C, P, P)
    out = g.call(aten.conv2d.default, x, g.randn(C, C, 3, 3), g.randn(C), [1, 1], [1, 1], [1, 1], 1)
    result = assert_folds(before, g.build(g.call(aten.view.default, out, [ROWS, C * P * P, 1, 1])))
    assert result.rewrites[0].kernel_shapes == ((C, C, 3, 3),)


def test_a_conv_made_a_matrix_is_bounded_by_max_param_growth():
    """Dense 3x3s beside a depthwise FC (groups C): the FC's matrix would become dense, 4x its size and more
    MACs. The cost rule keeps them apart; ``always`` merges (no bound), exactly."""
    def model():
        g = GraphBuilder()
        x = g.input("x", 2, C, H, H)
        parts = partitions(g, x)
        conv_rows = rows(g, parts, C, P, P)
        branch = g.call(aten.view.default, g.batch_norm(g.conv(conv_rows, C, 3, padding=1)), GRID)
        return g.build(unpartition(g, g.call(aten.add.Tensor, fc(g, parts), branch)))

    kept = model()
    fold_to_fixed_point(kept)
    assert op_counts(kept)["conv2d"] == 2
    merged, original = model(), model()
    fold_to_fixed_point(merged, "always")
    assert op_counts(merged)["conv2d"] == 1
    assert_same_values(original, merged)


def conv_before_cutting():
    """A 3x3 applied to the whole map, then cut: its padding read across partition borders."""
    g = GraphBuilder()
    x = g.input("x", 2, C, H, H)
    parts = partitions(g, x)
    whole = partitions(g, g.batch_norm(g.conv(x, C, 3, padding=1, groups=C)))
    branch = g.call(aten.clone.default, whole, memory_format=torch.contiguous_format)
    return g.build(unpartition(g, g.call(aten.add.Tensor, fc(g, parts), branch)))


def other_partition_size():
    """The local perceptron cuts the map into 2x8 partitions: the same number of values, other pixels."""
    g = GraphBuilder()
    x = g.input("x", 2, C, H, H)
    cut = rows(g, partitions(g, x, 2, 8), C, 2, 8)
    branch = g.call(aten.view.default, g.batch_norm(g.conv(cut, C, 3, padding=1, groups=C)), GRID)
    return g.build(unpartition(g, g.call(aten.add.Tensor, fc(g, partitions(g, x)), branch)))


@pytest.mark.parametrize("build, convs", [
    pytest.param(conv_before_cutting, 2, id="conv-before-cutting"),
    pytest.param(lambda: repmlp((1, 3), aten.relu.default), 2, id="relu-between"),
    pytest.param(other_partition_size, 2, id="other-partition-size"),
])
def test_must_not_merge_into_the_fc(build, convs):
    """Each branch folds its own BN, nothing more: the FC keeps its 1x1 and the branch its convs."""
    before, original = build(), build()
    results = fold_to_fixed_point(before)
    assert op_counts(before)["conv2d"] == convs and op_counts(before)["batch_norm"] == 0
    assert op_counts(before)["add"] >= 1
    assert_same_values(original, before)
    assert not fold_to_fixed_point(before)[0].modified
    assert any(r.code in ("rows", "different-inputs") for step in results for r in step.refusals)


def test_a_reshape_that_cuts_rows_elsewhere_is_no_region():
    """``[8, 4, 4, 4]`` viewed as ``[32, 16]``: rows of 16 values, not the 64 the conv computes per row."""
    g = GraphBuilder()
    x = g.input("x", ROWS, C, P, P)
    assert_unchanged(g.build(g.call(aten.view.default, g.conv(x, C, 3, padding=1), [ROWS * C, P * P])))
