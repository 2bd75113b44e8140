"""Which nodes of a plain graph torch-tensorrt can convert, decided without torch-tensorrt.

repfx's output is meant to be lowered to TensorRT by ``torch_tensorrt.dynamo.compile``. That
needs CUDA and TensorRT, which development and CI machines often lack, so this module answers
the question from data instead: the converter registry and decomposition tables of one
torch-tensorrt release, read from its source.

Data source: torch-tensorrt **2.14.0** (``repfx/data/torch_tensorrt_2.14.0_ops.json``),
extracted from the wheel ``torch_tensorrt-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl``.
To regenerate it, or to add another release next to it::

    python scripts/extract_torch_tensorrt_ops.py torch_tensorrt-<version>-....whl \\
        --out repfx/data/torch_tensorrt_<version>_ops.json

How torch-tensorrt (default settings) treats a node, and so how it is classified here:

1. ``dynamo.compile`` first decomposes: torch's decompositions listed in
   ``torch_enabled_decompositions``, every CompositeImplicitAutograd aten op, and its own
   ``TORCH_TRT_DECOMPOSITIONS``; ops in ``torch_disabled_decompositions`` and the attention
   ops are kept whole. A decomposed op never reaches a converter.
2. Each remaining ``call_function`` node is looked up by target in the converter registry, a
   dict: ``aten.batch_norm`` (a packet) and ``aten.batch_norm.default`` are different keys.
3. A converter with a ``capability_validator`` converts the node only if the validator accepts
   it; validators are Python code we cannot run here, so such nodes are *conditional*, not
   failures. ``operator.getitem``'s validator is the exception: it accepts a getitem exactly
   when its producer converts, which the graph itself tells us.
4. A node with symbolic shapes needs a converter registered with ``supports_dynamic_shapes``.

For an ``ExportedProgram`` (what ``dynamo.compile`` receives) step 1 is run for real with
torch's decompositions; torch-tensorrt's own decompositions are torch-tensorrt code, so an op
they handle is reported as decomposed without checking what it becomes. A ``GraphModule`` is
classified node by node without decomposing. Not modelled: torch-tensorrt's graph passes
(e.g. ``remove_assert_nodes`` deletes ``aten._assert_scalar`` before decomposing).
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from torch import fx
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


@dataclass(frozen=True)
class UnconvertibleOp:
    """A node torch-tensorrt would leave to PyTorch (or fail on, with require_full_compilation)."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class ConditionalOp:
    """A node whose conversion depends on a validator we cannot run without torch-tensorrt."""

    node: str
    op: str
    conditions: tuple[str, ...]


@dataclass(frozen=True)
class DecomposedOp:
    """A node rewritten before conversion; its replacement ops are not checked (see module doc)."""

    node: str
    op: str
    how: str


@dataclass(frozen=True)
class SupportReport:
    """Every call node's verdict, split into what blocks full conversion and what might."""

    source: str
    unconvertible: tuple[UnconvertibleOp, ...]
    conditional: tuple[ConditionalOp, ...]
    decomposed: tuple[DecomposedOp, ...]

    @property
    def fully_convertible(self) -> bool:
        return not self.unconvertible


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
        that :func:`lower_like_torch_tensorrt` already decomposed, so whatever torch's
        decompositions left in place (``aten.sym_size.int``, say) goes to the converters.
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


def lower_like_torch_tensorrt(
    program: torch.export.ExportedProgram, table: ConverterTable | None = None
) -> torch.export.ExportedProgram:
    """``program`` after the decompositions ``torch_tensorrt.dynamo.compile`` runs first.

    This is what the converter registry sees, so an exported graph is checked after it, not
    before: e.g. ``aten.conv2d`` becomes ``aten.convolution`` and ``adaptive_avg_pool2d`` to
    1x1 becomes ``aten.mean.dim``.
    """
    table = table or load_converter_table()
    return program.run_decompositions(table.torch_decompositions())


