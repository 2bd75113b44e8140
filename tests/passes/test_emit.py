"""The emitter alone: planning an expression, and detached emission (emit, then commit or discard).

``Emitter.emit`` adds nodes that read the region's sources but that nothing reads,
so the graph still computes what it did; ``commit`` reroutes the root's users to
the emitted result; ``discard`` erases the emitted nodes again. Proofs rely on that
order (``fold_linear_regions`` with a prover).
"""

from __future__ import annotations

import copy

import pytest
import torch

from repfx.passes.emit import REWRITE_META, Emitter, plan, remove_dead_code
from repfx.passes.regions.analyzer import analyze
from pass_graphs import GraphBuilder, assert_same_values, structure

aten = torch.ops.aten


def conv_bn():
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1)
    return g.build(g.batch_norm(y))


def region(gm: torch.fx.GraphModule):
    """The root of the graph's one region (the node the output reads) and its expression."""
    root = next(node for node in gm.graph.nodes if node.op == "output").args[0][0]
    return root, analyze(gm).exprs[root]


def halves():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.call(aten.add.Tensor, g.call(aten.mul.Tensor, x, 0.5), g.call(aten.mul.Tensor, x, 0.5)))


def scale_and_shift():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.call(aten.add.Tensor, g.call(aten.add.Tensor, g.call(aten.mul.Tensor, x, 2.0), x), 1.0))


@pytest.mark.parametrize("build, convs, scales, identities, copy_, op_count", [
    pytest.param(conv_bn, 1, 0, 0, False, 1, id="conv+bn-one-conv"),
    pytest.param(halves, 0, 0, 1, True, 1, id="x*0.5+x*0.5-one-copy"),
    pytest.param(scale_and_shift, 0, 1, 0, False, 1, id="x*2+x+1-scale-and-shift"),  # one addcmul
])
def test_plan_counts_the_ops_before_any_edit(build, convs, scales, identities, copy_, op_count):
    gm = build()
    written = structure(gm)
    planned = plan(region(gm)[1])
    assert (len(planned.convs), len(planned.scales), len(planned.identities)) == (convs, scales, identities)
    assert planned.is_plain_copy == copy_ and planned.op_count == op_count
    assert structure(gm) == written


def test_emit_adds_nodes_that_nothing_reads():
    gm = conv_bn()
    original = copy.deepcopy(gm)
    root, expr = region(gm)
    users = dict(root.users)
    emission = Emitter(gm).emit(root, plan(expr))
    assert emission.root is root and emission.result is not root
    assert all(set(node.users) <= set(emission.nodes) for node in emission.nodes)  # read only by each other
    assert not emission.result.users and dict(root.users) == users
    assert [n.meta[REWRITE_META] for n in emission.nodes if n.op == "call_function"] == [root.name]
    gm.recompile()
    assert_same_values(original, gm)  # the graph still computes the region as written


def test_emission_keeps_the_exact_float64_values_it_rounded():
    gm = conv_bn()
    root, expr = region(gm)
    emission = Emitter(gm).emit(root, plan(expr))
    assert set(emission.exact) == {n.target for n in emission.nodes if n.op == "get_attr"}
    for name, exact in emission.exact.items():
        assert exact.dtype == torch.float64
        assert torch.equal(getattr(gm, name), exact.to(torch.float32))


def test_commit_reroutes_the_roots_users():
    gm = conv_bn()
    original = copy.deepcopy(gm)
    root, expr = region(gm)
    emission = Emitter(gm).emit(root, plan(expr))
    Emitter.commit(emission)
    assert not root.users and list(emission.result.users)[0].op == "output"
    remove_dead_code(gm)
    assert [entry[0] for entry in structure(gm)] == ["aten.conv2d.default", "output"]
    assert_same_values(original, gm)


def test_discard_erases_what_was_emitted():
    gm = conv_bn()
    written, parameters = structure(gm), dict(gm.named_buffers())
    root, expr = region(gm)
    emitter = Emitter(gm)
    emission = emitter.emit(root, plan(expr))
    emitter.discard(emission)
    assert all(node not in gm.graph.nodes for node in emission.nodes)
    remove_dead_code(gm)
    assert structure(gm) == written
    assert set(dict(gm.named_parameters())) == set() and set(dict(gm.named_buffers())) == set(parameters)


def test_plain_copy_is_a_clone_never_the_input():
    gm = halves()
    root, expr = region(gm)
    emission = Emitter(gm).emit(root, plan(expr))
    Emitter.commit(emission)
    remove_dead_code(gm)
    x = torch.randn(2, 4, 8, 8)
    assert [entry[0] for entry in structure(gm)] == ["aten.clone.default", "output"]
    assert torch.equal(gm(x)[0], x) and gm(x)[0].data_ptr() != x.data_ptr()
