"""Bundled training-form samples collapse to their deploy form, exactly."""

from __future__ import annotations

import pytest
import torch

import repfx
from repfx.verify.opcount import count_ops, summarize
from repfx.samples import build_sample, randomize_bn_, sample_input_shape


def _reparameterize(name: str, seed: int = 0):
    model = randomize_bn_(build_sample(name), seed).eval()
    x = torch.randn(sample_input_shape(name), generator=torch.Generator().manual_seed(seed))
    gm = repfx.reparameterize(model, (x,))
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert (want - got).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    return summarize(count_ops(gm, (x,)))


def test_repvgg_a0_executes_22_convolutions_and_nothing_else():
    counts = _reparameterize("repvgg_a0")
    assert (counts["convolution"], counts["batch_norm"], counts["add"]) == (22, 0, 0)


@pytest.mark.parametrize("name", ["repvgg_block", "acb_block", "dbb_block", "dbb_block_shift", "dbb_dw_block",
                                  "replk_block"])
def test_block_becomes_one_convolution(name):
    counts = _reparameterize(name)
    assert (counts["convolution"], counts["batch_norm"], counts["add"]) == (1, 0, 0)


def test_mobileone_block_becomes_one_convolution_per_stage():
    """Depthwise stage and pointwise stage are separated by a ReLU: one conv each."""
    counts = _reparameterize("mobileone_block")
    assert (counts["convolution"], counts["batch_norm"], counts["add"]) == (2, 0, 0)


def test_replknet_block_keeps_only_its_residual_add():
    """BN->1x1 folds, large+small kernel merge, 1x1->BN folds; the residual reads a different tensor."""
    counts = _reparameterize("replknet_block")
    assert (counts["convolution"], counts["batch_norm"], counts["add"]) == (3, 0, 1)


@pytest.mark.parametrize("name,convs", [("acb_net", 5), ("dbb_net", 5)])
def test_small_nets_become_plain(name, convs):
    counts = _reparameterize(name)
    assert (counts["convolution"], counts["batch_norm"], counts["add"]) == (convs, 0, 0)
