"""The rule registry: every module of ``rules/`` registers itself, a target has one rule, and the
analyzer names no rule, so that adding a rule is one new module plus its tests."""

from __future__ import annotations

import ast
import inspect
import sys

import pytest
import torch

from repfx.passes import regions
from repfx.passes.regions import analyzer, rules
from pass_graphs import GraphBuilder, assert_folds, assert_unchanged

aten = torch.ops.aten


def test_every_rule_module_registers_a_rule():
    registered = {rule.__module__ for rule in analyzer.registered_rules().values()}
    modules = {f"{rules.__name__}.{name}" for name in rules.import_rule_modules()}
    assert modules and modules == registered


def test_registry_is_data_keyed_by_aten_target():
    table = analyzer.registered_rules()
    assert table[aten.conv2d.default].__module__.endswith(".conv")
    assert table[aten.cat.default].__module__.endswith(".shape")
    assert all(callable(rule) for rule in table.values())


def test_a_second_rule_for_a_target_is_an_error(monkeypatch):
    monkeypatch.setattr(analyzer, "RULES", dict(analyzer.registered_rules()))
    first = analyzer.RULES[aten.conv2d.default]

    def another(an, node, operand):
        raise AssertionError("never runs")

    with pytest.raises(ValueError, match="already has the rule"):
        analyzer.rule(aten.conv2d.default)(another)
    assert analyzer.RULES[aten.conv2d.default] is first


def test_the_analyzer_names_no_rule_module():
    tree = ast.parse(inspect.getsource(analyzer))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and "rules" in name], imported


def test_analyze_imports_the_rules_it_needs(monkeypatch):
    """With no rule module imported and an empty registry, the first analysis imports and sees every rule."""
    every_target = set(analyzer.registered_rules())
    monkeypatch.setattr(analyzer, "RULES", {})
    monkeypatch.setattr(regions, "rules", rules)  # the re-import below rebinds it; the test leaves it as it was
    for name in [name for name in sys.modules if name.startswith(rules.__name__)]:
        monkeypatch.delitem(sys.modules, name)
    g = GraphBuilder()
    gm = g.build(g.batch_norm(g.conv(g.input("x", 2, 4, 8, 8), 4, 3, padding=1)))
    assert len(analyzer.analyze(gm).exprs) == 2
    assert set(analyzer.RULES) == every_target


NEW_RULE = '''
"""Rule: ``positive(x)`` is ``x`` (written by a test: a new family of ops is one module)."""

import torch

from repfx.passes.regions.analyzer import Expr, NotLinear, rule


@rule(torch.ops.aten.positive.default)
def positive(an, node, operand):
    expr = operand(node.args[0])
    if not expr.ops:
        raise NotLinear  # alone it is no region
    return Expr(expr.terms, expr.ops | {node}, expr.shape)
'''


def conv_positive_bn():
    g = GraphBuilder()
    y = g.call(aten.positive.default, g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1))
    return g.build(g.batch_norm(y))


def one_conv():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    return g.build(g.call(aten.conv2d.default, x, g.randn(8, 4, 3, 3), g.randn(8), [1, 1], [1, 1], [1, 1], 1))


def test_a_new_rule_is_one_new_module(tmp_path, monkeypatch):
    assert_unchanged(conv_positive_bn())  # no rule for positive: it is a boundary between the conv and the BN
    (tmp_path / "positive_rule.py").write_text(NEW_RULE)
    monkeypatch.setattr(analyzer, "RULES", dict(analyzer.registered_rules()))
    monkeypatch.setattr(rules, "__path__", [*rules.__path__, str(tmp_path)])
    try:
        assert "positive_rule" in rules.import_rule_modules()
        assert_folds(conv_positive_bn(), one_conv())
    finally:
        sys.modules.pop(f"{rules.__name__}.positive_rule", None)
        vars(rules).pop("positive_rule", None)
