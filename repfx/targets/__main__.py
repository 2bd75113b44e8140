"""``python -m repfx.targets``: the device profile the cost rule plans with, and a way to measure it again.

    python -m repfx.targets                  # this CPU's profile (measured once, then cached)
    python -m repfx.targets --target cuda:h200
    python -m repfx.targets --measure        # measure again (a quiet machine gives truer rates)
    python -m repfx.targets --runtime onnxruntime   # this CPU as ONNX Runtime runs it (backend="onnx")
"""

from __future__ import annotations

import argparse
import sys

from repfx.errors import BackendUnavailable
from repfx.targets import RUNTIMES, device_profile, known_gpus, remeasure
from repfx.targets.cache import cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repfx.targets", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu", help=f"cpu, cuda, or a GPU: {', '.join(known_gpus())}")
    parser.add_argument("--runtime", default="eager", choices=RUNTIMES,
                        help="the runtime the model is deployed to (onnxruntime: the onnx backend; default eager)")
    parser.add_argument("--measure", action="store_true", help="measure the device here again and cache it")
    args = parser.parse_args(argv)
    try:
        profile = (remeasure(args.target, args.runtime) if args.measure
                   else device_profile(args.target, args.runtime))
    except (ValueError, BackendUnavailable) as error:  # BackendUnavailable: --runtime onnxruntime without it
        print(f"python -m repfx.targets: {error}", file=sys.stderr)
        return 2
    rates = ", ".join(f"{dtype} {rate / 1e9:,.1f} GFLOP/s" for dtype, rate in profile.flops.items())
    print(f"{profile.name} ({profile.source})\n  {rates}\n  bandwidth {profile.bandwidth / 1e9:,.1f} GB/s, "
          f"overhead {profile.overhead_s * 1e6:,.1f} us per op, a conv at least "
          f"{profile.conv_output_s * 1e9:,.2f} ns per output element\n  cache: {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
