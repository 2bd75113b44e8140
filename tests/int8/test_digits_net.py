"""The trained digits net INT8 tests rely on: accurate in fp32, folded by repfx, and its injected form widening
per-channel weight ranges when folded (what makes post-training INT8 of plain RepVGG nets collapse).

The net is trained once per machine (a few seconds) and cached under pytest's cache directory.
"""

from __future__ import annotations

import pytest
import torch

import repfx
from repfx.capture.export import capture
from repfx.int8.weight_stats import weight_stats
from helpers import assert_ops
from int8.digits import WIDTHS, accuracy, digits, inject_near_dead, trained_net

pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn (a test extra)")
pytestmark = pytest.mark.slow  # trains ~8 s the first time on a 2-core machine; folds two 10-block nets

BLOCKS = len(WIDTHS)
IDENTITY_BLOCKS = sum(1 for before, after in zip((1, *WIDTHS), WIDTHS) if before == after)


@pytest.fixture(scope="module")
def data():
    return digits(seed=0)


@pytest.fixture(scope="module")
def net(request):
    model, _ = trained_net(request.config.cache.mkdir("repfx-int8-digits"))
    return model


@pytest.fixture(scope="module")
def injected(net, data):
    return inject_near_dead(net, data)


def test_the_trained_net_is_accurate(net, data):
    assert accuracy(net, data.test_x, data.test_y) >= 0.95


def test_the_injection_keeps_accuracy_and_is_as_described(net, data, injected):
    model, done = injected
    assert [entry.scale for entry in done] == [318.0, 8.8, 112.0]
    assert accuracy(model, data.test_x, data.test_y) >= accuracy(net, data.test_x, data.test_y) - 0.01
    for entry in done:
        identity = model.blocks[entry.block].identity
        scale = identity.weight[entry.channel].detach().abs() / (identity.running_var[entry.channel] + identity.eps).sqrt()
        assert float(scale) == pytest.approx(entry.scale, rel=1e-5)


def test_repfx_folds_every_block_into_one_conv(net, data):
    x = data.test_x[:8]
    plain = repfx.reparameterize(net, (x,), dynamic_batch=True)
    branches = 2 * BLOCKS + IDENTITY_BLOCKS  # a BN per conv, one per identity
    assert_ops(net, x, convolution=2 * BLOCKS, batch_norm=branches)
    assert_ops(plain, x, convolution=BLOCKS, batch_norm=0, add=0)
    assert len(plain.repfx_report.rewrites) == BLOCKS
    assert accuracy(plain, data.test_x, data.test_y) == accuracy(net, data.test_x, data.test_y)


def test_folding_the_injected_net_widens_per_channel_ranges(injected, data):
    model, done = injected
    x = data.test_x[:8]
    plain = repfx.reparameterize(model, (x,))
    stats = weight_stats(plain, training=capture(model, (x,)).graph, rewrites=plain.repfx_report.rewrites)
    assert len(stats) == BLOCKS + 1  # and the head
    for entry in done:
        layer = stats[entry.block]
        assert layer.module == f"blocks.{entry.block}" and layer.before is not None
        assert layer.max_over_std.largest > 2 * layer.before.largest, layer
        assert layer.identity_tap_share >= 0.8
        if entry.scale > 100:  # one channel's identity tap dwarfs the others' ranges
            assert layer.channel_range_spread > 40, layer
    worst = max(stats[entry.block].max_over_std.largest for entry in done)
    assert worst > 15  # the folded nets: 15-29; the training form's kernels: ~3
    assert all(layer.before.largest < 6 for layer in stats[:BLOCKS])
