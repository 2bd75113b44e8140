"""``python -m repfx``: the demo command (``repfx.cli.demo``)."""

import sys

from repfx.cli.demo import main

sys.exit(main())
