import sys

from repfx.cli.trt import main

sys.exit(main())
