"""``repfx.export``: the plain graph written as deployable files.

``<name>.pt2`` (``torch.export.save`` of the plain ExportedProgram), the files of
every backend artifact that can be built here (``repfx.backends.formats``: ONNX's
``<name>.onnx``, checked in onnxruntime against the plain graph; where TensorRT is
usable ``<name>.engine`` and ``<name>_trt.pt2``), and ``<name>.report.json``: the report,
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from repfx.pipeline import report_of, run_whole
from repfx.settings import Settings
from repfx.capture.inputs import as_input_sets
from repfx.backends.base import ArtifactJob, Check
from repfx.backends.formats import artifacts, export_formats, file_names, int8_format_for, planned_for, resolve_formats
from repfx.backends.precision import PrecisionName, deploy_copy, is_quantized, precision_dtype
from repfx.int8.calibration import load_calibration
from repfx.int8.quantizers import ensure_tool
from repfx.int8.deploy import int8_options, quantize_plain, training_graph
from repfx.backends.program import export_program
from repfx.backends.registry import backends
from repfx.capture.export import SupportedModel, keeps_dynamic_batch
from repfx.deploy.compile import DeployedModel, check_against_plain, planned_target
from repfx.passes.cost import DEFAULT_MAX_PARAM_GROWTH
from repfx.deploy.staging import Claim, Transaction, repfx_version, reported_as, sha256_of
from repfx.report import Report
from repfx.targets import Target

FORMATS = export_formats()  # the built-in ones ("pt2", "onnx", "engine"): what the CLI's --formats accepts
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
REPORT_SUFFIX = ".report.json"
WRITTEN_BY = "repfx"  # the report's "written_by": what marks it (and the files it lists) as repfx's own


@dataclass
class ExportResult:
    files: dict[str, Path]  # format ("pt2", "onnx", "engine", "trt_pt2", "report") -> written file
    report: Report
    skipped: dict[str, str] = field(default_factory=dict)  # format -> why it was not written
    program: torch.export.ExportedProgram | None = None  # the plain program, in the deploy precision
    plain: torch.fx.GraphModule | None = None  # the plain graph in fp32 (weights before any cast)
    checks: dict[str, Check] = field(default_factory=dict)  # format -> how its artifact is run (--benchmark)


def export(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    out_dir: os.PathLike | str,
    formats: Sequence[str] | None = None,
    *,
    name: str = "model",
    precision: PrecisionName = "fp32",
    dynamic_batch: bool = False,
    batch_range: tuple[int, int, int] | None = None,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    strict: bool = False,
    cost: Literal["latency", "measure", "macs", "always"] = "latency",
    target: Target = None,
    batch: int | None = None,
    max_param_growth: float | None = DEFAULT_MAX_PARAM_GROWTH,
    calibration: Any = None,
    int8_target: Any = None,
    accept_below_target: bool = False,
    protected: Sequence[os.PathLike] = (),
    progress: Callable[[str], None] | None = None,
    **tensorrt_options: Any,
) -> ExportResult:
    """Re-parameterize ``model`` and write the plain graph to ``out_dir`` in ``formats``.

    ``formats=None`` means pt2 and onnx, plus the TensorRT engine where TensorRT and a
    CUDA device are usable (otherwise ``skipped["engine"]`` says why); in general, pt2 and
    every registered backend's artifacts that can be built and checked here. Naming
    ``"engine"`` explicitly makes a missing TensorRT a ``BackendUnavailable`` error,
    raised before any work. Nothing is written unless every requested file was built
    (and, with ``verify``, the ONNX model matched the plain graph in onnxruntime).

    No file repfx did not write is replaced: an existing file of the same name is
    replaced only when ``<name>.report.json`` (repfx's own record) lists it with its
    current SHA-256; ``protected`` paths (the input model) are never written. Those
    conflicts, an unwritable ``out_dir`` and a directory in the way are refused
    (``repfx.deploy.staging.Refused``) before the model is re-parameterized.

    ``precision="int8"`` quantizes the plain graph on ``calibration`` (required: ``repfx.int8.calibration``
    says what it may be) and writes ``<name>.int8.onnx`` (and ``<name>.int8.engine`` where TensorRT is usable)
    beside the float ``<name>.pt2``; the format follows the target (``repfx.int8.deploy``). It is judged on a
    held-out part of the data against ``int8_target`` = (agreement, snr_db), default (0.99, 20.0); below it,
    ``Int8TargetMissed`` and nothing is written, unless ``accept_below_target``.

    The files hold one graph, so a model torch.export cannot capture whole (one that
    ``repfx.reparameterize`` folds in parts) raises ``CaptureError`` in one line naming the
    line that blocks it and its largest folded part, to export instead.
    """
    with Transaction(protected) as transaction:
        plan = plan_export(transaction, out_dir, formats, name=name, precision=precision)
        settings = Settings(verify=verify, rtol=rtol, atol=atol, strict=strict, dynamic_batch=dynamic_batch,
                            cost=cost, target=target, batch=batch, precision=precision,
                            max_param_growth=max_param_growth, progress=progress,
                            int8=int8_options(int8_target, accept_below_target))
        result = build_export(plan, model, example_inputs, settings, batch_range=batch_range,
                              calibration=calibration, **tensorrt_options)
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

    @contextmanager
    def writing(self, kind: str) -> Iterator[Path]:
        """The staged path of ``kind``; an OS error (a full disk) names the file it will become."""
        claim = self.claims[kind]
        with reported_as(claim.target):
            yield claim.staged

    def write(self, kind: str, data: bytes) -> None:
        with self.writing(kind) as path:
            path.write_bytes(data)


def plan_export(transaction: Transaction, out_dir: os.PathLike | str, formats: Sequence[str] | None = None, *,
                name: str = "model", precision: str = "fp32") -> ExportPlan:
    """Resolve ``formats`` and claim every file the export will write in ``out_dir``: the checks that need no model."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be a plain file name (letters, digits, '_', '.', '-')")
    wanted, skipped = resolve_formats(formats, precision)
    if is_quantized(precision):
        int8_format_for(wanted)  # some wanted artifact runs INT8, or one line now, before any work
    out_dir = Path(out_dir)
    report = out_dir / f"{name}{REPORT_SUFFIX}"
    # The report last: until it is published, the earlier report vouches for the rest.
    filenames = file_names(name, wanted, precision) | {"report": report.name}
    claims = {kind: transaction.claim_file(out_dir / filename, _is_repfx_report if kind == "report"
                                           else functools.partial(_listed_in, report))
              for kind, filename in filenames.items()}
    return ExportPlan(name, out_dir, wanted, skipped, claims)


