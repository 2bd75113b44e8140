"""Pass ``fold_parameter_subgraphs``: a weight computed from parameters alone becomes one stored weight.

``before`` graphs compute a conv weight from parameters inside the graph (weight
standardization, a mask times a scale, a DO-Conv product); the pass leaves a conv on
a stored constant (the ``expected`` structure), and the pipeline then folds the BN
after it into one conv. Must-not neighbours: a weight that also reads an input, a
random op, a buffer the forward writes, a value the graph returns (each named with a
reason), and views or literals alone (untouched, silently).
"""

from __future__ import annotations

import copy

import pytest
import torch

from pass_graphs import GraphBuilder, assert_same_values, emitted_conv, op_counts, structure
from repfx.passes import CODES, PIPELINE, PassSettings, run_pipeline
from repfx.passes.constants import EXACT_META, ConstantFolder
from repfx.passes.kept_ops import account
from repfx.passes.parameter_subgraphs import fold_parameter_subgraphs

aten = torch.ops.aten
C = 4
_PASS = next(step for step in PIPELINE if step.name == "fold_parameter_subgraphs")


def standardized(g, w):
    """``(w - mean) / (std + eps)`` over each output filter."""
    centred = g.call(aten.sub.Tensor, w, g.call(aten.mean.dim, w, [1, 2, 3], True))
    return g.call(aten.div.Tensor, centred, g.call(aten.add.Tensor, g.call(aten.std.correction, w, [1, 2, 3],
                                                                           correction=1, keepdim=True), 1e-5))


def do_conv(g, w):
    """DO-Conv's ``W = D^T W'``: a product of two parameters, viewed as the kernel."""
    depthwise = g.randn(C * C, 9, name="D")
    return g.call(aten.view.default, g.call(aten.mm.default, depthwise, g.randn(9, 9, name="W_prime")), [C, C, 3, 3])


# weight (an [C, C, 3, 3] parameter) -> the kernel the conv reads, computed in the graph
COMPUTED = {
    "weight-standardization": standardized,
    "mask-times-scale": lambda g, w: g.call(aten.mul.Tensor, g.randn(C, 1, 1, 1, name="scale"), w),
    "do-conv-product": do_conv,
}


def conv_bn_on(kernel):
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    weight = kernel(g, g.randn(C, C, 3, 3))
    return g.build(g.batch_norm(g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1])))


def conv_bn_on_stored():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    return g.build(g.batch_norm(g.call(aten.conv2d.default, x, g.randn(C, C, 3, 3), None, [1, 1], [1, 1])))


@pytest.mark.parametrize("kernel", [pytest.param(kernel, id=name) for name, kernel in COMPUTED.items()])
def test_computed_weight_becomes_a_stored_weight(kernel):
    before = conv_bn_on(kernel)
    original = copy.deepcopy(before)
    result = fold_parameter_subgraphs(before)
    assert result.modified and not result.refusals and len(result.rewrites) == 1
    assert result.rewrites[0].ops_after == 0 and result.rewrites[0].ops_before >= 1
    if kernel is do_conv:  # the view stays (free); the product is stored
        assert [op for op, *_ in structure(before)] == ["aten.view.default", "aten.conv2d.default",
                                                        "aten.batch_norm.default", "output"]
    else:
        assert structure(before) == structure(conv_bn_on_stored())
    assert_same_values(original, before)
    written = structure(before)
    assert not fold_parameter_subgraphs(before).modified and structure(before) == written  # idempotent


@pytest.mark.parametrize("kernel", [pytest.param(kernel, id=name) for name, kernel in COMPUTED.items()])
def test_then_the_bn_folds_into_the_conv(kernel):
    before = conv_bn_on(kernel)
    original = copy.deepcopy(before)
    rounds = run_pipeline(before)
    assert op_counts(before) == {"conv2d": 1}
    assert structure(before) == structure(emitted_conv(C, 3, padding=1))
    assert_same_values(original, before)
    kinds = [rewrite.kind for rewrite in rounds[0].rewrites]
    assert kinds[0].endswith("-> constant [4, 4, 3, 3]") or kernel is do_conv, kinds  # told with the first round
    assert kinds[-1] == "1 conv + 1 batch_norm -> conv 3x3 4->4"


