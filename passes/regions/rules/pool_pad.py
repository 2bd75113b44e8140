"""Rules: average pooling, zero padding, crops (a spatial slice), and DBB's border fill (padding with a value).

Each is a convolution with a fixed kernel or a change of the output border: a crop is
negative padding, so a branch that reads ``x[:, :, 1:-1]`` reads ``x`` (ACNet). Pooling
with partial or unevenly divided windows (``ceil_mode``, ``count_include_pad=False``,
``divisor_override``), non-zero padding modes and asymmetric padding or crops have no
exact convolution form and are refused with that reason. A pool whose window spans the
whole feature map (an SE block's squeeze) is refused too: folded into a kernel, the
graph would hold only at the one resolution it was captured at.
"""

from __future__ import annotations

import math
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
    spatial = an.sample_shape(op["input"])[1:]
    if math.prod(kernel_size) > 1 and all(k >= n + 2 * p for k, n, p in zip(kernel_size, spatial, padding)):
        raise NotExact("whole-map-pool", f"{node.name}: the {'x'.join(map(str, kernel_size))} window spans the whole "
                       f"{'x'.join(map(str, spatial))} feature map; as a kernel it would hold only at this resolution")
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


@rule(aten.slice.Tensor)
def crop(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``x[..., c:-c, ...]`` on a spatial dim: the identity with padding ``-c`` there (it reads fewer pixels).

    A conv of the crop is then a conv of ``x`` with less padding, on the same output
    grid as its unpadded siblings (ACNet's ``padding < k // 2`` branches). A crop by
    different amounts on the two sides shifts the grid: no convolution pads so.
    """
    op = an.arguments(node)
    x, step = op["input"], op["step"]
    value = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() < 4 or not isinstance(op["dim"], int):
        raise NotLinear  # [B, N, C] tokens are sliced to split tokens or channels, not cropped
    dim = op["dim"] % value.dim()
    if dim < 2 or step != 1 or all(user.target is aten.copy.default for user in node.users):
        raise NotLinear  # a batch or channel slice, a strided one, or a border strip DBB writes: no crop
    start, end = op["start"] or 0, op["end"]
    if not isinstance(start, int) or not isinstance(end, (int, type(None))) or start < 0:
        raise NotLinear
    if not isinstance(value.shape[dim], int) and end is not None and end >= 0:
        raise NotLinear  # an end counted from the start of a symbolic size: symmetric at one size only
    size = an.sample_shape(x)[dim - 1]
    end = size if end is None or end > size else (end + size if end < 0 else end)
    if start != size - end:
        raise NotExact("padding", f"{node.name}: crops {start} pixel(s) before and {size - end} after along dim "
                       f"{dim}: not on a convolution's output grid")
    padding = tuple(-start if d == dim - 2 else 0 for d in range(value.dim() - 2))
    return an.apply(ConvForm.zero_pad(an.sample_shape(x)[0], padding), operand(x), node, view=True)


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
