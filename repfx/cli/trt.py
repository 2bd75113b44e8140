"""``python -m repfx.trt MODEL``: a training-form model to deployable files in one command.

MODEL is a TorchScript archive (torch.jit.save), an ExportedProgram (torch.export.save,
.pt2) or, with --sample NAME, a bundled training-form model. The model is
re-parameterized, verified, and written as <name>.pt2 and <name>.onnx, plus a
TensorRT engine where TensorRT and an NVIDIA GPU are usable. A pickled nn.Module that
torch.export cannot capture whole is refused (exit 2) in one line naming the line that
blocks it and its folded part to export instead.

Exit codes: 0 ok, 1 verification failed, 2 bad input, a file or directory in the way,
or an OS error such as a full disk (or a backend that was asked for explicitly and is
not available), 130 interrupted (Ctrl-C). --out and --triton-repo are written together
or not at all, and no file repfx did not write is ever replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from repfx.backends.formats import export_formats
from repfx.backends.precision import PRECISIONS
from repfx.capture.failure import loggers_at
from repfx.capture.inputs import InputSpec, random_inputs
from repfx.capture.loading import BadInput, LoadedModel, load_model
from repfx.cli import interrupts
from repfx.cli.benchmark import benchmark as run_benchmark
from repfx.cli.memory import check_inputs_fit
from repfx.cli.planning import add_check_arguments, add_int8_arguments, add_planning_arguments
from repfx.int8.deploy import int8_options
from repfx.cli.progress import PhaseProgress
from repfx.cli.results import print_result
from repfx.cli.triton_entry import plan_triton, stage_triton
from repfx.deploy.export import ExportResult, build_export, plan_export
from repfx.deploy.staging import Transaction
from repfx.deploy.triton_config import check_model_name
from repfx.errors import (BackendUnavailable, CaptureError, InputMismatch, LoweringError, VerificationError,
                          first_line)
from repfx.settings import Settings

if TYPE_CHECKING:
    from repfx.deploy.triton import ModelEntry

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
THIRD_PARTY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "torchvision")  # silenced below ERROR by --quiet

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
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {first_line(message, limit=None, empty='bad arguments')} "
                                  "(--help shows the usage)\n")


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
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--out", type=_directory, default=Path("repfx-out"),
                        help="output directory (default: repfx-out)")
    parser.add_argument("--name", help="base name of the written files (default: the model file's stem / sample)")
    parser.add_argument("--formats", type=_formats, metavar="pt2,onnx,engine",
                        help="what to write (default: pt2 and onnx, and the engine where TensorRT is usable; "
                             "naming engine makes a missing TensorRT an error)")
    parser.add_argument("--triton-repo", type=_directory, metavar="DIR",
                        help="also add the model to a Triton Inference Server model repository, as a new "
                             "version (engine if built, else ONNX)")
    parser.add_argument("--report", choices=("table", "json"), default="table")
    parser.add_argument("--benchmark", action="store_true", help="measure latency before/after on this device")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical checks (not recommended)")
    add_planning_arguments(parser)
    add_check_arguments(parser)
    add_int8_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed for sample BN statistics and example inputs")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="trust the model file: allow a pickled nn.Module (torch.save(model)) and turn off the "
                             ".pt2 safety checks (pickled members, shape expressions, guards, pytree imports); "
                             "loading an untrusted file this way can run arbitrary code")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code. Ctrl-C anywhere is exit 130 with one line: before the files are
    published nothing is left behind; after, the line names them and says they are complete."""
    runs: list[Transaction] = []  # the run's transaction, once it exists
    try:
        return _main(build_parser().parse_args(_joined_shapes(sys.argv[1:] if argv is None else argv)), runs)
    except KeyboardInterrupt:  # an uncommitted transaction has already removed what it staged
        print(_interrupted_line(runs), file=sys.stderr)
        return EXIT_INTERRUPTED


def _interrupted_line(runs: list[Transaction]) -> str:
    if not runs or not runs[0].committed:
        return "repfx.trt: interrupted"  # nothing was written
    written = ", ".join(str(path) for path in runs[0].published)
    return f"repfx.trt: interrupted after writing {written}: the files are complete"


def _main(args: argparse.Namespace, runs: list[Transaction]) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # TorchScript is deprecated
    progress = PhaseProgress(enabled=not args.quiet)
    # --quiet: the libraries' own warnings about what they skip (onnxscript's constant folding, torch.onnx's
    # "torchvision is not installed. Skipping torchvision::nms") are not the user's to act on either.
    quiet = loggers_at(logging.ERROR, THIRD_PARTY_LOGGERS) if args.quiet else contextlib.nullcontext()
    try:
        with quiet:
            result, triton, benchmark = _run(args, progress, runs)
        progress.close()
    except KeyboardInterrupt:
        progress.close(failed=True)
        raise
    except VerificationError as error:
        progress.close(failed=True)
        print(f"repfx.trt: verification failed: {error}", file=sys.stderr)  # all the numbers, not one line
        return EXIT_VERIFICATION_FAILED
    except InputMismatch as error:
        progress.close(failed=True)
        return _fail(_input_shape_fix(error), EXIT_BAD_INPUT)
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
    print_result(args, result, triton, benchmark)
    return EXIT_OK


