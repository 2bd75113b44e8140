"""End to end on channels-last FFN blocks written the way UniRepLKNet and ConvNeXt V2 write them (issue 16, item 2).

UniRepLKNet's block: the dilated branches and both BNs become one depthwise kxk; GRN's
beta, the BN after ``Linear -> permute(0, 3, 1, 2)`` and the layer scale fold into the
second linear. ConvNeXt V2's GRN adds beta to a sum: it moves into the second linear's
bias and the layer scale into its weights. Numerics against the model as given
(random BN), executed ops, the report, idempotence; and the pricing that decides it:
a channel-last linear costs what its NCHW view across the permute costs.
"""

from __future__ import annotations

import pytest
import torch

from channels_last_blocks import ConvNeXtV2Block, UniRepLKNetBlock, UniRepLKNetSmall
from helpers import assert_idempotent, assert_matches, assert_ops, build, rand, reparam
from pass_graphs import GraphBuilder, fold_to_fixed_point, op_counts
from repfx.passes.cost import LatencyCost, MacsCost, of_form
from repfx.passes.regions.analyzer import analyze
from conftest import PINNED

aten = torch.ops.aten


def test_unireplknet_block_folds_its_bns_grn_shift_and_layer_scale():
    model, x = build(UniRepLKNetBlock), rand(2, 16, 14, 14)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, batch_norm=0, convolution=3)  # the merged depthwise 7x7 and the SE's two 1x1s
    counts = op_counts(gm)
    assert (counts["linear"], counts["permute"], counts["addcmul"]) == (2, 2, 1)  # GRN's (gamma * Nx + 1): one op
    assert counts["add"] == 2  # the SE-free residual and Nx's eps; beta and the BN's shift went into the linear
    assert not [r for r in report.refusals if r.code in ("cost", "chain-partition")], report.refusals
    assert_idempotent(gm, x)


@pytest.mark.slow
def test_unireplknet_small_network_folds_every_bn():
    model, x = build(UniRepLKNetSmall), rand(2, 3, 56, 56)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, batch_norm=0, convolution=9)
    assert report.ops_before["batch_norm"] == 11 and report.ops_after["batch_norm"] == 0
    assert_idempotent(gm, x)


def test_convnext_v2_grn_beta_moves_into_the_second_linear():
    model, x = build(ConvNeXtV2Block), rand(2, 16, 14, 14)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    counts = op_counts(gm)
    assert (counts["linear"], counts["permute"], counts["mul"]) == (2, 2, 2)  # x * Nx, gamma * (..): the layer scale went
    assert counts["add"] == 3  # Nx's eps, GRN's "+ x", the residual: beta went into the linear's bias
    assert [rewrite.ops_before - rewrite.ops_after for rewrite in report.rewrites] == [2]
    assert_idempotent(gm, x)


def test_a_channel_last_linear_is_priced_per_sample():
    """A linear on ``[N, H, W, C]`` does ``H * W`` times the work of one row, as its NCHW 1x1 view does: priced
    per row, it looked ``H * W`` times cheaper than the same linear with a BN folded across the permute."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.call(aten.relu.default, g.input("x", 2, 3, 4, 8)), g.randn(16, 8))
    gm = g.build(g.call(aten.relu.default, y))
    linear = next(node for node in gm.graph.nodes if node.target is aten.linear.default)
    analysis = analyze(gm)
    assert analysis.own_cost[linear].macs == 16 * 8 * 3 * 4
    assert analysis.exprs[linear].terms[0].cost.macs == of_form(analysis.exprs[linear].terms[0].form, (16, 3, 4)).macs


@pytest.mark.parametrize("rule", [MacsCost(), LatencyCost(profile=PINNED, batch=2)], ids=["macs", "latency-pinned"])
def test_bn_after_a_channels_last_linear_folds_under_a_fixed_cost_rule(rule):
    """The decision the pricing changed, pinned: Linear -> permute(0, 3, 1, 2) -> BN2d -> layer scale is one linear
    and a permute under either rule."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.call(aten.relu.default, g.input("x", 2, 3, 4, 8)), g.randn(16, 8))
    y = g.call(aten.mul.Tensor, g.batch_norm(g.call(aten.permute.default, y, [0, 3, 1, 2])), g.positive(1, 16, 1, 1))
    gm = g.build(g.call(aten.relu.default, y))
    results = fold_to_fixed_point(gm, rule)
    assert not [r for step in results for r in step.refusals if r.code in ("cost", "chain-partition")]
    counts = op_counts(gm)
    assert (counts["linear"], counts["permute"], counts["batch_norm"], counts["mul"]) == (1, 1, 0, 0)
