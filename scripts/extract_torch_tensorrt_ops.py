"""Extract torch-tensorrt's converter and decomposition tables into a JSON data file.

repfx checks, on machines where torch-tensorrt cannot even be imported (no CUDA, no
TensorRT), that a re-parameterized graph holds only ops torch-tensorrt can convert. So the
op list has to be data, pinned to the torch-tensorrt release it was read from. This script
produces that data by reading torch-tensorrt's *source* with ``ast``: importing the package
would need TensorRT, and would also run the environment-dependent registrations we want to
describe rather than execute.

What is read, and why:

* ``dynamo/conversion/*.py``: every ``dynamo_tensorrt_converter(key, ...)`` registration,
  as a decorator (stacked or not) or called directly. The key is what the converter
  registry is indexed by; the keyword arguments say when the converter applies.
* ``dynamo/lowering/_decomposition_groups.py``: ``torch_enabled_decompositions`` (torch's
  own decompositions that torch-tensorrt switches on) and ``torch_disabled_decompositions``
  (ops it keeps whole, so they need a converter).
* ``dynamo/lowering/_decompositions.py``: ``register_torch_trt_decomposition(key, ...)``,
  torch-tensorrt's own decompositions, the attention ops it only decomposes on request, and
  whether ``get_decompositions`` also decomposes CompositeImplicitAutograd ops.

Keys are resolved statically through module assignments (``aten = torch.ops.aten``),
imports between modules of the package, ``for`` loops over literal collections and calls
of a helper whose parameter is the key (``replace_inplace_op(aten.add_, aten.add)``). A key
that can only be known at run time is listed under ``"unresolved"`` with the reason; it is
never guessed.

Usage::

    python scripts/extract_torch_tensorrt_ops.py /path/torch_tensorrt-2.14.0-....whl \\
        --out repfx/data/torch_tensorrt_2.14.0_ops.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "torch_tensorrt"
CONVERSION_DIR = "dynamo/conversion"
GROUPS_FILE = "dynamo/lowering/_decomposition_groups.py"
DECOMPOSITIONS_FILE = "dynamo/lowering/_decompositions.py"
CONVERTER_DECORATOR = "dynamo_tensorrt_converter"
DECOMPOSITION_DECORATOR = "register_torch_trt_decomposition"

# `import operator` binds the pure-Python facade, but the functions report the C module
# `_operator` as their home, and that is the name torch.fx (and torch-tensorrt's
# `qualified_name_or_str`) prints for a node target such as operator.mul.
MODULE_ALIASES = {"operator": "_operator"}


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """The package's Python files, from a wheel or an unpacked directory."""

    files: dict[str, str]  # path relative to the package root -> text
    label: str  # the wheel's file name, or the directory given
    version: str


