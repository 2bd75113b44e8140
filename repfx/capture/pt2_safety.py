"""The checks that loading a .pt2 (``torch.export.save``) runs no code the file carries.

A .pt2 is a zip of JSON graphs, raw tensor bytes and a few pickles, but ``torch.export.load``
(torch 2.14) runs code from it in several places, each checked here first:

- pickles it unpickles with Python's full unpickler (the sample inputs, weights and tensor
  constants marked ``use_pickle``, legacy ``<model>.pt`` weight/constant files) must load
  with torch's weights-only unpickler: tensors and plain containers only
  (``repfx.capture.pickle_safety``);
- "opaque" constants (``pickle.loads``), TorchBind constants (their C++ ``__setstate__``)
  and AOTInductor libraries (loaded as shared objects) cannot be checked: refused;
- symbolic-shape expressions go to ``sympy.sympify``, which is ``eval``: only sympy
  constructors applied to literals, symbol names that are identifiers;
- pytree contexts can name a module to import (enums, defaultdict factories): refused,
  but for builtin factories.

Members are read with torch's own zip reader (whose name lookup ignores case) by the
names torch asks for, so the checked member is the one torch unpickles
(``check_archive``). After loading, before anything runs the program
(``check_loaded_program``): no node may pass a Python callable other than an operator (the
deserializer resolves such arguments to anything reachable from ``torch``), and the saved
guards, which ``program.module()`` compiles into Python source, may only read input sizes
and compare them; string inputs must not be able to end the string literal torch pastes
them into. Each check raises ``Unsafe`` naming the member and the code.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2

from repfx.capture.pickle_safety import weights_only_problem

# What torch 2.14's sympy printer (srepr) writes into a program's shape expressions: sympy
# classes and functions, and torch's own sympy functions (the names the deserializer adds).
SYMPY_CALLABLES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise",
    "ExprCondPair", "IntInfinity", "NegativeIntInfinity",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
})
SYMBOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # printed verbatim into the guard source module() compiles
DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)")
SYMPY_STRING_ARGUMENTS = {"Symbol": SYMBOL_NAME, "Float": DECIMAL}  # a name, a decimal: sympy parses neither as code
SAFE_DEFAULT_FACTORIES = frozenset({"list", "dict", "set", "tuple", "int", "float", "str", "bool"})
# What the guards torch.export records use: L['x'] for an input, math, and the helpers
# torch compiles them with; of a tensor only its sizes, strides and offset.
GUARD_NAMES = frozenset({"L", "math", "inf", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"})
TENSOR_SIZE_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})


class Unsafe(Exception):
    """Loading would run code the file controls; ``str()`` says which member and what code."""


def check_archive(data: bytes) -> None:
    """Raise ``Unsafe`` for the first member ``torch.export.load`` would run code from.

    Mirrors torch 2.14's ``load_pt2``: the same reader, the same member names, the same
    order of decisions (legacy weight file first, else the payload config).
    """
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    names = reader.get_all_records()
    for name in names:
        if name.lower().startswith(pt2.AOTINDUCTOR_DIR):
            raise Unsafe(f"member {name} is an AOTInductor compiled library, which loading would run")
    prefix, suffix = pt2.MODELS_FILENAME_FORMAT.split("{}")
    for name in names:
        if not name.startswith(prefix):
            continue
        model = name[len(prefix):-len(suffix)]  # torch's own slicing of models/<model>.json
        _check_program_json(name, reader.get_record(name))
        _check_pickle_member(reader, pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model))
        _check_payloads(reader, names, pt2.WEIGHTS_DIR, f"{pt2.WEIGHTS_DIR}{model}.pt",
                        pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model))
        _check_payloads(reader, names, pt2.CONSTANTS_DIR, f"{pt2.CONSTANTS_DIR}{model}.pt",
                        pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model))


def _check_payloads(reader: Any, names: list[str], directory: str, legacy: str, config_name: str) -> None:
    """Weights or constants: the legacy pickle, else every member the payload config marks as pickled."""
    if legacy in names:  # torch reads this file instead of the config, and unpickles it
        _check_pickle_member(reader, legacy)
        return
    if config_name not in names:
        return  # torch refuses the archive before unpickling anything
    config = json.loads(reader.get_record(config_name))["config"]
    for entry in config.values():
        path_name = entry["path_name"]
        member = os.path.join(directory, path_name)  # as torch joins it
        if path_name.startswith(pt2.OPAQUE_OBJ_FILENAME_PREFIX):
            raise Unsafe(f"member {member} is a pickled Python object (an opaque constant), "
                         "which loading would unpickle without restrictions")
        if path_name.startswith(pt2.CUSTOM_OBJ_FILENAME_PREFIX):
            raise Unsafe(f"member {member} is a TorchBind object, whose C++ __setstate__ loading would run")
        if entry.get("use_pickle"):
            _check_pickle_member(reader, member)


def _check_pickle_member(reader: Any, member: str) -> None:
    try:
        payload = bytes(reader.get_record(member))
    except RuntimeError:
        return  # missing: torch.export.load fails on it without unpickling anything
    problem = weights_only_problem(payload)
    if problem:
        raise Unsafe(f"member {member} {problem}")


def _check_program_json(member: str, raw: bytes) -> None:
    """Shape expressions (``sympy.sympify``, i.e. eval) and pytree contexts (module imports) of a program."""
    try:
        program = json.loads(raw)
    except ValueError:
        return  # torch cannot parse it either; it fails before evaluating anything
    for key, value in _json_items(program):
        if key == "expr_str":
            _check_sympy_expression(member, value)
        elif key == "__enum__":
            raise Unsafe(f"member {member} has a pytree enum context naming {value!r}, "
                         "whose module loading would import")
        elif key == "default_factory_module":
            module, name = value
            if module != "builtins" or name not in SAFE_DEFAULT_FACTORIES:
                raise Unsafe(f"member {member} has a pytree defaultdict context naming {module}.{name}, "
                             "whose module loading would import")


def _json_items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of a JSON document, also inside strings that are JSON themselves (pytree specs)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "__enum__" in item:
                yield "__enum__", item.get("fqn")
            if "default_factory_module" in item:
                yield "default_factory_module", (item.get("default_factory_module"), item.get("default_factory_name"))
            for key, child in item.items():
                if key == "expr_str":
                    yield key, child
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):  # torch decodes pytree specs and their contexts from strings
            try:
                stack.append(json.loads(item))
            except ValueError:
                pass


def _check_sympy_expression(member: str, text: Any) -> None:
    """Only sympy constructors applied to literals: torch hands the text to ``sympy.sympify``, which evals it."""
    if not isinstance(text, str):
        raise Unsafe(f"member {member} has a shape expression that is not a string, which sympy would evaluate")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        tree = None
    culprit = _sympy_culprit(tree.body) if tree is not None else "text that is not an expression"
    if culprit:
        raise Unsafe(f"member {member} has a shape expression {_clip(text)} with {culprit}, "
                     "which loading would evaluate")


def _sympy_culprit(node: ast.AST) -> str | None:
    """What in the expression is more than sympy constructors, names and numbers; None when nothing is."""
    if isinstance(node, ast.Constant):
        return None if isinstance(node.value, (int, float, bool)) or node.value is None else "a bare literal"
    if isinstance(node, ast.Name):
        return None if not node.id.startswith("_") else f"the name {node.id}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        return _sympy_culprit(node.operand)
    if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.MatMult):
        return _sympy_culprit(node.left) or _sympy_culprit(node.right)
    if isinstance(node, ast.Compare):
        return next(filter(None, map(_sympy_culprit, [node.left, *node.comparators])), None)
    if isinstance(node, ast.Call):
        return _sympy_call_culprit(node)
    return f"a {type(node).__name__.lower()}"


def _sympy_call_culprit(node: ast.Call) -> str | None:
    if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_CALLABLES:
        return f"a call of {ast.unparse(node.func)}"
    for argument in node.args:
        if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
            pattern = SYMPY_STRING_ARGUMENTS.get(node.func.id)
            if pattern is None or not pattern.fullmatch(argument.value):
                return f"the string {_clip(argument.value, 40)} passed to {node.func.id}"
            continue
        culprit = _sympy_culprit(argument)
        if culprit:
            return culprit
    for argument in node.keywords:
        if argument.arg is None or argument.arg.startswith("_"):
            return f"keyword arguments {ast.unparse(argument)}"
        if not isinstance(argument.value, ast.Constant) or isinstance(argument.value.value, str):
            return f"the keyword argument {ast.unparse(argument)}"
    return None


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_loaded_program(program: torch.export.ExportedProgram) -> None:
    """What ``program.module()`` and running the graph would execute, checked before repfx does either."""
    _check_graph_callables(program)
    _check_guards_code(program)
    _check_input_strings(program)
    _check_argument_names(program)


def _check_graph_callables(program: torch.export.ExportedProgram) -> None:
    """No node may pass a Python callable other than an operator: running the graph would call it.

    torch's verifier (run by torch.export.load) already limits call targets to operators and
    a few builtins; arguments are not checked there, and the deserializer resolves an
    argument of kind ``as_operator`` to any attribute reachable from ``torch``.
    """
    operators = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            for value in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
                if callable(value) and not isinstance(value, (operators, torch.fx.Node)):
                    raise Unsafe(f"node {node.name} passes {_callable_name(value)} to {node.target}, "
                                 "which running the graph would call")


def _check_guards_code(program: torch.export.ExportedProgram) -> None:
    """``program.module()`` compiles the saved guards into Python source and runs them on every call."""
    for guard in getattr(program, "_guards_code", None) or []:
        try:
            tree = ast.parse(guard, mode="eval") if isinstance(guard, str) else None
        except (SyntaxError, RecursionError):
            tree = None
        culprit = _guard_culprit(tree.body) if tree is not None else "text that is not an expression"
        if culprit:
            raise Unsafe(f"guard {_clip(str(guard))} has {culprit}, which running the model would execute")


def _guard_culprit(node: ast.AST) -> str | None:
    """What in a guard is more than sizes/strides of inputs, arithmetic, comparisons and math; None when nothing is."""
    children: list[ast.AST] = []
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str) and not _plain(node.value):
            return f"the string {node.value!r}"
    elif isinstance(node, ast.Name):
        if node.id not in GUARD_NAMES:
            return f"the name {node.id}"
    elif isinstance(node, ast.Attribute):
        if not (_is_math_attribute(node) or node.attr in TENSOR_SIZE_METHODS):
            return f"the attribute .{node.attr}"
        children = [node.value]
    elif isinstance(node, ast.Call):
        children = [node.func, *node.args, *(keyword.value for keyword in node.keywords)]
    elif isinstance(node, ast.Subscript):
        children = [node.value, node.slice]
    elif isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)):
        children = list(ast.iter_child_nodes(node))
    elif not isinstance(node, (ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
        return f"a {type(node).__name__.lower()}"
    return next(filter(None, map(_guard_culprit, children)), None)


def _is_math_attribute(node: ast.Attribute) -> bool:
    return (isinstance(node.value, ast.Name) and node.value.id == "math" and not node.attr.startswith("_")
            and hasattr(math, node.attr))


def _check_input_strings(program: torch.export.ExportedProgram) -> None:
    """String inputs and keyword names end up quoted inside the guard source ``program.module()`` compiles."""
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, str) and not _plain(value):
            raise Unsafe(f"input {node.name} has the value {_clip(value)}, which running the model would "
                         "compile as code")
    stored = getattr(program, "example_inputs", None)
    for name in (stored[1] if stored and isinstance(stored[1], dict) else {}):
        if not (isinstance(name, str) and name.isidentifier()):
            raise Unsafe(f"the sample inputs have the keyword {_clip(str(name))}, which running the model "
                         "would compile as code")


def _check_argument_names(program: torch.export.ExportedProgram) -> None:
    """``program.module()`` writes the saved argument names into the ``def forward(...)`` line it compiles."""
    for entry in program.module_call_graph:
        signature = entry.signature
        if signature is None:
            continue
        names = list(signature.forward_arg_names or [])
        spec = signature.in_spec
        if spec.type is tuple and spec.num_children == 2 and spec.child(1).type is dict:
            names += list(spec.child(1).context)  # keyword arguments
        for name in names:
            if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
                raise Unsafe(f"the argument name {_clip(str(name))} is not an identifier; running the model "
                             "would compile it as code")


def _plain(text: str) -> bool:
    """No quote, backslash or line break: nothing that could end the string literal torch pastes it into."""
    return not any(character in text for character in "'\"\\\n\r")


def _callable_name(value: Any) -> str:
    return f"{getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', type(value).__name__)}"
