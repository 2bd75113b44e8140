"""Capture: any supported model -> a functional aten-level ``torch.fx.GraphModule``.

Everything downstream (passes, verification, lowering) sees one representation:
the unlifted module of a ``torch.export`` program after functionalization, so
in-place ops (``out += x``, DBB's slice assignments) are already explicit data flow
and parameters are ``get_attr`` nodes whose values the passes can fold.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repfx.passes.constants import written_attributes

from repfx.capture.inputs import as_input_tuple, example_batch_size, is_batched, user_input_nodes, with_batch
from repfx.errors import CaptureError, first_line, warn_user
from repfx.capture.failure import dtype_mismatch, export_failure_message, quiet_torch_logs
from repfx.capture.input_fit import check_input_count, input_mismatch
from repfx.capture.lean import lean_tracing
from repfx.capture.model_state import ModeChange, describe_mode_changes, train_mode_changes
from repfx.capture.torchscript import convert_torchscript, full_slices_dropped, numbers_as_scalars

SupportedModel = nn.Module | fx.GraphModule | torch.export.ExportedProgram | torch.jit.ScriptModule


@dataclass
class Captured:
    """The captured graph and what capture changed about the model as given."""

    graph: fx.GraphModule
    mode_changes: list[ModeChange] = field(default_factory=list)  # submodules switched from train to eval
    buffers_written: list[str] = field(default_factory=list)  # state the forward updates as it runs


def capture(model: SupportedModel, example_inputs: Sequence[Any], *, dynamic_batch: bool = False) -> Captured:
    """Aten GraphModule with eval semantics for ``model``; the model itself is never modified."""
    example_inputs = as_input_tuple(example_inputs)
    check_input_dtypes(model, example_inputs)
    check_input_count(getattr(model, "_orig_mod", model), example_inputs)
    mode_changes = _warn_about_train_mode(model) if _is_plain_module(model) else []
    with lean_tracing():  # no stack traces or code regenerated per pass: nothing downstream reads them
        try:
            program = _export(model, example_inputs, dynamic_batch)
        except CaptureError as error:  # an input that does not fit the model says what would
            mismatch = input_mismatch(getattr(model, "_orig_mod", model), example_inputs)
            if mismatch is None:
                raise
            raise mismatch from error
        if program is model or isinstance(model, torch.jit.ScriptModule):
            # The program's module would share the user's tensors (and advance any state it updates).
            program = copy.deepcopy(program)
        _reject_training_program(program)
        if _has_mutation(program):
            try:
                program = program.run_decompositions({})
            except Exception as error:
                raise CaptureError(f"functionalizing the exported graph failed: {first_line(error)}") from error
    graph = _plain_graph_module(program.module())
    if isinstance(model, torch.jit.ScriptModule):
        numbers_as_scalars(graph, set(model.state_dict()))
        full_slices_dropped(graph)
    return Captured(graph, mode_changes, written_attributes(graph))


def check_input_dtypes(model: SupportedModel, example_inputs: tuple) -> None:
    """Floating inputs of another dtype than every floating weight fail deep inside torch ("expected scalar type
    Double but found Float"), at export or only when the graph first runs: refuse them first, naming the dtype."""
    mismatch = dtype_mismatch(model, example_inputs)
    if mismatch:
        raise CaptureError(f"{type(model).__name__} was given example inputs of another dtype than its weights"
                           f"\nFix: {mismatch}")


def _is_plain_module(model: Any) -> bool:
    return isinstance(model, nn.Module) and not isinstance(model, (fx.GraphModule, torch.jit.ScriptModule))


def _warn_about_train_mode(model: nn.Module) -> list[ModeChange]:
    """Name every module whose train mode the eval capture drops; warn once if there are any.

    A model in train mode is the common slip (``eval()`` forgotten); an eval model with
    some submodules left training is usually deliberate (test-time BN adaptation, MC
    dropout), and its plain graph then computes something else: both are said loudly.
    """
    model = getattr(model, "_orig_mod", model)
    changes = train_mode_changes(model)
    name = type(model).__name__
    if model.training:
        warn_user(
            f"{name} is in training mode: BatchNorm would use batch statistics and dropout would be random. "
            "repfx re-parameterizes an eval() copy; the model passed in is unchanged."
            + (f" Modules affected: {describe_mode_changes(changes)}." if changes else ""))
    elif changes:
        warn_user(
            f"{name} is in eval mode but {len(changes)} submodule(s) are in train mode; the plain graph computes "
            f"them in eval mode, so its outputs differ from the model as given: {describe_mode_changes(changes)}. "
            "Call .eval() on them (or model.eval()) if eval behaviour is what you deploy.")
    return changes


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


def _export(model: SupportedModel, inputs: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        check_program_inputs(model, inputs)
        if not dynamic_batch or has_dynamic_batch(model):
            return model
        try:
            return _export_module(model.module(), inputs, dynamic_batch, type(model).__name__)
        except CaptureError as error:
            raise CaptureError(f"{first_line(error, limit=None)} (the ExportedProgram was exported with a static batch "
                               "size; export it with a dynamic batch dimension to use dynamic_batch)") from error
    if isinstance(model, torch.jit.ScriptModule):
        if not dynamic_batch:
            return convert_torchscript(model, inputs)
        # Convert at the widened batch: the converted graph may hold the batch it was converted at.
        inputs, _ = dynamic_batch_spec(model, inputs, shapes=False)
        return convert_torchscript(model, inputs, lambda graph, args: dynamic_batch_spec(graph, args)[1])
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected nn.Module, GraphModule, ExportedProgram or ScriptModule, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: capture the model it wraps
    return _export_module(_eval_copy(model), inputs, dynamic_batch, type(model).__name__)


def _eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode: export must see eval BatchNorm, and the user's model keeps its state."""
    try:
        clone = copy.deepcopy(model)
    except Exception as error:
        raise CaptureError(f"cannot copy {type(model).__name__} to capture it without modifying it: "
                           f"{first_line(error)}") from error
    return clone.eval()


def _export_module(module: nn.Module, inputs: tuple, dynamic_batch: bool, name: str) -> torch.export.ExportedProgram:
    dynamic_shapes = None
    if dynamic_batch:
        inputs, dynamic_shapes = dynamic_batch_spec(module, inputs)
    try:
        with quiet_torch_logs():
            return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise CaptureError(export_failure_message(name, error, module, inputs)) from error


def check_program_inputs(program: torch.export.ExportedProgram, inputs: tuple) -> None:
    """Example inputs must fit the shapes the program was exported for (its guards would fail later)."""
    placeholders = user_input_nodes(program)
    tensors = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    expected = [node.meta.get("val") for node in placeholders]
    if len(tensors) != len(expected):
        raise CaptureError(f"the ExportedProgram takes {len(expected)} tensor input(s), got {len(tensors)}")
    for index, (tensor, value) in enumerate(zip(tensors, expected)):
        if not isinstance(value, torch.Tensor):
            continue
        wanted = tuple(size if isinstance(size, int) else None for size in value.shape)
        if len(wanted) != tensor.dim() or any(w is not None and w != got for w, got in zip(wanted, tensor.shape)):
            shown = "x".join("?" if w is None else str(w) for w in wanted)
            raise CaptureError(f"input {index} ({placeholders[index].name}) has shape "
                               f"{'x'.join(map(str, tensor.shape))}; the ExportedProgram was exported for {shown}")
        if tensor.dtype != value.dtype:
            raise CaptureError(f"input {index} ({placeholders[index].name}) is {tensor.dtype}; "
                               f"the ExportedProgram was exported for {value.dtype}")


def keeps_dynamic_batch(model: Any, dynamic_batch: bool) -> bool:
    """``dynamic_batch``, or True for a program exported with a dynamic batch: writing it out static would drop it."""
    return dynamic_batch or (isinstance(model, torch.export.ExportedProgram) and has_dynamic_batch(model))


def has_dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    """Whether every batched user input already has a symbolic dim 0 (its own range is kept)."""
    values = [node.meta.get("val") for node in user_input_nodes(program)]
    batched = [value for value in values if isinstance(value, torch.Tensor) and value.dim() > 0]
    return bool(batched) and all(isinstance(value.shape[0], torch.SymInt) for value in batched)


def dynamic_batch_spec(module: nn.Module, inputs: tuple, *, shapes: bool = True,
                       batch: Any = None) -> tuple[tuple, Any]:
    """Mark dim 0 of the batched tensor inputs (``repfx.capture.inputs``) as one shared dynamic batch.

    A batch of 1 would be specialized by export (sizes 0 and 1 are special), so
    batched inputs are repeated to a batch of 2 for capture only. Shapes are keyed by
    tensor (``ShapesCollection``), which fits any forward signature, ``*args`` included.
    """
    batch = batch if batch is not None else torch.export.Dim("batch", min=1, max=65536)
    size = example_batch_size(inputs)

    def widen(leaf: Any) -> Any:
        return with_batch(leaf, 2) if size == 1 and is_batched(leaf, size) else leaf

    inputs = pytree.tree_map(widen, inputs)
    if not shapes:
        return inputs, None
    size = example_batch_size(inputs)
    collection = torch.export.ShapesCollection()
    for leaf in pytree.tree_leaves(inputs):
        if is_batched(leaf, size):
            collection[leaf] = {0: batch}
    return inputs, collection.dynamic_shapes(module, inputs)


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