def read_source(path: Path) -> Source:
    """Reads every ``.py`` file of the package without importing or unpacking anything."""
    if path.is_file():
        return _read_wheel(path)
    root = path / PACKAGE if (path / PACKAGE).is_dir() else path
    if not (root / CONVERSION_DIR).is_dir():
        raise SystemExit(f"{path}: no {PACKAGE}/{CONVERSION_DIR} here; give a wheel or the unpacked package")
    files = {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*.py")}
    version = _version(files, path)
    return Source(files, _unpacked_label(root, version), version)


def _unpacked_label(root: Path, version: str) -> str:
    """The wheel's file name, rebuilt from the dist-info an unpacked wheel keeps beside it.

    The data should name the artifact, not a path on the machine that happened to run this.
    """
    wheel = root.parent / f"{PACKAGE}-{version}.dist-info" / "WHEEL"
    tags = re.findall(r"^Tag: (\S+)$", wheel.read_text(), re.M) if wheel.is_file() else []
    if len(tags) != 1:
        return f"{PACKAGE} {version} source directory (no single wheel tag beside it)"
    return f"{PACKAGE}-{version}-{tags[0]}.whl"


def _read_wheel(path: Path) -> Source:
    prefix = PACKAGE + "/"
    with zipfile.ZipFile(path) as wheel:
        files = {
            name[len(prefix):]: wheel.read(name).decode()
            for name in wheel.namelist()
            if name.startswith(prefix) and name.endswith(".py")
        }
    return Source(files, path.name, _version(files, path))


def _version(files: dict[str, str], path: Path) -> str:
    """The release, from ``_version.py``: the label alone could be a renamed file."""
    match = re.search(r'__version__\s*=\s*"([^"]+)"', files.get("_version.py", ""))
    if match is None:
        raise SystemExit(f"{path}: no _version.py with __version__; cannot tell which release this is")
    return match.group(1)


# --------------------------------------------------------------------------- modules


class Module:
    """One parsed file: its tree, parents, module-level bindings and imports."""

    def __init__(self, relpath: str, text: str):
        self.relpath = relpath
        self.name = PACKAGE + "." + relpath[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        self.tree = ast.parse(text, filename=relpath)
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.assigned: dict[str, ast.expr] = {}
        self.imported: dict[str, tuple[str, str | None]] = {}  # local -> (module, attribute)
        for stmt in self.tree.body:
            self._bind(stmt)

    def _bind(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            self.assigned[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            self.assigned[stmt.target.id] = stmt.value
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                local = alias.asname or alias.name.split(".")[0]
                self.imported[local] = (alias.name if alias.asname else local, None)
        elif isinstance(stmt, ast.ImportFrom):
            source = self._absolute(stmt.module, stmt.level)
            for alias in stmt.names:
                self.imported[alias.asname or alias.name] = (source, alias.name)

    def _absolute(self, module: str | None, level: int) -> str:
        """``from ._x import y`` names a module relative to this file's package."""
        if level == 0:
            return module or ""
        package = self.name.split(".")
        if not self.relpath.endswith("__init__.py"):
            package = package[:-1]
        base = package[: len(package) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def ancestors(self, node: ast.AST):
        while node in self.parent:
            node = self.parent[node]
            yield node


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Target:
    """A resolved registry key, named as ``str(op)`` / torch.fx's qualified name gives it."""

    op: str
    all_overloads: bool  # the key is an OpOverloadPacket, not one overload


class Unresolvable(Exception):
    """A key whose value is only known when the code runs."""


class Resolver:
    """Turns a key expression into the ops it names, across the package's modules."""

    def __init__(self, modules: dict[str, Module]):
        self.modules = modules

    def targets(self, module: Module, expr: ast.expr) -> list[Target]:
        return [self._as_target(path) for path in self.paths(module, expr)]

    def paths(self, module: Module, expr: ast.expr) -> list[str]:
        """Every dotted path ``expr`` can stand for (several where a loop or helper binds it)."""
        if isinstance(expr, ast.Attribute):
            return [f"{base}.{expr.attr}" for base in self.paths(module, expr.value)]
        if isinstance(expr, ast.Name):
            return self._name(module, expr)
        raise Unresolvable(f"{type(expr).__name__} expression is evaluated at run time")

    def _name(self, module: Module, name: ast.Name) -> list[str]:
        child: ast.AST = name
        for scope in module.ancestors(name):
            decorating = child in getattr(scope, "decorator_list", ())  # evaluated in the outer scope
            child = scope
            if isinstance(scope, ast.For) and _binds(scope.target, name.id):
                return self._loop_values(module, scope, name.id)
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not decorating:
                if name.id in _parameters(scope):
                    return self._call_site_values(module, scope, name.id)
                if isinstance(scope, ast.FunctionDef) and _assigns_locally(scope, name.id):
                    raise Unresolvable(f"{name.id!r} is a local variable of {scope.name}() computed at run time")
        return self._global(module, name.id)

    def _global(self, module: Module, name: str) -> list[str]:
        if name in module.assigned:
            return self.paths(module, module.assigned[name])
        if name in module.imported:
            source, attribute = module.imported[name]
            if attribute is None:
                return [MODULE_ALIASES.get(source, source)]
            origin = self.modules.get(source)
            if origin is not None and (attribute in origin.assigned or attribute in origin.imported):
                return self._global(origin, attribute)
            return [f"{MODULE_ALIASES.get(source, source)}.{attribute}"]
        raise Unresolvable(f"{name!r} is not bound at module level in {module.relpath}")

    def _loop_values(self, module: Module, loop: ast.For, name: str) -> list[str]:
        if not isinstance(loop.target, ast.Name):
            raise Unresolvable(f"loop over {ast.unparse(loop.iter)} unpacks {name!r} from tuples")
        iterable = loop.iter
        if isinstance(iterable, ast.Name) and iterable.id in module.assigned:
            iterable = module.assigned[iterable.id]
        if not isinstance(iterable, (ast.List, ast.Tuple, ast.Set)):
            raise Unresolvable(f"loop over {ast.unparse(loop.iter)}, which is not a literal collection")
        return [path for element in iterable.elts for path in self.paths(module, element)]

    def _call_site_values(self, module: Module, function: ast.AST, name: str) -> list[str]:
        """The key is a helper's parameter: resolve it at each call of the helper in this module."""
        if not isinstance(function, ast.FunctionDef):
            raise Unresolvable(f"{name!r} is a lambda parameter")
        position = _parameters(function).index(name)
        calls = [
            call for call in ast.walk(module.tree)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == function.name
        ]
        if not calls:
            raise Unresolvable(f"{name!r} is a parameter of {function.name}(), which this module never calls")
        values = []
        for call in calls:
            argument = _argument(call, position, name)
            if argument is None:
                raise Unresolvable(f"a call of {function.name}() at line {call.lineno} passes no {name!r}")
            values.extend(self.paths(module, argument))
        return values

    @staticmethod
    def _as_target(path: str) -> Target:
        parts = path.split(".")
        if parts[:2] == ["torch", "ops"]:
            if len(parts) == 4:
                return Target(".".join(parts[2:]), all_overloads=True)
            if len(parts) == 5:
                return Target(".".join(parts[2:]), all_overloads=False)
            raise Unresolvable(f"{path} is not an operator (expected torch.ops.<namespace>.<op>[.<overload>])")
        return Target(path, all_overloads=False)


def _binds(target: ast.expr, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))


def _parameters(function: ast.AST) -> list[str]:
    arguments = function.args
    return [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]


def _assigns_locally(function: ast.FunctionDef, name: str) -> bool:
    return any(
        isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)
        for n in ast.walk(function)
    )


def _argument(call: ast.Call, position: int, name: str) -> ast.expr | None:
    if position < len(call.args):
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg == name), None)


# --------------------------------------------------------------------------- registrations


@dataclass
class Registration:
    """One call of a registering function: where it is, what it keys, how it is qualified."""

    module: Module
    call: ast.Call
    function: str | None  # the decorated function's name, when used as a decorator

    @property
    def line(self) -> int:
        return self.call.lineno

    def keyword(self, name: str) -> ast.expr | None:
        return next((k.value for k in self.call.keywords if k.arg == name), None)

    def key(self) -> ast.expr | None:
        return self.call.args[0] if self.call.args else self.keyword("key") or self.keyword("aten_op")

    def where(self) -> dict:
        place = {"file": self.module.relpath, "line": self.line}
        if self.function:
            place["function"] = self.function
        return place


def registrations(module: Module, callee: str) -> list[Registration]:
    """Calls of ``callee`` in ``module``: as decorators (``@callee(...)``) or plain calls."""
    found = []
    for node in ast.walk(module.tree):
        if not (isinstance(node, ast.Call) and _callee_name(node.func) == callee):
            continue
        owner = module.parent.get(node)
        decorates = isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in owner.decorator_list
        found.append(Registration(module, node, owner.name if decorates else None))
    return sorted(found, key=lambda r: r.line)


def _callee_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def guards(registration: Registration) -> list[str]:
    """The conditions, outermost first, under which the registration runs at import time.

    A converter under ``if ENABLED_FEATURES.x:`` or ``try: import modelopt ... else:`` exists
    only in some installations, so a reader of the data must be able to tell it apart.
    """
    found = []
    child: ast.AST = registration.call
    for node in registration.module.ancestors(registration.call):
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            found.append(f"if {test}" if _within(child, node.body) else f"not ({test})")
        elif isinstance(node, ast.Try):
            attempt = "; ".join(ast.unparse(s) for s in node.body)
            if _within(child, node.orelse):
                found.append(f"try-else: no exception from `{attempt}`")
            elif any(_within(child, h.body) for h in node.handlers):
                found.append(f"except: `{attempt}` raised")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and child not in node.decorator_list:
            found.append(f"when {node.name}() is called")
        child = node
    return list(reversed(found))


def _within(node: ast.AST, statements: list[ast.stmt]) -> bool:
    return any(node is s or any(node is n for n in ast.walk(s)) for s in statements)


def _literal(expr: ast.expr | None, default):
    """A keyword argument's value, if it is a constant; otherwise its source text."""
    if expr is None:
        return default
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "ConverterPriority":
        return expr.attr
    return ast.unparse(expr)


def _validator(expr: ast.expr | None) -> str | None:
    """The validator's name, or the source of a lambda / factory call, kept to one line."""
    if expr is None or (isinstance(expr, ast.Constant) and expr.value is None):
        return None
    if isinstance(expr, ast.Name):
        return expr.id
    return " ".join(ast.unparse(expr).split())


@dataclass
class Extraction:
    """What was found, ready to serialize."""

    converters: list[dict] = field(default_factory=list)
    decomposed: list[dict] = field(default_factory=list)
    kept_whole: list[dict] = field(default_factory=list)
    unresolved: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, registration: Registration, kind: str, reason: str) -> None:
        expr = registration.key()
        self.unresolved.append({
            "kind": kind,
            "expression": ast.unparse(expr) if expr is not None else "",
            "reason": reason,
            **registration.where(),
        })


