"""Ctrl-C for the commands: remembered even where Python loses it, and harmless once the command is done.

Python raises ``KeyboardInterrupt`` at whatever bytecode runs when SIGINT arrives. Inside a
finalizer or a weakref callback (importlib's module locks have one) it is printed as
"Exception ignored" and lost, and the run would go on to publish its files as if no one
had asked it to stop. ``remember`` installs a handler that raises as Python's does and
also counts; ``check`` raises again where the run must not go on (before it publishes).
After the command, ``exit_at_once`` makes a Ctrl-C during the interpreter's teardown end
the process with the command's own code.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

_received = 0  # SIGINTs seen since ``remember``


def remember() -> None:
    """Count each Ctrl-C and raise ``KeyboardInterrupt`` as Python's handler does (only where that handler is set:
    a Ctrl-C ignored or handled by an embedding program stays so)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _count_and_raise)


def _count_and_raise(signum: int, frame: FrameType | None) -> None:
    global _received
    _received += 1
    raise KeyboardInterrupt


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C came since ``remember``, even one whose exception was lost."""
    if _received:
        raise KeyboardInterrupt


def exit_at_once(code: int) -> None:
    """After the command, a Ctrl-C during the interpreter's teardown (torch's, onnxruntime's threads) ends the
    process with the command's own code: everything is written and said by then, so nothing is left to undo
    and no traceback from a half torn-down interpreter should follow the report."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        return  # Ctrl-C is ignored, or not Python's to handle
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            pass
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(code))
