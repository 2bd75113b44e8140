"""The backends by name, their runtimes by name, and the rule ``backend="auto"`` follows.

The built-in backends are the modules of ``repfx.backends`` that define ``BACKEND``;
they are found on first use, in file-name order. Importing one never imports its
runtime (torch_tensorrt, onnxruntime load lazily), so finding them is cheap and
works on any machine. ``register`` adds a backend from elsewhere (a plugin, a test).
A runtime is known by the backends that declare it (``Backend.runtime``): the one
vocabulary of runtime names is theirs.
"""

from __future__ import annotations

import importlib
import pkgutil

from repfx.backends.precision import is_quantized
from repfx.errors import BackendUnavailable
from repfx.backends.base import EAGER, Backend
from repfx.targets.runtime import Runtime

_registered: dict[str, Backend] = {}
_found_builtins = False


def _find_builtins() -> None:
    global _found_builtins
    if _found_builtins:
        return
    _found_builtins = True
    import repfx.backends

    for module_info in pkgutil.iter_modules(repfx.backends.__path__):
        backend = getattr(importlib.import_module(f"repfx.backends.{module_info.name}"), "BACKEND", None)
        if isinstance(backend, Backend):
            _registered.setdefault(backend.name, backend)


def register(backend: Backend) -> Backend:
    """Make ``backend`` available to ``repfx.compile(backend=backend.name)`` and its artifacts to ``repfx.export``."""
    _find_builtins()
    if backend.name == "auto" or backend.name in _registered:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _registered[backend.name] = backend
    return backend


def unregister(name: str) -> Backend:
    _find_builtins()
    if name not in _registered:
        raise ValueError(f"no backend named {name!r} is registered")
    return _registered.pop(name)


def backends() -> tuple[Backend, ...]:
    _find_builtins()
    return tuple(_registered.values())


def names() -> tuple[str, ...]:
    return tuple(backend.name for backend in backends())


def get_backend(name: str) -> Backend:
    _find_builtins()
    if name not in _registered:
        raise ValueError(f"backend must be one of {', '.join(('auto', *names()))}, got {name!r}")
    return _registered[name]


def resolve_backend(name: str, precision: str = "fp32") -> tuple[str, str]:
    """(backend to use, why); raises ``BackendUnavailable`` for an explicit backend that cannot run here,
    and ``ValueError`` for one that cannot run ``precision``."""
    if name == "auto":
        return _auto_quantized(precision) if is_quantized(precision) else _auto()
    backend = get_backend(name)
    backend.ensure_usable()
    refusal = backend.supports(precision)
    if refusal is not None:
        raise ValueError(f"the {backend.name} backend cannot run {precision}: {refusal.why}; "
                         f"use precision={refusal.instead!r}")
    return backend.name, "requested"


def auto_order() -> list[Backend]:
    """The backends "auto" may choose, best first (highest ``auto_rank``): the first whose probe says it is
    usable is chosen; the last is taken without asking."""
    return sorted((backend for backend in backends() if backend.auto_rank is not None),
                  key=lambda backend: -backend.auto_rank)


def module_fallback() -> Backend:
    """What "auto" runs a model folded in parts with: the first in its order that runs modules."""
    return next(backend for backend in auto_order() if backend.runs_modules)


def runtimes() -> dict[str, Runtime]:
    """Every runtime a registered backend declares, by name (eager PyTorch first)."""
    return {runtime.name: runtime for runtime in (EAGER, *(backend.runtime for backend in backends()))}


def runtime_named(name: str) -> Runtime:
    known = runtimes()
    if name not in known:
        raise ValueError(f"runtime must be one of {', '.join(known)}, got {name!r}")
    return known[name]


def _auto_quantized(precision: str) -> tuple[str, str]:
    """"auto" at a quantized precision: the best usable backend that runs it (ranked ones first), e.g. TensorRT on
    a GPU and ONNX Runtime elsewhere; inductor and eager run no INT8 model."""
    able = sorted((backend for backend in backends() if backend.supports(precision) is None),
                  key=lambda backend: -1 if backend.auto_rank is None else -backend.auto_rank)
    unusable = []
    for backend in able:
        probe = backend.probe()
        if probe.usable:
            return backend.name, "; ".join([*unusable, f"{backend.title} runs {precision}: {probe.reason}"])
        unusable.append(f"{backend.title} unavailable: {probe.reason}")
    raise BackendUnavailable(f"no backend that runs {precision} is usable here: {'; '.join(unusable) or 'none runs it'}")


def _auto() -> tuple[str, str]:
    *candidates, fallback = auto_order()
    unusable = []
    for backend in candidates:
        probe = backend.probe()
        if probe.usable:
            return backend.name, probe.reason
        unusable.append(f"{backend.title} unavailable: {probe.reason}")
    return fallback.name, "; ".join(unusable)
