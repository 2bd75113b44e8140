"""Rules: eval BatchNorm as a per-channel affine (``batch_norm``, ``_native_batch_norm_legit_no_training``).

Only running statistics make BN affine in its input: training-mode BN, or a BN
without running statistics, normalizes with batch statistics and is no region.
"""

from __future__ import annotations

import operator
import torch
from torch import fx

from repfx.passes.algebra import kernels
from repfx.passes.algebra.forms import ConvForm
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, rule

aten = torch.ops.aten


def _batch_norm_form(an: Analyzer, node: fx.Node) -> ConvForm:
    """``node`` is the batch-norm op itself (the owner of its statistics)."""
    op = an.arguments(node)
    stats = [an.weight(node, op[name], what) if op[name] is not None else None
             for name, what in (("weight", "BN weight"), ("bias", "BN bias"), ("running_mean", "running_mean"),
                                ("running_var", "running_var"))]
    if stats[2] is None or stats[3] is None:
        raise NotLinear
    as64 = [None if t is None else t.to(torch.float64) for t in stats]
    scale, shift = kernels.batch_norm_scale_shift(as64[2], as64[3], as64[0], as64[1], float(op["eps"]))
    return ConvForm.affine(scale, shift, len(an.sample_shape(op["input"])) - 1)


@rule(operator.getitem)
def batch_norm_output(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """Output 0 of a functionalized eval BN (``_native_batch_norm_legit_no_training``); the BN joins the region."""
    bn, index = node.args
    if not isinstance(bn, fx.Node) or bn.target is not aten._native_batch_norm_legit_no_training.default or index != 0:
        raise NotLinear
    if any(user is not node for user in bn.users):
        raise NotLinear  # saved statistics are consumed elsewhere
    return an.apply(_batch_norm_form(an, bn), operand(an.arguments(bn)["input"]), node, extra_ops=(bn,))


@rule(aten.batch_norm.default)
def batch_norm(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``aten.batch_norm`` as export leaves it in a graph without mutations."""
    if an.arguments(node)["training"]:
        raise NotLinear  # training-mode BN normalizes with batch statistics: not affine in x
    return an.apply(_batch_norm_form(an, node), operand(an.arguments(node)["input"]), node)
