"""The memory rule for the CLI's example inputs: a shape whose run would exhaust memory is refused up front.

Checked before a single input is drawn, with what the machine (or its container) has left.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from repfx.capture.loading import BadInput

INPUT_MEMORY_SHARE = 8  # inputs may take at most 1/8 of available memory (see check_inputs_fit)


def check_inputs_fit(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> None:
    """Refuse inputs that would exhaust memory, before allocating them (else: the OOM killer, or swapping for hours).

    Rule: the inputs may take at most 1/INPUT_MEMORY_SHARE of the memory available now.
    The run holds them several times over (the example inputs, verification's seeded
    random inputs of the same shapes and, with --dynamic-batch, another batch, float64
    copies when a check is repeated in float64, the deploy-precision cast) plus the
    activations of two graphs at once, the first of which is already several times the
    input for a typical conv net. Where available memory cannot be read, nothing is refused.
    """
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes))
    available = available_memory()
    if available is None or needed * INPUT_MEMORY_SHARE <= available:
        return
    shown = " ".join("x".join(map(str, shape)) for shape in shapes)
    raise BadInput(f"inputs {shown} take {_gib(needed)} and the run needs about {INPUT_MEMORY_SHARE}x that, "
                   f"but {_gib(available)} of memory is available: use a smaller --input-shape (e.g. batch 1)")


def available_memory() -> int | None:
    """Bytes this process can still get: the kernel's MemAvailable, lowered by a cgroup v2 limit (containers)."""
    known = [value for value in (_mem_available(), _cgroup_headroom()) if value is not None]
    return min(known) if known else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (macOS, BSD): free physical pages, where the platform has the name
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this cgroup (v2); None without a limit or cgroup v2."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
