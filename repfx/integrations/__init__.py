"""Hooks of the repfx pipeline into other tools: ``torch.compile(backend="repfx")`` (``dynamo``)
and torch-tensorrt's lowering passes (``torch_tensorrt``); ``register_dynamo_backend`` makes the
first resolvable in a checkout that is not installed."""

import contextlib
import importlib.metadata

BACKEND_NAME = "repfx"


def register_dynamo_backend() -> None:
    """Make ``backend="repfx"`` resolvable after ``import repfx``.

    An installed repfx declares the backend as a ``torch_dynamo_backends`` entry
    point, which torch loads on lookup; registering it again would make torch's
    registry assert on a duplicate name, so this only registers when that entry
    point is absent (a checkout on ``sys.path``). Only then is torch imported here:
    ``import repfx`` of an installed repfx stays light.
    """
    if importlib.metadata.entry_points(group="torch_dynamo_backends", name=BACKEND_NAME):
        return
    from torch._dynamo.backends.registry import register_backend

    from repfx.integrations.dynamo import repfx_backend

    with contextlib.suppress(AssertionError):  # already registered in this process
        register_backend(repfx_backend, name=BACKEND_NAME)
