"""What a backend is: the interface ``repfx.compile`` and ``repfx.export`` use, and never more.

A backend says whether it can run here (``probe``) and at which precisions
(``supports``), builds a runner from the plain graph (``build``), and declares what
the rest of repfx would otherwise have to know about it: the ``device`` it runs on, the
``runtime`` its merges are planned and timed with (``repfx.targets.runtime``), whether
it ``runs_modules`` (a model folded in parts) or needs one graph, its ``auto_rank`` in
``backend="auto"``, and the files ``repfx.export`` writes for it (``artifacts``).
compile, export and the CLI name no backend and no runtime: they look backends up in
``repfx.backends.registry`` and read only what is declared here, so a new backend is one
module of this package that sets ``BACKEND = MyBackend()`` (found on first use), or a
``register(MyBackend())`` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import fx

from repfx.backends.availability import Probe, ensure
from repfx.backends.precision import is_quantized
from repfx.backends.program import export_program
from repfx.report import Report
from repfx.targets.runtime import Runtime

# Eager PyTorch: planned with this machine's profile as PyTorch attains it, forms timed as modules. The runtime
# of a backend that declares none (TensorRT too: an engine per timed form would take minutes).
EAGER = Runtime("eager")


@dataclass(frozen=True)
class Unsupported:
    """Why a backend cannot run a precision, and the precision to use instead (for the error's advice)."""

    why: str  # e.g. "onnxruntime has no bfloat16 Conv kernel"
    instead: str  # e.g. "fp16"


@dataclass
class BuildRequest:
    """What a backend builds from: the plain graph and example inputs, cast to the deploy precision
    and already on the backend's ``device``."""

    graph: fx.GraphModule
    inputs: tuple
    precision: str
    report: Report  # the run's report: a backend may add what it found (TensorRT: ops it cannot convert)
    dynamic_batch: bool = False  # dim 0 of every batched input symbolic
    batch_range: tuple[int, int, int] | None = None  # (min, opt, max) where a backend takes a batch profile
    options: dict[str, Any] = field(default_factory=dict)  # the caller's backend-specific settings
    exported: torch.export.ExportedProgram | None = None  # ``program``, once made
    quantized: bytes | None = None  # precision "int8": the INT8 ONNX model in the backend's ``int8_format``

    @property
    def program(self) -> torch.export.ExportedProgram:
        """The graph re-exported (``torch.export``): what ONNX and torch-tensorrt lower from; made once, on demand."""
        if self.exported is None:
            self.exported = export_program(self.graph, self.inputs, dynamic_batch=self.dynamic_batch)
        return self.exported


class Staging(Protocol):
    """Where an artifact's files go (``repfx.deploy.export.ExportPlan``): staged, then published all together."""

    def write(self, kind: str, data: bytes) -> None: ...

    def writing(self, kind: str) -> AbstractContextManager[Path]:
        """The staged path of the file of ``kind``; an OS error inside names the final file."""


@dataclass
class ArtifactJob(BuildRequest):
    """An artifact's part of ``repfx.export``: the request (graph, inputs and ``program`` on the CPU),
    plus where its files go."""

    out: Staging = field(kw_only=True)
    progress: Callable[[str], None] = field(default=lambda phase: None, kw_only=True)


@dataclass(frozen=True)
class Check:
    """How ``repfx.export`` checks a written artifact against the plain graph."""

    what: str  # "the ONNX model", in the mismatch error
    runtime: str  # what runs it ("onnxruntime"): the report's ``backend`` for the export
    load: Callable[[], Callable]  # the written artifact as a runner (called only when checking)


@dataclass(frozen=True)
class Artifact:
    """Files ``repfx.export`` can write for a backend, under one name in its ``formats``."""

    format: str  # "onnx", "engine"
    title: str  # in messages: "ONNX", "the TensorRT engine"
    files: Mapping[str, str]  # file kind -> file name, with "{name}" for the export's name
    write: Callable[[ArtifactJob], Check | None]  # writes every file kind; None: nothing to check it with
    # Set for an artifact that needs more than repfx's own dependencies: formats=None then skips
    # it where its backend is unusable, with "needs <this> (<probe's reason>)". Unset, a missing
    # runtime is an error, as for any dependency.
    needs: str | None = None


class Backend(ABC):
    """One way to run the plain graph. Subclasses set ``name`` and implement ``build``; the rest is optional."""

    name: ClassVar[str]  # the value of ``repfx.compile(backend=...)``
    device: ClassVar[torch.device | None] = None  # where it runs (and merges are planned for); None: the inputs'
    runtime: ClassVar[Runtime] = EAGER  # what its merges are planned with, and cost="measure" times forms with
    runs_modules: ClassVar[bool] = False  # runs any module, so also a model folded in parts; else one graph
    auto_rank: ClassVar[int | None] = None  # backend="auto" takes the highest usable; None: never chosen by auto
    artifacts: tuple[Artifact, ...] = ()  # what repfx.export can write for it
    # The INT8 format it runs (repfx.int8.quantizers: "tensorrt" or "cpu"); None: it runs no INT8 model.
    int8_format: ClassVar[str | None] = None

    @property
    def title(self) -> str:
        """The backend in messages ("the TensorRT backend is unavailable: ...")."""
        return self.name

    def probe(self) -> Probe:
        """Whether it can run here, and why (not), in one line. Default: it needs only torch."""
        return Probe(True, f"needs only torch {torch.__version__}")

    def supports(self, precision: str) -> Unsupported | None:
        """None, or why it cannot run ``precision`` (a key of ``repfx.backends.precision.PRECISIONS``).
        Subclasses that refuse more call this first."""
        if is_quantized(precision) and self.int8_format is None:
            return Unsupported(f"the {self.title} backend runs no INT8 model (INT8 runs through a quantized ONNX "
                               "model: ONNX Runtime or TensorRT)", instead="fp16")
        return None

    @abstractmethod
    def build(self, request: BuildRequest) -> Callable:
        """A callable taking the model's arguments (in the deploy precision) and returning its outputs."""

    def annotate(self, program: torch.export.ExportedProgram, report: Report) -> None:
        """Record in ``report`` what this backend would make of ``program``; export asks every backend."""

    def ensure_usable(self) -> None:
        ensure(self.probe(), self.title)
