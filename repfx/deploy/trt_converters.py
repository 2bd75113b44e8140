"""torch-tensorrt's converter registry and decomposition tables of one release, read from data.

Data source: torch-tensorrt **2.14.0** (``repfx/deploy/data/torch_tensorrt_2.14.0_ops.json``),
extracted from the wheel ``torch_tensorrt-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl``.
To regenerate it, or to add another release next to it::

    python scripts/extract_torch_tensorrt_ops.py torch_tensorrt-<version>-....whl \\
        --out repfx/deploy/data/torch_tensorrt_<version>_ops.json

``ConverterTable.support`` answers, per op, what torch-tensorrt (default settings) does
with it: decomposes it first (torch's decompositions listed in
``torch_enabled_decompositions``, every CompositeImplicitAutograd aten op, and its own
``TORCH_TRT_DECOMPOSITIONS``, but never the ops in ``torch_disabled_decompositions`` or the
attention ops), converts it (a converter is registered for its target: ``aten.batch_norm``,
a packet, and ``aten.batch_norm.default`` are different keys), converts it only if a
``capability_validator`` accepts it (Python code we cannot run here: *conditional*), or
neither. How a whole graph is classified with it is ``repfx.deploy.trt_coverage``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from torch._ops import OpOverload, OpOverloadPacket

DEFAULT_VERSION = "2.14.0"


class Coverage(str, Enum):
    """How torch-tensorrt handles an op."""

    CONVERTED = "converted"  # a converter applies to every node of this op
    CONDITIONAL = "conditional"  # converted only if a validator (or the installation) allows
    DECOMPOSED = "decomposed"  # rewritten into other ops before conversion


@dataclass(frozen=True)
class Converter:
    """One converter registration, as recorded in the data file."""

    op: str
    all_overloads: bool
    capability_validator: str | None
    supports_dynamic_shapes: bool
    guards: tuple[str, ...]  # import-time conditions; non-empty means "only in some installs"

    @property
    def conditions(self) -> tuple[str, ...]:
        validator = (f"capability_validator {self.capability_validator}",) if self.capability_validator else ()
        return validator + tuple(f"registered only {g}" for g in self.guards)


@dataclass(frozen=True)
class Support:
    """The answer for one op: how it is covered, and the conditions if it is conditional."""

    coverage: Coverage
    how: str
    conditions: tuple[str, ...] = ()


def op_name(target: Any) -> str | None:
    """The name the data file uses for a node target, or None for a target with no name.

    Ops print as ``aten.convolution.default`` (``aten.batch_norm`` for a packet); Python
    functions as ``module.name``, e.g. ``_operator.mul``, as torch.fx qualifies them.
    """
    if isinstance(target, (OpOverload, OpOverloadPacket)):
        return str(target)
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
    if module is None or name is None:
        return None
    return f"{module}.{name}"


class ConverterTable:
    """torch-tensorrt's converters and decompositions for one release, queried by node target."""

    def __init__(self, data: dict):
        self.source: str = data["source"]
        self.extracted_from: str = data["extracted_from"]
        self.converters: dict[str, tuple[Converter, ...]] = _group_converters(data["converters"])
        self._decomposed = _by_name(data["decomposed"])
        self._kept_whole = _by_name(data["kept_whole"])
        self.unresolved: tuple[dict, ...] = tuple(data.get("unresolved", ()))

    def covers(self, target: Any) -> bool | None:
        """True if converted or decomposed, None if a validator decides, False if neither."""
        support = self.support(target)
        if support is None:
            return False
        return None if support.coverage is Coverage.CONDITIONAL else True

    def support(self, target: Any, *, dynamic_shapes: bool = False, torch_decomposed: bool = False) -> Support | None:
        """How torch-tensorrt handles ``target``; None when it has no way to convert it.

        ``dynamic_shapes``: the node has symbolic sizes, so only converters registered with
        ``supports_dynamic_shapes`` qualify. ``torch_decomposed``: the node comes from a graph
        that ``trt_coverage.lower_like_torch_tensorrt`` already decomposed, so whatever
        torch's decompositions left in place (``aten.sym_size.int``, say) goes to the converters.
        """
        name = op_name(target)
        if name is None:
            return None
        decomposition = self.decomposition(target, torch_decomposed=torch_decomposed)
        if decomposition is not None:
            return Support(Coverage.DECOMPOSED, decomposition)
        candidates = [c for c in self.converters.get(name, ()) if c.supports_dynamic_shapes or not dynamic_shapes]
        if not candidates:
            return None
        if any(not c.conditions for c in candidates) or _complementary(candidates):
            return Support(Coverage.CONVERTED, "converter")
        conditions = tuple(dict.fromkeys(cond for c in candidates for cond in c.conditions))
        return Support(Coverage.CONDITIONAL, "converter", conditions)

    def decomposition(self, target: Any, *, torch_decomposed: bool = False) -> str | None:
        """Which decomposition torch-tensorrt applies to ``target`` before conversion, if any."""
        if not isinstance(target, OpOverload) or self._matches(self._kept_whole, target):
            return None
        for entry in self._matching(self._decomposed, target):
            if entry["decomposed_by"] == "torch-tensorrt":
                return "decomposed by torch-tensorrt's own decomposition (not run here)"
            if torch_decomposed:
                continue
            if target in torch._decomp.global_decomposition_table["post_autograd"]:
                return "decomposed by torch's decomposition (torch_enabled_decompositions)"
        if not torch_decomposed and target.namespace == "aten" and _is_composite_implicit(target):
            return "decomposed by its CompositeImplicitAutograd kernel"
        return None

    def decomposed_by_torch_tensorrt(self, target: Any) -> bool:
        """True for ops torch-tensorrt rewrites with its own code, which we can only trust."""
        return any(e["decomposed_by"] == "torch-tensorrt" for e in self._matching(self._decomposed, target)) and not (
            self._matches(self._kept_whole, target)
        )

    def torch_decompositions(self) -> dict:
        """The decomposition table ``dynamo.compile`` builds, minus torch-tensorrt's own entries.

        Mirrors torch-tensorrt's ``get_decompositions()`` at default settings: torch's
        decompositions for ``torch_enabled_decompositions``, then every CompositeImplicitAutograd
        aten op except those kept whole. Ops with a torch-tensorrt decomposition are left out so
        they stay in the graph and are reported as decomposed, rather than being rewritten the
        way torch would and checked against the wrong result.
        """
        # Private torch helpers, but the very ones torch-tensorrt 2.14 calls to build its table.
        from torch._export.utils import _collect_all_valid_cia_ops_for_aten_namespace, _get_decomp_for_cia

        enabled = [op for e in self._decomposed_entries("torch") if (op := _torch_op(e["op"])) is not None]
        table = dict(torch._decomp.get_decompositions(enabled))
        for op in _collect_all_valid_cia_ops_for_aten_namespace():
            if not self._matches(self._kept_whole, op):
                table[op] = _get_decomp_for_cia(op)
        return {op: fn for op, fn in table.items() if not self.decomposed_by_torch_tensorrt(op)}

    def _decomposed_entries(self, by: str) -> list[dict]:
        return [e for entries in self._decomposed.values() for e in entries if e["decomposed_by"] == by]

    @staticmethod
    def _matching(index: dict[str, list[dict]], target: OpOverload) -> list[dict]:
        exact = index.get(str(target), [])
        packet = [e for e in index.get(str(target.overloadpacket), []) if e["all_overloads"]]
        return exact + packet

    def _matches(self, index: dict[str, list[dict]], target: OpOverload) -> bool:
        return bool(self._matching(index, target))


