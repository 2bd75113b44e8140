"""End to end (torch.export -> repfx): exact merges that hide behind other spellings, and their neighbours.

* branches summed or averaged through ``torch.stack([...]).sum(0)`` / ``.mean(0)``;
* ``ConvTranspose1d/2d/3d`` + BatchNorm (stride, output_padding, groups, dilation);
* ``BatchNorm1d`` between transposes on ``[B, N, C]`` tokens, after a linear;
* branches reading ``x.detach()``, ``x.clone()``, ``x.contiguous()``, ``x.to(x.dtype)``, which are ``x``.

Each merge is checked on numbers (seeded, every BN randomized), on the ops the
result executes, and for idempotence; each must-not-merge neighbour (another
tensor, another dim, another dtype, a shift before a transposed conv) stays as
written and says why.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import (C, assert_idempotent, assert_matches, assert_ops, assert_refused, build, conv_bn, image, ops,
                     rand, reparam, rewrite_kernels)


# ---------------------------------------------------------------------------------------------
# 1. torch.stack([...]).sum(0) / .mean(0)
# ---------------------------------------------------------------------------------------------

class StackedBranches(nn.Module):
    """RepVGG's three branches (3x3, 1x1, BN) reduced through a stack."""

    def __init__(self, reduce: str = "sum", stack_dim: int = 0, reduce_dim: int = 0, copies: int = 1):
        super().__init__()
        self.a, self.b, self.bn = conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0), nn.BatchNorm2d(C)
        self.reduce, self.stack_dim, self.reduce_dim, self.copies = reduce, stack_dim, reduce_dim, copies

    def forward(self, x):
        branches = [self.a(x), self.b(x), self.bn(x)] + [x] * (self.copies - 1)
        return getattr(torch.stack(branches, self.stack_dim), self.reduce)(self.reduce_dim)


@pytest.mark.parametrize("reduce, stack_dim, reduce_dim, copies", [
    pytest.param("sum", 0, 0, 1, id="stack-sum-0"),
    pytest.param("mean", 0, 0, 1, id="stack-mean-0-of-3"),
    pytest.param("mean", 0, 0, 2, id="stack-mean-0-of-4-with-identity"),
    pytest.param("sum", -1, -1, 1, id="stack-sum-last-dim"),
])
def test_stacked_branches_become_one_conv(reduce, stack_dim, reduce_dim, copies):
    model = build(lambda: StackedBranches(reduce, stack_dim, reduce_dim, copies))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert ops(gm, x)["stack"] == 0 and rewrite_kernels(report) == [(C, C, 3, 3)]
    assert_idempotent(gm, x)


def test_mean_scales_by_exactly_one_over_n():
    """``stack([x] * 3).mean(0)`` is ``x``: a 1/3 that were not exact (or a sum taken for a mean) would show."""
    class MeanOfCopies(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return torch.stack([y * 3.0, y * 3.0, y * 3.0]).mean(0) - y * 3.0

    model = build(MeanOfCopies)
    x = image()
    gm, _ = reparam(model, x)
    with torch.no_grad():
        assert gm(x).abs().max().item() <= 1e-6 * model(x).abs().max().item() + 1e-6


def test_stack_summed_over_another_dim_is_no_branch_sum():
    model = build(lambda: StackedBranches("sum", 0, 1))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=1)
    assert ops(gm, x)["stack"] == 1
    assert_refused(report, "not a sum of the stacked branches")


# ---------------------------------------------------------------------------------------------
# 2. ConvTranspose + BN
# ---------------------------------------------------------------------------------------------

_TRANSPOSED = {1: (nn.ConvTranspose1d, nn.BatchNorm1d), 2: (nn.ConvTranspose2d, nn.BatchNorm2d),
               3: (nn.ConvTranspose3d, nn.BatchNorm3d)}


class TransposedBN(nn.Module):
    """``relu(bn(conv_transpose(x)))``, optionally with a BN before the transposed conv."""

    def __init__(self, rank: int, bn_before: bool = False, **options):
        super().__init__()
        transposed, norm = _TRANSPOSED[rank]
        self.before = norm(4) if bn_before else nn.Identity()
        self.up, self.bn = transposed(4, C, 3, **options), norm(C)

    def forward(self, x):
        return torch.relu(self.bn(self.up(self.before(x))))


@pytest.mark.parametrize("rank, options, emitted", [
    pytest.param(1, {}, "aten.conv1d.default", id="1d-stride1-becomes-a-conv"),
    pytest.param(2, {"stride": 2, "padding": 1, "output_padding": 1}, "aten.conv_transpose2d.input",
                 id="2d-stride2-output_padding"),
    pytest.param(2, {"stride": 2, "groups": 2, "bias": False}, "aten.conv_transpose2d.input", id="2d-groups2-no-bias"),
    pytest.param(2, {"stride": 1, "dilation": 2, "output_padding": 1}, "aten.conv_transpose2d.input",
                 id="2d-dilation2-output_padding"),
    pytest.param(3, {"stride": 2, "dilation": 2, "groups": 4}, "aten.conv_transpose3d.input",
                 id="3d-stride2-dilation2-groups4"),
])
def test_conv_transpose_bn_becomes_one_op(rank, options, emitted):
    model = build(lambda: TransposedBN(rank, **options))
    x = rand(2, 4, *[5] * rank)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0)
    assert [str(node.target) for node in gm.graph.nodes if "conv" in str(node.target)] == [emitted]
    assert len(report.rewrites) == 1
    assert_idempotent(gm, x)


