"""End to end: RepMLPNet's partition perceptron with its local perceptron (``spatial_blocks.RepMLPUnit``; issue 16 item 6).

The block as its repository writes it: partitions by reshape and permute, the FC a grouped
1x1 on each flattened partition with a BN over the share-sets, depthwise kxk convs with BN
on the same partitions added in place. Folded, it runs the repository's deploy form: one
1x1 conv (the FC with the convs and BNs in its matrix) between the reshapes. BatchNorms
randomized; numerics against the model, executed ops, idempotence, a dynamic batch.
"""

from __future__ import annotations

import pytest

from helpers import assert_idempotent, assert_matches, assert_ops, build, rand, reparam
from spatial_blocks import RepMLPUnit


@pytest.mark.parametrize("channels, sharesets, kernels", [
    pytest.param(8, 4, (1, 3), id="4-sharesets"),
    pytest.param(8, 8, (1, 3), id="a-shareset-per-channel"),
    pytest.param(4, 2, (3,), id="one-conv"),
])
def test_repmlp_block_runs_one_fc(channels, sharesets, kernels):
    model = build(lambda: RepMLPUnit(channels, sharesets, kernels=kernels))
    x = rand(2, channels, 8, 8)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    [rewrite] = report.rewrites
    assert rewrite.kernel_shapes == ((sharesets * 16, 16, 1, 1),)  # the FC's own matrix: it does not grow
    assert rewrite.params_after <= rewrite.params_before
    assert_idempotent(gm, x)


def test_repmlp_block_with_a_dynamic_batch():
    model = build(RepMLPUnit)
    gm, _ = reparam(model, rand(2, 8, 8, 8), dynamic_batch=True)
    assert_ops(gm, rand(3, 8, 8, 8), convolution=1, batch_norm=0)
    assert_matches(model, gm, rand(3, 8, 8, 8))
