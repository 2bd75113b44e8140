"""Measure a ``DeviceProfile``: arithmetic rate, memory bandwidth, per-op overhead and conv output time.

The four numbers (about a second) are measured with the ops the latency model prices, at the
current thread count (``torch.get_num_threads()``), so they are rates this device
attains on convolutions, not datasheet peaks. Each is the fastest of several single
calls: other work on the machine only ever adds time, and a profile is cached for
good (``python -m repfx.targets --measure`` measures again). On a busy CPU several
threads can run slower than one (a descheduled thread stalls every OpenMP barrier);
then the profile is estimated from one thread, marked ``busy`` and not cached:

* rate: dense 3x3 convolutions large enough to be compute-bound (the better of two shapes), per dtype;
* bandwidth: an elementwise add of tensors larger than a core's caches;
* overhead: what a small convolution takes beyond its modeled arithmetic and traffic (at
  least the time of a conv so small that its arithmetic is negligible): a tiny conv can take
  a cheaper code path than the convolutions of a network, so it alone would understate it;
* conv output time: a depthwise 3x3 convolution's time per output element beyond the
  overhead (the better of two sizes): the floor under every conv's time.
"""

from __future__ import annotations

import platform
from typing import NamedTuple

import torch
from torch.nn import functional as F

from repfx.passes.cost import DeviceProfile
from repfx.targets.clock import fastest_call_seconds
from repfx.targets.runtime import Runtime

# (batch, channels, size) of the compute-bound conv and elements per operand of the add, per device type
# Two shapes of the same MACs each: the rate is the better of the two, since one shape can land on a weaker
# kernel (on a 2-core Xeon, 64 channels at 56x56 ran at 125-300 GFLOP/s from call to call, 128 at 28x28 at 300).
COMPUTE_CONVS = {"cpu": ((1, 64, 56), (1, 128, 28)), "cuda": ((16, 256, 56), (16, 512, 28))}
STREAM_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
SMALL_CONV = (16, 16)  # channels and size of a small 3x3 conv: mostly overhead, a little arithmetic
# (batch, channels, size) of depthwise 3x3 convs big enough that their per-output time dominates, per device type
DEPTHWISE_CONVS = {"cpu": ((1, 32, 56), (1, 128, 28)), "cuda": ((16, 128, 56), (16, 512, 28))}


FIGURES_VERSION = 2  # in the cache key: a profile cached before the conv output time was measured is measured anew


class Figures(NamedTuple):
    """What one measurement yields, before it becomes a profile."""

    flops: dict[str, float]
    bandwidth: float
    overhead_s: float
    conv_output_s: float


def measure_profile(device: torch.device | str = "cpu", dtypes: tuple[str, ...] = ()) -> DeviceProfile:
    """The profile of ``device`` measured now; ``dtypes`` beyond float32 (CUDA: float16, bfloat16 by default)."""
    device = torch.device(device)
    kind = device.type
    if kind not in COMPUTE_CONVS:
        raise ValueError(f"cannot measure a profile of a {kind} device (cpu and cuda are supported)")
    dtypes = dtypes or (("float32", "float16", "bfloat16") if kind == "cuda" else ("float32",))
    measured = _measure(device, dtypes)
    threads = torch.get_num_threads()
    if kind == "cpu" and threads > 1:
        single = _one_thread(lambda: _measure(device, dtypes))
        if single.flops["float32"] > measured.flops["float32"]:  # more threads ran slower: barriers stalled
            return busy_estimate(_name(device), single, threads,
                                 f"estimated from one thread x {threads} with torch {torch.__version__}: "
                                 f"{threads} threads ran slower than one (a busy machine)")
    return DeviceProfile(_name(device), kind, measured.flops, measured.bandwidth, measured.overhead_s,
                         f"measured with torch {torch.__version__}", conv_output_s=measured.conv_output_s)


