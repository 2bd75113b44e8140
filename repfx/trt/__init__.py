"""``python -m repfx.trt MODEL``: training-form model -> verified plain graph -> .pt2 / .onnx / TensorRT engine.

``run`` is the command's entry point (``python -m repfx.trt`` and the ``repfx-trt`` script). It
imports the command inside it: torch and onnx take seconds to import, and a Ctrl-C meanwhile is
the command's one line and exit 130 like one at any later moment, not a traceback through torch.
Importing this package imports nothing heavy (``repfx`` itself is lazy).
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # as repfx.cli.trt: 128 + SIGINT


def run() -> int:
    """Run the command with ``sys.argv``; its exit code."""
    try:
        from repfx.cli.trt import main
    except KeyboardInterrupt:
        print("repfx.trt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = main()
    _exit_at_once_on_interrupt(code)
    return code


def _exit_at_once_on_interrupt(code: int) -> None:
    """After the command, a Ctrl-C during the interpreter's teardown (torch's, onnxruntime's threads) ends the
    process with the command's own code: everything is written and said by then, so nothing is left to undo
    and no traceback from a half torn-down interpreter should follow the report."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # Ctrl-C is someone else's (an embedding program) or ignored
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            pass
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(code))
