"""The inductor backend: ``repfx.compile(backend="inductor")`` is ``torch.compile`` of the plain graph."""

from __future__ import annotations

import repfx


from helpers import assert_matches


def test_compile_inductor_matches(net, x):
    deployed = repfx.compile(net, (x,), backend="inductor")
    assert_matches(net, deployed, x)
