"""Loading the model file the CLI is given, without running code the user did not agree to.

Security model. The file is read once into memory; every check below and the load itself
see those same bytes, so a file swapped on disk between check and load changes nothing.
``trust_pickle`` (``--trust-pickle``) skips every check and loads as torch does.

* ExportedProgram (``torch.export.save``, .pt2): a zip of JSON graphs, raw tensor bytes and
  a few pickles, but ``torch.export.load`` (torch 2.14) runs code from it in several places,
  each checked first:

  - pickles it unpickles with Python's full unpickler (the sample inputs, weights and tensor
    constants marked ``use_pickle``, legacy ``<model>.pt`` weight/constant files) must load
    with torch's weights-only unpickler: tensors and plain containers only;
  - "opaque" constants (``pickle.loads``), TorchBind constants (their C++ ``__setstate__``)
    and AOTInductor libraries (loaded as shared objects) cannot be checked: refused;
  - symbolic-shape expressions go to ``sympy.sympify``, which is ``eval``: only sympy
    constructors applied to literals, symbol names that are identifiers;
  - pytree contexts can name a module to import (enums, defaultdict factories): refused,
    but for builtin factories.

  Members are read with torch's own zip reader (whose name lookup ignores case) by the
  names torch asks for, so the checked member is the one torch unpickles. After loading,
  before anything runs the program: no node may pass a Python callable other than an
  operator (the deserializer resolves such arguments to anything reachable from ``torch``),
  and the saved guards, which ``program.module()`` compiles into Python source, may only
  read input sizes and compare them; string inputs must not be able to end the string
  literal torch pastes them into.
* TorchScript (``torch.jit.save``): ``torch.jit.load`` deserializes with TorchScript's own
  unpickler, which builds tensors, containers and the archive's TorchScript classes, never
  Python objects or callables, and the only code it runs is TorchScript (registered
  operators, no Python). It is allowed.
* A pickled ``nn.Module`` (``torch.save(model)``) is Python code execution on load: refused
  unless ``trust_pickle``.

Archive kinds are told apart by the formats' own markers, relative to the one top-level
folder every member of a torch zip lives in: a PT2 archive has ``archive_format`` saying
"pt2"; a TorchScript archive has ``constants.pkl`` and ``code/``; a ``torch.save`` zip has
``data.pkl`` and neither. A legacy (non-zip) ``torch.save`` file is a pickle (protocol 2+
starts with 0x80).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import keyword
import logging
import math
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2

from repfx.errors import first_line

TRUST_HINT = "refused (pass --trust-pickle if you trust this file)"
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # the PROTO opcode every protocol-2+ pickle starts with

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
QUIET_TORCH_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")


class BadInput(ValueError):
    """The CLI's input is unusable; the message is one line a user can act on (exit code 2)."""


class _Unsafe(Exception):
    """Loading would run code the file controls; ``str()`` says which member and what code."""


@dataclass
class LoadedModel:
    model: Any  # nn.Module, ExportedProgram or ScriptModule
    kind: str  # "torchscript", "exported_program", "pickle"
    example_inputs: tuple | None  # what the file says about its inputs, when it says anything


def load_model(path: Path, *, trust_pickle: bool = False) -> LoadedModel:
    """The model in ``path``; code in the file runs only with ``trust_pickle`` (see the module docstring)."""
    data = _read(path)
    kind = sniff_kind(data)
    if kind == "exported_program":
        program = _load_exported_program(path, data, trust_pickle)
        return LoadedModel(program, kind, _program_example_inputs(program))
    if kind == "torchscript":
        try:
            return LoadedModel(torch.jit.load(io.BytesIO(data), map_location="cpu"), kind, None)
        except Exception as error:
            raise BadInput(f"{path}: not a loadable TorchScript archive ({first_line(error)})") from error
    if kind == "pickle":
        return LoadedModel(_load_pickled_module(path, data, trust_pickle), kind, None)
    raise BadInput(f"{path}: not a TorchScript archive, an ExportedProgram (.pt2) or a pickled module")


def _read(path: Path) -> bytes:
    """The whole file, read once: checks and load must see the same bytes."""
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInput(f"{path}: cannot be read ({first_line(error)})") from error


# --- what kind of file ------------------------------------------------------------------------------------------

