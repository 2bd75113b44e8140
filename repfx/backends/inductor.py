"""The ``inductor`` backend: ``torch.compile`` of the plain graph (C++ on the CPU, Triton kernels on CUDA).

What ``backend="auto"`` falls back to where TensorRT is unusable: it needs only
torch (and a C++ compiler on the CPU). ``backend_options`` are ``torch.compile``'s
keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from repfx.backends.base import Backend, BuildRequest


class InductorBackend(Backend):
    name = "inductor"

    def build(self, request: BuildRequest) -> Callable:
        # dynamic=None lets torch.compile decide; a dynamic batch is declared so the first call does not specialize it.
        settings = {"dynamic": True if request.dynamic_batch else None} | request.options
        return torch.compile(request.graph, **settings)


BACKEND = InductorBackend()