def build_export(plan: ExportPlan, model: SupportedModel, example_inputs: Sequence[Any], settings: Settings, *,
                 batch_range: tuple[int, int, int] | None = None, calibration: Any = None,
                 **tensorrt_options: Any) -> ExportResult:
    """The heavy part of ``export``: re-parameterize, lower, check, and write every file of ``plan`` to staging.

    ``settings.precision`` is the one being exported (None: fp32); ``settings.target`` defaults to where the
    wanted files run. The result names the files where they will be once the plan's transaction commits.
    """
    precision = settings.precision or "fp32"
    precision_dtype(precision)  # an unknown precision is refused before the heavy work
    sets = as_input_sets(example_inputs)  # one example input set, or a list of them (all recorded and checked)
    inputs = sets[0]
    if is_quantized(precision):  # missing or unfit data, or a missing tool: before any work
        calibration = load_calibration(calibration, inputs)
        int8_format, int8_why = int8_format_for(plan.wanted, settings.target)
        ensure_tool(int8_format)
    dynamic_batch = keeps_dynamic_batch(model, settings.dynamic_batch)
    # One graph is written: a model torch.export cannot capture whole is refused in one line naming what blocks
    # it and the folded part to export instead.
    device, runtime = planned_for(plan.wanted)  # e.g. a TensorRT engine runs on the GPU it is built on
    settings = settings.replace(dynamic_batch=dynamic_batch, precision=precision, runtime=runtime,
                                target=planned_target(settings.target, device))
    plain = run_whole(model, sets, settings)
    report: Report = report_of(plain)
    report.precision = precision
    deploy_graph, deploy_inputs = deploy_copy(plain, inputs, precision)
    settings.progress("export")
    program = export_program(deploy_graph, deploy_inputs, dynamic_batch=dynamic_batch)
    for backend in backends():
        backend.annotate(program, report)

    quantized = None
    if is_quantized(precision):
        quantized = quantize_plain(plain, inputs, calibration, int8_format, int8_why, settings.int8 or int8_options(),
                                   report, training=training_graph(model, inputs), progress=settings.progress)
    if "pt2" in plan.wanted:
        plan.write("pt2", _saved_program(program))
    job = ArtifactJob(deploy_graph, deploy_inputs, precision, report, dynamic_batch=dynamic_batch,
                      batch_range=batch_range, options=tensorrt_options, exported=program, quantized=quantized,
                      out=plan, progress=settings.progress)
    checks = {}
    for backend, artifact in artifacts(plan.wanted):
        check = artifact.write(job)
        if check is None:
            continue
        checks[artifact.format] = check
        if quantized is not None:
            report.backend = check.runtime  # judged on held-out data by quantize_plain, in that runtime
        elif settings.verify:
            _check_artifact(check, backend.name, plain, sets, settings, report)
    report.notes += [f"{fmt} not written: {why}" for fmt, why in plan.skipped.items()]
    _stage_report(plan, report)
    files = {kind: claim.target for kind, claim in plan.claims.items()}
    return ExportResult(files, report, plan.skipped, program, plain, checks)


def _saved_program(program: torch.export.ExportedProgram) -> bytes:
    """``torch.export.save`` into memory: written by Python, a full disk is an OSError naming the file,
    not a RuntimeError from torch's zip writer."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


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
    plan.write("report", json.dumps(record, indent=2, default=str).encode("utf-8"))


def _manifest(report: Path) -> dict[str, str]:
    """File name -> SHA-256 of the files repfx's report at ``report`` says repfx wrote ({} if it is not one)."""
    files = (_repfx_record(report) or {}).get("files")
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


def _check_artifact(check: Check, backend: str, plain: torch.fx.GraphModule, sets: list[tuple], settings: Settings,
                    report: Report) -> None:
    """A written artifact, run by its runtime, must reproduce the plain graph (fed like a deployed model)."""
    deployed = DeployedModel(check.load(), backend=backend, precision=settings.precision, plain=plain, report=report)
    stats = check_against_plain(plain, deployed, sets, settings.precision, settings,
                                f"{check.what} does not match the plain graph in {check.runtime}")
    report.backend, report.backend_max_abs_error, report.backend_tolerance = (
        check.runtime, stats.max_abs_error, stats.tolerance)
