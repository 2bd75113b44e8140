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

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def cast_floating(value: Any, dtype: torch.dtype, device: torch.device | str | None = None) -> Any:
    """``value``'s floating tensors in ``dtype`` (and on ``device``); everything else as it is."""
    def cast(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        leaf = leaf.to(device) if device is not None else leaf
        return leaf.to(dtype) if leaf.is_floating_point() else leaf

    return torch.utils._pytree.tree_map(cast, value)


def in_precision(plain: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """A copy of ``plain`` whose floating weights are ``dtype`` (folding already happened in fp32/fp64).

    Always cast, fp32 included: a float64 model deployed at fp32 must not keep float64
    weights next to the float32 inputs the deployed model is fed.
    """
    import copy

    return copy.deepcopy(plain).to(dtype)


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



def user_input_nodes(program: torch.export.ExportedProgram) -> list[fx.Node]:
    names = set(program.graph_signature.user_inputs)
    return [node for node in program.graph.nodes if node.op == "placeholder" and node.name in names]


def output_values(program: torch.export.ExportedProgram) -> list[Any]:
    """The fake values of the program's outputs, flattened."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    return [node.meta["val"] for node in torch.utils._pytree.tree_leaves(output.args[0])
            if isinstance(node, fx.Node)]


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """``output0..N``: torch-tensorrt's engine binding names, given to the ONNX outputs as well."""
    return [f"output{index}" for index in range(len(output_values(program)))]


def record_tensorrt_coverage(program: torch.export.ExportedProgram, report: Any) -> None:
    """Put torch-tensorrt's converter coverage of ``program`` into ``report`` (no torch_tensorrt needed)."""
    from repfx.deploy.trt_coverage import analyze

    coverage = analyze(program)
    report.tensorrt_ops_source = coverage.source
    report.tensorrt_unconvertible = [f"{op.node}: {op.op} ({op.reason})" for op in coverage.unconvertible]
