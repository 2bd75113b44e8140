"""The backends by name, and the rule ``backend="auto"`` follows.

The built-in backends are the modules of ``repfx.backends`` that define ``BACKEND``;
they are found on first use, in file-name order. Importing one never imports its
runtime (torch_tensorrt, onnxruntime load lazily), so finding them is cheap and
works on any machine. ``register`` adds a backend from elsewhere (a plugin, a test).
"""

from __future__ import annotations

import importlib
import pkgutil

from repfx.backends.base import Backend

# "auto": the first of these whose probe says it is usable; the last is taken without asking.
AUTO = ("tensorrt", "inductor")

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
        return _auto()
    backend = get_backend(name)
    backend.ensure_usable()
    refusal = backend.supports(precision)
    if refusal is not None:
        raise ValueError(f"the {backend.name} backend cannot run {precision}: {refusal.why}; "
                         f"use precision={refusal.instead!r}")
    return backend.name, "requested"


def _auto() -> tuple[str, str]:
    unusable = []
    for name in AUTO[:-1]:
        backend = get_backend(name)
        probe = backend.probe()
        if probe.usable:
            return name, probe.reason
        unusable.append(f"{backend.title} unavailable: {probe.reason}")
    return AUTO[-1], "; ".join(unusable)
