"""``python -m repfx.trt MODEL``: training-form model -> verified plain graph -> .pt2 / .onnx / TensorRT engine.

``run`` is the command's entry point (``python -m repfx.trt`` and the ``repfx-trt`` script). It
imports the command inside it: torch and onnx take seconds to import, and a Ctrl-C meanwhile is
the command's one line and exit 130 like one at any later moment, not a traceback through torch.
Importing this package imports nothing heavy (``repfx`` itself is lazy).
"""

import sys

from repfx.cli import interrupts

EXIT_INTERRUPTED = 130  # as repfx.cli.trt: 128 + SIGINT


def run() -> int:
    """Run the command with ``sys.argv``; its exit code."""
    interrupts.remember()
    try:
        from repfx.cli.trt import main
    except KeyboardInterrupt:
        print("repfx.trt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = main()
    interrupts.exit_at_once(code)
    return code
