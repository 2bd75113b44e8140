"""``python -m repfx.trt MODEL``: a training-form model to deployable files in one command.

MODEL is a TorchScript archive (torch.jit.save), an ExportedProgram (torch.export.save,
.pt2) or, with --sample NAME, a bundled training-form model. The model is
re-parameterized, verified, and written as <name>.pt2 and <name>.onnx, plus a
TensorRT engine where TensorRT and an NVIDIA GPU are usable.

Exit codes: 0 ok, 1 verification failed, 2 bad input (or a backend that was asked
for explicitly and is not available).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import BackendUnavailable, CaptureError, LoweringError, VerificationError
from ..backends.program import output_names, precision_dtype, output_values, user_input_nodes
from ..exporter import FORMATS, ExportResult, export
from .loading import BadInput, LoadedModel, load_model
from .progress import PhaseProgress

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from repfx.samples import SAMPLES

    parser = argparse.ArgumentParser(prog="python -m repfx.trt", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[2])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", type=Path, help="TorchScript archive or ExportedProgram (.pt2)")
    source.add_argument("--sample", choices=sorted(SAMPLES), metavar="NAME",
                        help=f"a bundled training-form model: {', '.join(sorted(SAMPLES))}")
    parser.add_argument("--input-shape", type=_shape, action="append", metavar="1x3x224x224",
                        help="example input shape, once per input (default: from the .pt2 / the sample)")
    parser.add_argument("--dynamic-batch", type=_batch_range, metavar="MIN:OPT:MAX",
                        help="make the batch dimension dynamic; MIN:OPT:MAX is TensorRT's optimization profile")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, default=Path("repfx-out"), help="output directory (default: repfx-out)")
    parser.add_argument("--name", help="base name of the written files (default: the model file's stem / sample)")
    parser.add_argument("--formats", type=_formats, metavar="pt2,onnx,engine",
                        help="what to write (default: pt2 and onnx, and the engine where TensorRT is usable; "
                             "naming engine makes a missing TensorRT an error)")
    parser.add_argument("--triton-repo", type=Path, metavar="DIR",
                        help="also lay out a Triton Inference Server model repository (engine if built, else ONNX)")
    parser.add_argument("--report", choices=("table", "json"), default="table")
    parser.add_argument("--benchmark", action="store_true", help="measure latency before/after on this device")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical checks (not recommended)")
    parser.add_argument("--cost", choices=("macs", "always"), default="macs", help="merge cost rule")
    parser.add_argument("--seed", type=int, default=0, help="seed for sample BN statistics and example inputs")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a pickled nn.Module (torch.save(model)); unpickling runs arbitrary code")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # TorchScript is deprecated
    progress = PhaseProgress(enabled=not args.quiet)
    try:
        model, inputs, name = _resolve_model(args, progress)
        if args.triton_repo:
            from ..triton import check_model_name

            check_model_name(name)  # before any work: a bad name must not leave exported files behind
        result = export(
            model, inputs, args.out, args.formats, name=name, precision=args.precision,
            dynamic_batch=args.dynamic_batch is not None, batch_range=args.dynamic_batch,
            verify=not args.no_verify, cost=args.cost, protected=[args.model] if args.model else [],
            progress=progress)
        triton_dir = _write_triton(args, result, name) if args.triton_repo else None
        benchmark = _benchmark(model, result, inputs, progress) if args.benchmark else None
        progress.close()
    except VerificationError as error:
        progress.close(failed=True)
        print(f"repfx.trt: verification failed: {error}", file=sys.stderr)  # all the numbers, not one line
        return EXIT_VERIFICATION_FAILED
    except (BadInput, CaptureError, BackendUnavailable, LoweringError, ValueError, FileNotFoundError) as error:
        progress.close(failed=True)
        return _fail(str(error), EXIT_BAD_INPUT)
    except Exception as error:  # a bug of ours or torch's: still one line, the traceback on request
        progress.close(failed=True)
        if os.environ.get("REPFX_TRACEBACK"):
            raise
        return _fail(f"unexpected {type(error).__name__} while processing the model: {error} "
                     "(set REPFX_TRACEBACK=1 for the traceback and please report it)", EXIT_BAD_INPUT)
    _print_result(args, result, triton_dir, benchmark)
    return EXIT_OK


def _resolve_model(args: argparse.Namespace, progress: PhaseProgress) -> tuple[Any, tuple, str]:
    if args.sample:
        from repfx.samples import build_sample, randomize_bn_, sample_input_shape

        torch.manual_seed(args.seed)
        model = randomize_bn_(build_sample(args.sample), args.seed).eval()
        shapes = args.input_shape or [sample_input_shape(args.sample)]
        return model, _random_inputs(shapes, args.seed), args.name or args.sample
    progress("load")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    return loaded.model, _inputs_for(loaded, args), args.name or args.model.stem


def _inputs_for(loaded: LoadedModel, args: argparse.Namespace) -> tuple:
    if args.input_shape:
        if loaded.example_inputs is not None and len(args.input_shape) != len(loaded.example_inputs):
            raise BadInput(f"{args.model} takes {len(loaded.example_inputs)} input(s), "
                           f"--input-shape was given {len(args.input_shape)} time(s)")
        recorded = [t.dtype for t in loaded.example_inputs] if loaded.example_inputs is not None else None
        return _random_inputs(args.input_shape, args.seed, dtypes=recorded)
    if loaded.example_inputs is None:
        raise BadInput(f"{args.model} ({loaded.kind}) does not record its input shapes: pass --input-shape, "
                       "e.g. --input-shape 1x3x224x224 (once per input)")
    return _random_inputs([tuple(t.shape) for t in loaded.example_inputs], args.seed,
                          dtypes=[t.dtype for t in loaded.example_inputs])


def _random_inputs(shapes: list[tuple[int, ...]], seed: int, dtypes: list[torch.dtype] | None = None) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    return tuple(torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                 else torch.zeros(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes))


def _write_triton(args: argparse.Namespace, result: ExportResult, name: str) -> Path:
    """A Triton model repository around the engine (if built) or the ONNX model.

    Tensor names are the ones both artifacts carry: the program's input names and
    ``output0..N`` (torch-tensorrt's binding names, which the ONNX export reuses).
    """
    from ..triton import TensorSpec, write_model_repository

    engine = result.files.get("engine")
    artifact, platform = (engine, "tensorrt_plan") if engine else (result.files.get("onnx"), "onnxruntime_onnx")
    if artifact is None:
        raise BadInput("--triton-repo needs the ONNX model or the TensorRT engine among --formats")
    inputs = [TensorSpec.like(node.name, node.meta["val"], _symbolic_dims(node.meta["val"]))
              for node in user_input_nodes(result.program)]
    outputs = [TensorSpec.like(output_name, value, _symbolic_dims(value))
               for output_name, value in zip(output_names(result.program), output_values(result.program))]
    return write_model_repository(args.triton_repo, name, artifact_path=artifact, platform=platform,
                                  inputs=inputs, outputs=outputs,
                                  max_batch_size=args.dynamic_batch[2] if args.dynamic_batch else 0,
                                  dynamic_batching=bool(args.dynamic_batch), overwrite=True)


def _symbolic_dims(value: torch.Tensor) -> tuple[int, ...]:
    """Dimensions the program leaves dynamic: ``-1`` in the Triton config."""
    return tuple(index for index, size in enumerate(value.shape) if not isinstance(size, int))


def _benchmark(model: Any, result: ExportResult, inputs: tuple, progress: PhaseProgress) -> list[dict]:
    """Latency of the model as given vs the plain graph (eager) and the ONNX model (onnxruntime), here."""
    from ..backends.onnx import OnnxRuntimeModule
    from ..benchmarking import median_latency_ms

    progress("benchmark")
    original = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    rows = [{"what": "as given (eager, fp32)", "ms": median_latency_ms(original, inputs)},
            {"what": "repfx plain (eager, fp32)", "ms": median_latency_ms(result.plain, inputs)}]
    if "onnx" in result.files:
        session = OnnxRuntimeModule(result.files["onnx"], result.program)
        deploy_inputs = tuple(t.to(precision_dtype(result.report.precision)) if t.is_floating_point() else t
                              for t in inputs)
        rows.append({"what": f"repfx plain (onnxruntime, {result.report.precision})",
                     "ms": median_latency_ms(session, deploy_inputs)})
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    return rows


def _print_result(args: argparse.Namespace, result: ExportResult, triton_dir: Path | None,
                  benchmark: list[dict] | None) -> None:
    from ..precision import format_range_table, weight_range_report

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    ranges = weight_range_report(result.plain, dtype)
    if args.report == "json":
        payload = {"report": result.report.to_dict(), "files": {k: str(v) for k, v in result.files.items()},
                   "skipped": result.skipped, "triton_repo": str(triton_dir) if triton_dir else None,
                   "weight_range": [_range_row(row) for row in ranges if row.has_problem],
                   "weight_range_checked": {"dtype": str(dtype), "tensors": len(ranges)},
                   "benchmark": benchmark}
        print(json.dumps(payload, indent=2, default=str))
        return
    print(result.report)
    print()
    print(format_range_table(ranges, dtype))
    if benchmark:
        print("\nlatency on this machine (median):")
        for row in benchmark:
            print(f"  {row['what']:<36} {row['ms']:8.2f} ms  {row['speedup']:5.2f}x")
    print("\nwrote:")
    for path in result.files.values():
        print(f"  {path}")
    if triton_dir:
        print(f"  {triton_dir}/ (Triton model repository entry)")


def _range_row(row: Any) -> dict:
    return {"node": row.node, "tensor": row.tensor, "numel": row.numel, "overflow": row.overflow,
            "underflow": row.underflow, "max_abs": row.max_abs, "min_abs_nonzero": row.min_abs_nonzero}


def _fail(message: str, code: int) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"repfx.trt: error: {first_line}", file=sys.stderr)
    return code


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}") from None
    if not shape or any(size <= 0 for size in shape):
        raise argparse.ArgumentTypeError(f"every dimension must be a positive integer, got {text!r}")
    return shape


def _batch_range(text: str) -> tuple[int, int, int]:
    try:
        low, opt, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX like 1:8:32, got {text!r}") from None
    if not 1 <= low <= opt <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= OPT <= MAX, got {text!r}")
    return low, opt, high


def _formats(text: str) -> list[str]:
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"formats are a comma-separated subset of {','.join(FORMATS)}, got {text!r}")
    return formats
