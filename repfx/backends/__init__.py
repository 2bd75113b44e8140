"""Backends: the plain graph run by TensorRT, ONNX Runtime, inductor or eager; one module each.

``base`` says what a backend is, ``registry`` finds backends by name and applies
``backend="auto"``, ``precision`` is the fp32/fp16/bf16 table (dtype, tolerance),
``formats`` says which files ``repfx.export`` writes from the backends' artifacts.
``availability`` probes the optional runtimes; ``program`` re-exports the plain graph.
"""

from __future__ import annotations

from typing import Any

from repfx.backends.availability import Probe, probe_onnxruntime, probe_torch_tensorrt
from repfx.backends.base import Artifact, ArtifactJob, Backend, BuildRequest, Check, Unsupported
from repfx.backends.registry import backends, get_backend, names, register, resolve_backend, unregister


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # the accepted ``backend=`` values, read when asked: backends may be registered later
        return ("auto", *names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Artifact", "ArtifactJob", "Backend", "BuildRequest", "Check", "Probe", "Unsupported", "backends",
           "get_backend", "names", "probe_onnxruntime", "probe_torch_tensorrt", "register", "resolve_backend",
           "unregister"]
