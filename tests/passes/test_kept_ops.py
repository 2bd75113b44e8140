"""``kept_ops``: each BatchNorm, affine, pad, pool and parameter-only op left in the plain graph, with its reason.

One case per reason: each left-as-written kind (``refusals.LEFT_AS_WRITTEN``), each way a
refused merge keeps an op that is not the op refused, the LayerNorm written out (its
internals are no refusals), and the ``unexplained`` entry a gap in the accounting gets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repfx
from repfx.passes.kept_ops import account
from helpers import assert_accounts_for_every_op_left, build, conv_bn, image, rand
from pass_graphs import GraphBuilder

C = 8


class Between(nn.Module):
    """A BN between two ReLUs: nothing linear on either side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        return torch.relu(self.bn(torch.relu(self.conv(x))))


class OnTheInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm, written out as its repository writes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(channels)), nn.Parameter(torch.randn(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.pw = nn.Conv2d(C, C, 3, padding=1), LayerNorm2d(C), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.pw(torch.relu(self.norm(self.conv(x))))


class BatchStatistics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.register_buffer("mask", torch.rand(1, 1, 8, 8) + 0.5)

    def forward(self, x):
        return torch.relu(self.conv(x) * self.mask)


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.max_pool2d(torch.relu(self.conv(x)), 2), 1)


class Logit(nn.Module):
    """A per-sample score times a temperature: a 1-d tensor has no channel dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return torch.relu(self.conv(x)).amax((1, 2, 3)) * 0.5


class TokensFlattened(nn.Module):
    """A Linear on [B, N, C], then the tokens flattened into the batch for a BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(C, C), nn.BatchNorm1d(C)

    def forward(self, x):
        return self.bn(self.fc(x).flatten(0, 1))


class RandomWeight(nn.Module):
    """A weight computed in forward from a parameter and a random op: it must run on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight * (torch.rand_like(self.weight) < 2.0))


class SharedConvOutput(nn.Module):
    """The conv's output is also read by a sigmoid: the BN after it cannot fold into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) * torch.sigmoid(y)


class ReflectPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(C, C, 3)

    def forward(self, x):
        return self.conv(F.pad(torch.relu(x), (1, 1, 1, 1), mode="reflect"))


class PoolAfterPointwise(nn.Module):
    """A 1x1 conv, then a 3x3 average pool: merged, one 3x3 conv with 9x the MACs, which the MAC rule refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, bias=False)  # a bias would meet the pool's zero border: refused as inexact

    def forward(self, x):
        return torch.relu(F.avg_pool2d(self.conv(x), 3, stride=1, padding=1))


def _kept(model: nn.Module, x: torch.Tensor, **kwargs) -> list[repfx.report.KeptOp]:
    gm = repfx.reparameterize(build(lambda: model), (x,), verify=False, **kwargs)
    assert_accounts_for_every_op_left(gm)
    return gm.repfx_report.kept_ops


LEFT_AS_WRITTEN_CASES = [
    pytest.param(Between, image(), [("batch_norm", "nothing-to-fold", "bn")], "reads relu", id="between-relus"),
    pytest.param(OnTheInput, image(), [("batch_norm", "reads-input", "bn")], "model input x", id="on-the-input"),
    pytest.param(BatchStatistics, image(), [("batch_norm", "batch-statistics", "bn")], "batch's own",
                 id="batch-statistics"),
    pytest.param(SpatialMask, image(), [("affine", "not-per-channel", "")], "(1, 1, 8, 8)", id="spatial-constant"),
    pytest.param(Pools, rand(2, C, 8, 8), [("pool", "max-pool", ""), ("pool", "adaptive-pool", "")],
                 "whole map", id="max-and-adaptive-pool"),
    pytest.param(Logit, image(), [("affine", "no-channel-dim", "")], "1-d tensor", id="no-channel-dim"),
    pytest.param(TokensFlattened, rand(2, 5, C), [("batch_norm", "layout", "bn")], "channel-last", id="layout"),
]


@pytest.mark.parametrize("model,x,expected,words", LEFT_AS_WRITTEN_CASES)
def test_an_op_left_as_written_is_named_with_its_reason(model, x, expected, words):
    kept = _kept(model(), x)
    assert [(op.kind, op.code, op.module) for op in kept] == expected
    assert words in " ".join(op.reason for op in kept) and not any(op.refused_at for op in kept)


REFUSED_CASES = [
    pytest.param(SharedConvOutput, {}, [("batch_norm", "shared-output", "bn")], id="conv-output-read-twice"),
    pytest.param(ReflectPad, {}, [("pad", "padding-mode", "")], id="reflect-pad"),
    pytest.param(PoolAfterPointwise, {"cost": "macs"}, [("pool", "cost", "")], id="cost-rule"),
]


@pytest.mark.parametrize("model,kwargs,expected", REFUSED_CASES)
def test_an_op_a_refused_merge_keeps_names_that_refusal(model, kwargs, expected):
    gm = repfx.reparameterize(build(model), (image(),), verify=False, **kwargs)
    assert_accounts_for_every_op_left(gm)
    report = gm.repfx_report
    assert [(op.kind, op.code, op.module) for op in report.kept_ops] == expected
    refusals = {(refusal.node, refusal.code, refusal.reason) for refusal in report.refusals}
    assert all((op.refused_at, op.code, op.reason) in refusals for op in report.kept_ops)


def test_a_parameter_subgraph_that_must_run_each_call_is_named_with_its_refusal():
    kept = _kept(RandomWeight(), image())
    assert {op.kind for op in kept} == {"parameter-subgraph"} and len(kept) >= 2  # rand_like, the comparison, the mul
    assert {op.code for op in kept} == {"parameter-subgraph"} and all("random" in op.reason for op in kept)


def test_a_layer_norm_written_out_is_one_reason_not_a_list_of_refusals():
    gm = repfx.reparameterize(build(WithLayerNorm), (image(),), verify=False)
    assert_accounts_for_every_op_left(gm)
    report = gm.repfx_report
    assert {(op.kind, op.code, op.module) for op in report.kept_ops} == {("affine", "normalization", "norm")}
    assert len(report.kept_ops) == 2  # var + eps; the weight and the bias, written as one addcmul
    assert not [refusal for refusal in report.refusals if refusal.module == "norm"], report.refusals
    text = str(report)
    assert "channel mismatch" not in text
    assert text.count("normalization by the input's own statistics") == 1, text


def test_an_op_with_no_known_reason_is_an_explicit_unexplained_entry():
    """A conv + BN the fold never ran on: the region is exact, nothing refused it, yet it stays."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 6, 6)
    gm = g.build(g.batch_norm(g.conv(x, C, 3, padding=1)))
    kept = account(gm, None, []).kept
    assert [(op.kind, op.code) for op in kept] == [("batch_norm", "unexplained")]
    assert "no refusal says why" in kept[0].reason
