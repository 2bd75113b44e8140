"""Which nodes of a plain graph torch-tensorrt can convert, decided without torch-tensorrt.

repfx's output is meant to be lowered to TensorRT by ``torch_tensorrt.dynamo.compile``. That
needs CUDA and TensorRT, which development and CI machines often lack, so this module answers
the question from data instead: the converter registry and decomposition tables of one
torch-tensorrt release (``repfx.deploy.trt_converters``).

How torch-tensorrt (default settings) treats a node, and so how it is classified here:

1. ``dynamo.compile`` first decomposes (see ``trt_converters``); a decomposed op never
   reaches a converter.
2. Each remaining ``call_function`` node is looked up by target in the converter registry.
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

import operator
from dataclasses import dataclass

import torch
from torch import fx

from repfx.deploy.trt_converters import ConverterTable, Coverage, Support, load_converter_table, op_name


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
