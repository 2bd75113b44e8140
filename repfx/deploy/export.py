"""``repfx.export``: the plain graph written as deployable files.

``<name>.pt2`` (``torch.export.save`` of the plain ExportedProgram), ``<name>.onnx``
(``torch.onnx.export(dynamo=True)``, checked in onnxruntime against the plain
graph), and where TensorRT is usable ``<name>.engine`` (a serialized TensorRT
engine, what ``trtexec --loadEngine`` and Triton's ``model.plan`` take) plus
``<name>_trt.pt2`` (``torch_tensorrt.save``), and ``<name>.report.json``: the report,
which also records which files repfx wrote (``written_by``, ``files``: name -> SHA-256)
so that a later run may replace exactly those. Writes are all-or-nothing
(``repfx.deploy.staging.Transaction``); ``plan_export`` + ``build_export`` let the CLI put
the Triton repository into the same transaction.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from repfx.api import as_input_tuple, reparameterize
from repfx.deploy.staging import Claim, Transaction, repfx_version, reported_as, sha256_of
from repfx.backends.availability import probe_torch_tensorrt, require_onnxruntime, require_torch_tensorrt
from repfx.backends.onnx import OnnxRuntimeModule, export_onnx
from repfx.backends.program import cast_floating, export_program, in_precision, precision_dtype, record_tensorrt_coverage
from repfx.capture.export import SupportedModel, keeps_dynamic_batch
from repfx.errors import VerificationError
from repfx.report import Report
from repfx.verify.numeric import verify as verify_outputs

FORMATS = ("pt2", "onnx", "engine")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ONNX_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
REPORT_SUFFIX = ".report.json"
WRITTEN_BY = "repfx"  # the report's "written_by": what marks it (and the files it lists) as repfx's own


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

    No file repfx did not write is replaced: an existing file of the same name is
    replaced only when ``<name>.report.json`` (repfx's own record) lists it with its
    current SHA-256; ``protected`` paths (the input model) are never written. Those
    conflicts, an unwritable ``out_dir`` and a directory in the way are refused
    (``repfx.deploy.staging.Refused``) before the model is re-parameterized.
    """
    with Transaction(protected) as transaction:
        plan = plan_export(transaction, out_dir, formats, name=name, precision=precision)
        result = build_export(plan, model, example_inputs, precision=precision, dynamic_batch=dynamic_batch,
                              batch_range=batch_range, verify=verify, cost=cost, progress=progress,
                              **tensorrt_options)
        transaction.commit()
    return result


@dataclass
class ExportPlan:
    """The files one export writes, claimed in a ``Transaction`` before any heavy work."""

    name: str
    out_dir: Path
    wanted: list[str]  # requested formats that will be built
    skipped: dict[str, str]  # format -> why it will not be
    claims: dict[str, Claim]  # file kind ("pt2", "onnx", "engine", "trt_pt2", "report") -> its claim

    def staged(self, kind: str) -> Path:
        """Where the file of ``kind`` is written during the run (published by the transaction's commit)."""
        return self.claims[kind].staged


def plan_export(transaction: Transaction, out_dir: os.PathLike | str, formats: Sequence[str] | None = None, *,
                name: str = "model", precision: str = "fp32") -> ExportPlan:
    """Resolve ``formats`` and claim every file the export will write in ``out_dir``: the checks that need no model."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be a plain file name (letters, digits, '_', '.', '-')")
    wanted, skipped = _resolve_formats(formats, precision)
    out_dir = Path(out_dir)
    report = out_dir / f"{name}{REPORT_SUFFIX}"
    claims = {kind: transaction.claim_file(out_dir / filename, _is_repfx_report if kind == "report"
                                           else functools.partial(_listed_in, report))
              for kind, filename in _filenames(name, wanted).items()}
    return ExportPlan(name, out_dir, wanted, skipped, claims)


def build_export(plan: ExportPlan, model: SupportedModel, example_inputs: Sequence[Any], *,
                 precision: Literal["fp32", "fp16", "bf16"] = "fp32", dynamic_batch: bool = False,
                 batch_range: tuple[int, int, int] | None = None, verify: bool = True,
                 cost: Literal["macs", "always"] = "macs", progress: Callable[[str], None] | None = None,
                 **tensorrt_options: Any) -> ExportResult:
    """The heavy part of ``export``: re-parameterize, lower, check, and write every file of ``plan`` to staging.

    The result names the files where they will be once the plan's transaction commits.
    """
    progress = progress or (lambda phase: None)
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

    if "pt2" in plan.wanted:
        _stage_bytes(plan.claims["pt2"], _saved_program(program))
    if "onnx" in plan.wanted:
        onnx_model = export_onnx(program)
        _stage_bytes(plan.claims["onnx"], onnx_model)
        if verify:
            _check_onnx(onnx_model, program, plain, inputs, precision, dynamic_batch, report)
    if "engine" in plan.wanted:
        progress("build")
        _build_engine(plan, deploy_graph, deploy_inputs, dynamic_batch, batch_range, tensorrt_options)
    report.notes += [f"{fmt} not written: {why}" for fmt, why in plan.skipped.items()]
    _stage_report(plan, report)
    files = {kind: claim.target for kind, claim in plan.claims.items()}
    return ExportResult(files, report, plan.skipped, program, plain)


def _filenames(name: str, wanted: Sequence[str]) -> dict[str, str]:
    """File kind -> file name, for the formats in ``wanted`` (an engine comes with its torch-tensorrt module)."""
    names = {"pt2": f"{name}.pt2", "onnx": f"{name}.onnx", "engine": f"{name}.engine"}
    files = {kind: filename for kind, filename in names.items() if kind in wanted}
    if "engine" in wanted:
        files["trt_pt2"] = f"{name}_trt.pt2"
    files["report"] = f"{name}{REPORT_SUFFIX}"  # last: until it is published, the earlier report vouches for the rest
    return files


def _saved_program(program: torch.export.ExportedProgram) -> bytes:
    """``torch.export.save`` into memory: written by Python, a full disk is an OSError naming the file,
    not a RuntimeError from torch's zip writer."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _stage_bytes(claim: Claim, data: bytes) -> None:
    with reported_as(claim.target):
        claim.staged.write_bytes(data)