def extract_converters(modules: dict[str, Module], resolver: Resolver, out: Extraction) -> None:
    """Every converter registration in the conversion package, one entry per resolved key."""
    prefix = CONVERSION_DIR + "/"
    for module in (m for m in modules.values() if m.relpath.startswith(prefix)):
        for registration in registrations(module, CONVERTER_DECORATOR):
            if _literal(registration.keyword("enabled"), True) is False:
                out.skip(registration, "converter", "registered with enabled=False, so never added")
                continue
            try:
                targets = resolver.targets(module, registration.key())
            except Unresolvable as e:
                out.skip(registration, "converter", str(e))
                continue
            for target in targets:
                out.converters.append(_converter_entry(registration, target))


def _converter_entry(registration: Registration, target: Target) -> dict:
    entry = {
        "op": target.op,
        "all_overloads": target.all_overloads,
        "capability_validator": _validator(registration.keyword("capability_validator")),
        "supports_dynamic_shapes": _literal(registration.keyword("supports_dynamic_shapes"), False),
        "priority": _literal(registration.keyword("priority"), "STANDARD"),
        "requires_output_allocator": _literal(registration.keyword("requires_output_allocator"), False),
        "guards": guards(registration),
    }
    entry.update(registration.where())
    return entry


def extract_decompositions(modules: dict[str, Module], resolver: Resolver, out: Extraction) -> None:
    """torch's decompositions torch-tensorrt enables, its own ones, and the ops it keeps whole."""
    groups = _module(modules, GROUPS_FILE)
    decompositions = _module(modules, DECOMPOSITIONS_FILE)
    for target, line in _set_members(groups, resolver, "torch_enabled_decompositions", out):
        out.decomposed.append({
            "op": target.op, "all_overloads": target.all_overloads, "decomposed_by": "torch",
            "registry": "torch_enabled_decompositions", "file": groups.relpath, "line": line,
        })
    for target, line in _set_members(groups, resolver, "torch_disabled_decompositions", out):
        out.kept_whole.append({
            "op": target.op, "all_overloads": target.all_overloads,
            "reason": "torch_disabled_decompositions: never decomposed, converted whole",
            "file": groups.relpath, "line": line,
        })
    for registration in registrations(decompositions, DECOMPOSITION_DECORATOR):
        try:
            targets = resolver.targets(decompositions, registration.key())
        except Unresolvable as e:
            out.skip(registration, "decomposition", str(e))
            continue
        registry = registration.keyword("registry")
        for target in targets:
            entry = {
                "op": target.op, "all_overloads": target.all_overloads, "decomposed_by": "torch-tensorrt",
                "registry": ast.unparse(registry) if registry is not None else "torch global decomposition table",
                "guards": guards(registration),
            }
            entry.update(registration.where())
            out.decomposed.append(entry)
    for target, line in _set_members(decompositions, resolver, "ATTENTION_DECOMPOSITION_OPS", out):
        out.kept_whole.append({
            "op": target.op, "all_overloads": target.all_overloads,
            "reason": "ATTENTION_DECOMPOSITION_OPS: decomposed only with decompose_attention=True (default False)",
            "file": decompositions.relpath, "line": line,
        })
    _note_composite_decomposition(decompositions, out)


