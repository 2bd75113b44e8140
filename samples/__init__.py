"""Training-form ("multi-branch") sample models for exercising repfx.

Each sample is plain PyTorch with no deploy / reparameterize methods: the
point is that repfx fuses them generically from the traced graph. Use
:func:`build_sample` with a name from :data:`SAMPLES`, feed it a tensor of
:func:`sample_input_shape`, and call :func:`randomize_bn_` first so that no
BatchNorm is an identity (fresh BNs would hide fusion mistakes).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .acb import ACBlock, ACBNet
from .dbb import BNAndPad, DBBNet, DiverseBranchBlock
from .mobileone import MobileOne, MobileOneBlock, MobileOneUnit, mobileone_s0
from .replknet import LargeKernelConv, RepLKBlock
from .repvgg import RepVGG, RepVGGBlock, RepVGGConfig, repvgg, repvgg_variants

DEFAULT_INPUT_SHAPE: tuple[int, ...] = (1, 3, 224, 224)

SAMPLES: dict[str, Callable[[], nn.Module]] = {
    # whole networks
    **{f"repvgg_{v}": partial(repvgg, v) for v in repvgg_variants()},
    "acb_net": ACBNet,
    "dbb_net": DBBNet,
    "dbb_net_shift": partial(DBBNet, pad_style="shift"),
    "mobileone_s0": mobileone_s0,
    "replknet_block": partial(RepLKBlock, 64, large_kernel=13, small_kernel=5),
    # single blocks: the smallest graphs that still contain each pattern
    "repvgg_block": partial(RepVGGBlock, 32, 32),
    "acb_block": partial(ACBlock, 16, 32),
    "dbb_block": partial(DiverseBranchBlock, 16, 32),
    "dbb_block_shift": partial(DiverseBranchBlock, 16, 32, pad_style="shift"),
    "dbb_dw_block": partial(DiverseBranchBlock, 32, 32, groups=32),
    "mobileone_block": partial(MobileOneBlock, 32, 32),
    "replk_block": partial(LargeKernelConv, 32, 13, 5),
}

# Only samples that differ from DEFAULT_INPUT_SHAPE are listed.
_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "acb_net": (1, 3, 64, 64),
    "dbb_net": (1, 3, 64, 64),
    "dbb_net_shift": (1, 3, 64, 64),
    "replknet_block": (1, 64, 32, 32),
    "repvgg_block": (1, 32, 32, 32),
    "acb_block": (1, 16, 32, 32),
    "dbb_block": (1, 16, 32, 32),
    "dbb_block_shift": (1, 16, 32, 32),
    "dbb_dw_block": (1, 32, 32, 32),
    "mobileone_block": (1, 32, 32, 32),
    "replk_block": (1, 32, 32, 32),
}


def _check_name(name: str) -> None:
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; valid names: {', '.join(sorted(SAMPLES))}")


def build_sample(name: str) -> nn.Module:
    """A fresh, randomly initialised instance of the named sample (train mode)."""
    _check_name(name)
    return SAMPLES[name]()


def sample_input_shape(name: str) -> tuple[int, ...]:
    """The input shape the named sample is meant to be run and traced with."""
    _check_name(name)
    return _INPUT_SHAPES.get(name, DEFAULT_INPUT_SHAPE)


@torch.no_grad()
def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm seeded random statistics and affine parameters.

    Freshly built BNs have mean 0, var 1, weight 1, bias 0, i.e. (almost)
    identities, which would let a wrong fusion pass a numerical check. Here:
    ``running_mean ~ 0.1*N(0,1)``, ``running_var ~ U(0.5, 2)``,
    ``weight ~ +-U(0.5, 1.5)`` (random sign), ``bias ~ 0.1*N(0,1)``.
    Magnitudes are moderate so deep nets stay numerically well-behaved.
    Modifies ``model`` in place and returns it.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=gen)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.running_mean is not None and module.running_var is not None:
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * randn(shape))
            module.running_var.copy_(0.5 + 1.5 * rand(shape))
        if module.weight is not None and module.bias is not None:
            shape = module.weight.shape
            sign = torch.where(rand(shape) < 0.5, -1.0, 1.0)
            module.weight.copy_(sign * (0.5 + rand(shape)))
            module.bias.copy_(0.1 * randn(shape))
    return model


__all__ = [
    "DEFAULT_INPUT_SHAPE",
    "SAMPLES",
    "build_sample",
    "sample_input_shape",
    "randomize_bn_",
    # block / model classes
    "ACBlock",
    "ACBNet",
    "BNAndPad",
    "DiverseBranchBlock",
    "DBBNet",
    "MobileOneUnit",
    "MobileOneBlock",
    "MobileOne",
    "mobileone_s0",
    "LargeKernelConv",
    "RepLKBlock",
    "RepVGGBlock",
    "RepVGGConfig",
    "RepVGG",
    "repvgg",
    "repvgg_variants",
]