Graph = fx.GraphModule | torch.export.ExportedProgram


def analyze(graph: Graph, table: ConverterTable | None = None) -> SupportReport:
    """Classifies every call node of ``graph`` as torch-tensorrt would treat it."""
    table = table or load_converter_table()
    lowered = isinstance(graph, torch.export.ExportedProgram)
    if lowered:
        graph = lower_like_torch_tensorrt(graph, table).graph_module
    unconvertible, conditional, decomposed = [], [], []
    verdict: dict[fx.Node, Coverage | None] = {}
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or _is_guard_check(node):
            continue
        name = (op_name(node.target) or repr(node.target)) if node.op == "call_function" else f"{node.op} {node.target}"
        support, reason = _classify(node, table, verdict, lowered)
        verdict[node] = support.coverage if support else None
        if support is None:
            unconvertible.append(UnconvertibleOp(node.name, name, reason))
        elif support.coverage is Coverage.CONDITIONAL:
            conditional.append(ConditionalOp(node.name, name, support.conditions))
        elif support.coverage is Coverage.DECOMPOSED:
            decomposed.append(DecomposedOp(node.name, name, support.how))
    return SupportReport(table.source, tuple(unconvertible), tuple(conditional), tuple(decomposed))


def unconvertible_ops(graph: Graph, table: ConverterTable | None = None) -> list[UnconvertibleOp]:
    """The call nodes torch-tensorrt cannot convert; empty means the graph lowers whole."""
    return list(analyze(graph, table).unconvertible)


def conditional_ops(graph: Graph, table: ConverterTable | None = None) -> list[ConditionalOp]:
    """The call nodes whose conversion a validator decides at compile time; not failures."""
    return list(analyze(graph, table).conditional)


def _classify(node: fx.Node, table: ConverterTable, verdict: dict, lowered: bool) -> tuple[Support | None, str]:
    """The node's support, and if there is none, why."""
    if node.op != "call_function":
        return None, f"{node.op} node: torch-tensorrt converts the call_function nodes of an exported graph"
    if node.target is operator.getitem:
        return _getitem(node, verdict)
    dynamic = _has_symbolic_shapes(node)
    support = table.support(node.target, dynamic_shapes=dynamic, torch_decomposed=lowered)
    if support is not None:
        return support, ""
    if dynamic and table.support(node.target, torch_decomposed=lowered) is not None:
        return None, "symbolic shapes, and no converter for it supports dynamic shapes"
    return None, f"no converter in {table.source} and not decomposed before conversion"


def _is_guard_check(node: fx.Node) -> bool:
    """The input-guard call ``ExportedProgram.module()`` inserts; exporting the module drops it.

    torch itself recognises it by this name (``torch._inductor.aot_compile``, ``export._swap``).
    """
    return node.op == "call_module" and node.target == "_guards_fn"


def _getitem(node: fx.Node, verdict: dict) -> tuple[Support | None, str]:
    """getitem's validator: convertible exactly when what it indexes is converted (or a constant)."""
    producer = node.args[0]
    if isinstance(producer, fx.Node) and producer.op == "get_attr":
        return Support(Coverage.CONVERTED, "getitem of a constant"), ""
    coverage = verdict.get(producer) if isinstance(producer, fx.Node) else None
    if coverage is None:
        source = producer.name if isinstance(producer, fx.Node) else repr(producer)
        return None, f"indexes {source}, which is not converted"
    if coverage is Coverage.CONDITIONAL:
        return Support(Coverage.CONDITIONAL, "getitem", (f"{producer.name} is converted",)), ""
    return Support(Coverage.CONVERTED, "getitem"), ""


def _has_symbolic_shapes(node: fx.Node) -> bool:
    """Whether the node or its inputs carry SymInt sizes, torch-tensorrt's test for "dynamic"."""
    values = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    return any(
        isinstance(v, symbolic) or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
        for v in flat
    )
