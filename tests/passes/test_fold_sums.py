"""End to end (torch.export -> repfx): k-way sums of branches, and what the result of a RepVGG-like block is.

Sums of any number of branches of one input (kernel sizes, dilations, groups,
strides, any Python summation style) become one conv; the result is idempotent,
leaves the model alone, has eval semantics, re-exports, and takes any batch size.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import (C, HW, assert_dynamic_batch_folds, assert_folds_idempotently, assert_matches, assert_ops,
                     build, conv_bn, image, reparam, rewrite_kernels)


def emitted_convs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]


# ---------------------------------------------------------------------------------------------
# 1. k-way sums: kernel sizes, dilations, groups
# ---------------------------------------------------------------------------------------------

class RepVGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.bn(x)


class ACBLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.square = conv_bn(C, C, 3, 1)
        self.hor = conv_bn(C, C, (1, 3), (0, 1))
        self.ver = conv_bn(C, C, (3, 1), (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class RepLKLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.large = conv_bn(C, C, 13, 6, groups=C)
        self.small = conv_bn(C, C, 5, 2, groups=C)

    def forward(self, x):
        return self.large(x) + self.small(x)


class FivePlusDilated(nn.Module):
    """5x5 and a dilation-2 3x3 span the same 5x5 window."""

    def __init__(self):
        super().__init__()
        self.five = conv_bn(C, C, 5, 2)
        self.dilated = conv_bn(C, C, 3, 2, dilation=2)

    def forward(self, x):
        return self.five(x) + self.dilated(x)


class DilatedPlusPointwise(nn.Module):
    """A dilated 3x3 plus a 1x1 (its centre tap): the merged kernel can stay a dilated 3x3."""

    def __init__(self):
        super().__init__()
        self.dilated = conv_bn(C, C, 3, 2, dilation=2)
        self.point = conv_bn(C, C, 1, 0)

    def forward(self, x):
        return self.dilated(x) + self.point(x)


class MixedGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = conv_bn(C, C, 3, 1)
        self.grouped = conv_bn(C, C, 1, 0, groups=2)

    def forward(self, x):
        return self.dense(x) + self.grouped(x)


class Rect(nn.Module):
    """A non-square 3x5 kernel summed with a 3x3."""

    def __init__(self):
        super().__init__()
        self.wide = conv_bn(C, C, (3, 5), (1, 2))
        self.square = conv_bn(C, C, 3, 1)

    def forward(self, x):
        return self.wide(x) + self.square(x)


class StridedBranches(nn.Module):
    """Stride 2 on every branch (RepVGG's first block of a stage)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(C, 2 * C, 3, 1, stride=2), conv_bn(C, 2 * C, 1, 0, stride=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


K_WAY_CASES = [
    pytest.param(RepVGGLike, (C, C, 3, 3), 1, id="3x3+1x1+bn-identity"),
    pytest.param(ACBLike, (C, C, 3, 3), 1, id="acb-1x3+3x1+3x3"),
    pytest.param(RepLKLike, (C, 1, 13, 13), C, id="replk-13x13dw+5x5dw"),
    pytest.param(FivePlusDilated, (C, C, 5, 5), 1, id="5x5+3x3-dilation2"),
    pytest.param(DilatedPlusPointwise, (C, C, 3, 3), 1, id="3x3-dilation2+1x1-stays-dilated"),
    pytest.param(MixedGroups, (C, C, 3, 3), 1, id="dense3x3+grouped1x1"),
    pytest.param(Rect, (C, C, 3, 5), 1, id="3x5+3x3"),
    pytest.param(StridedBranches, (2 * C, C, 3, 3), 1, id="stride2-3x3+1x1"),
]


@pytest.mark.parametrize("factory, kernel, groups", K_WAY_CASES)
def test_k_way_sum_becomes_one_conv(factory, kernel, groups):
    model = build(factory)
    x = image(size=16)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert rewrite_kernels(report) == [kernel]
    (conv,) = emitted_convs(gm)
    assert conv.args[-1] == groups


def test_dilated_merge_keeps_dilation():
    """3x3 dilation 2 + 1x1: the merged conv is a 3x3 with dilation 2, not a 5x5 of zeros."""
    model = build(DilatedPlusPointwise)
    x = image(size=12)
    gm, _ = reparam(model, x)
    (conv,) = emitted_convs(gm)
    weight, stride, padding, dilation = conv.args[1], conv.args[3], conv.args[4], conv.args[5]
    assert tuple(getattr(gm, weight.target).shape) == (C, C, 3, 3)
    assert list(dilation) == [2, 2] and list(padding) == [2, 2] and list(stride) == [1, 1]


class SumStyle(nn.Module):
    """Three conv-BN branches of one input, summed in different Python styles."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.branches = nn.ModuleList([conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0), conv_bn(C, C, (1, 3), (0, 1))])

    def forward(self, x):
        if self.style == "loop":
            out = 0
            for branch in self.branches:
                out = out + branch(x)
            return out
        a, b, c = (branch(x) for branch in self.branches)
        if self.style == "plus":
            return a + b + c
        if self.style == "torch.add":
            return torch.add(torch.add(a, b), c)
        if self.style == "builtin-sum":
            return sum([a, b, c])
        if self.style == "inplace":
            out = a
            out += b
            out += c
            return out
        raise ValueError(self.style)


@pytest.mark.parametrize("style", [
    pytest.param("plus", id="a+b+c"),
    pytest.param("torch.add", id="torch.add"),
    pytest.param("builtin-sum", id="sum-list"),
    pytest.param("inplace", id="inplace-+="),
    pytest.param("loop", id="modulelist-loop"),
])
def test_summation_style_does_not_matter(style):
    model = build(lambda: SumStyle(style))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert rewrite_kernels(report) == [(C, C, 3, 3)]


# ---------------------------------------------------------------------------------------------
# 2. idempotence, the user's model, training mode
# ---------------------------------------------------------------------------------------------

IDEMPOTENCE_CASES = [
    pytest.param(RepVGGLike, (2, C, HW, HW), id="repvgg-like"),
]


@pytest.mark.parametrize("factory, shape", IDEMPOTENCE_CASES)
def test_idempotent(factory, shape):
    assert_folds_idempotently(factory, shape)


def test_rerun_on_result_does_not_warn():
    """The result is a graph with eval semantics: running repfx on it again must not warn about training mode."""
    model = build(RepVGGLike)
    x = image()
    gm, _ = reparam(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reparam(gm, x)
    assert not [w for w in caught if "training" in str(w.message).lower()], [str(w.message) for w in caught]


def test_result_supports_eval():
    """Deploy code calls .eval() on what it is given; the result must accept it and stay exact."""
    model = build(RepVGGLike)
    x = image()
    gm, _ = reparam(model, x)
    gm.eval()
    assert not gm.training
    assert_matches(model, gm, x)


@pytest.mark.parametrize("training", [pytest.param(False, id="eval-model"), pytest.param(True, id="train-model")])
def test_model_is_not_modified(training):
    model = build(RepVGGLike, train=training)
    x = image()
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reparam(model, x)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert after.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(after[name], value), name


def test_training_mode_model_warns_and_gets_eval_semantics():
    model = build(RepVGGLike, train=True)
    x = image()
    with pytest.warns(UserWarning, match=r"(?i)training.*batchnorm|batchnorm.*training"):
        gm, _ = reparam(model, x)
    assert model.training
    reference = copy.deepcopy(model).eval()
    assert_matches(reference, gm, x)
    with torch.no_grad():
        train_out = copy.deepcopy(model)(x)
    assert not torch.allclose(train_out, reference(x), atol=1e-3), "batch stats should differ from running stats"
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


# ---------------------------------------------------------------------------------------------
# 3. the result as a deployable graph
# ---------------------------------------------------------------------------------------------

def test_result_can_be_exported_again():
    model = build(RepVGGLike)
    x = image()
    gm, _ = reparam(model, x)
    program = torch.export.export(gm, (x,))
    assert_matches(model, program.module(), x)
    assert_ops(program.module(), x, convolution=1, batch_norm=0, add=0)


class VarArgsForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = RepVGGLike()

    def forward(self, *inputs):
        return self.block(inputs[0])


@pytest.mark.parametrize("factory, example_batch", [
    pytest.param(RepVGGLike, 2, id="repvgg-like"),
    pytest.param(RepVGGLike, 1, id="repvgg-like-example-batch-1"),
    pytest.param(VarArgsForward, 2, id="forward(*inputs)"),
])
def test_dynamic_batch(factory, example_batch):
    assert_dynamic_batch_folds(factory, example_batch)
