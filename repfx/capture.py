"""Capture: any supported model -> a functional aten-level ``torch.fx.GraphModule``.

Everything downstream (passes, verification, lowering) sees one representation:
the unlifted module of a ``torch.export`` program after functionalization, so
in-place ops (``out += x``, DBB's slice assignments) are already explicit data flow
and parameters are ``get_attr`` nodes whose values the passes can fold.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import CaptureError

SupportedModel = nn.Module | fx.GraphModule | torch.export.ExportedProgram | torch.jit.ScriptModule


def capture(model: SupportedModel, example_inputs: Sequence[Any], *, dynamic_batch: bool = False) -> fx.GraphModule:
    """Aten GraphModule with eval semantics for ``model``; the model itself is never modified."""
    example_inputs = _as_tuple(example_inputs)
    program = _export(model, example_inputs, dynamic_batch)
    if program is model or isinstance(model, torch.jit.ScriptModule):
        # The program's module would share the user's tensors (and advance any state it updates).
        program = copy.deepcopy(program)
    _reject_training_program(program)
    if _has_mutation(program):
        try:
            program = program.run_decompositions({})
        except Exception as error:
            raise CaptureError(f"functionalizing the exported graph failed: {_first_line(error)}") from error
    return _plain_graph_module(program.module())


def _plain_graph_module(unlifted: fx.GraphModule) -> fx.GraphModule:
    """A regular ``GraphModule`` in eval mode around the unlifted graph.

    ``ExportedProgram.module()`` returns a subclass whose ``train()``/``eval()`` raise,
    and deploy code calls ``.eval()`` routinely; the graph (and its pytree calling
    convention) is kept as is.
    """
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name=type(unlifted).__name__.removesuffix("Impl"))
    return gm.eval()


def _has_mutation(program: torch.export.ExportedProgram) -> bool:
    """Whether any op writes into a tensor (``+=``, ``relu_``, slice assignment).

    Folding treats every node as a value, which in-place writes break, so such
    graphs are functionalized first; most graphs have none and skip that re-trace
    (it costs as much as the export itself).
    """
    return any(isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
               for node in program.graph.nodes if node.op == "call_function")


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def _export(model: SupportedModel, inputs: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        if not dynamic_batch:
            return model
        return _export_module(model.module(), inputs, dynamic_batch, type(model).__name__)
    if isinstance(model, torch.jit.ScriptModule):
        program = _convert_torchscript(model, inputs)
        return _export_module(program.module(), inputs, dynamic_batch, "TorchScript module") if dynamic_batch else program
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected nn.Module, GraphModule, ExportedProgram or ScriptModule, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: capture the model it wraps
    return _export_module(_eval_copy(model), inputs, dynamic_batch, type(model).__name__)


def _eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode: export must see eval BatchNorm, and the user's model keeps its state."""
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode: BatchNorm would use batch statistics and "
            "dropout would be random. repfx re-parameterizes an eval() copy; the model passed in is unchanged.",
            UserWarning, stacklevel=4)
    try:
        clone = copy.deepcopy(model)
    except Exception as error:
        raise CaptureError(f"cannot copy {type(model).__name__} to capture it without modifying it: "
                           f"{_first_line(error)}") from error
    return clone.eval()


def _export_module(module: nn.Module, inputs: tuple, dynamic_batch: bool, name: str) -> torch.export.ExportedProgram:
    dynamic_shapes = None
    if dynamic_batch:
        inputs, dynamic_shapes = dynamic_batch_spec(module, inputs)
    try:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise CaptureError(
            f"torch.export could not capture {name}: {_first_line(error)}\n"
            "Fix: make forward() traceable (no data-dependent Python control flow or .item() on tensors, "
            "see https://pytorch.org/docs/stable/export.html), or pass an ExportedProgram you exported yourself."
        ) from error


def dynamic_batch_spec(module: nn.Module, inputs: tuple) -> tuple[tuple, Any]:
    """Mark dim 0 of every tensor input as one shared dynamic batch.

    A batch of 1 would be specialized by export (sizes 0 and 1 are special), so
    such inputs are repeated to a batch of 2 for capture only. Shapes are keyed by
    tensor (``ShapesCollection``), which fits any forward signature, ``*args`` included.
    """
    batch = torch.export.Dim("batch", min=1, max=65536)

    def widen(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == 1:
            return leaf.expand(2, *leaf.shape[1:]).clone()
        return leaf

    inputs = pytree.tree_map(widen, inputs)
    shapes = torch.export.ShapesCollection()
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            shapes[leaf] = {0: batch}
    return inputs, shapes.dynamic_shapes(module, inputs)


def _convert_torchscript(module: torch.jit.ScriptModule, inputs: tuple) -> torch.export.ExportedProgram:
    if module.training:
        raise CaptureError("the TorchScript module is in training mode; call .eval() before torch.jit.save "
                           "(repfx cannot switch a scripted module without modifying it)")
    try:
        from torch._export.converter import TS2EPConverter

        return TS2EPConverter(module, inputs).convert()
    except Exception as error:
        raise CaptureError(f"converting the TorchScript module to an ExportedProgram failed: {_first_line(error)}\n"
                           "Fix: export the original nn.Module with torch.export instead.") from error


def _updates_running_stats(node: fx.Node) -> bool:
    aten = torch.ops.aten
    if node.target in (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default):
        return True
    if node.target in (aten.batch_norm.default, aten.native_batch_norm.default):
        return bool(node.args[5]) and node.args[3] is not None
    return False


def _reject_training_program(program: torch.export.ExportedProgram) -> None:
    """A program whose BatchNorm updates running statistics was exported in training mode.

    (A BatchNorm with ``track_running_stats=False`` uses batch statistics in eval
    too; it has no running statistics, stays in the graph and is simply not folded.)
    """
    for node in program.graph.nodes:
        if node.op == "call_function" and _updates_running_stats(node):
            raise CaptureError(f"node {node.name} ({node.target}) normalizes with batch statistics and updates "
                               "running statistics: this program was exported from a model in training mode. "
                               "Export it after model.eval().")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]
