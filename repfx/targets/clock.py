"""Timing one callable on a device: warm up, then the median of repeated timed batches of calls.

Shared by the profile micro-benchmark and by ``cost="measure"``. A CUDA device is
synchronized around each timed batch (kernels launch asynchronously); each batch
runs long enough (``min_seconds``) that the timer's resolution does not matter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """What waits for ``device`` to finish its queued work (nothing to wait for on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def seconds_per_call(run: Callable[[], object], device: torch.device | str = "cpu", *, repeats: int = 5,
                     min_seconds: float = 0.02, warmup: int = 2) -> float:
    """Median over ``repeats`` batches of the mean time of one call of ``run``."""
    (seconds,) = interleaved_seconds([run], device, rounds=repeats, min_seconds=min_seconds, warmup=warmup)
    return seconds


def interleaved_seconds(runs: list[Callable[[], object]], device: torch.device | str = "cpu", *,
                        rounds: int = 7, min_seconds: float = 0.005, warmup: int = 2) -> list[float]:
    """Per run, the median over ``rounds`` of the mean time of one call, the runs taking turns each round.

    What is compared is timed alike: a load that comes and goes lands on every run in turn,
    not on whichever was being timed at the moment.
    """
    sync = synchronizer(device)
    with torch.inference_mode():
        for run in runs:
            for _ in range(warmup):
                run()
        sync()
        calls = [_calls_filling(run, sync, min_seconds) for run in runs]
        samples: list[list[float]] = [[] for _ in runs]
        for _ in range(rounds):
            for run, count, times in zip(runs, calls, samples):
                start = time.perf_counter()
                for _ in range(count):
                    run()
                sync()
                times.append((time.perf_counter() - start) / count)
    return [statistics.median(times) for times in samples]


def fastest_call_seconds(run: Callable[[], object], device: torch.device | str = "cpu", *,
                         calls: int = 20, warmup: int = 2) -> float:
    """The fastest of ``calls`` single timed calls: what the device attains when nothing else interrupts it.

    Other work on a shared machine only ever adds time (a descheduled thread stalls an
    OpenMP barrier for milliseconds), so the minimum estimates the device, the median the moment.
    """
    sync = synchronizer(device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        sync()
        for _ in range(calls):
            start = time.perf_counter()
            run()
            sync()
            best = min(best, time.perf_counter() - start)
    return best


def _calls_filling(run: Callable[[], object], sync: Callable[[], None], min_seconds: float) -> int:
    """How many calls one timed batch needs to last ``min_seconds`` (at least one)."""
    start = time.perf_counter()
    run()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(10_000, int(min_seconds / once)))
