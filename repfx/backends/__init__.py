"""Backends: the plain graph run by TensorRT, ONNX Runtime, inductor or eager; one module each.

``base`` says what a backend is, ``registry`` finds backends by name and applies
``backend="auto"``, ``precision`` is the fp32/fp16/bf16 table (dtype, tolerance),
``formats`` says which files ``repfx.export`` writes from the backends' artifacts.
``availability`` probes the optional runtimes; ``program`` re-exports the plain graph;
``onnx_profile`` measures a CPU as ONNX Runtime attains it.
"""

from __future__ import annotations

from typing import Any

from repfx.backends.availability import Probe, probe_onnxruntime, probe_torch_tensorrt
from repfx.backends.base import EAGER, Artifact, ArtifactJob, Backend, BuildRequest, Check, Unsupported
from repfx.backends.registry import (auto_order, backends, get_backend, module_fallback, names, register,
                                     resolve_backend, runtime_named, runtimes, unregister)
from repfx.targets.runtime import Runtime


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # the accepted ``backend=`` values, read when asked: backends may be registered later
        return ("auto", *names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EAGER", "Artifact", "ArtifactJob", "Backend", "BuildRequest", "Check", "Probe", "Runtime", "Unsupported",
           "auto_order", "backends", "get_backend", "module_fallback", "names", "probe_onnxruntime",
           "probe_torch_tensorrt", "register", "resolve_backend", "runtime_named", "runtimes", "unregister"]
