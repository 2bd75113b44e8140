"""Static reading of registration calls in a Python package's source, without importing it.

``extract_torch_tensorrt_ops.py`` describes what torch-tensorrt registers; this module
knows only Python: a parsed file's module-level bindings and imports (``Module``), the
dotted paths a key expression can stand for (``Resolver``: module assignments such as
``aten = torch.ops.aten``, imports between modules of the package, ``for`` loops over
literal collections, a helper's parameter resolved at each call of the helper), the calls
of a registering function (``registrations``) and the conditions under which each runs at
import time (``guards``). A key that can only be known at run time raises
``Unresolvable`` with the reason; it is never guessed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

# `import operator` binds the pure-Python facade, but the functions report the C module
# `_operator` as their home, and that is the name torch.fx (and torch-tensorrt's
# `qualified_name_or_str`) prints for a node target such as operator.mul.
MODULE_ALIASES = {"operator": "_operator"}


class Module:
    """One parsed file: its tree, parents, module-level bindings and imports."""

    def __init__(self, relpath: str, text: str, package: str):
        self.relpath = relpath
        self.name = package + "." + relpath[: -len(".py")].replace("/", ".").removesuffix(".__init__")
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
        if not (isinstance(node, ast.Call) and callee_name(node.func) == callee):
            continue
        owner = module.parent.get(node)
        decorates = isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in owner.decorator_list
        found.append(Registration(module, node, owner.name if decorates else None))
    return sorted(found, key=lambda r: r.line)


def callee_name(func: ast.expr) -> str | None:
    """The name called: ``f`` of ``f(...)`` and of ``x.f(...)``; None for anything else."""
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
