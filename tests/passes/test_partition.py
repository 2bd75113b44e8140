"""Chain partition (``passes/partition.py``): chains of linear ops cut where that costs the fewest MACs.

The chain dw3x3 -> BN -> 1x1 -> 3x3 -> BN (no nonlinearity) is two regions for
exactness (the padded 3x3 would read real pixels where it reads zeros: the border rule); the region rule alone kept all three
convs. At each size the cheapest exact partition is asserted: nothing merged beyond
the BNs, ``(dw, BN) + (1x1, 3x3, BN)``, or ``(dw, BN, 1x1) + (3x3, BN)``; a chain that
is cheapest merged whole stays one conv. Pass level: which chains are found, what the
dynamic programme picks, and that every cost decision goes through the rule the pass is given.
End to end: executed convolutions, kernels, numerics, the report's line, idempotence.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_matches, assert_ops, assert_refused, build, rand, reparam, rewrite_kernels
from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

from repfx.passes import cost as cost_rule
from repfx.passes import partition
from repfx.passes.fold import _rewrites_fewer_ops
from repfx.passes.regions.analyzer import Analyzer

aten = torch.ops.aten
HW = 8


def m1(cin: int, cmid: int, cout: int, bn: bool = True):
    """dw3x3 (-> BN) -> 1x1 -> 3x3 (-> BN) on [2, cin, 8, 8]: no bias before the padded 3x3 (the border rule)."""
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, cin, HW, HW), cin, 3, padding=1, groups=cin)
    y = g.conv(g.batch_norm(y) if bn else y, cmid, 1)
    y = g.conv(y, cout, 3, padding=1)
    return g.build(g.batch_norm(y) if bn else y)


def convs(*specs: tuple[int, int, int, int, bool]):
    """Convs in a row, each ``(cin, cout, kernel, groups, bias)``, padded to keep the size, as the fold writes them;
    ``bias`` None: a conv left as written (export's short form, no bias)."""
    g = GraphBuilder()
    y = g.input("x", 2, specs[0][0], HW, HW)
    for cin, cout, kernel, groups, bias in specs:
        if bias is None:
            y = g.conv(y, cout, kernel, padding=kernel // 2, groups=groups)
            continue
        y = g.call(aten.conv2d.default, y, g.randn(cout, cin // groups, kernel, kernel), g.randn(cout),
                   [1, 1], [kernel // 2] * 2, [1, 1], groups)
    return g.build(y)


# ---------------------------------------------------------------------------------------------
# 1. pass level
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, expected", [
    pytest.param((64, 16, 64), lambda: convs((64, 64, 3, 64, True), (64, 16, 1, 1, None), (16, 64, 3, 1, True)),
                 id="nothing-beyond-the-bns"),
    pytest.param((16, 64, 16), lambda: convs((16, 16, 3, 16, True), (16, 16, 3, 1, True)),
                 id="dw + (1x1 -> 3x3)"),
    pytest.param((16, 1, 16), lambda: convs((16, 1, 3, 1, True), (1, 16, 3, 1, True)),
                 id="(dw -> 1x1) + 3x3"),
])
def test_m1_chain_is_cut_where_cheapest(sizes, expected):
    result = assert_folds(m1(*sizes), expected(), refused="chain partition")
    assert len(result.rewrites) == 2


def test_m1_without_bn_already_cheapest_as_written_is_unchanged():
    assert_unchanged(m1(64, 16, 64, bn=False), refused="chain partition: conv2d -> conv2d_1 -> conv2d_2 cut as "
                                                       "(conv2d) + (conv2d_1) + (conv2d_2)")


def test_m1_without_bn_merges_the_1x1_into_the_3x3():
    assert_folds(m1(16, 64, 16, bn=False), convs((16, 16, 3, 16, None), (16, 16, 3, 1, True)),
                 refused="cut as (conv2d) + (conv2d_1, conv2d_2)")


def expand_then_depthwise():
    """1x1 4->64 -> 1x1 64->64 -> dw3x3: merged whole (one dense 3x3 4->64, 2,304 MACs per pixel) costs less than
    as written (4,928), so the region rule merged it whole; (1x1 -> 1x1) + dw3x3 costs 832."""
    g = GraphBuilder()
    y = g.conv(g.conv(g.input("x", 2, 4, HW, HW), 64, 1), 64, 1)
    return g.build(g.conv(y, 64, 3, padding=1, groups=64))


def test_a_whole_merge_that_pays_still_gives_way_to_a_cheaper_cut():
    assert_folds(expand_then_depthwise(), convs((4, 64, 1, 1, True), (64, 64, 3, 64, None)),
                 refused="cut as (conv2d, conv2d_1) + (conv2d_2): 53,248 MACs per sample vs 315,392 MACs per sample as "
                         "written, 147,456 MACs per sample merging region by region (MACs)")


def analyzed(graph):
    analyzer = Analyzer(graph, "always")
    return analyzer, analyzer.run()


def test_the_chain_is_found_across_the_two_regions_exactness_draws():
    graph = m1(16, 64, 16)
    analyzer, analysis = analyzed(graph)
    assert [[node.name for node in chain] for chain in partition.chains(analysis)] == [
        ["conv2d", "batch_norm", "conv2d_1", "conv2d_2", "batch_norm_1"]]
    best = partition.cheapest(analyzer, analysis, partition.chains(analysis)[0], _rewrites_fewer_ops,
                                 cost_rule.MacsCost())
    assert [[node.name for node in segment.nodes] for segment in best.segments] == [
        ["conv2d", "batch_norm"], ["conv2d_1", "conv2d_2", "batch_norm_1"]]
    assert best.cost.macs == 16 * 9 * HW * HW + 16 * 16 * 9 * HW * HW  # dw 3x3, then one dense 3x3 16 -> 16
    assert best.whole.startswith("not exact") and "pads the output of a spatial convolution" in best.whole


def chain_into_sum():
    """1x1 -> 3x3 feeding a sum with the input: part of the sum's region, no chain of its own."""
    g = GraphBuilder()
    x = g.input("x", 2, 8, HW, HW)
    return g.build(g.call(aten.add.Tensor, g.conv(g.conv(x, 8, 1), 8, 3, padding=1), x))


def chain_after_sum():
    """A BN after a sum absorbs the sum: the region rule decides that region."""
    g = GraphBuilder()
    x = g.input("x", 2, 8, HW, HW)
    return g.build(g.conv(g.batch_norm(g.call(aten.add.Tensor, g.conv(x, 8, 3, padding=1), x)), 8, 1))


def chain_behind_relu():
    g = GraphBuilder()
    x = g.input("x", 2, 8, HW, HW)
    return g.build(g.conv(g.call(aten.relu.default, g.conv(x, 8, 3, padding=1)), 8, 1))


@pytest.mark.parametrize("before", [
    pytest.param(chain_into_sum, id="feeds-a-sum"),
    pytest.param(chain_after_sum, id="fed-by-a-sum"),
    pytest.param(chain_behind_relu, id="single-ops-around-a-relu"),
])
def test_no_chain_where_the_region_rule_decides(before):
    _, analysis = analyzed(before())
    assert partition.chains(analysis) == []


class NothingPays(cost_rule.MacsCost):
    """A cost model under which no merge pays and no partition is cheaper: nothing may change."""

    def pays(self, merged, separate, where: str = "") -> cost_rule.Verdict:
        return cost_rule.Verdict(False)

    def cheaper(self, candidate, incumbent, where: str = "") -> cost_rule.Verdict:
        return cost_rule.Verdict(False)


@pytest.mark.parametrize("before", [
    pytest.param(lambda: m1(16, 64, 16, bn=False), id="m1-chain"),
    pytest.param(lambda: convs((8, 8, 1, 1, None), (8, 8, 1, 1, None)), id="two-1x1"),
])
def test_every_cost_decision_asks_the_one_cost_model(before):
    assert_unchanged(before(), refused="cost rule", cost=NothingPays())


# ---------------------------------------------------------------------------------------------
# 2. end to end
# ---------------------------------------------------------------------------------------------

class M1(nn.Module):
    """dw3x3-BN -> 1x1 -> 3x3-BN with no nonlinearity (MobileNet-like blocks without their activations)."""

    def __init__(self, cin: int, cmid: int, cout: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cmid, 1, bias=False)
        self.conv = nn.Conv2d(cmid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.conv(self.pw(self.bn1(self.dw(x)))))


class ExpandDepthwiseProject(nn.Module):
    """1x1 4->64 -> dw3x3 -> 1x1 64->4, no activation: one 3x3 4->4 is cheapest (and exact): merged whole."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 64, 1, bias=False)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.project = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        return self.project(self.dw(self.expand(x)))


# factory, input channels, convolutions executed, kernels the rewrites emit, the cut the report shows (None: no cut)
CHAINS = [
    pytest.param(lambda: M1(64, 16, 64), 64, 3, [(64, 1, 3, 3), (64, 16, 3, 3)],
                 "(conv2d, batch_norm) + (conv2d_1) + (conv2d_2, batch_norm_1)", id="m1-3-convs"),
    pytest.param(lambda: M1(16, 64, 16), 16, 2, [(16, 1, 3, 3), (16, 16, 3, 3)],
                 "(conv2d, batch_norm) + (conv2d_1, conv2d_2, batch_norm_1)", id="m1-2-convs-dw+(1x1-3x3)"),
    pytest.param(lambda: M1(16, 1, 16), 16, 2, [(1, 16, 3, 3), (16, 1, 3, 3)],
                 "(conv2d, batch_norm, conv2d_1) + (conv2d_2, batch_norm_1)", id="m1-2-convs-(dw-1x1)+3x3"),
    pytest.param(ExpandDepthwiseProject, 4, 1, [(4, 4, 3, 3)], None, id="1x1-dw-1x1-merged-whole"),
]


@pytest.mark.parametrize("factory, channels, convolutions, kernels, cut", CHAINS)
def test_chain_executes_its_cheapest_partition(factory, channels, convolutions, kernels, cut):
    model = build(factory)
    x = rand(2, channels, HW, HW)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=convolutions, batch_norm=0, add=0)
    assert sorted(rewrite_kernels(report)) == sorted(kernels)
    if cut is None:
        assert not any("chain partition" in r.reason for r in report.refusals)
    else:
        assert_refused(report, f"cut as {cut}")
    _, again = reparam(gm, x)
    assert again.rewrites == [], [rewrite.kind for rewrite in again.rewrites]