def busy_estimate(name: str, single: Figures, threads: int, source: str) -> DeviceProfile:
    """A profile from one thread's figures, scaled to ``threads`` where the work divides among them."""
    return DeviceProfile(name, "cpu", {dtype: rate * threads for dtype, rate in single.flops.items()},
                         single.bandwidth, single.overhead_s, source, busy=True,
                         conv_output_s=single.conv_output_s / threads)


def _measure(device: torch.device, dtypes: tuple[str, ...]) -> Figures:
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        flops = {dtype: _conv_rate(device, getattr(torch, dtype), generator) for dtype in dtypes}
        bandwidth = _stream_bandwidth(device, generator)
        overhead = _overhead_seconds(device, generator, flops["float32"], bandwidth)
        conv_output = min(_depthwise_output_seconds(device, generator, shape, overhead)
                          for shape in DEPTHWISE_CONVS[device.type])
    return Figures(flops, bandwidth, overhead, conv_output)


def _one_thread(measure):
    """``measure()`` with one intra-op thread, the thread count restored afterwards whatever happens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)


def _conv_rate(device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> float:
    rates = []
    for batch, channels, size in COMPUTE_CONVS[device.type]:
        x = torch.randn(batch, channels, size, size, device=device, generator=generator).to(dtype)
        weight = torch.randn(channels, channels, 3, 3, device=device, generator=generator).to(dtype)
        seconds = fastest_call_seconds(lambda: F.conv2d(x, weight, padding=1), device, calls=10)
        rates.append(2 * batch * channels * channels * 9 * size * size / seconds)
    return max(rates)


def _stream_bandwidth(device: torch.device, generator: torch.Generator) -> float:
    elements = STREAM_ELEMENTS[device.type]
    a = torch.randn(elements, device=device, generator=generator)
    b, out = torch.randn_like(a), torch.empty_like(a)
    seconds = fastest_call_seconds(lambda: torch.add(a, b, out=out), device, calls=10)
    return 3 * elements * a.element_size() / seconds


def _overhead_seconds(device: torch.device, generator: torch.Generator, rate: float, bandwidth: float) -> float:
    tiny_x = torch.randn(1, 8, 4, 4, device=device, generator=generator)
    tiny_weight = torch.randn(8, 8, 1, 1, device=device, generator=generator)
    tiny = fastest_call_seconds(lambda: F.conv2d(tiny_x, tiny_weight), device, calls=50)
    channels, size = SMALL_CONV
    x = torch.randn(1, channels, size, size, device=device, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, device=device, generator=generator)
    small = fastest_call_seconds(lambda: F.conv2d(x, weight, padding=1), device, calls=50)
    macs = channels * channels * 9 * size * size
    traffic = (2 * channels * size * size + weight.numel()) * x.element_size()
    return max(tiny, small - max(2 * macs / rate, traffic / bandwidth))


def _depthwise_output_seconds(device: torch.device, generator: torch.Generator, shape: tuple[int, int, int],
                              overhead: float) -> float:
    batch, channels, size = shape
    x = torch.randn(batch, channels, size, size, device=device, generator=generator)
    weight = torch.randn(channels, 1, 3, 3, device=device, generator=generator)
    seconds = fastest_call_seconds(lambda: F.conv2d(x, weight, padding=1, groups=channels), device, calls=20)
    return max(seconds - overhead, seconds / 2) / x.numel()


def _name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()}, {torch.get_num_threads()} threads"


def cache_key(device: torch.device | str, threads: int | None = None, runtime: Runtime | None = None) -> str:
    """What a measured profile depends on: the device, and for eager PyTorch the thread count (default: the
    current) and the torch build; for a runtime with a profile of its own its version (it sizes its own threads)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    if runtime is not None:
        return f"{device.type}|{name}|{runtime.name}={runtime.version()}|figures={FIGURES_VERSION}"
    return (f"{device.type}|{name}|threads={threads or torch.get_num_threads()}|torch={torch.__version__}"
            f"|figures={FIGURES_VERSION}")


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux; /proc/cpuinfo has it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
