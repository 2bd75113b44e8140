"""Output shared by the benchmark scripts (run as ``python bench/<script>.py``): header, tables, verdicts."""

from __future__ import annotations

import os
import sys

import torch

import repfx


def print_environment(quick: bool, timm_version: str, busy_advice: str) -> None:
    """Versions, cores, threads and load; ``busy_advice`` follows a warning when the machine is busy."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"repfx {repfx.__version__}, torch {torch.__version__}, timm {timm_version}, "
          f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{'; QUICK mode' if quick else ''}")
    if load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"NOTE: load average {load[0]:.2f} on {os.cpu_count()} CPUs{busy_advice}")
    print()


def table(header: list[str], rows: list[list[str]], title: str) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [title, line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, row)) for row in rows]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
