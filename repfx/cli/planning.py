"""Command-line arguments that say what the merge decisions plan for (``--cost``, ``--target``, ``--batch``),
shared by both CLIs.

Checked while the arguments are parsed, so a misspelt GPU is one argparse line
naming the known ones, before any model is loaded.
"""

from __future__ import annotations

import argparse

from repfx.targets import COSTS, check_target


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost", choices=COSTS, default="latency",
                        help="merge cost rule: modeled time on the target (default), measured time, MACs, always")
    parser.add_argument("--target", type=target_argument, metavar="DEVICE",
                        help="device the model will run on: cpu, cuda, or a GPU not here (cuda:h200, cuda:a100, "
                             "cuda:l4, ...); default: where it is built (the engine: cuda)")
    parser.add_argument("--batch", type=positive_int, metavar="N",
                        help="batch size the merge decisions plan for (default: the example input's)")


def target_argument(text: str) -> str:
    try:
        return check_target(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
