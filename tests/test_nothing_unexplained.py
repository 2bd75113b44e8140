"""Nothing stays unexplained: for every model the tests fold, the report names each BatchNorm, affine, pad and pool
op left in the plain graph with the reason it stays (``report.kept_ops``), and none is "unexplained".

The zoo: the builders of ``tests/helpers.py`` and ``tests/spatial_blocks.py``, the samples
(``repfx.samples``, with ECBSR and VanillaNet) and, in ``test_timm.py``, the timm families.
The ops are found by name here (``helpers.ops_to_account_for``), apart from how
``repfx.passes.kept_ops`` finds them. Folding runs without verification: the accounting
reads the graph, and the tests that fold these models check their numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import repfx
from repfx import samples
from repfx.samples.ecbsr import ECB, ECBSRNet
from repfx.samples.vanillanet import VanillaBlock as VanillaNetBlock
from repfx.samples.vanillanet import VanillaNetSmall
import spatial_blocks
from helpers import COMPUTE_BOUND, DepthwiseBesideDense, assert_accounts_for_every_op_left, build, rand

# Whole networks (at 64x64): a few seconds each. The other RepVGG variants are repvgg_a0 at other widths.
NETWORKS = ["repvgg_a0", "acb_net", "dbb_net", "dbb_net_shift", "mobileone_s0", "replknet_block"]
BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "depthwise_beside_dense": (lambda: DepthwiseBesideDense(8), (1, 8, 8, 8)),
    "repnext_mixer": (spatial_blocks.RepNeXtMixer, (1, 16, 16, 16)),
    "repnext_block": (spatial_blocks.RepNeXtBlock, (1, 16, 16, 16)),
    "factorized_conv": (spatial_blocks.FactorizedConv, (1, 16, 16, 16)),
    "acb_block_crop": (spatial_blocks.ACBlockCrop, (1, 8, 16, 16)),
    "se_block": (lambda: spatial_blocks.SEBlock(16), (1, 16, 8, 8)),
    "mobileone_se": (spatial_blocks.MobileOneSE, (1, 32, 16, 16)),
    "vanilla_block_dw": (spatial_blocks.VanillaBlock, (1, 32, 16, 16)),
    "ecb": (lambda: ECB(8), (1, 8, 8, 8)),
    "ecbsr_net": (ECBSRNet, (1, 3, 8, 8)),
    "vanillanet_block": (lambda: VanillaNetBlock(8), (1, 8, 8, 8)),
    "vanillanet_block_slope_0_99": (lambda: VanillaNetBlock(8, act_learn=0.99), (1, 8, 8, 8)),
    "vanillanet_small": (VanillaNetSmall, (1, 3, 32, 32)),
    **{name: (lambda name=name: samples.build_sample(name), samples.sample_input_shape(name))
       for name in samples.SAMPLES if name not in NETWORKS and samples.sample_input_shape(name)[-1] != 224},
}


def _fold_and_check(factory: Callable[[], nn.Module], shape: tuple[int, ...], **kwargs) -> repfx.Report:
    gm = repfx.reparameterize(build(factory), (rand(*shape),), verify=False, **kwargs)
    assert_accounts_for_every_op_left(gm)
    return gm.repfx_report


@pytest.mark.parametrize("name", BLOCKS)
def test_every_op_left_in_a_block_is_named_with_its_reason(name):
    _fold_and_check(*BLOCKS[name])


@pytest.mark.parametrize("name", ["mobileone_se", "repnext_block", "vanillanet_block_slope_0_99"])
def test_every_op_left_is_named_when_the_cost_rule_keeps_merges_apart(name):
    _fold_and_check(*BLOCKS[name], target=COMPUTE_BOUND)


@pytest.mark.slow
@pytest.mark.parametrize("name", NETWORKS)
def test_every_op_left_in_a_sample_network_is_named_with_its_reason(name):
    shape = samples.sample_input_shape(name)
    report = _fold_and_check(lambda: samples.build_sample(name), shape[:2] + (64, 64) if shape[-1] == 224 else shape)
    assert all(op.kind == "pool" for op in report.kept_ops), report.kept_ops  # a head's pool at most: every BN folds