def sniff_kind(data: bytes) -> str:
    """``exported_program``, ``torchscript``, ``pickle`` or ``unknown``, from the formats' markers (suffixes lie)."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        return "pickle" if data[:1] == PICKLE_PROTOCOL_2_PLUS else "unknown"
    try:
        with zipfile.ZipFile(buffer) as archive:
            members = _relative_members(archive.namelist())
            if members is None:
                return "unknown"
            if pt2.ARCHIVE_FORMAT_PATH in members:
                marker = archive.read(members[pt2.ARCHIVE_FORMAT_PATH])
                return "exported_program" if marker == pt2.ARCHIVE_FORMAT_VALUE.encode() else "unknown"
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    if "constants.pkl" in members and any(name.startswith("code/") for name in members):
        return "torchscript"
    if "data.pkl" in members:
        return "pickle"
    return "unknown"


def _relative_members(names: list[str]) -> dict[str, str] | None:
    """Member path relative to the archive's one top-level folder -> full name; None when torch's layout is broken.

    torch writes every member under a single ``<prefix>/`` folder and its reader strips it;
    a member outside it (or none at all) is not a torch archive. This also keeps a root-level
    ``version`` member, which would send ``torch.export.load`` to its deprecated pre-2.7
    loader, out of any archive that reaches it.
    """
    if not names or "/" not in names[0]:
        return None
    prefix = names[0].split("/", 1)[0] + "/"
    if not all(name.startswith(prefix) for name in names):
        return None
    return {name[len(prefix):]: name for name in names}


# --- ExportedProgram --------------------------------------------------------------------------------------------

def _load_exported_program(path: Path, data: bytes, trust_pickle: bool) -> torch.export.ExportedProgram:
    if not trust_pickle:
        try:
            _check_pt2_members(data)
        except _Unsafe as unsafe:
            raise BadInput(f"{path}: {unsafe}; {TRUST_HINT}") from None
        except Exception as error:  # malformed beyond what the checks understand: refused either way
            raise BadInput(f"{path}: not a loadable ExportedProgram ({first_line(error)})") from error
    try:
        with _quiet_torch_export_logs():
            program = torch.export.load(io.BytesIO(data))
    except Exception as error:
        raise BadInput(f"{path}: not a loadable ExportedProgram ({first_line(error)})") from error
    if not trust_pickle:
        try:
            _check_loaded_program(program)
        except _Unsafe as unsafe:
            raise BadInput(f"{path}: {unsafe}; {TRUST_HINT}") from None
        except Exception as error:  # a program shaped unlike anything torch.export writes
            raise BadInput(f"{path}: the loaded program could not be checked ({first_line(error)}); "
                           f"{TRUST_HINT}") from error
    return program


@contextlib.contextmanager
def _quiet_torch_export_logs() -> Iterator[None]:
    """torch.export.load logs tracebacks and warns on its way to an error (the CLI prints one line).

    With --trust-pickle it also logs a warning whose own format string is broken, which
    Python's logging reports as a traceback on stderr.
    """
    loggers = [logging.getLogger(name) for name in QUIET_TORCH_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # about torch's internals, e.g. a graph it could not compile
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_pt2_members(data: bytes) -> None:
    """Raise ``_Unsafe`` for the first member ``torch.export.load`` would run code from.

    Mirrors torch 2.14's ``load_pt2``: the same reader, the same member names, the same
    order of decisions (legacy weight file first, else the payload config).
    """
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    names = reader.get_all_records()
    for name in names:
        if name.lower().startswith(pt2.AOTINDUCTOR_DIR):
            raise _Unsafe(f"member {name} is an AOTInductor compiled library, which loading would run")
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
            raise _Unsafe(f"member {member} is a pickled Python object (an opaque constant), "
                          "which loading would unpickle without restrictions")
        if path_name.startswith(pt2.CUSTOM_OBJ_FILENAME_PREFIX):
            raise _Unsafe(f"member {member} is a TorchBind object, whose C++ __setstate__ loading would run")
        if entry.get("use_pickle"):
            _check_pickle_member(reader, member)


def _check_pickle_member(reader: Any, member: str) -> None:
    try:
        payload = bytes(reader.get_record(member))
    except RuntimeError:
        return  # missing: torch.export.load fails on it without unpickling anything
    problem = weights_only_problem(payload)
    if problem:
        raise _Unsafe(f"member {member} {problem}")


def weights_only_problem(payload: bytes) -> str | None:
    """None when the torch.save-format bytes hold only tensors and plain containers, else what they reference."""
    if not payload:
        return None  # torch reads empty sample inputs as {} and fails on other empty pickles
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # An explicit weights_only=True is kept even under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True, mmap=False)
    except Exception as error:
        unsafe = _disallowed_globals(payload)
        if unsafe:
            return f"references {', '.join(unsafe)}, which loading would execute"
        return f"is not a plain-tensor pickle ({first_line(error, 200)}), so loading it could execute code"
    return None


def _disallowed_globals(payload: bytes) -> list[str]:
    """The globals the payload's pickles import that torch's weights-only unpickler does not allow (for messages)."""
    from torch import _weights_only_unpickler

    allowed = set(getattr(_weights_only_unpickler, "_get_allowed_globals", dict)())
    allowed |= {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}"
                for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple)}
    found = [name for pickled in _pickles_in(payload) for name in _pickle_globals(pickled)]
    return list(dict.fromkeys(name for name in found if name not in allowed))


def _pickles_in(payload: bytes) -> Iterator[bytes]:
    """The pickle streams of torch.save bytes: ``data.pkl`` of the zip format, else the legacy file itself."""
    buffer = io.BytesIO(payload)
    if not zipfile.is_zipfile(buffer):
        yield payload
        return
    with zipfile.ZipFile(buffer) as archive:
        for name in archive.namelist():
            if name.endswith(".pkl"):
                yield archive.read(name)


def _pickle_globals(pickled: bytes) -> list[str]:
    """``module.name`` of each global the pickle stream(s) import, read statically with pickletools.

    STACK_GLOBAL takes its names from the stack: the last two strings pushed (or fetched
    from the memo) stand in for them. Good enough to name the culprit in a message; the
    decision itself is the weights-only unpickler's.
    """
    found: list[str] = []
    stream = io.BytesIO(pickled)
    while stream.tell() < len(pickled):  # legacy torch.save writes several pickles back to back
        strings: list[str] = []
        memo: dict[int, str | None] = {}
        top: str | None = None  # the string the last opcode pushed, if it pushed one
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if arg is None else arg] = top
                    continue  # memoizing leaves the stack as it was
                elif name in ("GET", "BINGET", "LONG_BINGET") and memo.get(arg):
                    strings.append(memo[arg])
                    top = memo[arg]
                    continue
                elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                    strings.append(arg)
                    top = arg
                    continue
                top = None
        except Exception:
            break  # raw storage bytes follow the pickles of the legacy format
    return found


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
            raise _Unsafe(f"member {member} has a pytree enum context naming {value!r}, "
                          "whose module loading would import")
        elif key == "default_factory_module":
            _check_default_factory(member, value)


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


def _check_default_factory(member: str, factory: tuple[Any, Any]) -> None:
    module, name = factory
    if module == "builtins" and name in SAFE_DEFAULT_FACTORIES:
        return
    raise _Unsafe(f"member {member} has a pytree defaultdict context naming {module}.{name}, "
                  "whose module loading would import")


def _check_sympy_expression(member: str, text: Any) -> None:
    """Only sympy constructors applied to literals: torch hands the text to ``sympy.sympify``, which evals it."""
    if not isinstance(text, str):
        raise _Unsafe(f"member {member} has a shape expression that is not a string, which sympy would evaluate")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        tree = None
    culprit = _sympy_culprit(tree.body) if tree is not None else "text that is not an expression"
    if culprit:
        raise _Unsafe(f"member {member} has a shape expression {_clip(text)} with {culprit}, "
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
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg.startswith("_"):
            return f"keyword arguments {ast.unparse(keyword)}"
        if not isinstance(keyword.value, ast.Constant) or isinstance(keyword.value.value, str):
            return f"the keyword argument {ast.unparse(keyword)}"
    return None


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_loaded_program(program: torch.export.ExportedProgram) -> None:
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
                    raise _Unsafe(f"node {node.name} passes {_callable_name(value)} to {node.target}, "
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
            raise _Unsafe(f"guard {_clip(str(guard))} has {culprit}, which running the model would execute")


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
            raise _Unsafe(f"input {node.name} has the value {_clip(value)}, which running the model would "
                          "compile as code")
    stored = getattr(program, "example_inputs", None)
    for name in (stored[1] if stored and isinstance(stored[1], dict) else {}):
        if not (isinstance(name, str) and name.isidentifier()):
            raise _Unsafe(f"the sample inputs have the keyword {_clip(str(name))}, which running the model "
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
                raise _Unsafe(f"the argument name {_clip(str(name))} is not an identifier; running the model "
                              "would compile it as code")


def _plain(text: str) -> bool:
    """No quote, backslash or line break: nothing that could end the string literal torch pastes it into."""
    return not any(character in text for character in "'\"\\\n\r")


def _callable_name(value: Any) -> str:
    return f"{getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', type(value).__name__)}"


# --- pickled module ---------------------------------------------------------------------------------------------

def _load_pickled_module(path: Path, data: bytes, trust_pickle: bool) -> torch.nn.Module:
    if not trust_pickle:
        raise BadInput(f"{path} is a pickled Python object (torch.save(model)); unpickling runs arbitrary code, "
                       "so it is refused. Save the model with torch.export.save or torch.jit.save, or pass "
                       "--trust-pickle if you trust this file.")
    try:
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as error:
        raise BadInput(f"{path}: unpickling failed ({first_line(error)})") from error
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"{path} holds a {type(model).__name__}, not an nn.Module (a state_dict needs the "
                       "model's code: build the model, load the weights, then torch.export.save it)")
    return model


def _program_example_inputs(program: torch.export.ExportedProgram) -> tuple | None:
    """Example inputs saved with the program, else zeros shaped like its user-input placeholders."""
    stored = getattr(program, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs:
            return tuple(args)
    user_inputs = set(program.graph_signature.user_inputs)
    inputs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                return None
            shape = [int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None else int(s)
                     for s in value.shape]
            inputs.append(torch.zeros(shape, dtype=value.dtype))
    return tuple(inputs) or None
