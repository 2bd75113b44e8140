"""What runs a model, as the cost rules see it: the profile its merges are planned with and how a form is timed.

A ``Runtime`` is declared by a backend (``repfx.backends``: its ``runtime``); the planner
here takes one without knowing any by name, so a runtime comes with its backend, in one
file. ``None`` wherever a runtime is taken means eager PyTorch: this machine's profile as
PyTorch attains it, and a form timed by calling the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from repfx.passes.cost import DeviceProfile


def as_module(module: nn.Module, inputs: tuple) -> Callable:
    """A form run as eager PyTorch runs it: the module itself."""
    return module


@dataclass(frozen=True)
class Runtime:
    """One runtime, under the name ``python -m repfx.targets --runtime`` and the profile cache know it by."""

    name: str
    # cost="measure": what a form (an ``nn.Module``, with its example inputs) is timed through.
    timed: Callable[[nn.Module, tuple], Callable] = as_module
    # A CPU profile measured in this runtime, when its per-op costs are its own (ONNX Runtime pays a few
    # microseconds an op where eager PyTorch pays tens); None: planned with eager PyTorch's profile.
    cpu_profile: Callable[[], DeviceProfile] | None = None
    version: Callable[[], str] = str  # what a profile measured in it depends on besides the CPU (in the cache key)
