"""Lowering backends for the plain graph, and the rule ``backend="auto"`` follows."""

from __future__ import annotations

from repfx.backends.availability import probe_onnxruntime, probe_torch_tensorrt, require_onnxruntime, require_torch_tensorrt

BACKENDS = ("auto", "tensorrt", "onnx", "inductor", "eager")


def resolve_backend(backend: str, precision: str = "fp32") -> tuple[str, str]:
    """(backend to use, why); raises ``BackendUnavailable`` for an explicit backend that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        tensorrt = probe_torch_tensorrt()
        if tensorrt.usable:
            return "tensorrt", tensorrt.reason
        return "inductor", f"TensorRT unavailable: {tensorrt.reason}"
    if backend == "tensorrt":
        require_torch_tensorrt()
    if backend == "onnx":
        require_onnxruntime()
        if precision == "bf16":
            raise ValueError("the onnx backend cannot run bf16: onnxruntime has no bfloat16 Conv kernel; "
                             "use precision='fp16'")
    return backend, "requested"


__all__ = ["BACKENDS", "probe_onnxruntime", "probe_torch_tensorrt", "resolve_backend"]
