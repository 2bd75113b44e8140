"""Rules: average pooling, zero padding, and DBB's border fill (padding with a per-channel value).

Each is a convolution with a fixed kernel or a change of the output border. Pooling
with partial or unevenly divided windows (``ceil_mode``, ``count_include_pad=False``,
``divisor_override``), non-zero padding modes and asymmetric padding have no exact
convolution form and are refused with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx

from repfx.passes.algebra import kernels
from repfx.passes.algebra.forms import ConvForm, NotExact
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, as_ints, per_channel, rule

aten = torch.ops.aten


_POOL_RANK = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


@rule(*_POOL_RANK)
def avg_pool(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A depthwise convolution whose kernel is the window's average."""
    op = an.arguments(node)
    shape = an.sample_shape(node)
    rank = len(shape) - 1
    if rank != _POOL_RANK[node.target]:
        raise NotLinear  # unbatched input: dim 1 is not the channel dim
    kernel_size = as_ints(op["kernel_size"], rank)
    stride = as_ints(op["stride"], rank) if op["stride"] else kernel_size  # export's default stride is []
    padding = as_ints(op["padding"], rank)
    if op["ceil_mode"]:
        raise NotExact("pool-window", f"{node.name}: ceil_mode pooling has partial windows at the border")
    if any(padding) and op["count_include_pad"] is False:
        raise NotExact("pool-window", f"{node.name}: count_include_pad=False divides border windows by fewer pixels")
    if op.get("divisor_override") is not None:  # avg_pool1d has none
        raise NotExact("pool-window", f"{node.name}: divisor_override is not a plain average")
    kernel = kernels.avgpool_kernel(shape[0], kernel_size)
    form = ConvForm.convolution(kernel, None, stride, padding, (1,) * rank, shape[0])
    return an.apply(form, operand(op["input"]), node)


def _symmetric_padding(node: fx.Node, pad: Sequence[int], rank: int) -> tuple[int, ...]:
    pad = list(pad)
    if len(pad) % 2 or len(pad) > 2 * rank:
        raise NotExact("padding", f"{node.name}: pads non-spatial dims {pad}")
    pad += [0] * (2 * rank - len(pad))
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(rank)][::-1]  # F.pad lists the last dim first
    if any(left != right or left < 0 for left, right in pairs):
        raise NotExact("padding", f"{node.name}: asymmetric or negative padding {pad} has no convolution equivalent")
    return tuple(left for left, _ in pairs)


@rule(aten.constant_pad_nd.default, aten.pad.default)
def pad(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """Symmetric constant padding of a single branch: the branch's output gets a border."""
    if any(user.target is aten.slice_scatter.default and user.args[0] is node for user in node.users):
        raise NotLinear  # border writes follow: the border-fill rule owns this pad
    op = an.arguments(node)
    mode, value = op.get("mode", "constant"), op["value"]  # constant_pad_nd has no mode
    if mode != "constant":
        raise NotExact("padding-mode", f"{node.name}: {mode} padding is not zero padding")
    shape = an.sample_shape(node)
    padding = _symmetric_padding(node, op["pad"], len(shape) - 1)
    value_vec = None if not value else torch.full((shape[0],), float(value), dtype=torch.float64)
    return an.pad(node, operand(op["input"]), padding, value_vec)


def _fill_value(an: Analyzer, src: Any, shape: tuple[int, ...]) -> Tensor:
    """The per-channel constant a border write stores (``copy(slice, expand(c))`` or ``c``)."""
    if isinstance(src, fx.Node) and src.target is aten.copy.default:
        src = src.args[1]
    if isinstance(src, fx.Node) and src.target is aten.expand.default:
        src = src.args[0]
    value = per_channel(an.constants.value(src), shape)
    if value is None:
        raise NotExact("border-fill", f"border write of {getattr(src, 'name', src)} is not a per-channel constant")
    return value


@rule(aten.slice_scatter.default)
def border_fill(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """Zero pad + writes of one per-channel constant into exactly the border strips.

    This is padding with a per-channel value, as DBB's BN-and-pad layer writes it
    with slice assignments (functionalized into a chain of ``slice_scatter``).
    """
    if any(user.target is aten.slice_scatter.default and user.args[0] is node for user in node.users):
        raise NotLinear  # not the last write: the last one handles the whole chain
    chain = []
    current = node
    while isinstance(current, fx.Node) and current.target is aten.slice_scatter.default:
        chain.append(current)
        current = current.args[0]
    pad_node = current
    if not isinstance(pad_node, fx.Node) or pad_node.target not in (aten.pad.default, aten.constant_pad_nd.default):
        raise NotLinear
    shape = an.sample_shape(node)
    rank = len(shape) - 1
    pad_op = an.arguments(pad_node)
    padding = _symmetric_padding(pad_node, pad_op["pad"], rank)
    if pad_op.get("mode", "constant") != "constant" or pad_op["value"] not in (None, 0, 0.0):
        raise NotLinear
    ops = {pad_node, *chain}
    value = None
    writes = set()
    for scatter in chain:
        src, dim, start, end, step = (an.arguments(scatter)[name] for name in ("src", "dim", "start", "end", "step"))
        fill = _fill_value(an, src, shape)
        if value is not None and not torch.allclose(fill, value, rtol=0, atol=0):
            raise NotExact("border-fill", f"{scatter.name}: border strips hold different values")
        value = fill
        if isinstance(src, fx.Node) and src.target is aten.copy.default:
            ops |= {src, src.args[0]}
            fill_node = src.args[1]
            if isinstance(fill_node, fx.Node) and fill_node.target is aten.expand.default:
                ops.add(fill_node)  # expand(c, [batch, ...]) is not constant under a dynamic batch
        size = shape[dim - 1]
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None or end > size else (end + size if end < 0 else end)
        if step != 1 or dim < 2:
            raise NotLinear
        writes.add((dim - 2, start, end))
    expected = {(d, 0, p) for d, p in enumerate(padding) if p} | {(d, shape[d + 1] - p, shape[d + 1])
                                                                  for d, p in enumerate(padding) if p}
    if writes != expected:
        raise NotExact("border-fill", f"{node.name}: writes {sorted(writes)} are not exactly the padded border {sorted(expected)}")
    for op in ops - {node}:
        if any(user not in ops for user in op.users):
            raise NotLinear
    return an.pad(node, operand(pad_op["input"]), padding, value, frozenset(ops))
