"""End to end: RepMLPNet's partition perceptron with its local perceptron (``spatial_blocks.RepMLPUnit``; issue 16 item 6).

The block as its repository writes it: partitions by reshape and permute, the FC a grouped
1x1 on each flattened partition with a BN over the share-sets, depthwise kxk convs with BN
on the same partitions added in place; and the first RepMLP's, whose FC's BN is a
BatchNorm1d on the flattened partitions. Folded, it runs the repository's deploy form: one
1x1 conv (the FC with the convs and BNs in its matrix) between the reshapes. BatchNorms
randomized; numerics against the model, executed ops, idempotence, a dynamic batch.
"""

from __future__ import annotations

import pytest

from torch import nn

from helpers import assert_idempotent, assert_matches, assert_ops, build, rand, reparam
from spatial_blocks import RepMLPUnit


class RepMLPv1Unit(nn.Module):
    """The first RepMLP's partition perceptron: the FC's BN is a BatchNorm1d on each flattened partition
    (a 2-D tensor), the local convs grouped like the FC (not depthwise), the sum written in place on 6-D views."""

    def __init__(self, channels: int = 8, size: int = 8, h: int = 4, groups: int = 2, kernels=(1, 3)) -> None:
        super().__init__()
        self.C, self.H, self.h, self.kernels = channels, size, h, kernels
        self.fc3 = nn.Conv2d(channels * h * h, channels * h * h, 1, groups=groups, bias=False)
        self.fc3_bn = nn.BatchNorm1d(channels * h * h)
        for k in kernels:
            setattr(self, f"repconv{k}", nn.Sequential(nn.Conv2d(channels, channels, k, padding=k // 2, bias=False,
                                                                 groups=groups), nn.BatchNorm2d(channels)))

    def forward(self, x):
        parts_h = parts_w = self.H // self.h
        parts = x.reshape(-1, self.C, parts_h, self.h, parts_w, self.h).permute(0, 2, 4, 1, 3, 5)
        out = self.fc3(parts.reshape(-1, self.C * self.h * self.h, 1, 1)).reshape(-1, self.C * self.h * self.h)
        out = self.fc3_bn(out).reshape(-1, parts_h, parts_w, self.C, self.h, self.h)
        conv_inputs = parts.reshape(-1, self.C, self.h, self.h)
        conv_out = 0
        for k in self.kernels:
            conv_out += getattr(self, f"repconv{k}")(conv_inputs)
        out += conv_out.view(-1, parts_h, parts_w, self.C, self.h, self.h)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(-1, self.C, self.H, self.H)


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


def test_first_repmlp_with_a_batchnorm1d_on_flattened_partitions_runs_one_fc():
    model, x = build(RepMLPv1Unit), rand(2, 8, 8, 8)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert [rewrite.kernel_shapes for rewrite in report.rewrites] == [((128, 64, 1, 1),)]
    assert_idempotent(gm, x)


@pytest.mark.slow  # two captures
def test_repmlp_block_with_a_dynamic_batch():
    model = build(RepMLPUnit)
    gm, _ = reparam(model, rand(2, 8, 8, 8), dynamic_batch=True)
    assert_ops(gm, rand(3, 8, 8, 8), convolution=1, batch_norm=0)
    assert_matches(model, gm, rand(3, 8, 8, 8))