def test_the_stored_weight_keeps_its_float64_value():
    """The fold and its proof read the value the subgraph had in float64, not the one rounding of it."""
    gm = conv_bn_on(standardized)
    expected = ConstantFolder(gm).tensor(next(n for n in gm.graph.nodes if n.target is aten.div.Tensor))
    assert expected.dtype == torch.float64
    fold_parameter_subgraphs(gm)
    stored = next(n for n in gm.graph.nodes if n.op == "get_attr" and EXACT_META in n.meta)
    assert torch.equal(stored.meta[EXACT_META], expected)
    assert torch.equal(ConstantFolder(gm).tensor(stored), expected)
    assert getattr(gm, stored.target).dtype == torch.float32
    assert torch.equal(getattr(gm, stored.target), expected.float())


def test_a_rounding_float64_decides_otherwise_keeps_the_models_value():
    """``floor(w * 10)`` with w = fp32(0.7): 7 in float32 arithmetic, 6 in float64. The model computes 7."""
    g = GraphBuilder()
    x = g.input("x", 2, 1, 4, 4)
    w = g.constant(torch.full((1, 1, 1, 1), 0.7))
    kernel = g.call(aten.floor.default, g.call(aten.mul.Tensor, w, 10.0))
    gm = g.build(g.call(aten.conv2d.default, x, kernel))
    original = copy.deepcopy(gm)
    assert fold_parameter_subgraphs(gm).modified
    stored = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert getattr(gm, stored.target).item() == 7.0 and stored.meta[EXACT_META].item() == 7.0
    assert_same_values(original, gm)


# ---------------------------------------------------------------------------------------------
# must not: each stays as written, and a parameter-only value is named with its reason
# ---------------------------------------------------------------------------------------------

def reads_an_input(g, x, w):
    return g.call(aten.mul.Tensor, w, g.call(aten.mean.default, x))


def random(g, x, w):
    noise = g.call(aten.randn.default, [C, C, 3, 3], device=torch.device("cpu"), pin_memory=False)
    return g.call(aten.add.Tensor, w, g.call(aten.mul.Tensor, noise, 0.01))


def written_buffer(g, x, w):
    step = g.constant(torch.zeros(()), name="step")
    g.call(aten.add_.Tensor, step, 1.0)  # ``self.step += 1``: state the forward writes
    return g.call(aten.mul.Tensor, w, step)


KEPT = {
    "reads-an-input": (reads_an_input, None),
    "random": (random, "is random"),
    "buffer-the-forward-writes": (written_buffer, "which the forward writes"),
}


@pytest.mark.parametrize("kernel, reason", [pytest.param(*case, id=name) for name, case in KEPT.items()])
def test_a_weight_that_must_run_each_call_stays(kernel, reason):
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    gm = g.build(g.call(aten.conv2d.default, x, kernel(g, x, g.randn(C, C, 3, 3)), None, [1, 1], [1, 1]))
    written = structure(gm)
    result = fold_parameter_subgraphs(gm)
    assert not result.modified and structure(gm) == written
    assert all(r.code in CODES for r in result.refusals)
    assert [(r.code, reason in r.reason) for r in result.refusals] == ([("parameter-subgraph", True)] if reason else [])


def test_a_returned_value_stays():
    g = GraphBuilder()
    x = g.input("x", 2, C)
    scaled = g.call(aten.mul.Tensor, g.randn(C), 2.0)
    gm = g.build(g.call(aten.add.Tensor, x, scaled), scaled)
    result = fold_parameter_subgraphs(gm)
    assert not result.modified
    assert [r.code for r in result.refusals] == ["parameter-subgraph"] and "returns it" in result.refusals[0].reason


