"""Property tests: random multi-branch linear blocks are re-parameterized exactly.

Hypothesis draws blocks of 2-4 branches over one input (conv kxk with k in 1/3/5 and
``padding=k//2``, optional bias and BN, groups 1/2/depthwise; identity; BN alone;
scalar scale; 3x3 average pool), optionally nested sums and a BN after the sum, and
optionally a channel concat of two such blocks. Every such block is linear with all
branches on the same output grid, so:

* with the default cost rule the result matches the model and never executes more ops;
* with ``cost="always"`` the whole block becomes one convolution (or, when every
  branch is a per-channel affine map, at most a per-channel scale and a shift).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_matches, build, ops, rand, reparam

# No shrink phase: each example captures a model (~0.3 s), and shrinking a failure would run for
# minutes; the drawn specs are small enough to read unshrunk.
SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SIZE = 6  # spatial size of the drawn inputs

# -- specs --------------------------------------------------------------------------------------
# leaf:   ("conv", k, groups, bias, bn) | ("identity",) | ("bn",) | ("scale", s) | ("avgpool",)
# branch: leaf | ("sum", [leaf, ...], bn)
# block:  ([branch, ...], post_bn)
# model:  (channels, ("single", block) | ("cat", block, block), seed)

LEAF = st.one_of(
    st.tuples(st.just("conv"), st.sampled_from([1, 3, 5]), st.sampled_from(["1", "2", "dw"]),
              st.booleans(), st.booleans()),
    st.just(("identity",)),
    st.just(("bn",)),
    st.tuples(st.just("scale"), st.sampled_from([0.5, -1.5, 2.0])),
    st.just(("avgpool",)),
)
BRANCH = st.one_of(LEAF, LEAF, st.tuples(st.just("sum"), st.lists(LEAF, min_size=2, max_size=3), st.booleans()))
BLOCK = st.tuples(st.lists(BRANCH, min_size=2, max_size=4), st.booleans())
MODEL = st.tuples(
    st.sampled_from([4, 8]),
    st.one_of(st.tuples(st.just("single"), BLOCK), st.tuples(st.just("cat"), BLOCK, BLOCK)),
    st.integers(0, 2**16),
)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


class SumOf(nn.Module):
    """``post(b0(x) + b1(x) + ...)``."""

    def __init__(self, branches: list[nn.Module], post: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.post = post

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return self.post(out)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def make_leaf(spec: tuple, channels: int) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        _, k, groups, bias, bn = spec
        groups = {"1": 1, "2": 2, "dw": channels}[groups]
        conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=groups, bias=bias)
        return nn.Sequential(conv, nn.BatchNorm2d(channels)) if bn else conv
    if kind == "identity":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "scale":
        return Scale(spec[1])
    if kind == "avgpool":
        return nn.AvgPool2d(3, 1, 1)
    raise ValueError(spec)


def make_branch(spec: tuple, channels: int) -> nn.Module:
    if spec[0] == "sum":
        _, leaves, bn = spec
        return SumOf([make_leaf(leaf, channels) for leaf in leaves], nn.BatchNorm2d(channels) if bn else nn.Identity())
    return make_leaf(spec, channels)


def make_block(spec: tuple, channels: int) -> nn.Module:
    branches, post_bn = spec
    return SumOf([make_branch(b, channels) for b in branches], nn.BatchNorm2d(channels) if post_bn else nn.Identity())


def make_model(spec: tuple) -> tuple[nn.Module, torch.Tensor]:
    channels, body, seed = spec

    def factory() -> nn.Module:
        if body[0] == "single":
            return make_block(body[1], channels)
        return Concat(make_block(body[1], channels), make_block(body[2], channels))

    return build(factory, seed), rand(2, channels, SIZE, SIZE, seed=seed + 1)


def leaves(spec: Any) -> list[tuple]:
    """Every leaf spec of a model spec."""
    channels, body, _ = spec
    result = []
    for branches, _ in body[1:]:
        for branch in branches:
            result += branch[1] if branch[0] == "sum" else [branch]
    return result


def is_per_channel_affine(leaf: tuple, channels: int) -> bool:
    """Identity, BN, scalar scale, or a depthwise 1x1 conv: a per-channel ``a * x + b``."""
    if leaf[0] == "conv":
        _, k, groups, _, _ = leaf
        return k == 1 and groups == "dw"
    return leaf[0] in ("identity", "bn", "scale")


def arith(counts: dict[str, int]) -> dict[str, int]:
    names = ("convolution", "batch_norm", "add", "mul", "sub", "div", "cat", "avg_pool2d")
    return {name: counts[name] for name in names if counts[name]}


# -- properties ---------------------------------------------------------------------------------

@SETTINGS
@given(MODEL)
def test_random_block_is_exact_and_never_slower(spec):
    model, x = make_model(spec)
    gm, report = reparam(model, x)
    assert_matches(model, gm, x)
    executed = ops(gm, x)
    before, after = arith(ops(model, x)), arith(executed)
    # a rewrite only happens when it executes fewer ops (x + avgpool(x) may become one conv)
    assert sum(after.values()) <= sum(before.values()), (before, after)
    # the report describes what the result executes
    assert report.ops_after == {k: executed[k] for k in ("convolution", "batch_norm", "add", "total")}


@SETTINGS
@given(MODEL)
def test_random_block_fully_merges_with_cost_always(spec):
    model, x = make_model(spec)
    gm, report = reparam(model, x, cost="always")
    assert_matches(model, gm, x)
    counts = arith(ops(gm, x))
    channels, body, _ = spec
    if body[0] == "cat" or not all(is_per_channel_affine(leaf, channels) for leaf in leaves(spec)):
        assert counts == {"convolution": 1}, f"{counts}\n{report}"
    else:
        # a per-channel map: never a conv; at most a scale (mul) and a shift (add). Two ops that
        # are already that cheap (``x + bn(x)``: one BN and one add) are left as they are.
        assert counts.get("convolution", 0) == 0, counts
        assert sum(counts.values()) <= 2 and not set(counts) - {"mul", "add", "batch_norm"}, counts