# --- how repfx knows it wrote a file: <name>.report.json lists it with its SHA-256 -------------------------------

def _stage_report(plan: ExportPlan, report: Report) -> None:
    """Write the report, with the record of what repfx wrote: ``written_by`` and ``files`` (name -> SHA-256).

    Files an earlier run wrote under this name and that are still as written stay listed,
    so that a run with other ``formats`` does not make them look like the user's.
    """
    claim = plan.claims["report"]
    written = {c.target.name: sha256_of(c.staged) for kind, c in plan.claims.items() if kind != "report"}
    earlier = {filename: digest for filename, digest in _manifest(claim.target).items()
               if filename not in written and _unchanged(plan.out_dir / filename, digest)}
    record = {"written_by": WRITTEN_BY, "repfx_version": repfx_version(), **report.to_dict(),
              "files": {**earlier, **written}}
    _stage_bytes(claim, json.dumps(record, indent=2, default=str).encode("utf-8"))


def _manifest(report: Path) -> dict[str, str]:
    """File name -> SHA-256 of the files repfx's report at ``report`` says repfx wrote ({} if it is not one)."""
    record = _repfx_record(report)
    files = record.get("files") if record else None
    if not isinstance(files, dict):
        return {}
    return {filename: digest for filename, digest in files.items() if isinstance(digest, str)}


def _repfx_record(report: Path) -> dict | None:
    """The JSON object in ``report`` if it is a report repfx wrote, else None."""
    try:
        record = json.loads(report.read_bytes())
    except (OSError, ValueError):
        return None  # missing, unreadable or not JSON: not repfx's record
    return record if isinstance(record, dict) and record.get("written_by") == WRITTEN_BY else None


def _unchanged(path: Path, digest: str) -> bool:
    return path.is_file() and not path.is_symlink() and sha256_of(path) == digest


def _listed_in(report: Path, target: Path) -> str | None:
    """Rule for an existing artifact: replaceable only when repfx's report lists it with its current content."""
    digest = _manifest(report).get(target.name)
    if digest and _unchanged(target, digest):
        return None
    return (f"{target} exists and repfx did not write it (or it changed since: {report.name} does not list it "
            "with this content): move it away, or choose another output directory (--out) or name (--name)")


def _is_repfx_report(target: Path) -> str | None:
    """Rule for an existing ``<name>.report.json``: replaceable only when it is a report repfx wrote."""
    if _repfx_record(target) is not None:
        return None
    return (f"{target} exists and is not a report repfx wrote: move it away, or choose another output "
            "directory (--out) or name (--name)")


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
    from repfx.deploy.compile import DeployedModel

    session = DeployedModel(OnnxRuntimeModule(onnx_model, program), backend="onnx", precision=precision,
                            plain=plain, report=report)
    try:
        stats = verify_outputs(plain, session, inputs, rtol=ONNX_RTOL[precision],
                               extra_batch=3 if dynamic_batch else None)
    except VerificationError as error:
        raise VerificationError(f"the ONNX model does not match the plain graph in onnxruntime: {error}") from error
    report.backend, report.backend_max_abs_error, report.backend_tolerance = (
        "onnxruntime", stats.max_abs_error, stats.tolerance)


def _build_engine(plan: ExportPlan, graph: torch.fx.GraphModule, inputs: tuple, dynamic_batch: bool,
                  batch_range: tuple[int, int, int] | None, options: dict) -> None:
    from repfx.backends.tensorrt import compile_tensorrt, resolve_batch_range, save_compiled, serialize_engine

    cuda_graph, cuda_inputs = graph.to("cuda"), cast_floating(inputs, next(iter(_dtypes(inputs))), "cuda")
    program = export_program(cuda_graph, cuda_inputs, dynamic_batch=dynamic_batch)
    batch_range = resolve_batch_range(cuda_inputs, dynamic_batch, batch_range)
    _stage_bytes(plan.claims["engine"], serialize_engine(program, cuda_inputs, batch_range=batch_range, **options))
    compiled = compile_tensorrt(program, cuda_inputs, batch_range=batch_range, **options)
    with reported_as(plan.claims["trt_pt2"].target):
        save_compiled(compiled, str(plan.staged("trt_pt2")), cuda_inputs)


def _dtypes(inputs: tuple) -> list[torch.dtype]:
    return [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()] or [torch.float32]
