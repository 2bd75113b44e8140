"""Command-line arguments shared by both CLIs: what the merge decisions plan for (``--cost``, ``--target``,
``--batch``, ``--max-param-growth``) how a difference is judged (``--rtol``, ``--atol``, ``--strict``), and what INT8 is calibrated on and judged by.

Checked while the arguments are parsed, so a misspelt GPU is one argparse line
naming the known ones, before any model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from repfx.int8.metrics import Target
from repfx.passes.cost import DEFAULT_MAX_PARAM_GROWTH, check_param_growth
from repfx.targets import COSTS, check_target


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost", choices=COSTS, default="latency",
                        help="merge cost rule: modeled time on the target (default), measured time, MACs, always")
    parser.add_argument("--target", type=target_argument, metavar="DEVICE",
                        help="device the model will run on: cpu, cuda, or a GPU not here (cuda:h200, cuda:a100, "
                             "cuda:l4, ...); default: where it is built (the engine: cuda)")
    parser.add_argument("--batch", type=positive_int, metavar="N",
                        help="batch size the merge decisions plan for (default: the example input's)")
    parser.add_argument("--max-param-growth", type=param_growth, metavar="X", default=DEFAULT_MAX_PARAM_GROWTH,
                        help="refuse a merge holding more than X times the parameters of the ops it replaces "
                             f"(default {DEFAULT_MAX_PARAM_GROWTH:g}; 'none': no bound)")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The tolerance of every check (rewrite, backend, ONNX Runtime), judged alike (``repfx.settings.Settings``)."""
    parser.add_argument("--rtol", type=tolerance, metavar="R",
                        help="relative tolerance of every check, times max(1, max|y|) (default: the dtype's, "
                             "1e-4 for fp32; the precision's for a backend)")
    parser.add_argument("--atol", type=tolerance, metavar="A", help="absolute tolerance added to it (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a difference beyond tolerance that fp32 rounding through discontinuous ops "
                             "(top-k, NMS) explains, instead of accepting it with a note")


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``--precision int8`` needs: the user's calibration data and the held-out target (``repfx.int8``)."""
    parser.add_argument("--calibration", type=Path, metavar="PATH",
                        help="INT8 calibration data: a folder of images (timm's eval transform), a .npy/.npz, or a "
                             ".pt of tensors (read weights-only); required with --precision int8")
    parser.add_argument("--int8-target", type=int8_target, metavar="AGREE:SNR", default=None,
                        help="held-out target of the INT8 model against fp32: top-1 agreement in %% and SNR in dB "
                             "(default 99:20); missed, the run fails and writes nothing")
    parser.add_argument("--int8-accept-below-target", action="store_true",
                        help="write the INT8 model even when it misses --int8-target (the report says so)")


def int8_target(text: str) -> tuple[float, float]:
    """``99:20`` -> (0.99, 20.0): agreement in percent, SNR in dB."""
    agreement, _, snr = text.partition(":")
    try:
        value = (float(agreement) / 100, float(snr))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AGREE:SNR such as 99:20 (percent, dB), got {text!r}") from None
    try:
        Target(*value)  # the one check of a target, in the API's terms (a fraction): said here in the CLI's
    except ValueError:
        raise argparse.ArgumentTypeError(f"agreement is a percentage in [0, 100] and SNR a finite dB, got {text!r}") \
            from None
    return value


def tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def target_argument(text: str) -> str:
    try:
        return check_target(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def param_growth(text: str) -> float | None:
    try:
        return None if text.lower() == "none" else check_param_growth(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'none', got {text!r}") from error


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
