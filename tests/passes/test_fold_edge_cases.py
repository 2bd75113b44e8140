"""End to end (torch.export -> repfx): regressions from an adversarial review, and regions equal to their input.

Channel-last scales, dtype promotion, unbatched pooling, forwards that write into
their input or into their own state, and identity regions, which must come back as
a copy and never as an alias of the input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_idempotent, assert_matches, assert_ops, build, image, ops, rand, reparam


# -- regressions from an adversarial review ------------------------------------------------

class TokenLinearScaled(nn.Module):
    """Per-channel scale on a linear's [B, N, C] output: the scale broadcasts on the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.gain = nn.Parameter(torch.rand(6))

    def forward(self, x):
        y = self.linear(x)
        return torch.relu(y * self.gain + y)


class PromotedByBuffer(nn.Module):
    """fp32 conv times an fp64 buffer: the region would change dtype midway."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(4, 1, 1, dtype=torch.float64))

    def forward(self, x):
        return self.conv(x) * self.scale


class UnbatchedPool(nn.Module):
    def forward(self, x):
        return F.avg_pool1d(x, 3, 1, 1) * 2


class WritesIntoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x.div_(255)
        return self.bn(self.conv(x))


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


@pytest.mark.parametrize("factory,shape", [
    pytest.param(TokenLinearScaled, (2, 3, 4), id="channel-last-scale"),
    pytest.param(PromotedByBuffer, (1, 3, 8, 8), id="dtype-promotion"),
    pytest.param(UnbatchedPool, (4, 10), id="unbatched-avgpool"),
])
def test_reviewed_models_come_back_exact(factory, shape):
    model = build(factory)
    x = rand(*shape)
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)


def test_forward_writing_into_its_input_leaves_the_callers_tensor_alone():
    model = build(WritesIntoInput)
    x = image(3, 6)
    before = x.clone()
    gm, _ = reparam(model, x)
    assert torch.equal(x, before)
    assert_ops(gm, x.clone(), convolution=1, batch_norm=0)


def test_state_the_model_updates_is_not_folded_as_a_constant():
    model = Counter().eval()
    x = image(3, 8)
    program = torch.export.export(model, (x,))
    state = {k: v.clone() for k, v in program.state_dict.items()}
    gm, _ = reparam(program, x)  # would fail verification if calls were folded into the weights
    assert all(torch.equal(state[k], v) for k, v in program.state_dict.items())


def test_identity_region_does_not_return_its_input():
    class TimesOne(nn.Module):
        def forward(self, x):
            return x * 1.0

    x = image()
    gm, _ = reparam(TimesOne().eval(), x)
    assert gm(x).data_ptr() != x.data_ptr()


class HalvesSum(nn.Module):
    """``x*0.5 + x*0.5`` is exactly ``x``: one copy, never an alias of the input."""

    def forward(self, x):
        return x * 0.5 + x * 0.5


def test_region_equal_to_its_input_becomes_one_copy():
    x = image()
    model = HalvesSum().eval()
    gm, report = reparam(model, x)
    counts = ops(gm, x)
    assert counts["total"] == 1 and counts["clone"] == 1, dict(counts)
    assert gm(x).data_ptr() != x.data_ptr()
    assert_matches(model, gm, x)
    assert_idempotent(gm, x)
