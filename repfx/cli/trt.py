"""``python -m repfx.trt MODEL``: a training-form model to deployable files in one command.

MODEL is a TorchScript archive (torch.jit.save), an ExportedProgram (torch.export.save,
.pt2) or, with --sample NAME, a bundled training-form model. The model is
re-parameterized, verified, and written as <name>.pt2 and <name>.onnx, plus a
TensorRT engine where TensorRT and an NVIDIA GPU are usable.

Exit codes: 0 ok, 1 verification failed, 2 bad input, a file or directory in the way,
or an OS error such as a full disk (or a backend that was asked for explicitly and is
not available), 130 interrupted (Ctrl-C). --out and --triton-repo are written together
or not at all, and no file repfx did not write is ever replaced.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch

from repfx.errors import BackendUnavailable, CaptureError, LoweringError, VerificationError
from repfx.backends.program import output_names, precision_dtype, output_values, user_input_nodes
from repfx.deploy.staging import Transaction
from repfx.deploy.export import FORMATS, ExportPlan, ExportResult, build_export, plan_export
from repfx.deploy.triton import ModelEntry, TensorSpec, check_model_name, plan_model_entry, render_config
from repfx.capture.loading import BadInput, LoadedModel, load_model
from repfx.cli.progress import PhaseProgress

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
INPUT_MEMORY_SHARE = 8  # inputs may take at most 1/8 of available memory (see _check_inputs_fit)

# What a person can do about the OS errors a run meets most (appended to the one-line message).
OS_ERROR_HINTS = {
    errno.EACCES: "check its permissions, or choose another location",
    errno.EPERM: "check its permissions, or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOSPC: "the disk is full: free some space, or choose another location",
    errno.EDQUOT: "the disk quota is used up: free some space, or choose another location",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2): the usage block buried the message."""

    def error(self, message: str) -> NoReturn:
        first = message.strip().splitlines()[0] if message.strip() else "bad arguments"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {first} (--help shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    from repfx.samples import SAMPLES

    parser = OneLineParser(prog="python -m repfx.trt", description=__doc__.split("\n\n")[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2])
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
                        help="also add the model to a Triton Inference Server model repository, as a new "
                             "version (engine if built, else ONNX)")
    parser.add_argument("--report", choices=("table", "json"), default="table")
    parser.add_argument("--benchmark", action="store_true", help="measure latency before/after on this device")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical checks (not recommended)")
    parser.add_argument("--cost", choices=("macs", "always"), default="macs", help="merge cost rule")
    parser.add_argument("--seed", type=int, default=0, help="seed for sample BN statistics and example inputs")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="trust the model file: allow a pickled nn.Module (torch.save(model)) and turn off the "
                             ".pt2 safety checks (pickled members, shape expressions, guards, pytree imports); "
                             "loading an untrusted file this way can run arbitrary code")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code. Ctrl-C anywhere is exit 130 with one line, nothing left behind."""
    try:
        return _main(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # the transaction has already removed what it staged
        print("repfx.trt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # TorchScript is deprecated
    progress = PhaseProgress(enabled=not args.quiet)
    try:
        result, triton, benchmark = _run(args, progress)
        progress.close()
    except KeyboardInterrupt:
        progress.close(failed=True)
        raise
    except VerificationError as error:
        progress.close(failed=True)
        print(f"repfx.trt: verification failed: {error}", file=sys.stderr)  # all the numbers, not one line
        return EXIT_VERIFICATION_FAILED
    except (BadInput, CaptureError, BackendUnavailable, LoweringError, ValueError) as error:
        progress.close(failed=True)
        return _fail(str(error), EXIT_BAD_INPUT)
    except OSError as error:  # permissions, a full disk, a read-only file system: the user's to fix
        progress.close(failed=True)
        return _fail(_os_error_line(error), EXIT_BAD_INPUT)
    except Exception as error:  # a bug of ours or torch's: still one line, the traceback on request
        progress.close(failed=True)
        if os.environ.get("REPFX_TRACEBACK"):
            raise
        return _fail(f"unexpected {type(error).__name__} while processing the model: {error} "
                     "(set REPFX_TRACEBACK=1 for the traceback and please report it)", EXIT_BAD_INPUT)
    _print_result(args, result, triton, benchmark)
    return EXIT_OK


def _run(args: argparse.Namespace,
         progress: PhaseProgress) -> tuple[ExportResult, ModelEntry | None, list[dict] | None]:
    """Everything the command writes, in one transaction: claimed (and so checked) before the model is
    even loaded, staged while it is rewritten, published together at the end or not at all."""
    name = _output_name(args)
    with Transaction(protected=[args.model] if args.model else []) as transaction:
        plan = plan_export(transaction, args.out, args.formats, name=name, precision=args.precision)
        entry = _plan_triton(transaction, args.triton_repo, plan) if args.triton_repo else None
        transaction.check()  # the two destinations against each other
        model, inputs = _resolve_model(args, progress)
        result = build_export(plan, model, inputs, precision=args.precision,
                              dynamic_batch=args.dynamic_batch is not None, batch_range=args.dynamic_batch,
                              verify=not args.no_verify, cost=args.cost, progress=progress)
        if entry is not None:
            _stage_triton(entry, plan, result, args.dynamic_batch)
        benchmark = _benchmark(model, result, plan, inputs, progress) if args.benchmark else None
        transaction.commit()
    return result, entry, benchmark


def _output_name(args: argparse.Namespace) -> str:
    """The base name of the written files (and the Triton model name, checked first: its rule is Triton's)."""
    name = args.name or args.sample or args.model.stem
    if args.triton_repo:
        check_model_name(name)
    return name


def _resolve_model(args: argparse.Namespace, progress: PhaseProgress) -> tuple[Any, tuple]:
    if args.sample:
        from repfx.samples import build_sample, randomize_bn_, sample_input_shape

        torch.manual_seed(args.seed)
        model = randomize_bn_(build_sample(args.sample), args.seed).eval()
        shapes = args.input_shape or [sample_input_shape(args.sample)]
        return model, _random_inputs(shapes, args.seed)
    progress("load")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    return loaded.model, _inputs_for(loaded, args)


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
    dtypes = dtypes or [torch.float32] * len(shapes)
    _check_inputs_fit(shapes, dtypes)
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                 else torch.zeros(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes))