def _group_converters(entries: list[dict]) -> dict[str, tuple[Converter, ...]]:
    """Converters by key; several registrations of one key are alternatives, tried in turn."""
    grouped: dict[str, list[Converter]] = {}
    for e in entries:
        converter = Converter(
            e["op"], e["all_overloads"], e["capability_validator"], e["supports_dynamic_shapes"], tuple(e["guards"])
        )
        grouped.setdefault(e["op"], []).append(converter)
    return {op: tuple(cs) for op, cs in grouped.items()}


def _by_name(entries: list[dict]) -> dict[str, list[dict]]:
    index: dict[str, list[dict]] = {}
    for e in entries:
        index.setdefault(e["op"], []).append(e)
    return index


def _complementary(converters: list[Converter]) -> bool:
    """True if two alternatives' validators are ``v`` and ``not v``, so one always accepts.

    torch-tensorrt registers ``aten.clone.default`` this way; calling it conditional would
    flag every clone although no clone is ever left unconverted.
    """
    validators = {c.capability_validator for c in converters if c.capability_validator and not c.guards}
    negated = re.compile(r"lambda node, settings: not (\w+)\(node, settings\)")
    return any((m := negated.fullmatch(v)) and m.group(1) in validators for v in validators)


def _is_composite_implicit(op: OpOverload) -> bool:
    """Whether the op has a CompositeImplicitAutograd kernel (C++ or Python), as export tests it."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key) or key in op.py_kernels


def _torch_op(name: str) -> OpOverload | OpOverloadPacket | None:
    """The torch object for a data-file name; None if this torch build lacks the op."""
    namespace, _, rest = name.partition(".")
    try:
        op = getattr(getattr(torch.ops, namespace), rest.split(".")[0])
        return getattr(op, rest.split(".")[1]) if "." in rest else op
    except AttributeError:
        return None


@lru_cache(maxsize=None)
def load_converter_table(version: str = DEFAULT_VERSION) -> ConverterTable:
    """The table for a torch-tensorrt release, from the package data ``repfx.deploy.data``."""
    filename = f"torch_tensorrt_{version}_ops.json"
    resource = resources.files("repfx.deploy.data").joinpath(filename)
    if not resource.is_file():
        available = sorted(p.name for p in resources.files("repfx.deploy.data").iterdir() if p.name.endswith("_ops.json"))
        raise FileNotFoundError(f"no op data for torch-tensorrt {version}; available: {available}")
    data = json.loads(resource.read_text())
    if data["source"] != f"torch-tensorrt {version}":
        raise ValueError(f"{filename} holds data for {data['source']!r}; regenerate it for {version}")
    return ConverterTable(data)