def _run(args: argparse.Namespace, progress: PhaseProgress,
         runs: list[Transaction]) -> tuple[ExportResult, ModelEntry | None, list[dict] | None]:
    """Everything the command writes, in one transaction (appended to ``runs``): claimed (and so checked) before
    the model is even loaded, staged while it is rewritten, published together at the end or not at all."""
    name = _output_name(args)
    with Transaction(protected=[args.model] if args.model else []) as transaction:
        runs.append(transaction)
        plan = plan_export(transaction, args.out, args.formats, name=name, precision=args.precision)
        entry = plan_triton(transaction, args.triton_repo, plan) if args.triton_repo else None
        model, inputs = _resolve_model(args, progress)
        settings = Settings(verify=not args.no_verify, rtol=args.rtol, atol=args.atol, strict=args.strict,
                            dynamic_batch=args.dynamic_batch is not None, cost=args.cost, target=args.target,
                            batch=args.batch, precision=args.precision, max_param_growth=args.max_param_growth,
                            progress=progress, int8=int8_options(args.int8_target, args.int8_accept_below_target))
        result = build_export(plan, model, inputs, settings, batch_range=args.dynamic_batch,
                              calibration=args.calibration)
        if entry is not None:
            stage_triton(entry, plan, result, args.dynamic_batch)
        if args.benchmark:
            progress("benchmark")  # before the commit, on the staged files: a failed benchmark writes nothing
        benchmark = run_benchmark(model, result.plain, inputs, args.precision) if args.benchmark else None
        interrupts.check()  # a Ctrl-C Python lost on the way (in a finalizer) still stops the run here
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
        return model, _example_inputs(shapes, args.seed)
    progress("load")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    return loaded.model, _inputs_for(loaded, args)


def _inputs_for(loaded: LoadedModel, args: argparse.Namespace) -> tuple:
    recorded = loaded.example_inputs
    if recorded is None and not args.input_shape:
        raise BadInput(f"{args.model} ({loaded.kind}) does not record its input shapes: pass --input-shape, "
                       "e.g. --input-shape 1x3x224x224 (once per input)")
    if recorded is not None and args.input_shape and len(args.input_shape) != len(recorded):
        raise BadInput(f"{args.model} takes {len(recorded)} input(s), "
                       f"--input-shape was given {len(args.input_shape)} time(s)")
    shapes = args.input_shape or [tuple(t.shape) for t in recorded]
    return _example_inputs(shapes, args.seed, dtypes=[t.dtype for t in recorded] if recorded is not None else None)


def _example_inputs(shapes: list[tuple[int, ...]], seed: int, dtypes: list[torch.dtype] | None = None) -> tuple:
    """Seeded inputs of ``shapes`` (float32 unless ``dtypes`` says otherwise), refused first if they cannot fit."""
    dtypes = dtypes or [torch.float32] * len(shapes)
    check_inputs_fit(shapes, dtypes)
    return random_inputs([InputSpec(tuple(shape), dtype) for shape, dtype in zip(shapes, dtypes)], seed)


def _input_shape_fix(error: InputMismatch) -> str:
    """The mismatch with its fix said in this command's option: ``--input-shape``, once per input."""
    if error.shapes:
        return f"{error.problem}: pass {' '.join(f'--input-shape {shape}' for shape in error.shapes)}"
    if error.names:
        return (f"{error.problem}: pass --input-shape once per input, in this order: {', '.join(error.names)} "
                "(e.g. --input-shape 1x3x224x224 --input-shape ...)")
    return f"{error.problem}: pass --input-shape with the shape the model takes"


def _os_error_line(error: OSError) -> str:
    """``PATH: REASON (what to do)`` for an OS error; its own message when it names no path."""
    reason = error.strerror or str(error)
    line = f"{error.filename}: {reason}" if error.filename else reason
    hint = OS_ERROR_HINTS.get(error.errno)
    return f"{line} ({hint})" if hint else line


def _fail(message: str, code: int) -> int:
    print(f"repfx.trt: error: {first_line(message, limit=None, empty='failed')}", file=sys.stderr)
    return code


def _directory(text: str) -> Path:
    """A directory argument; an empty one (``--out ''``, an unset shell variable) would mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty string (to write here, say --out .)")
    return Path(text)


def _joined_shapes(argv: list[str]) -> list[str]:
    """``--input-shape -1x3x224x224`` as ``--input-shape=-1x3x224x224``: argparse reads a value starting with
    ``-`` as an option, and the user would be told "expected one argument" instead of what is wrong with -1."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] == "--input-shape" and arg.startswith("-") and arg[1:2].isdigit():
            joined[-1] = f"--input-shape={arg}"
        else:
            joined.append(arg)
    return joined


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}") from None
    if any(size < 0 for size in shape):
        raise argparse.ArgumentTypeError(f"every dimension must be a positive integer, got {text!r} (a dynamic "
                                         "batch is --dynamic-batch MIN:OPT:MAX, with a concrete example shape)")
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
    formats, known = [part.strip() for part in text.split(",") if part.strip()], export_formats()
    unknown = [fmt for fmt in formats if fmt not in known]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"formats are a comma-separated subset of {','.join(known)}, got {text!r}")
    return formats
