"""Latency measurement shared by ``--benchmark`` and ``bench/``: warm up, then the median of timed runs.

CUDA work is asynchronous, so each timed run synchronizes the device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_latency_ms(run: Callable[..., Any], inputs: tuple, *, warmup: int = 3, repeat: int = 10) -> float:
    synchronize = torch.cuda.synchronize if any(
        isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            run(*inputs)
        synchronize()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            run(*inputs)
            synchronize()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