def test_bn_before_a_conv_transpose_is_refused_with_the_border_reason():
    model = build(lambda: TransposedBN(2, bn_before=True, stride=2))
    x = rand(2, 4, 5, 5)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=1)  # the BN after still folds; the one before stays
    assert_refused(report, "a shift before conv_transpose", "not constant near the border")


# ---------------------------------------------------------------------------------------------
# 3. BatchNorm1d between transposes on [B, N, C] tokens
# ---------------------------------------------------------------------------------------------

class TokenBN(nn.Module):
    def __init__(self, between: str = "bn1d"):
        super().__init__()
        self.linear, self.bn = nn.Linear(C, C), nn.BatchNorm1d(C)
        self.wide = nn.Conv1d(C, C, 3, padding=1)
        self.between = between

    def forward(self, x):
        y = self.linear(x).transpose(1, 2)
        y = self.bn(y) if self.between == "bn1d" else self.wide(y)
        return torch.relu(y.transpose(1, 2))


def test_batchnorm1d_between_transposes_folds_into_the_linear():
    model = build(TokenBN)
    x = rand(2, 5, C)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    counts = assert_ops(gm, x, convolution=0, batch_norm=0)
    assert counts["transpose"] == 0 and counts["addmm"] == 1, dict(counts)
    assert rewrite_kernels(report) == [(C, C)]
    assert_idempotent(gm, x)


def test_a_wide_conv1d_between_transposes_is_refused():
    model = build(lambda: TokenBN("conv3"))
    x = rand(2, 5, C)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1)
    assert not report.rewrites
    assert_refused(report, "does not commute with a transpose")


# ---------------------------------------------------------------------------------------------
# 4. branches reading x.detach(), x.clone(), x.contiguous(), x.to(x.dtype)
# ---------------------------------------------------------------------------------------------

ALIASES = {
    "detach": lambda x: x.detach(),
    "clone": lambda x: x.clone(),
    "contiguous": lambda x: x.contiguous(),
    "to-own-dtype": lambda x: x.to(x.dtype),
    "to-own-dtype-copy": lambda x: x.to(x.dtype, copy=True),
}
OTHER_TENSORS = {
    "flip": (lambda x: x.flip(-1), "different tensors"),
    "through-float16": (lambda x: x.to(torch.float16).to(torch.float32), "converted to torch.float16"),
}


class BranchesOfAnAlias(nn.Module):
    """``a(y) + b(f(y)) + f(y)`` with ``y = relu(x)`` (``permuted``: ``y`` is not contiguous)."""

    def __init__(self, alias, permuted: bool = False, inplace_after: bool = False):
        super().__init__()
        self.a, self.b, self.alias, self.permuted = conv_bn(C, C, 3, 1), conv_bn(C, C, 1, 0), alias, permuted
        self.inplace_after = inplace_after

    def forward(self, x):
        y = torch.relu(x)
        if self.permuted:
            y = y.transpose(2, 3)
        out = self.a(y) + self.b(self.alias(y)) + self.alias(y)
        if self.inplace_after:
            out += 1  # an in-place op: capture functionalizes the graph
        return out


INPUTS = {"contiguous-input": (False, False), "transposed-input": (True, False), "functionalized": (False, True)}


@pytest.mark.parametrize("alias, permuted, inplace_after", [
    pytest.param(alias, permuted, inplace_after, id=f"{name}-{kind}")
    for name, alias in ALIASES.items() for kind, (permuted, inplace_after) in INPUTS.items()
    if not (permuted and name == "contiguous")  # a layout copy then: see test_branches_of_another_tensor_do_not_merge
])
def test_branches_of_an_alias_of_x_merge_with_branches_of_x(alias, permuted, inplace_after):
    model = build(lambda: BranchesOfAnAlias(alias, permuted, inplace_after))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)  # ``+= 1`` folds into the bias
    assert rewrite_kernels(report) == [(C, C, 3, 3)]
    assert_idempotent(gm, x)


@pytest.mark.parametrize("alias, reason", [
    *[pytest.param(alias, reason, id=name) for name, (alias, reason) in OTHER_TENSORS.items()],
    pytest.param(ALIASES["contiguous"], "copied into another memory layout", id="layout-copy-of-transposed-x"),
])
def test_branches_of_another_tensor_do_not_merge(alias, reason):
    permuted = reason == "copied into another memory layout"
    model = build(lambda: BranchesOfAnAlias(alias, permuted))
    x = image()
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=2)
    assert_refused(report, reason)
    assert_idempotent(gm, x)


def test_a_returned_copy_stays_a_copy():
    """``return conv(x) + x, x.clone()``: the copy is an output of its own, never an alias of ``x``."""
    class ReturnsCopy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(C, C, 3, 1)

        def forward(self, x):
            y = torch.relu(x)
            return self.a(y) + y.detach(), y.clone()

    model = build(ReturnsCopy)
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    with torch.no_grad():
        first, copy = gm(x)
    assert copy.data_ptr() != x.data_ptr()


def test_a_copy_the_fold_writes_survives_a_second_run():
    """``y*0.5 + y*0.5`` is ``y``: the fold writes one copy (never an alias), and a second run keeps it."""
    class Halves(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return torch.sigmoid(y * 0.5 + y * 0.5)

    model = build(Halves)
    x = image()
    gm, _ = reparam(model, x)
    assert_matches(model, gm, x)
    assert ops(gm, x)["clone"] == 1
    assert_idempotent(gm, x)
