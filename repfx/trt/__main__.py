"""``python -m repfx.trt``: the deploy command (``repfx.cli.trt``), started by ``repfx.trt.run``."""

import sys

from repfx.trt import run

sys.exit(run())
