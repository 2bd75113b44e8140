"""The ``eager`` backend: the verified plain GraphModule itself, run by PyTorch.

Nothing is compiled: it is the reference the other backends are checked against,
and a deployable module wherever no compiler or runtime is installed.
"""

from __future__ import annotations

from torch import fx

from repfx.backends.base import Backend, BuildRequest


class EagerBackend(Backend):
    name = "eager"
    runs_modules = True

    def build(self, request: BuildRequest) -> fx.GraphModule:
        return request.graph


BACKEND = EagerBackend()
