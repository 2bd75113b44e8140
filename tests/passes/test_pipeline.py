"""The declared pipeline: its order, its description, and the one driver that runs it.

``repfx.reparameterize`` runs it with ``eager_runtime=True`` (activations go in
place); the torch-tensorrt lowering pass without (TensorRT runs the graph). The
fold pass repeats until it changes nothing, and those rounds are what the driver
returns.
"""

from __future__ import annotations

import copy
import runpy

import pytest
import torch

import repfx.passes
from repfx.passes import PIPELINE, Pass, PassResult, Refused, describe_pipeline, run_pipeline, run_to_fixed_point
from pass_graphs import GraphBuilder, assert_same_values, fold_to_fixed_point, op_counts, structure

aten = torch.ops.aten


def test_pipeline_order():
    assert [step.name for step in PIPELINE] == ["reshape_as_to_static_shape", "see_through_value_aliases",
                                               "fold_parameter_subgraphs", "fold_linear_regions",
                                               "inplace_activations"]


def test_each_pass_says_why_in_one_line():
    for step in PIPELINE:
        assert step.why and "\n" not in step.why and len(step.why) < 160, step.name
    assert len({step.name for step in PIPELINE}) == len(PIPELINE)


def test_only_the_fold_repeats_and_only_inplace_activations_is_eager_only():
    assert [step.name for step in PIPELINE if step.to_fixed_point] == ["fold_linear_regions"]
    assert [step.name for step in PIPELINE if step.eager_runtime] == ["inplace_activations"]


def test_description_lists_the_passes_in_order():
    lines = describe_pipeline().splitlines()
    assert len(lines) == 1 + len(PIPELINE)
    for index, (line, step) in enumerate(zip(lines[1:], PIPELINE), 1):
        assert line.strip().startswith(f"{index}. {step.name}") and line.endswith(step.why)
    assert "[to a fixed point]" in lines[4] and "[eager runtime only]" in lines[5]


def test_python_dash_m_prints_the_pipeline(capsys):
    runpy.run_module("repfx.passes", run_name="__main__")
    assert capsys.readouterr().out.strip() == describe_pipeline()


def test_old_names_are_still_exported():
    for name in ("run_to_fixed_point", "fold_linear_regions", "Candidate", "Prover", "PassResult", "AppliedRewrite",
                 "ConvForm", "NotExact"):
        assert name in repfx.passes.__all__ and hasattr(repfx.passes, name)


def conv_bn_relu():
    g = GraphBuilder()
    y = g.batch_norm(g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1))
    return g.build(g.call(aten.relu.default, y))


@pytest.mark.parametrize("eager_runtime, relu", [
    pytest.param(False, "relu", id="for-a-compiler"),
    pytest.param(True, "relu_", id="for-eager-pytorch"),
])
def test_eager_runtime_passes_run_only_when_asked(eager_runtime, relu):
    gm = conv_bn_relu()
    original = copy.deepcopy(gm)
    rounds = run_pipeline(gm, eager_runtime=eager_runtime)
    assert [step.modified for step in rounds] == [True, False]  # the fold's rounds: one rewrite, then the proof
    assert op_counts(gm) == {"conv2d": 1, relu: 1}
    assert_same_values(original, gm)


def test_run_to_fixed_point_is_the_pipeline_for_a_compiler():
    a, b = conv_bn_relu(), conv_bn_relu()
    old, new = run_to_fixed_point(a), run_pipeline(b)
    assert [(step.modified, [r.kind for r in step.rewrites]) for step in old] == (
        [(step.modified, [r.kind for r in step.rewrites]) for step in new])
    assert structure(a) == structure(b)


def linear_norm_reshape_as():
    """``bn1d(y.flatten(0, 1)).reshape_as(y)`` with ``y = linear(x)``: the reshape_as reads ``y`` a second time."""
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", 2, 5, 8), g.randn(8, 8))
    normed = g.batch_norm(g.call(aten.flatten.using_ints, y, 0, 1))
    return g.build(g.call(aten.reshape_as.default, normed, y))


def test_canonicalize_runs_before_the_fold():
    """Without the static reshape the linear is read twice and stays apart from the BN."""
    gm = linear_norm_reshape_as()
    original, fold_alone = copy.deepcopy(gm), copy.deepcopy(gm)
    fold_to_fixed_point(fold_alone)
    assert op_counts(fold_alone)["batch_norm"] == 1
    run_pipeline(gm)
    assert op_counts(gm) == {"linear": 1}
    assert_same_values(original, gm)


def test_fixed_point_stops_after_max_iterations():
    calls = []
    always_changes = Pass("always_changes", lambda gm, settings: calls.append(settings) or PassResult(True),
                          "a pass that never converges", to_fixed_point=True)
    rounds = run_pipeline(conv_bn_relu(), "always", max_iterations=3, pipeline=[always_changes])
    assert len(rounds) == 3 and len(calls) == 3 and calls[0].cost == "always"


def test_prover_is_handed_to_the_fold_and_its_refusals_kept():
    gm = conv_bn_relu()
    written = structure(gm)

    def refuse_all(gm, candidates):
        return {candidate: "local proof failed: refused by the test" for candidate in candidates}

    rounds = run_pipeline(gm, prover=refuse_all)
    assert not any(step.modified for step in rounds)
    assert Refused("batch_norm", "local-proof", "local proof failed: refused by the test") in rounds[0].refusals
    assert structure(gm) == written
