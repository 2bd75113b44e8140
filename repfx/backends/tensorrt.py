"""TensorRT lowering through torch-tensorrt's dynamo path (``torch_tensorrt.dynamo.compile``).

The plain program goes to TensorRT whole: ``require_full_compilation`` and
``min_block_size=1`` make a graph that would need PyTorch fallback segments an
error instead of a silently slower hybrid. torch-tensorrt 2.14 builds strongly
typed networks (``enabled_precisions`` is gone from the dynamo API), so the
precision is the dtype of the program's weights and inputs: fp16 means the
plain graph is cast to half *after* folding in fp32/fp64.

torch_tensorrt is imported only here, lazily; without it (or without a CUDA
device) ``BackendUnavailable`` says which piece is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from repfx.backends.availability import require_torch_tensorrt

FULL_GRAPH_OPTIONS = {"require_full_compilation": True, "min_block_size": 1}


def resolve_batch_range(inputs: Sequence[Any], dynamic_batch: bool,
                        batch_range: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """TensorRT's optimization profile for dim 0: None when static, else the given or a default range.

    The default optimizes for the example's batch and admits 1..max(batch, 64).
    """
    if not dynamic_batch:
        return None
    if batch_range is not None:
        return batch_range
    batch = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) else 1
    return (1, batch, max(batch, 64))


def tensorrt_inputs(example_inputs: Sequence[Any], batch_range: tuple[int, int, int] | None) -> list[Any]:
    """Example tensors as ``torch_tensorrt.Input`` specs; with ``batch_range`` dim 0 spans (min, opt, max)."""
    torch_tensorrt = require_torch_tensorrt()
    specs = []
    for tensor in example_inputs:
        if batch_range is None or not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            specs.append(tensor)
            continue
        low, opt, high = batch_range
        rest = tuple(tensor.shape[1:])
        specs.append(torch_tensorrt.Input(min_shape=(low, *rest), opt_shape=(opt, *rest), max_shape=(high, *rest),
                                          dtype=tensor.dtype))
    return specs


def compile_tensorrt(program: torch.export.ExportedProgram, example_inputs: Sequence[Any], *,
                     batch_range: tuple[int, int, int] | None = None, **options: Any) -> torch.nn.Module:
    """A module that runs ``program`` as TensorRT engine(s); inputs must be CUDA tensors."""
    torch_tensorrt = require_torch_tensorrt()
    settings = FULL_GRAPH_OPTIONS | options
    return torch_tensorrt.dynamo.compile(program, arg_inputs=tensorrt_inputs(example_inputs, batch_range),
                                         **settings)


def serialize_engine(program: torch.export.ExportedProgram, example_inputs: Sequence[Any], *,
                     batch_range: tuple[int, int, int] | None = None, **options: Any) -> bytes:
    """The serialized TensorRT engine (``.engine`` / Triton ``model.plan``) for ``program``."""
    torch_tensorrt = require_torch_tensorrt()
    settings = FULL_GRAPH_OPTIONS | options
    return torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
        program, arg_inputs=tensorrt_inputs(example_inputs, batch_range), **settings)


def save_compiled(module: torch.nn.Module, path: str, example_inputs: Sequence[Any]) -> None:
    """``torch_tensorrt.save`` as an ExportedProgram that embeds the engine (loads with ``torch.export.load``)."""
    torch_tensorrt = require_torch_tensorrt()
    torch_tensorrt.save(module, path, output_format="exported_program", arg_inputs=list(example_inputs))
