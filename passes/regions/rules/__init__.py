"""The rules of the linear-region analysis: what each aten op computes, one module per family of ops.

Importing this package imports every module in it; each module registers its rules
with ``@rule(target, ...)`` (``repfx.passes.regions.analyzer.RULES``). Adding a rule
is therefore one new module here plus its tests (``tests/passes/rules/``): nothing
lists the modules, and the analyzer names none of them.

A rule is ``(analyzer, node, operand) -> Expr``: ``operand(arg)`` is the expression
of an input (absorbed when nothing else reads it, else a boundary); it reads the op's
arguments by name (``analyzer.arguments(node)``) and builds the expression with the
analyzer's combinators, which price it: a rule never touches cost state. It raises
``NotExact(code, sentence)`` when the op is linear but cannot be merged exactly (the
report shows it; codes in ``repfx.passes.refusals``) and ``NotLinear`` when the op is
outside the algebra (silent).
"""

import importlib
import pkgutil


def import_rule_modules() -> list[str]:
    """Import every module of this package (each registers its rules as it is imported); returns their names."""
    names = [module.name for module in pkgutil.iter_modules(__path__)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


import_rule_modules()
