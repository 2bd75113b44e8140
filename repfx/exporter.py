"""``repfx.export``: the plain graph written as deployable files.

``<name>.pt2`` (``torch.export.save`` of the plain ExportedProgram), ``<name>.onnx``
(``torch.onnx.export(dynamo=True)``, checked in onnxruntime against the plain
graph), and where TensorRT is usable ``<name>.engine`` (a serialized TensorRT
engine, what ``trtexec --loadEngine`` and Triton's ``model.plan`` take) plus
``<name>_trt.pt2`` (``torch_tensorrt.save``). Writes are all-or-nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .api import as_input_tuple, reparameterize
from .artifacts import staged
from .backends.availability import probe_torch_tensorrt, require_onnxruntime, require_torch_tensorrt
from .backends.onnx import OnnxRuntimeModule, export_onnx
from .backends.program import cast_floating, export_program, in_precision, precision_dtype, record_tensorrt_coverage
from .capture import SupportedModel, keeps_dynamic_batch
from .errors import VerificationError
from .report import Report
from .verify import verify as verify_outputs

FORMATS = ("pt2", "onnx", "engine")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ONNX_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}


@dataclass
class ExportResult:
    files: dict[str, Path]  # format ("pt2", "onnx", "engine", "trt_pt2", "report") -> written file
    report: Report
    skipped: dict[str, str] = field(default_factory=dict)  # format -> why it was not written
    program: torch.export.ExportedProgram | None = None  # the plain program, in the deploy precision
    plain: torch.fx.GraphModule | None = None  # the plain graph in fp32 (weights before any cast)


def export(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    out_dir: os.PathLike | str,
    formats: Sequence[str] | None = None,
    *,
    name: str = "model",
    precision: Literal["fp32", "fp16", "bf16"] = "fp32",
    dynamic_batch: bool = False,
    batch_range: tuple[int, int, int] | None = None,
    verify: bool = True,
    cost: Literal["macs", "always"] = "macs",
    protected: Sequence[os.PathLike] = (),
    progress: Callable[[str], None] | None = None,
    **tensorrt_options: Any,
) -> ExportResult:
    """Re-parameterize ``model`` and write the plain graph to ``out_dir`` in ``formats``.

    ``formats=None`` means pt2 and onnx, plus the TensorRT engine where TensorRT and a
    CUDA device are usable (otherwise ``skipped["engine"]`` says why). Naming
    ``"engine"`` explicitly makes a missing TensorRT a ``BackendUnavailable`` error,
    raised before any work. Nothing is written unless every requested file was built
    (and, with ``verify``, the ONNX model matched the plain graph in onnxruntime).
    ``protected`` paths (the input model) are never overwritten.
    """
    progress = progress or (lambda phase: None)
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be a plain file name (letters, digits, '_', '.', '-')")
    wanted, skipped = _resolve_formats(formats, precision)
    dtype = precision_dtype(precision)
    inputs = as_input_tuple(example_inputs)

    dynamic_batch = keeps_dynamic_batch(model, dynamic_batch)
    plain = reparameterize(model, inputs, verify=verify, dynamic_batch=dynamic_batch, cost=cost, progress=progress)
    report: Report = plain.meta["repfx"]
    report.precision = precision
    deploy_graph, deploy_inputs = in_precision(plain, dtype), cast_floating(inputs, dtype)
    progress("export")
    program = export_program(deploy_graph, deploy_inputs, dynamic_batch=dynamic_batch)
    record_tensorrt_coverage(program, report)

    with staged(out_dir, protected) as staging:
        if "pt2" in wanted:
            torch.export.save(program, staging.file(f"{name}.pt2"))
        if "onnx" in wanted:
            onnx_model = export_onnx(program)
            staging.file(f"{name}.onnx").write_bytes(onnx_model)
            if verify:
                _check_onnx(onnx_model, program, plain, inputs, precision, dynamic_batch, report)
        if "engine" in wanted:
            progress("build")
            _build_engine(staging, name, deploy_graph, deploy_inputs, dynamic_batch, batch_range, tensorrt_options)
        report.notes += [f"{fmt} not written: {why}" for fmt, why in skipped.items()]
        staging.file(f"{name}.report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
        written = staging.commit()
    files = {_format_of(path.name, name): path for path in written.values()}
    return ExportResult(files, report, skipped, program, plain)


def _resolve_formats(formats: Sequence[str] | None, precision: str) -> tuple[list[str], dict[str, str]]:
    if formats is None:
        wanted, skipped = ["pt2"], {}
        if precision == "bf16":
            # Written unverified it would break the rule that every artifact is checked.
            skipped["onnx"] = ("onnxruntime has no bfloat16 Conv kernel to check it with; "
                               "use --precision fp16 for ONNX, or bf16 for the TensorRT engine")
        else:
            wanted.append("onnx")
        tensorrt = probe_torch_tensorrt()
        if tensorrt.usable:
            wanted.append("engine")
        else:
            skipped["engine"] = f"needs TensorRT on an NVIDIA GPU ({tensorrt.reason})"
        return wanted, skipped
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, got {list(formats)!r}")
    if "onnx" in formats:
        require_onnxruntime()
        if precision == "bf16":
            raise ValueError("ONNX at bf16 cannot be checked: onnxruntime has no bfloat16 Conv kernel; "
                             "use precision fp16 for ONNX, or bf16 for the TensorRT engine")
    if "engine" in formats:
        require_torch_tensorrt()
    return list(dict.fromkeys(formats)), {}


def _check_onnx(onnx_model: bytes, program: torch.export.ExportedProgram, plain: torch.fx.GraphModule,
                inputs: tuple, precision: str, dynamic_batch: bool, report: Report) -> None:
    """The written ONNX file, run by onnxruntime, must reproduce the plain graph (fed like a deployed model)."""
    from .lowering import DeployedModel

    session = DeployedModel(OnnxRuntimeModule(onnx_model, program), backend="onnx", precision=precision,
                            plain=plain, report=report)
    try:
        stats = verify_outputs(plain, session, inputs, rtol=ONNX_RTOL[precision],
                               extra_batch=3 if dynamic_batch else None)
    except VerificationError as error:
        raise VerificationError(f"the ONNX model does not match the plain graph in onnxruntime: {error}") from error
    report.backend, report.backend_max_abs_error, report.backend_tolerance = (
        "onnxruntime", stats.max_abs_error, stats.tolerance)


def _build_engine(staging, name: str, graph: torch.fx.GraphModule, inputs: tuple, dynamic_batch: bool,
                  batch_range: tuple[int, int, int] | None, options: dict) -> None:
    from .backends.tensorrt import compile_tensorrt, resolve_batch_range, save_compiled, serialize_engine

    cuda_graph, cuda_inputs = graph.to("cuda"), cast_floating(inputs, next(iter(_dtypes(inputs))), "cuda")
    program = export_program(cuda_graph, cuda_inputs, dynamic_batch=dynamic_batch)
    batch_range = resolve_batch_range(cuda_inputs, dynamic_batch, batch_range)
    staging.file(f"{name}.engine").write_bytes(serialize_engine(program, cuda_inputs, batch_range=batch_range,
                                                                **options))
    compiled = compile_tensorrt(program, cuda_inputs, batch_range=batch_range, **options)
    save_compiled(compiled, str(staging.file(f"{name}_trt.pt2")), cuda_inputs)


def _dtypes(inputs: tuple) -> list[torch.dtype]:
    return [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()] or [torch.float32]


def _format_of(filename: str, name: str) -> str:
    return {f"{name}.pt2": "pt2", f"{name}.onnx": "onnx", f"{name}.engine": "engine",
            f"{name}_trt.pt2": "trt_pt2", f"{name}.report.json": "report"}.get(filename, filename)
