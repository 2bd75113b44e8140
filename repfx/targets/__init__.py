"""repfx.targets: the device a model will run on, as the cost rules need it.

``cost_rule`` turns what a user asks for (``cost="latency"``, ``target="cuda:h200"``,
``batch=128``) into the ``CostRule`` the passes apply. The target is the device the
model will run on: by default the example inputs' device. A CPU or a CUDA device
present here is measured once (``microbench``, about a second) and cached
(``cache``); a GPU this machine lacks is planned for from published figures
(``gpus``). ``cost="measure"`` times contested forms on the device (``timing``).

The runtime matters as much as the device: ONNX Runtime pays a few microseconds per
op where eager PyTorch pays tens, so a runtime may bring a CPU profile of its own
(``runtime.Runtime``, declared by its backend in ``repfx.backends``: nothing here names
one). A runtime without one (inductor calls the same convolution kernels as eager) is
planned with eager PyTorch's profile; so is every runtime on a CUDA device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch.utils import _pytree as pytree

from repfx.passes.cost import (DEFAULT_MAX_PARAM_GROWTH, AlwaysMerge, CostRule, DeviceProfile, LatencyCost, MacsCost,
                              MeasuredCost, check_param_growth)
from repfx.targets.cache import cached_profile
from repfx.targets.gpus import known_gpus, published_profile
from repfx.targets.microbench import cache_key, measure_profile
from repfx.targets.runtime import Runtime
from repfx.targets.timing import WorkTimer

COSTS = ("latency", "measure", "macs", "always")
# INT8 is planned as fp32: no profile of INT8 kernels is measured, and a merge removes layers in both.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}
Target = Union[str, DeviceProfile, None]


def check_target(target: str) -> str:
    """``target`` if it names a device repfx can plan for (nothing is measured); ValueError says what can be named."""
    kind, _, name = target.partition(":")
    if kind == "cuda" and name and not name.isdigit():
        published_profile(name)  # raises, listing the known GPUs
    if kind == "cuda" or (kind == "cpu" and not name):
        return target
    raise ValueError(f"target must be 'cpu', 'cuda', 'cuda:<index>' or 'cuda:<gpu>' "
                     f"(known GPUs: {', '.join(known_gpus())}), got {target!r}")


def device_profile(target: Target = "cpu", runtime: Runtime | None = None) -> DeviceProfile:
    """The profile of ``target``: ``"cpu"``, ``"cuda"``/``"cuda:1"`` (measured here), ``"cuda:h200"`` (published);
    a CPU as ``runtime`` attains it where that runtime has a profile of its own (None: eager PyTorch)."""
    if isinstance(target, DeviceProfile):
        return target
    if not isinstance(target, str):
        raise TypeError(f"target must be a device string or a DeviceProfile, got {type(target).__name__}")
    kind, _, name = check_target(target).partition(":")
    if kind == "cpu":
        return _measured("cpu", runtime)
    if name and not name.isdigit():
        return published_profile(name)
    if not torch.cuda.is_available():
        raise ValueError(f"target={target!r}: there is no CUDA device here to measure; name the GPU to plan "
                         f"for, e.g. target='cuda:h200' (known: {', '.join(known_gpus())})")
    return _measured(target if name else "cuda:0", None)


@functools.lru_cache(maxsize=None)
def _measured(device: str, runtime: Runtime | None) -> DeviceProfile:
    """Measured once per process (and once per machine, through the cache file)."""
    return _profile(device, runtime, refresh=False)


def _profile(device: str, runtime: Runtime | None, refresh: bool) -> DeviceProfile:
    """The cached (with ``refresh``: measured again) profile of ``device`` as ``runtime`` attains it; a runtime
    has a profile of its own on a CPU only (see the module doc), elsewhere eager PyTorch's is measured."""
    if device != "cpu" or runtime is None or runtime.cpu_profile is None:
        runtime = None
    measure = runtime.cpu_profile if runtime is not None else lambda: measure_profile(device)
    return cached_profile(cache_key(device, runtime=runtime), measure, refresh=refresh)


def remeasure(target: str = "cpu", runtime: Runtime | None = None) -> DeviceProfile:
    """Measure ``target`` (``"cpu"`` or a CUDA device here) in ``runtime`` again and replace its cached profile."""
    device = check_target(target)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"target={target!r}: there is no CUDA device here to measure")
    _measured.cache_clear()
    return _profile("cuda:0" if device == "cuda" else device, runtime, refresh=True)


def cost_rule(cost: str | CostRule = "latency", *, target: Target = None, batch: int | None = None,
              precision: str | None = None, example_inputs: Sequence[Any] = (),
              runtime: Runtime | None = None,
              max_param_growth: float | None = DEFAULT_MAX_PARAM_GROWTH) -> CostRule:
    """The rule for ``cost``; ``target``, ``batch`` and ``precision`` default to what the example inputs show.

    ``runtime`` is the one the model is deployed to (a backend's ``runtime``; None: eager PyTorch):
    it picks the profile and what ``cost="measure"`` times forms with. ``max_param_growth`` bounds
    the parameters a merge may hold per parameter it replaces (None: no bound; ``"always"`` has none)."""
    if isinstance(cost, CostRule):
        return cost
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(repr(name) for name in COSTS)}, got {cost!r}")
    bound = {"max_param_growth": check_param_growth(max_param_growth)}
    if cost == "macs":
        return MacsCost(**bound)
    if cost == "always":
        return AlwaysMerge()
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    first = _first_tensor(example_inputs)
    target = target if target is not None else (device_target(first.device) if first is not None else "cpu")
    profile = device_profile(target, runtime)
    batch = batch or (int(first.shape[0]) if first is not None and first.dim() > 0 else 1)
    dtype = _dtype_name(precision, first)
    if cost == "latency":
        return LatencyCost(profile=profile, batch=batch, dtype=dtype, **bound)
    if profile.source.startswith("published"):
        raise ValueError(f"cost='measure' times forms on the device itself, and {profile.name} is not here; "
                         "use cost='latency' to plan for it")
    timer = WorkTimer(device_target(torch.device(profile.device)), batch, dtype, runtime)
    return MeasuredCost(profile=profile, batch=batch, dtype=dtype, timer=timer, **bound)


def _first_tensor(example_inputs: Sequence[Any]) -> torch.Tensor | None:
    leaves = [leaf for leaf in pytree.tree_leaves(tuple(example_inputs)) if isinstance(leaf, torch.Tensor)]
    floating = [leaf for leaf in leaves if leaf.is_floating_point()]
    return (floating or leaves or [None])[0]


def device_target(device: torch.device) -> str:
    """A torch device as a target name: ``"cpu"`` or ``"cuda:<index>"``."""
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def _dtype_name(precision: str | None, first: torch.Tensor | None) -> str:
    if precision is not None:
        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
        return PRECISION_DTYPES[precision]
    if first is not None and first.is_floating_point():
        return str(first.dtype).removeprefix("torch.")
    return "float32"


__all__ = ["COSTS", "DeviceProfile", "Runtime", "Target", "check_target", "cost_rule", "device_profile", "device_target",
           "known_gpus", "measure_profile", "published_profile", "remeasure"]
