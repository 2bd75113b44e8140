"""``python -m repfx.trt``: the deploy command (``repfx.cli.trt``)."""

import sys

from repfx.cli.trt import main

sys.exit(main())
