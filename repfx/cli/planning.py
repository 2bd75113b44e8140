"""Command-line arguments that say what the merge decisions plan for (``--target``, ``--batch``), shared by both CLIs.

Checked while the arguments are parsed, so a misspelt GPU is one argparse line
naming the known ones, before any model is loaded.
"""

from __future__ import annotations

import argparse

from repfx.targets import check_target


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
