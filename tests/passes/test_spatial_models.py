"""End to end on blocks written the way their repositories write them (``spatial_blocks.py``; issue 16, items 1, 4, 8).

RepNeXt's mixer and an Inception factorized conv become one kxk, ACNet's cropped
branches one 3x3; MobileOne's squeeze-excite pool stays a pool; VanillaNet's depthwise
7x7 + 1x1 stays two convs unless the parameter bound is lifted. Numerics against the
model as given, executed ops, the report's refusal codes, idempotence.
"""

from __future__ import annotations

import dataclasses

import pytest

from helpers import LAUNCH_BOUND, assert_idempotent, assert_matches, assert_ops, build, rand, reparam
from repfx.capture.export import capture
from repfx.passes import run_pipeline
from repfx.targets import cost_rule
from spatial_blocks import ACBlockCrop, FactorizedConv, MobileOneSE, RepNeXtBlock, RepNeXtMixer, VanillaBlock


def codes(report) -> set[str]:
    return {refusal.code for refusal in report.refusals}


@pytest.mark.parametrize("factory, shape, convs", [
    pytest.param(RepNeXtMixer, (2, 16, 14, 14), 1, id="repnext-mixer"),
    pytest.param(RepNeXtBlock, (2, 16, 14, 14), 3, id="repnext-block"),  # mixer, 1x1, 1x1
    pytest.param(ACBlockCrop, (2, 8, 10, 12), 1, id="acnet-crop"),
])
def test_blocks_whose_kernel_does_not_grow_fold_under_the_default_rule(factory, shape, convs):
    model, x = build(factory), rand(*shape)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert assert_ops(gm, x, convolution=convs, batch_norm=0)["slice"] == 0
    assert not [refusal for refusal in report.refusals if "slice" in refusal.reason], report.refusals
    assert_idempotent(gm, x)


def test_acnet_crop_is_one_unpadded_3x3():
    model, x = build(ACBlockCrop), rand(2, 8, 10, 12)
    gm, report = reparam(model, x)
    assert [rewrite.kernel_shapes for rewrite in report.rewrites] == [((8, 8, 3, 3),)]
    assert not [r for r in report.refusals if "slice" in r.reason], report.refusals
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


def test_inception_factorized_conv_is_one_7x7_when_merging_pays():
    model, x = build(FactorizedConv), rand(2, 16, 17, 17)
    gm, report = reparam(model, x, target=LAUNCH_BOUND)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0)
    assert [rewrite.kernel_shapes for rewrite in report.rewrites] == [((16, 16, 7, 7),)]


def test_mobileone_se_pool_stays_a_pool():
    """The pool spans the 20x20 map: folded into the 1x1 it was one 20x20 conv (706 -> 26,242 parameters)."""
    model, x = build(MobileOneSE), rand(1, 32, 20, 20)
    gm, report = reparam(model, x, cost="always")
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=3, batch_norm=0)
    assert counts["avg_pool2d"] == 1 and "whole-map-pool" in codes(report)
    assert all(max(shape[2:]) <= 3 for rewrite in report.rewrites for shape in rewrite.kernel_shapes)
    assert report.parameters_after <= report.parameters_before


@pytest.mark.parametrize("bound, convs", [(4.0, 2), (None, 1)])
def test_vanilla_dw7x7_and_1x1_stay_apart_within_the_parameter_bound(bound, convs):
    model, x = build(VanillaBlock), rand(1, 32, 14, 14)
    gm, report = reparam(model, x, target=LAUNCH_BOUND, max_param_growth=bound)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=convs, batch_norm=0)
    if bound is not None:
        assert "param-growth" in codes(report) and report.parameters_after <= report.parameters_before
    else:
        assert report.parameters_after > 10 * report.parameters_before


def test_the_pass_says_what_a_growing_merge_bought():
    """The passes' rewrite carries the parameters before and after and a note the report can show."""
    gm = capture(build(VanillaBlock), (rand(1, 32, 14, 14),)).graph
    rounds = run_pipeline(gm, dataclasses.replace(cost_rule(target=LAUNCH_BOUND), max_param_growth=None))
    (rewrite,) = [rewrite for step in rounds for rewrite in step.rewrites]
    assert (rewrite.params_before, rewrite.params_after) == (32 * 49 + 4 * 32 + 32 * 32 + 4 * 32, 32 * 32 * 49 + 32)
    assert rewrite.growth_note.startswith("parameters 2,848 -> 50,208 (17.6x) for "), rewrite.growth_note


def test_explain_takes_the_bound_too():
    import repfx
    report = repfx.explain(build(VanillaBlock), (rand(1, 32, 14, 14),), target=LAUNCH_BOUND, max_param_growth=None)
    assert "param-growth" not in codes(report)


@pytest.mark.parametrize("bound, convs", [(4.0, 2), (None, 1)])
def test_compile_and_export_take_the_bound(bound, convs, tmp_path):
    import repfx
    model, x = build(VanillaBlock), rand(1, 32, 14, 14)
    deployed = repfx.compile(model, (x,), backend="eager", target=LAUNCH_BOUND, max_param_growth=bound)
    assert_ops(deployed.plain, x, convolution=convs)
    result = repfx.export(model, (x,), tmp_path, formats=["pt2"], target=LAUNCH_BOUND, max_param_growth=bound)
    assert result.report.ops_after["convolution"] == convs
