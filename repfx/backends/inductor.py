"""The ``inductor`` backend: ``torch.compile`` of the plain graph (C++ on the CPU, Triton kernels on CUDA).

What ``backend="auto"`` falls back to where TensorRT is unusable (the lowest
``auto_rank``, taken without a probe): it needs only torch (and a C++ compiler on the
CPU). It runs any module, so also a model folded in parts. Merges are planned with
eager PyTorch's profile (the same convolution kernels; the elementwise ops it fuses are
not modeled) and ``cost="measure"`` times forms compiled. ``backend_options`` are
``torch.compile``'s keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from repfx.backends.base import Backend, BuildRequest
from repfx.targets.runtime import Runtime

INDUCTOR = Runtime("inductor", timed=lambda module, inputs: torch.compile(module, dynamic=False))


class InductorBackend(Backend):
    name = "inductor"
    runtime, runs_modules, auto_rank = INDUCTOR, True, 0

    def build(self, request: BuildRequest) -> Callable:
        # dynamic=None lets torch.compile decide; a dynamic batch is declared so the first call does not specialize it.
        settings = {"dynamic": True if request.dynamic_batch else None} | request.options
        return torch.compile(request.graph, **settings)


BACKEND = InductorBackend()
