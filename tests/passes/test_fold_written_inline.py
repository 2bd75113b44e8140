"""End to end: blocks written the way ECBSR, weight-standardized nets and VanillaNet write theirs.

ECBSR's block re-parameterizes itself inside ``forward`` in ``eval()`` (a zero kernel
with Sobel and Laplacian masks written into its diagonal, composed with a 1x1 by a
convolution of weights): the kernel is evaluated once and the block runs one conv. A
weight-standardized conv is a conv on a stored weight, and its BN folds. VanillaNet's
``leaky_relu`` annealed to slope 1 is the identity, so the 1x1 convs around it merge; at
0.99 they stay apart. BatchNorms randomized (``build``), numerics against the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_idempotent, assert_matches, assert_ops, build, rand, reparam
from repfx.samples.ecbsr import ECB, ECBSRNet
from repfx.samples.vanillanet import VanillaBlock, VanillaNetSmall


def edge_scales_not_tiny(model: nn.Module) -> nn.Module:
    """ECBSR initializes its edge scales near zero; large ones make a wrong kernel visible."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("scale", "edges.0.bias", "edges.1.bias", "edges.2.bias")):
                parameter.normal_()
    return model


def test_ecb_in_eval_runs_one_conv_and_matches_its_training_form():
    block = edge_scales_not_tiny(build(lambda: ECB(8)))
    x = rand(2, 8, 12, 12)
    gm, report = reparam(block, x)
    assert_matches(block, gm, x)
    assert_ops(gm, x, convolution=1, add=0, total=3)  # the conv and the PReLU (a view and its kernel)
    trained = ECB(8)
    trained.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert torch.allclose(trained.train()(x), gm(x), atol=1e-4)
    assert any(rewrite.kind.endswith("-> constant [8, 8, 3, 3]") for rewrite in report.rewrites)
    assert_idempotent(gm, x)


def test_ecbsr_network_runs_its_plain_convs():
    model = edge_scales_not_tiny(build(ECBSRNet))
    x = rand(1, 3, 16, 16)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert report.ops_before["convolution"] == 10  # 6 of them convolve weights, on every call
    assert_ops(gm, x, convolution=4, add=0)  # head, two blocks, tail: the repository's plain form
    assert not [r for r in report.refusals if r.code == "parameter-subgraph"]


class WSConv2d(nn.Conv2d):
    """A conv whose weight is standardized per filter in ``forward`` (weight standardization)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_standardized_conv_bn_is_one_conv():
    model = build(lambda: nn.Sequential(WSConv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    x = rand(2, 8, 8, 8)
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, total=2)


class InputScaledConv(nn.Module):
    """A weight scaled by a statistic of the input: it reads an input, so it is computed on each call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.conv2d(x, self.conv.weight * x.mean() - self.conv.weight.mean(), self.conv.bias, padding=1)


def test_a_weight_that_reads_the_input_stays():
    """Only the part of parameters alone (the weight's mean) is stored; ``w * x.mean()`` runs on each call."""
    model = build(InputScaledConv)
    x = rand(2, 8, 8, 8)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert [rewrite.kind for rewrite in report.rewrites] == ["1 mean -> constant []"]
    assert gm.code.count("aten.mean") == 1 and gm.code.count("aten.mul") == 1 and gm.code.count("aten.sub") == 1


def test_vanillanet_block_annealed_to_the_identity_merges_its_1x1_convs():
    model = build(lambda: VanillaBlock(8))
    x = rand(2, 8, 8, 8)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, leaky_relu=0, leaky_relu_=0)  # 1x1 (two merged) and the series dw3x3
    assert any("leaky_relu" in rewrite.kind for rewrite in report.rewrites)


def test_vanillanet_block_before_the_end_of_annealing_keeps_them_apart():
    model = build(lambda: VanillaBlock(8, act_learn=0.99))
    x = rand(2, 8, 8, 8)
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=3, batch_norm=0, leaky_relu_=1)  # run in place


def test_vanillanet_network_at_slope_1_runs_fewer_convs_than_at_0_99():
    x = rand(1, 3, 32, 32)
    annealed, _ = reparam(build(VanillaNetSmall), x)
    training, _ = reparam(build(lambda: VanillaNetSmall(act_learn=0.99)), x)
    assert_ops(annealed, x, convolution=4, batch_norm=0, leaky_relu=0, leaky_relu_=0)
    # At 0.99 each depthwise 7x7 stays apart from the 1x1 after it: merged they would be a dense 7x7 holding
    # more than max_param_growth (4x) the parameters (issue 16 item 8), so only the BNs fold.
    assert_ops(training, x, convolution=9, batch_norm=0, leaky_relu_=3)
