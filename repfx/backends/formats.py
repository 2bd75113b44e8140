"""Which files ``repfx.export`` writes: ``pt2`` plus the registered backends' artifacts, as far as they can be built.

``pt2`` (``torch.export.save`` of the plain program) needs nothing and is always
available. Every other format is an ``Artifact`` of a backend; whether it is
written follows from that backend alone: its probe (can it run here) and its
``supports(precision)`` (every artifact is checked in its runtime, so one that
cannot run the precision is not written unchecked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from repfx.backends.base import EAGER, Artifact, Backend, Unsupported
from repfx.backends.precision import PRECISIONS
from repfx.backends.registry import backends
from repfx.targets.runtime import Runtime

PROGRAM = "pt2"


def export_formats() -> tuple[str, ...]:
    return (PROGRAM, *(artifact.format for _, artifact in artifacts()))


def artifacts(wanted: Sequence[str] | None = None) -> list[tuple[Backend, Artifact]]:
    """Every registered artifact with its backend, in registry order (the order they are built); only
    those in ``wanted`` if given."""
    return [(backend, artifact) for backend in backends() for artifact in backend.artifacts
            if wanted is None or artifact.format in wanted]


def file_names(name: str, wanted: Sequence[str], precision: str = "fp32") -> dict[str, str]:
    """File kind -> file name for the formats in ``wanted`` (an artifact may have several files). An artifact of a
    quantized precision says so in its name (``model.int8.onnx``); the program is the float plain graph."""
    files = {PROGRAM: f"{name}.pt2"} if PROGRAM in wanted else {}
    suffix = PRECISIONS[precision].suffix
    for _, artifact in artifacts(wanted):
        files |= {kind: pattern.format(name=name + suffix) for kind, pattern in artifact.files.items()
                  if not (suffix and kind == "trt_pt2")}  # the torch-tensorrt program is no INT8 artifact
    return files


def planned_for(wanted: Sequence[str]) -> tuple[torch.device | None, Runtime]:
    """The device and runtime an export writing ``wanted`` plans its merges for: the first device and the first
    runtime other than eager PyTorch among the artifacts' backends (a TensorRT engine runs on CUDA, an ONNX
    model in ONNX Runtime); else where the inputs are, in eager PyTorch."""
    planned = [backend for backend, _ in artifacts(wanted)]
    device = next((backend.device for backend in planned if backend.device is not None), None)
    return device, next((backend.runtime for backend in planned if backend.runtime is not EAGER), EAGER)


def int8_format_for(wanted: Sequence[str], target: Any = None) -> tuple[str, str]:
    """The INT8 format (``repfx.int8.quantizers``) an export writing ``wanted`` quantizes in, and why.

    One quantized model serves every file, so the device decides: a GPU (a wanted artifact built on one, or a
    target naming one) takes the format of a GPU backend (TensorRT's explicit quantization, also what an
    engine built elsewhere needs); otherwise the format of the first wanted artifact's backend that runs INT8
    (ONNX Runtime's CPU format). ValueError when no wanted artifact runs INT8."""
    runs_int8 = [backend for backend, _ in artifacts(wanted) if backend.int8_format]
    if not runs_int8:
        raise ValueError(f"precision int8 needs an artifact that runs INT8 ({', '.join(_int8_artifacts())}); "
                         f"the formats asked for are {', '.join(wanted)}")
    on_gpu = [backend for backend in backends() if backend.int8_format and _is_gpu(backend.device)]
    built_on_gpu = [backend for backend in runs_int8 if _is_gpu(backend.device)]
    if built_on_gpu:
        return built_on_gpu[0].int8_format, f"the {built_on_gpu[0].title} artifact is built from it"
    if on_gpu and _is_gpu(target):
        return on_gpu[0].int8_format, f"the target is a GPU ({target}): {on_gpu[0].title}'s format"
    return runs_int8[0].int8_format, (f"the target is the CPU: the {runs_int8[0].title} backend's format "
                                      "(pass target='cuda' for TensorRT's)")


def _int8_artifacts() -> list[str]:
    return [artifact.format for backend, artifact in artifacts() if backend.int8_format]


def _is_gpu(where: Any) -> bool:
    """A CUDA device, or a target naming one ("cuda", "cuda:h200", a profile of a GPU)."""
    if isinstance(where, torch.device):
        return where.type == "cuda"
    name = getattr(where, "device", where)
    return isinstance(name, str) and name.startswith("cuda")


def resolve_formats(formats: Sequence[str] | None, precision: str) -> tuple[list[str], dict[str, str]]:
    """(formats to write, {format: why it is not written}); raises before any work for a named format
    that cannot be built (``BackendUnavailable``) or checked (``ValueError``)."""
    if formats is None:
        return _default_formats(precision)
    known = export_formats()
    unknown = [fmt for fmt in formats if fmt not in known]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {', '.join(known)}, got {list(formats)!r}")
    for backend, artifact in artifacts(formats):
        backend.ensure_usable()
        refusal = backend.supports(precision)
        if refusal is not None:
            raise ValueError(f"{artifact.title} at {precision} cannot be checked: {refusal.why}; "
                             f"use precision {_advice(artifact, refusal, precision)}")
    return list(dict.fromkeys(formats)), {}


def _default_formats(precision: str) -> tuple[list[str], dict[str, str]]:
    """Every format that can be built and checked here; the others with the reason they are skipped."""
    wanted, skipped = [PROGRAM], {}
    for backend, artifact in artifacts():
        refusal = backend.supports(precision)
        probe = backend.probe() if artifact.needs is not None else None
        if refusal is not None:
            # Written unverified it would break the rule that every artifact is checked.
            skipped[artifact.format] = (f"{refusal.why} to check it with; "
                                        f"use --precision {_advice(artifact, refusal, precision)}")
        elif probe is not None and not probe.usable:
            skipped[artifact.format] = f"needs {artifact.needs} ({probe.reason})"
        else:
            wanted.append(artifact.format)
    return wanted, skipped


def _advice(refused: Artifact, refusal: Unsupported, precision: str) -> str:
    """"fp16 for ONNX, or bf16 for the TensorRT engine": the precision to use instead, or the artifacts
    that do take this one."""
    elsewhere = [f"{precision} for {artifact.title}" for backend, artifact in artifacts()
                 if artifact is not refused and backend.supports(precision) is None]
    return ", or ".join([f"{refusal.instead} for {refused.title}", *elsewhere])
