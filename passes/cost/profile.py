"""A device as the latency model sees it, and the roofline time of one op on it.

Three numbers describe a device well enough to decide a merge (the RepVGG paper's
lesson: FLOPs do not predict speed, memory traffic and the number of ops do):
attainable arithmetic rate per dtype, memory bandwidth, and the fixed cost of
launching one op. An op then takes ``max(2 * MACs / rate, bytes / bandwidth) +
overhead``: it is bound either by arithmetic or by memory traffic, and it always
pays its launch. Small tensors are overhead-bound (merging wins even when it adds
MACs); large ones are compute- or memory-bound (it can lose).

A fourth number keeps low-intensity convolutions honest: a depthwise conv does a
few MACs per output and cannot run as a matrix product, so it attains a fraction of
both peak rate and bandwidth (the MobileNet experience on every device). Its time
per output element, measured, is a floor under every conv's time
(``conv_output_s``; 0 where not measured, as for published GPU figures).

Profiles are plain data; ``repfx.targets`` measures them or reads them from its
table of published GPU figures. Nothing here touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from repfx.passes.cost.work import Op

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class DeviceProfile:
    """Attainable rates of one device; ``source`` says where they come from (measured, or published)."""

    name: str  # "cpu: <model>, 2 threads" or "cuda:h200"
    device: str  # "cpu" or "cuda": where the ops run
    flops: dict[str, float] = field(hash=False)  # FLOP/s per dtype name (2 FLOPs per multiply-accumulate)
    bandwidth: float = 1e10  # bytes per second
    overhead_s: float = 1e-5  # seconds per op launched
    source: str = "given"
    conv_output_s: float = 0.0  # seconds per output element a conv takes at least (a depthwise 3x3's); 0: none
    busy: bool = False  # measured while the machine was busy: an estimate, not kept in the cache

    def rate(self, dtype: str) -> float:
        """FLOP/s for ``dtype``; a dtype the profile lacks runs at the float32 rate (no faster path assumed)."""
        return self.flops.get(dtype) or self.flops["float32"]

    def to_dict(self) -> dict:
        return {"name": self.name, "device": self.device, "flops": dict(self.flops), "bandwidth": self.bandwidth,
                "overhead_s": self.overhead_s, "source": self.source, "busy": self.busy,
                "conv_output_s": self.conv_output_s}

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        """The inverse of ``to_dict``; raises ValueError naming the field that is missing or not a positive number."""
        try:
            flops = {str(dtype): _positive(rate, f"flops[{dtype}]") for dtype, rate in dict(data["flops"]).items()}
            if "float32" not in flops:
                raise ValueError("flops has no float32 rate")
            return cls(str(data["name"]), str(data["device"]), flops, bandwidth=_positive(data["bandwidth"], "bandwidth"),
                       overhead_s=_positive(data["overhead_s"], "overhead_s"), source=str(data.get("source", "given")),
                       busy=bool(data.get("busy", False)),
                       conv_output_s=_not_negative(data.get("conv_output_s", 0.0), "conv_output_s"))
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a device profile: {error}") from None

    def derated(self, compute: float, memory: float) -> DeviceProfile:
        """Published peaks are not attained by real kernels: the fraction reached, applied to each rate."""
        return replace(self, flops={dtype: rate * compute for dtype, rate in self.flops.items()},
                       bandwidth=self.bandwidth * memory)


def _positive(value: object, what: str) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return number


def _not_negative(value: object, what: str) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not 0 <= number < float("inf"):
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    return number


CONVOLUTIONS = ("conv", "conv_transpose")


def roofline_seconds(op: Op, profile: DeviceProfile, batch: int, dtype: str) -> float:
    """Modeled time of ``op`` on ``profile`` for ``batch`` samples of ``dtype``.

    Activations scale with the batch; weights are read once per call. Bytes are
    counted once each (a kernel reads its input and weights and writes its output):
    caches that let a kernel read less are a second-order effect the model ignores.
    A convolution also takes at least ``conv_output_s`` per output element.
    """
    itemsize = DTYPE_BYTES.get(dtype, 4)
    compute = 2 * op.macs * batch / profile.rate(dtype)
    traffic = ((op.reads + op.writes) * batch + op.params) * itemsize / profile.bandwidth
    floor = op.writes * batch * profile.conv_output_s if op.kind in CONVOLUTIONS else 0.0
    return max(compute, traffic, floor) + profile.overhead_s
