"""The plain graph as an ``ExportedProgram``: the one artifact every backend lowers from.

torch-tensorrt's dynamo path, ``torch.onnx.export(dynamo=True)`` and
``torch.export.save`` all take an ExportedProgram, so the re-parameterized
GraphModule is re-exported once, with the batch dimension symbolic when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from repfx.capture.export import dynamic_batch_spec
from repfx.errors import LoweringError, first_line


def export_program(plain: fx.GraphModule, example_inputs: Sequence[Any], *,
                   dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``plain`` re-exported (no dispatch-level changes: it already is an aten graph)."""
    inputs, dynamic_shapes = tuple(example_inputs), None
    if dynamic_batch:
        # Dim.DYNAMIC: the plain graph keeps the batch range it was captured with (a program
        # exported with its own range, e.g. max=64, must not be widened to repfx's default).
        inputs, dynamic_shapes = dynamic_batch_spec(plain, inputs, batch=torch.export.Dim.DYNAMIC)
    try:
        with torch.no_grad():
            return torch.export.export(plain, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise LoweringError(f"re-exporting the plain graph failed: {first_line(error)}") from error


def output_values(program: torch.export.ExportedProgram) -> list[Any]:
    """The fake values of the program's outputs, flattened."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    return [node.meta["val"] for node in torch.utils._pytree.tree_leaves(output.args[0])
            if isinstance(node, fx.Node)]


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """``output0..N``: torch-tensorrt's engine binding names, given to the ONNX outputs as well."""
    return [f"output{index}" for index in range(len(output_values(program)))]
