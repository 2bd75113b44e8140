"""Every test plans merges for one pinned CPU profile, so no decision depends on how busy this machine is.

The default cost rule (``cost="latency"``) prices forms on the measured profile of the
target device, cached in repfx's cache directory. The session points that directory
(``REPFX_CACHE_DIR``, inherited by CLI subprocesses and xdist workers) at a temporary
one holding ``PINNED`` under this machine's CPU keys (any thread count, and ONNX Runtime's, which
``backend="onnx"`` plans with): tests never measure, never write
the user's cache, and decide alike on every machine. Tests of the measurement and of
the cache itself use their own directories.
"""

from __future__ import annotations

import json
import os
import tempfile

from repfx.backends import runtime_named
from repfx.passes.cost import DeviceProfile
from repfx.targets.cache import FILE_NAME, MARK
from repfx.targets.microbench import cache_key

PINNED = DeviceProfile("cpu: pinned for tests", "cpu", {"float32": 5e10}, bandwidth=1e10, overhead_s=1e-5,
                       source="pinned by tests/conftest.py")


def pytest_configure(config) -> None:
    if os.environ.get("REPFX_TEST_CACHE_DIR"):  # an xdist worker: the controller made it already
        os.environ["REPFX_CACHE_DIR"] = os.environ["REPFX_TEST_CACHE_DIR"]
        return
    directory = tempfile.mkdtemp(prefix="repfx-test-cache-")
    with open(os.path.join(directory, FILE_NAME), "w", encoding="utf-8") as file:
        pinned = {cache_key("cpu", threads): PINNED.to_dict() for threads in range(1, 2 * (os.cpu_count() or 1) + 1)}
        pinned[cache_key("cpu", runtime=runtime_named("onnxruntime"))] = PINNED.to_dict()
        json.dump({"written_by": MARK, "profiles": pinned}, file)
    os.environ["REPFX_CACHE_DIR"] = os.environ["REPFX_TEST_CACHE_DIR"] = directory
