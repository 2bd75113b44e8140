"""Timing callables on a device: the one timer of repfx (profiles, ``cost="measure"``, ``--benchmark``, ``bench/``).

Every figure comes from the same loop (``_rounds``): warm up, then timed batches of
calls, the runs taking turns, in inference mode. A CUDA device is synchronized around
each timed batch (kernels launch asynchronously). What differs is what is read from
the samples: a median (what a run takes now), or a minimum (what the device attains).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    not on whichever was being timed at the moment. Each batch runs long enough
    (``min_seconds``) that the timer's resolution does not matter.
    """
    samples = _rounds(runs, synchronizer(device), rounds, warmup, min_seconds=min_seconds)
    return [statistics.median(times) for times in samples]


def interleaved_samples(runs: list[Callable[[], object]], device: torch.device | str = "cpu", *, rounds: int = 25,
                        warmup: int = 3) -> list[list[float]]:
    """Per run, ``rounds`` single-call times in seconds, the runs taking turns each round (for a median and a
    spread of what one call takes, as ``--benchmark`` reports)."""
    return _rounds(runs, synchronizer(device), rounds, warmup)


def fastest_call_seconds(run: Callable[[], object], device: torch.device | str = "cpu", *,
                         calls: int = 20, warmup: int = 2) -> float:
    """The fastest of ``calls`` single timed calls: what the device attains when nothing else interrupts it.

    Other work on a shared machine only ever adds time (a descheduled thread stalls an
    OpenMP barrier for milliseconds), so the minimum estimates the device, the median the moment.
    """
    (samples,) = _rounds([run], synchronizer(device), calls, warmup)
    return min(samples)


def median_latency_ms(run: Callable[..., Any], inputs: tuple, *, warmup: int = 3, repeat: int = 10) -> float:
    """The median of ``repeat`` single calls ``run(*inputs)``, in milliseconds, on the inputs' device."""
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda), "cpu")
    (samples,) = _rounds([lambda: run(*inputs)], synchronizer(device), repeat, warmup)
    return statistics.median(samples) * 1e3


def _rounds(runs: Sequence[Callable[[], object]], sync: Callable[[], None], rounds: int, warmup: int, *,
            min_seconds: float | None = None) -> list[list[float]]:
    """Per run, ``rounds`` samples of the seconds one call takes; each sample times one call, or with
    ``min_seconds`` a batch of calls lasting about that long (mean per call)."""
    with torch.inference_mode():
        for run in runs:
            for _ in range(warmup):
                run()
        sync()
        calls = [1 if min_seconds is None else _calls_filling(run, sync, min_seconds) for run in runs]
        samples: list[list[float]] = [[] for _ in runs]
        for _ in range(rounds):
            for run, count, times in zip(runs, calls, samples):
                start = time.perf_counter()
                for _ in range(count):
                    run()
                sync()
                times.append((time.perf_counter() - start) / count)
    return samples


def _calls_filling(run: Callable[[], object], sync: Callable[[], None], min_seconds: float) -> int:
    """How many calls one timed batch needs to last ``min_seconds`` (at least one)."""
    start = time.perf_counter()
    run()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(10_000, int(min_seconds / once)))
