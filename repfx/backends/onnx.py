"""ONNX lowering: the plain program exported with ``torch.onnx.export(dynamo=True)``, run by onnxruntime.

ONNX is the interchange TensorRT's own parser (``trtexec --onnx``) and ONNX
Runtime consume; after re-parameterization each merged block is a single Conv
node. Sessions use ``ORT_ENABLE_ALL`` and the CUDA provider when onnxruntime has it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import LoweringError
from .availability import require_onnxruntime
from .program import output_names


def export_onnx(program: torch.export.ExportedProgram) -> bytes:
    """The serialized ONNX model of ``program`` (weights embedded; models here are far below 2 GB)."""
    require_onnxruntime()
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, report=False,
                                         output_names=output_names(program))
        return onnx_program.model_proto.SerializeToString()
    except Exception as error:
        raise LoweringError(f"torch.onnx.export failed on the plain graph: {_first_line(error)}") from error


def session_options():
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    return options


def providers() -> list[str]:
    available = require_onnxruntime().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeModule(torch.nn.Module):
    """Runs an ONNX model in onnxruntime behind the plain graph's calling convention.

    Inputs are flattened like ``torch.export`` flattened them; outputs come back as
    torch tensors on the first input's device, in the program's output structure.
    """

    def __init__(self, model: bytes | os.PathLike, out_spec: pytree.TreeSpec | None = None,
                 *, threads: int | None = None) -> None:
        super().__init__()
        ort = require_onnxruntime()
        options = session_options()
        if threads:
            options.intra_op_num_threads = threads
        source = str(model) if isinstance(model, (str, os.PathLike)) else model
        try:
            self.session = ort.InferenceSession(source, options, providers=providers())
        except Exception as error:
            raise LoweringError(f"onnxruntime cannot load the exported model: {_first_line(error)}") from error
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.out_spec = out_spec

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if len(leaves) != len(self.input_names):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} tensor inputs, got {len(leaves)}")
        device = leaves[0].device if leaves else torch.device("cpu")
        feeds = {name: leaf.detach().cpu().contiguous().numpy() for name, leaf in zip(self.input_names, leaves)}
        outputs = [torch.from_numpy(array).to(device) for array in self.session.run(None, feeds)]
        if self.out_spec is None:
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        return pytree.tree_unflatten(outputs, self.out_spec)


def compile_onnx(program: torch.export.ExportedProgram, *, threads: int | None = None,
                 save_to: Path | None = None) -> OnnxRuntimeModule:
    model = export_onnx(program)
    if save_to is not None:
        Path(save_to).write_bytes(model)
    return OnnxRuntimeModule(model, program.call_spec.out_spec, threads=threads)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]
