"""``--benchmark``: what repfx itself gains, runtime by runtime, measured so that a busy machine cannot fake it.

A speed-up of the plain graph in ONNX Runtime over the model in eager PyTorch is
mostly the runtime, not repfx. So every runtime usable here (each registered backend
whose probe passes and that runs on this machine) runs both the model *as given* and
the *plain* graph, and the speed-up is taken within a runtime. All variants are timed
in the same rounds, taking turns (``repfx.targets.clock.interleaved_samples``), so a
load that comes and goes lands on each alike; each row gives the median and the
spread (25th-75th percentile) of single calls. A machine that is busy before the
run, or a spread that says it became busy, is warned about in the result.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch

from repfx.backends.base import BuildRequest
from repfx.backends.precision import deploy_copy
from repfx.backends.registry import backends
from repfx.capture.export import capture
from repfx.errors import BackendUnavailable, LoweringError, first_line, warn_user
from repfx.targets.clock import interleaved_samples

ROUNDS, WARMUP = 25, 3
WIDE_SPREAD = 0.25  # an interquartile range over a quarter of the median: the machine's load moved under the run


def benchmark(model: Any, plain: torch.fx.GraphModule, inputs: tuple, precision: str) -> list[dict]:
    """One row per runtime and variant (``as given``, ``repfx``), with median and spread in ms and the speed-up
    of the plain graph over the model as given on the same runtime."""
    busy = _busy_before()
    as_given = capture(model, inputs).graph  # the model as given, as the runtimes take it (one graph, eval mode)
    runs, rows, here = [], [], _runtimes_here()
    for backend in here:
        for variant, graph in (("as given", as_given), ("repfx", plain)):
            graph_in, inputs_in = deploy_copy(graph, inputs, precision, backend.device)
            try:
                runner = backend.build(BuildRequest(graph_in, inputs_in, precision, _scratch_report()))
            except (BackendUnavailable, LoweringError) as error:
                rows.append({"what": variant, "runtime": backend.name, "skipped": first_line(error, 200)})
                break
            runs.append(lambda runner=runner, inputs_in=inputs_in: runner(*inputs_in))
            rows.append({"what": variant, "runtime": backend.name, "precision": precision})
    timed = [row for row in rows if "skipped" not in row]
    device = next((backend.device for backend in here if backend.device is not None), _device_of(inputs))
    for row, samples in zip(timed, interleaved_samples(runs, device, rounds=ROUNDS, warmup=WARMUP)):
        quartiles = statistics.quantiles(samples, n=4)
        row.update(ms=statistics.median(samples) * 1e3, p25=quartiles[0] * 1e3, p75=quartiles[2] * 1e3)
    for row in timed:
        given = next(other for other in timed if other["runtime"] == row["runtime"] and other["what"] == "as given")
        row["speedup"] = given["ms"] / row["ms"]
    wide = [f"{row['what']} on {row['runtime']}" for row in timed if row["p75"] - row["p25"] > WIDE_SPREAD * row["ms"]]
    if busy or wide:
        warn_user("repfx --benchmark: the machine is busy (" + "; ".join(filter(None, [busy, (
            "wide spread: " + ", ".join(wide)) if wide else ""])) + "): compare rows of one runtime, and measure "
            "again on a quiet machine before quoting a figure")
    return rows


def _runtimes_here() -> list:
    """The registered backends that run on this machine (their probe passes), each one runtime of the table."""
    return [backend for backend in backends() if backend.probe().usable]


def _busy_before() -> str:
    """Why the machine looks busy before the run ("load 3.1 on 2 cores"), or ""."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load {load:.1f} on {cores} cores" if load > 0.5 * cores else ""


def _scratch_report():
    from repfx.report import Report

    return Report(model="benchmark")  # what a backend notes while building a timed variant is not the user's


def _device_of(inputs: tuple) -> torch.device:
    return next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
