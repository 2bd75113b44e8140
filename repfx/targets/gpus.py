"""Published figures of common NVIDIA GPUs, to plan for a GPU this machine lacks (``target="cuda:h200"``).

Rates are the vendors' dense tensor-core figures (no structured sparsity). A float32
convolution on these GPUs runs on TF32 tensor cores (cuDNN's and TensorRT's default
for convolutions), so ``float32`` is the TF32 rate. Kernels reach only part of a
peak: ``ATTAINED_COMPUTE`` and ``ATTAINED_BANDWIDTH`` scale every entry (a measured
profile needs no such factor). ``LAUNCH_OVERHEAD_S`` is the cost of one op in a
CUDA graph or TensorRT engine; eager PyTorch pays more per op on the host.
"""

from __future__ import annotations

from repfx.passes.cost import DeviceProfile

TERA = 1e12
ATTAINED_COMPUTE = 0.6  # fraction of the tensor-core peak that convolution kernels reach
ATTAINED_BANDWIDTH = 0.8  # fraction of the memory bandwidth that streaming kernels reach
LAUNCH_OVERHEAD_S = 5e-6

# name -> (TF32, FP16/BF16 dense TFLOP/s, memory bandwidth in TB/s, what the figures are)
PUBLISHED: dict[str, tuple[float, float, float, str]] = {
    "h100": (494.7, 989.4, 3.35, "H100 SXM5 80GB"),
    "h200": (494.7, 989.4, 4.8, "H200 SXM 141GB"),
    "a100": (156.0, 312.0, 2.039, "A100 SXM 80GB"),
    "l4": (60.0, 121.0, 0.3, "L4 24GB"),
    "rtx4090": (82.6, 165.2, 1.008, "GeForce RTX 4090 (FP16 with FP32 accumulate)"),
    "orin": (21.25, 42.5, 0.2048, "Jetson AGX Orin 64GB GPU (FP16: half of 85 dense INT8 TOPS; TF32: half of FP16)"),
}
ALIASES = {"4090": "rtx4090", "agx-orin": "orin", "jetson-orin": "orin"}


def known_gpus() -> list[str]:
    return sorted(PUBLISHED)


def published_profile(name: str) -> DeviceProfile:
    """The planning profile of GPU ``name`` (``h200``, ``a100``...); ValueError lists the known names."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PUBLISHED:
        raise ValueError(f"no published figures for GPU {name!r}; known: {', '.join(known_gpus())} "
                         "(or run on the GPU itself: target='cuda' measures it)")
    tf32, fp16, bandwidth, what = PUBLISHED[key]
    peak = DeviceProfile(f"cuda:{key}", "cuda", {"float32": tf32 * TERA, "float16": fp16 * TERA,
                                                 "bfloat16": fp16 * TERA},
                         bandwidth * TERA, LAUNCH_OVERHEAD_S, f"published figures: {what}")
    return peak.derated(ATTAINED_COMPUTE, ATTAINED_BANDWIDTH)