def _module(modules: dict[str, Module], relpath: str) -> Module:
    found = next((m for m in modules.values() if m.relpath == relpath), None)
    if found is None:
        raise SystemExit(f"{relpath} is missing; this layout is not the one the script was written for")
    return found


def _set_members(module: Module, resolver: Resolver, name: str, out: Extraction):
    """The members of a module-level set literal, e.g. ``torch_enabled_decompositions``."""
    value = module.assigned.get(name)
    if not isinstance(value, (ast.Set, ast.List, ast.Tuple)):
        raise SystemExit(f"{module.relpath}: {name} is not a literal collection; the layout changed")
    for element in value.elts:
        try:
            for target in resolver.targets(module, element):
                yield target, element.lineno
        except Unresolvable as e:
            out.unresolved.append({
                "kind": name, "expression": ast.unparse(element), "reason": str(e),
                "file": module.relpath, "line": element.lineno,
            })


def _note_composite_decomposition(module: Module, out: Extraction) -> None:
    """Records, if the source still does it, that CompositeImplicitAutograd ops are decomposed.

    That set is computed from torch's dispatcher at run time, so it cannot be listed here;
    the rule is recorded instead, and repfx applies it with the installed torch.
    """
    function = next(
        (n for n in module.tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_decompositions"), None
    )
    calls = {_callee_name(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)} if function else set()
    if "_collect_all_valid_cia_ops_for_aten_namespace" in calls:
        out.notes.append(
            "get_decompositions() (default settings) also decomposes every CompositeImplicitAutograd aten op "
            "(torch._export.utils._collect_all_valid_cia_ops_for_aten_namespace) except kept_whole ops"
        )
        out.unresolved.append({
            "kind": "decomposition",
            "expression": "_collect_all_valid_cia_ops_for_aten_namespace()",
            "reason": "the CompositeImplicitAutograd op set comes from torch's dispatcher at run time; "
                      "repfx.deploy.trt_coverage applies this rule with the installed torch",
            "file": module.relpath, "line": function.lineno, "function": "get_decompositions",
        })


# --------------------------------------------------------------------------- main


def extract(path: Path) -> dict:
    source = read_source(path)
    modules = {}
    for relpath, text in sorted(source.files.items()):
        module = Module(relpath, text)
        modules[module.name] = module
    out = Extraction()
    resolver = Resolver(modules)
    extract_converters(modules, resolver, out)
    extract_decompositions(modules, resolver, out)
    return {
        "source": f"torch-tensorrt {source.version}",
        "extracted_from": source.label,
        "generated_by": "scripts/extract_torch_tensorrt_ops.py",
        "notes": out.notes,
        "converters": out.converters,
        "decomposed": out.decomposed,
        "kept_whole": out.kept_whole,
        "unresolved": out.unresolved,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a torch_tensorrt wheel, or the unpacked package directory")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    args = parser.parse_args(argv)
    data = extract(args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"{data['source']}: {len(data['converters'])} converters, {len(data['decomposed'])} decomposed, "
        f"{len(data['kept_whole'])} kept whole, {len(data['unresolved'])} unresolved -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
