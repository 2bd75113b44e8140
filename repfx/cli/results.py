"""What ``python -m repfx.trt`` prints once it has written everything: the report, weight ranges, latency, files."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from repfx.backends.precision import precision_dtype
from repfx.deploy.export import ExportResult
from repfx.deploy.triton import ModelEntry


def print_result(args: argparse.Namespace, result: ExportResult, triton: ModelEntry | None,
                 benchmark: list[dict] | None) -> None:
    from repfx.deploy.weight_range import format_range_table, weight_range_report

    # The reduced precision being deployed; an fp32 deploy is checked against fp16, the usual next step, and so is
    # an INT8 one: TensorRT runs the layers left in float in fp16.
    dtype = torch.float16 if args.precision in ("fp32", "int8") else precision_dtype(args.precision)
    ranges = weight_range_report(result.plain, dtype)
    if args.report == "json":
        payload = {"report": result.report.to_dict(), "files": {k: str(v) for k, v in result.files.items()},
                   "skipped": result.skipped, "triton_repo": str(triton.model_dir) if triton else None,
                   "triton_version": triton.version if triton else None,
                   "weight_range": [_range_row(row) for row in ranges if row.has_problem()],
                   "weight_range_checked": {"dtype": str(dtype), "tensors": len(ranges)},
                   "benchmark": benchmark}
        print(json.dumps(payload, indent=2, default=str))
        return
    print(result.report)
    print()
    print(format_range_table(ranges, dtype))
    if benchmark:
        print("\nlatency on this machine, each runtime running the model as given and the plain graph in turns "
              "(median ms, 25th-75th percentile, speed-up within the runtime):")
        for row in benchmark:
            print(_benchmark_line(row))
    print("\nwrote:")
    for path in result.files.values():
        print(f"  {path}")
    if triton:
        print(f"  {triton.model_dir / str(triton.version)}/ (Triton model version {triton.version}"
              f"{', new model' if triton.is_new else ''})")


def _benchmark_line(row: dict) -> str:
    """``  onnx        as given   1.23 ms (1.20-1.31)  1.00x``: median, 25th-75th percentile, speed-up within the
    runtime (the model as given on the same runtime is 1.00x)."""
    if "skipped" in row:
        return f"  {row['runtime']:<12} {row['what']:<9} not measured: {row['skipped']}"
    return (f"  {row['runtime']:<12} {row['what']:<9} {row['ms']:8.3f} ms ({row['p25']:.3f}-{row['p75']:.3f})  "
            f"{row['speedup']:5.2f}x")


def _range_row(row: Any) -> dict:
    return {"node": row.node, "tensor": row.tensor, "numel": row.numel, "overflow": row.overflow,
            "underflow": row.underflow, "max_abs": row.max_abs, "min_abs_nonzero": row.min_abs_nonzero}