@pytest.mark.parametrize("case", ["views-only", "literals-only"])
def test_nothing_to_store_is_left_alone_silently(case):
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    if case == "views-only":
        kernel = g.call(aten.view.default, g.randn(C, C * 9), [C, C, 3, 3])
        out = g.call(aten.conv2d.default, x, kernel, None, [1, 1], [1, 1])
    else:
        out = g.call(aten.add.Tensor, x, g.call(aten.zeros.default, [C, 1, 1], device=torch.device("cpu"),
                                               pin_memory=False))
    gm = g.build(out)
    written = structure(gm)
    result = fold_parameter_subgraphs(gm)
    assert not result.modified and not result.refusals and structure(gm) == written


def test_the_pipeline_tells_what_it_kept_with_the_first_round():
    g = GraphBuilder()
    x = g.input("x", 2, C, 8, 8)
    gm = g.build(g.call(aten.conv2d.default, x, random(g, x, g.randn(C, C, 3, 3)), None, [1, 1], [1, 1]))
    rounds = run_pipeline(gm)
    assert rounds[0].refusals[0].code == "parameter-subgraph"  # then the fold's own: the conv's weight is no constant
    assert _PASS.run(gm, PassSettings()).refusals  # the pass as the pipeline runs it, once more: the same refusal


# ---------------------------------------------------------------------------------------------
# the parameter bound: a value that grows beyond max_param_growth stays evaluated per call
# ---------------------------------------------------------------------------------------------

def gathered_bias_table():
    """LeViT's ``attention_biases[:, idxs]``: a [heads, offsets] table gathered into a [heads, N, N] bias."""
    g = GraphBuilder()
    x = g.input("x", 2, 2, 16, 16)
    table = g.randn(2, 4, name="attention_biases")
    idxs = g.constant(torch.randint(0, 4, (16, 16)), name="attention_bias_idxs")
    bias = g.call(aten.index.Tensor, table, [None, idxs])
    return g.build(g.call(aten.add.Tensor, x, bias))


def test_a_gathered_table_that_grows_beyond_the_bound_stays():
    gm = gathered_bias_table()
    written = structure(gm)
    result = fold_parameter_subgraphs(gm, max_param_growth=4.0)
    assert not result.modified and structure(gm) == written
    [refusal] = result.refusals
    assert refusal.code == "param-growth" and refusal.code in CODES
    assert "512 elements for the 8 of the parameters" in refusal.reason and "max_param_growth=4" in refusal.reason


def test_the_pipeline_bounds_stored_values_as_its_cost_rule_bounds_merges():
    bounded = gathered_bias_table()
    assert [r.code for r in _PASS.run(bounded, PassSettings()).refusals] == ["param-growth"]  # "macs": the default 4
    unbounded = gathered_bias_table()
    original = copy.deepcopy(unbounded)
    assert _PASS.run(unbounded, PassSettings(cost="always")).modified  # AlwaysMerge has no bound
    assert op_counts(unbounded) == {"add": 1}
    assert_same_values(original, unbounded)
    assert fold_parameter_subgraphs(gathered_bias_table()).modified  # no bound named: none


def test_weight_standardization_is_still_stored_under_the_bound():
    gm = conv_bn_on(standardized)
    original = copy.deepcopy(gm)
    result = fold_parameter_subgraphs(gm, max_param_growth=1.0)  # the stored kernel is as large as the weight
    assert result.modified and not result.refusals
    assert structure(gm) == structure(conv_bn_on_stored())
    assert_same_values(original, gm)


def test_a_table_kept_by_the_bound_is_accounted_for_as_refused():
    """The report's accounting of what stays (passes/kept_ops.py) names the bound as the reason, not 'unexplained'."""
    gm = gathered_bias_table()
    result = fold_parameter_subgraphs(gm, max_param_growth=4.0)
    kept = account(gm, None, result.refusals).kept
    # The table's gather (refused by the bound), and the add of the [2, 16, 16] bias (not a per-channel affine).
    assert [(entry.kind, entry.code) for entry in kept] == [("parameter-subgraph", "param-growth"),
                                                            ("affine", "not-per-channel")]
