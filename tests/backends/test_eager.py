"""The eager backend: ``repfx.compile(backend="eager")`` runs the verified plain graph itself."""

from __future__ import annotations

import repfx

from deploy_fixtures import BLOCKS
from helpers import assert_matches, assert_ops


def test_compile_eager_is_the_verified_plain_graph(net, x):
    deployed = repfx.compile(net, (x,), backend="eager")
    assert deployed.backend == "eager" and deployed.report.backend == "eager"
    assert deployed.report.backend_max_abs_error <= deployed.report.backend_tolerance
    assert_matches(net, deployed, x)
    assert_ops(deployed, x, convolution=BLOCKS, batch_norm=0, add=0)
