"""What a round reports besides its rewrites: a code with every refusal, the rules that fired, the decisions.

* each refusal carries a code from ``CODES`` (reports group by it) and its sentence unchanged;
* a code not in ``CODES`` is an error where it is raised, and every code listed is raised somewhere;
* ``rule_counts`` counts, per rule, the ops whose form it gave the regions rewritten;
* a cost rule holds no state: the decisions come back with each verdict and each round.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch

import repfx.passes
from repfx.passes import CODES, ConvForm, Refused
from repfx.passes.cost import Decisions, MacsCost, Verdict, elementwise, of_form
from repfx.passes.refusals import NotExact
from pass_graphs import GraphBuilder, assert_unchanged, fold_once, fold_to_fixed_point

aten = torch.ops.aten


def _form(cin: int, cout: int, k: int) -> ConvForm:
    return ConvForm.convolution(torch.randn(cout, cin, k, k), None, (1, 1), (k // 2,) * 2, (1, 1), 1)


def conv_bn() -> torch.fx.GraphModule:
    g = GraphBuilder()
    return g.build(g.batch_norm(g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1)))


def two_inputs_summed() -> torch.fx.GraphModule:
    g = GraphBuilder()
    a = g.conv(g.input("x", 2, 4, 8, 8), 4, 3, padding=1)
    b = g.conv(g.input("y", 2, 4, 8, 8), 4, 1)
    return g.build(g.call(aten.add.Tensor, a, b))


def test_a_refusal_has_a_code_and_its_sentence():
    result = assert_unchanged(two_inputs_summed(), refused="branches read different tensors")
    (refusal,) = [r for r in result.refusals if r.node == "add"]
    assert refusal == Refused("add", "different-inputs", "branches read different tensors (x, y); kept as separate terms")


def test_an_unknown_code_is_an_error_where_it_is_raised():
    with pytest.raises(ValueError, match="unknown refusal code"):
        NotExact("no-such-code", "a sentence")
    assert str(NotExact("stride", "branches have different strides")) == "branches have different strides"


def test_every_code_listed_is_raised_somewhere():
    """The codes are documented in one place; one no pass raises any more is dead text."""
    source = "\n".join(path.read_text() for path in pathlib.Path(repfx.passes.__file__).parent.rglob("*.py")
                       if path.name != "refusals.py")
    raised = set(re.findall(r'"([a-z][a-z-]+)"', source)) & CODES.keys()
    assert raised == CODES.keys(), sorted(CODES.keys() - raised)


def test_rule_counts_count_the_forms_of_the_regions_rewritten():
    gm = conv_bn()
    rounds = fold_to_fixed_point(gm)
    assert rounds[0].rule_counts == {"convolution": 1, "batch_norm": 1}
    assert rounds[-1].rule_counts == {}  # the fixed point rewrites nothing: a lone conv is no rewrite


def test_cost_rules_are_stateless_and_verdicts_carry_the_decision():
    rule = MacsCost()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.unit = "s"
    merged = of_form(_form(8, 8, 3), (8, 16, 16))
    apart = of_form(_form(8, 4, 3), (4, 16, 16)) + of_form(_form(8, 4, 1), (4, 16, 16)) + elementwise((8, 16, 16), 1)
    verdict = rule.pays(merged, apart, "cat")
    assert not verdict.won and verdict.decision.where == "cat" and not verdict.decision.merged_won
    ledger = Decisions()
    ledger.note(Verdict(True))
    assert not ledger
    ledger.note(verdict)
    assert list(ledger.values()) == [verdict.decision]


def test_a_round_reports_the_decisions_it_took():
    g = GraphBuilder()
    x = g.input("x", 2, 8, 16, 16)
    gm = g.build(g.call(aten.cat.default, [g.conv(x, 4, 3, padding=1), g.conv(x, 4, 1)], 1))
    result = fold_once(gm, "macs")
    assert {refusal.code for refusal in result.refusals if refusal.node == "cat"} == {"cost"}  # the merge, the region
    assert [decision.where for decision in result.decisions] == ["cat"]