def _check_inputs_fit(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> None:
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


# --- Triton ---------------------------------------------------------------------------------------------------------

def _plan_triton(transaction: Transaction, repo: Path, plan: ExportPlan) -> ModelEntry:
    """Claim the Triton entry (engine if one is built, else ONNX) before any work: its state is judged now."""
    platform, _ = _triton_artifact(plan)
    return plan_model_entry(transaction, repo, plan.name, platform=platform)


def _triton_artifact(plan: ExportPlan) -> tuple[str, str]:
    """(Triton platform, file kind of the artifact it serves)."""
    if "engine" in plan.wanted:
        return "tensorrt_plan", "engine"
    if "onnx" in plan.wanted:
        return "onnxruntime_onnx", "onnx"
    raise BadInput("--triton-repo needs the ONNX model or the TensorRT engine among --formats")


def _stage_triton(entry: ModelEntry, plan: ExportPlan, result: ExportResult,
                  dynamic_batch: tuple[int, int, int] | None) -> None:
    """Stage the new version and its config.pbtxt next to the staged deploy files.

    Tensor names are the ones both artifacts carry: the program's input names and
    ``output0..N`` (torch-tensorrt's binding names, which the ONNX export reuses).
    """
    inputs = [TensorSpec.like(node.name, node.meta["val"], _symbolic_dims(node.meta["val"]))
              for node in user_input_nodes(result.program)]
    outputs = [TensorSpec.like(output_name, value, _symbolic_dims(value))
               for output_name, value in zip(output_names(result.program), output_values(result.program))]
    text = render_config(entry.model_dir.name, platform=entry.platform, inputs=inputs, outputs=outputs,
                         max_batch_size=dynamic_batch[2] if dynamic_batch else 0,
                         dynamic_batching=bool(dynamic_batch))
    entry.stage(plan.staged(_triton_artifact(plan)[1]), text)


def _symbolic_dims(value: torch.Tensor) -> tuple[int, ...]:
    """Dimensions the program leaves dynamic: ``-1`` in the Triton config."""
    return tuple(index for index, size in enumerate(value.shape) if not isinstance(size, int))


def _benchmark(model: Any, result: ExportResult, plan: ExportPlan, inputs: tuple,
               progress: PhaseProgress) -> list[dict]:
    """Latency of the model as given vs the plain graph (eager) and the ONNX model (onnxruntime), here.

    Runs before the commit, on the staged ONNX file: a failed or interrupted benchmark writes nothing.
    """
    from repfx.backends.onnx import OnnxRuntimeModule
    from repfx.deploy.benchmarking import median_latency_ms

    progress("benchmark")
    original = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    rows = [{"what": "as given (eager, fp32)", "ms": median_latency_ms(original, inputs)},
            {"what": "repfx plain (eager, fp32)", "ms": median_latency_ms(result.plain, inputs)}]
    if "onnx" in result.files:
        session = OnnxRuntimeModule(plan.staged("onnx"), result.program)
        deploy_inputs = tuple(t.to(precision_dtype(result.report.precision)) if t.is_floating_point() else t
                              for t in inputs)
        rows.append({"what": f"repfx plain (onnxruntime, {result.report.precision})",
                     "ms": median_latency_ms(session, deploy_inputs)})
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    return rows


def _print_result(args: argparse.Namespace, result: ExportResult, triton: ModelEntry | None,
                  benchmark: list[dict] | None) -> None:
    from repfx.deploy.weight_range import format_range_table, weight_range_report

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    ranges = weight_range_report(result.plain, dtype)
    if args.report == "json":
        payload = {"report": result.report.to_dict(), "files": {k: str(v) for k, v in result.files.items()},
                   "skipped": result.skipped, "triton_repo": str(triton.model_dir) if triton else None,
                   "triton_version": triton.version if triton else None,
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
    if triton:
        print(f"  {triton.model_dir / str(triton.version)}/ (Triton model version {triton.version}"
              f"{', new model' if triton.is_new else ''})")


def _os_error_line(error: OSError) -> str:
    """``PATH: REASON (what to do)`` for an OS error; its own message when it names no path."""
    reason = error.strerror or str(error)
    line = f"{error.filename}: {reason}" if error.filename else reason
    hint = OS_ERROR_HINTS.get(error.errno)
    return f"{line} ({hint})" if hint else line


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
