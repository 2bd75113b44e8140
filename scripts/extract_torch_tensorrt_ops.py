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

Keys are resolved statically (``static_registrations.py``, next to this script) through
module assignments (``aten = torch.ops.aten``), imports between modules of the package,
``for`` loops over literal collections and calls of a helper whose parameter is the key
(``replace_inplace_op(aten.add_, aten.add)``). A key that can only be known at run time is
listed under ``"unresolved"`` with the reason; it is never guessed.

Usage::

    python scripts/extract_torch_tensorrt_ops.py /path/torch_tensorrt-2.14.0-....whl \\
        --out repfx/deploy/data/torch_tensorrt_2.14.0_ops.json
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

# The generic half of the parsing, next to this script (run as a script, its folder is on sys.path).
from static_registrations import (Module, Registration, Resolver, Target, Unresolvable, callee_name, guards,
                                  registrations)

PACKAGE = "torch_tensorrt"
CONVERSION_DIR = "dynamo/conversion"
GROUPS_FILE = "dynamo/lowering/_decomposition_groups.py"
DECOMPOSITIONS_FILE = "dynamo/lowering/_decompositions.py"
CONVERTER_DECORATOR = "dynamo_tensorrt_converter"
DECOMPOSITION_DECORATOR = "register_torch_trt_decomposition"


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


# --------------------------------------------------------------------------- extraction


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
    calls = {callee_name(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)} if function else set()
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
        module = Module(relpath, text, PACKAGE)
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
