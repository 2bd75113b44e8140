"""``python -m repfx.targets``: the device profile the cost rule plans with, and a way to measure it again.

    python -m repfx.targets                  # this CPU's profile (measured once, then cached)
    python -m repfx.targets --target cuda:h200
    python -m repfx.targets --measure        # measure again (a quiet machine gives truer rates)
    python -m repfx.targets --runtime onnxruntime   # this CPU as ONNX Runtime runs it (backend="onnx")
"""

from __future__ import annotations

import argparse
import sys

from repfx.backends import EAGER, runtimes
from repfx.errors import BackendUnavailable
from repfx.targets import device_profile, known_gpus, remeasure
from repfx.targets.cache import cache_dir


def main(argv: list[str] | None = None) -> int:
    # The runtimes with a profile of their own, as their backends declare them (the command line is the one
    # part of this package that may know the backends).
    profiled = {name: runtime for name, runtime in runtimes().items() if runtime is EAGER or runtime.cpu_profile}
    parser = argparse.ArgumentParser(prog="python -m repfx.targets", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu", help=f"cpu, cuda, or a GPU: {', '.join(known_gpus())}")
    parser.add_argument("--runtime", default=EAGER.name, choices=profiled,
                        help=f"the runtime the model is deployed to (default {EAGER.name})")
    parser.add_argument("--measure", action="store_true", help="measure the device here again and cache it")
    args = parser.parse_args(argv)
    runtime = profiled[args.runtime]
    try:
        profile = (remeasure(args.target, runtime) if args.measure else device_profile(args.target, runtime))
    except (ValueError, BackendUnavailable) as error:  # BackendUnavailable: a runtime that is not installed
        print(f"python -m repfx.targets: {error}", file=sys.stderr)
        return 2
    rates = ", ".join(f"{dtype} {rate / 1e9:,.1f} GFLOP/s" for dtype, rate in profile.flops.items())
    print(f"{profile.name} ({profile.source})\n  {rates}\n  bandwidth {profile.bandwidth / 1e9:,.1f} GB/s, "
          f"overhead {profile.overhead_s * 1e6:,.1f} us per op, a conv at least "
          f"{profile.conv_output_s * 1e9:,.2f} ns per output element\n  cache: {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
