"""Which lowering backends this machine can run, and if not, exactly what is missing.

TensorRT's native libraries are not pip-installable everywhere (and never on a
machine without an NVIDIA GPU), so every backend dependency is imported lazily
and probed here; callers get a ``BackendUnavailable`` naming the missing piece
instead of an ``ImportError`` from deep inside a third-party package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch

from repfx.errors import BackendUnavailable, first_line

# repfx is installed from its clone, not the package index: the extra is installed the same way.
TENSORRT_INSTALL_HINT = ("install it on a machine with an NVIDIA GPU and TensorRT, from the repfx clone: "
                         "pip install -e '.[tensorrt]' (torch-tensorrt 2.14 pins torch 2.14 and TensorRT 11.1)")


@dataclass(frozen=True)
class Probe:
    usable: bool
    reason: str  # why not (or what was found), one line


@functools.cache
def imported_torch_tensorrt() -> ModuleType | Probe:
    """torch_tensorrt, imported; or the unusable ``Probe`` saying why it does not import."""
    if importlib.util.find_spec("torch_tensorrt") is None:
        return Probe(False, f"torch_tensorrt is not installed; {TENSORRT_INSTALL_HINT}")
    try:
        return importlib.import_module("torch_tensorrt")
    except Exception as error:  # ImportError, OSError from a missing libnvinfer, ...
        return Probe(False, f"torch_tensorrt is installed but does not import ({first_line(error)}); "
                            "TensorRT's native libraries are missing or do not match")


@functools.cache
def probe_torch_tensorrt() -> Probe:
    """Is torch_tensorrt importable and is there a CUDA device to build engines on?"""
    module = imported_torch_tensorrt()
    if isinstance(module, Probe):
        return module
    if not torch.cuda.is_available():
        return Probe(False, "torch_tensorrt imports but no CUDA device is visible; TensorRT engines are built "
                            "on an NVIDIA GPU")
    return Probe(True, f"torch_tensorrt {getattr(module, '__version__', '?')} on {torch.cuda.get_device_name()}")


@functools.cache
def probe_onnxruntime() -> Probe:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return Probe(False, f"{package} is not installed (pip install {package}); the ONNX backend needs "
                                "onnx and onnxscript to export and onnxruntime to run")
    import onnxruntime

    return Probe(True, f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})")


def ensure(probe: Probe, title: str) -> None:
    """Raise ``BackendUnavailable`` naming what the ``title`` backend lacks here (nothing is built then)."""
    if not probe.usable:
        raise BackendUnavailable(f"the {title} backend is unavailable: {probe.reason}")


def require_torch_tensorrt() -> ModuleType:
    ensure(probe_torch_tensorrt(), "TensorRT")
    return importlib.import_module("torch_tensorrt")


def require_onnxruntime() -> ModuleType:
    ensure(probe_onnxruntime(), "ONNX")
    return importlib.import_module("onnxruntime")
