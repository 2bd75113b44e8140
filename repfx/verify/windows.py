"""Windows of the activations on which a local proof checks everything the whole map checks.

A region that is spatially local (convolutions, average pools, constant pads,
BatchNorm and per-channel or elementwise arithmetic) computes each output position
from a window of its input: along each spatial dim, position ``o`` reads input
``[o*S - low, o*S + high]`` (``S`` the product of the strides on the way, ``low``
and ``high`` the taps and paddings composed; a sum of branches reads the union,
which needs one ``S`` for all). Which numbers it computes there depends on one thing
besides the window: whether the window, at any op of the region, reaches past the
map's border (into a padding, a pool's count, a ceil-mode window). If the window
lies inside the map, it reaches past no border at any op (each op's window is
inside the composed one, and the composed one is inside the map), so

* every *interior* position applies one and the same function to its window
  (the region's algebra, shifted by ``S``: the function a fold must reproduce);
* each *border* position (``o*S < low`` or ``o*S + high > size - 1``) is its own
  case, reading only the first or the last ``low + high`` inputs.

The proof therefore keeps, per spatial dim, the first ``head = low + high + S`` inputs
(the first border positions and one interior window) and the last ``tail = low + high``
(the last border positions) plus the remainder that makes the dropped middle ``m*S``
long (the stride phase). Every op's map then shrinks by ``m`` times its remaining
stride, floor and ceil sizes included, so the last positions of the cropped map are
the whole map's last positions shifted by ``m``. With the crop a product over the
dims, every combination of per-dim cases is present (a corner is a border in both):

* every border position of the whole map is a position of the cropped one, reading
  the same inputs (the head's at the start; the tail's, shifted, at the end), so it
  is checked on exactly the numbers the whole map gives it: a padding mistake, at
  either border, in any phase, fails here as it fails there;
* the interior function is checked on at least one window of real, contiguous
  activations per input set and on the windows across the seam (the same real
  values, spliced): the function a wrong fold gets wrong, on several windows
  instead of all of them. Folded regions are affine, so a wrong fold's difference is
  a fixed non-zero affine map of the window; it passes only if it vanishes on every
  one of these windows of every input set (the seeded one included), and the
  end-to-end check still runs on whole maps in the model's dtype.

A refutation on the windows is stated from the whole maps (``repfx.verify.local``
re-proves there), so a refused fold reads exactly as before.

Anything else (a global pool, a reshape, a linear over flattened features, a
transposed convolution, attention, a constant with a spatial extent, branches of
different strides) returns no windows: that region is proven on whole maps.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

# Ops that compute each position from the same position of their inputs (broadcasting allowed).
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar,
                aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.neg.default, aten.clone.default,
                aten.alias.default, aten.detach.default, aten._to_copy.default}
_BATCH_NORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_POOL = {aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default}
_WINDOWED = _BATCH_NORM | _CONV | _POOL | {aten.constant_pad_nd.default, aten.pad.default}
_CONSTANT = "constant"  # a value that does not depend on the inputs (weights, BN statistics)


class _NotLocal(Exception):
    """An op, or an operand, this module cannot place windows for: the proof uses whole maps."""


@dataclass(frozen=True)
class Reach:
    """Per spatial dim: position ``o`` reads input positions ``o*stride - low ... o*stride + high``."""

    stride: tuple[int, ...]
    low: tuple[int, ...]
    high: tuple[int, ...]

    def then(self, stride: Sequence[int], extent: Sequence[int], pad_low: Sequence[int]) -> Reach:
        """This reach followed by a window op (``extent`` taps, ``pad_low`` padding before the first)."""
        return Reach(tuple(s * t for s, t in zip(self.stride, stride)),
                     tuple(p * s + lo for s, p, lo in zip(self.stride, pad_low, self.low)),
                     tuple((e - 1 - p) * s + hi for s, e, p, hi in zip(self.stride, extent, pad_low, self.high)))

    def union(self, other: Reach) -> Reach:
        if self.stride != other.stride:
            raise _NotLocal("branches of different strides")
        return Reach(self.stride, tuple(map(max, self.low, other.low)), tuple(map(max, self.high, other.high)))


@dataclass(frozen=True)
class Windows:
    """Per spatial dim (negative index): the map's size and how many inputs to keep at its start and end."""

    dims: tuple[tuple[int, int, int, int, int], ...]  # (dim, size, head, tail, stride)

    def crop(self, value: Any) -> Any:
        """``value`` with the middle of each cropped dim dropped (values constant along a dim are kept)."""
        if not isinstance(value, torch.Tensor):
            return value
        for dim, size, head, tail, _ in self.dims:
            if value.dim() >= -dim and value.shape[dim] == size:
                value = torch.cat((value.narrow(dim, 0, head), value.narrow(dim, size - tail, tail)), dim)
        return value

    def fits(self, cropped: torch.Tensor, whole: Sequence[int]) -> bool:
        """Whether ``cropped``, an output on the windows, is the output of ``whole`` shape less the
        dropped inputs over the stride along each cropped dim (as the phase argument says it is)."""
        return all(cropped.dim() >= -dim and cropped.shape[dim] == whole[dim] - (size - head - tail) // stride
                   for dim, size, head, tail, stride in self.dims)


def windows(nodes: Sequence[fx.Node], outputs: Sequence[fx.Node], is_constant: Callable[[fx.Node], bool]) -> Windows | None:
    """Windows on which ``nodes`` (a region and its replacement, in graph order) prove as much at
    ``outputs`` as on whole maps; None where that cannot be shown (prove on whole maps)."""
    value = outputs[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 3:
        return None  # no spatial dims (a linear over features, a scalar)
    try:
        reach, size = _Reaches(nodes, value.dim() - 2, is_constant).of(outputs)
    except _NotLocal:
        return None
    dims = []
    for index, (stride, low, high) in enumerate(zip(reach.stride, reach.low, reach.high)):
        if low < 0 or high < 0:
            return None  # a window beside its position (a negative pad): not worth the argument
        head = low + high + stride  # the first border positions and one interior window of real activations
        tail = low + high  # the last border positions
        tail += (size[index] - head - tail) % stride  # drop a multiple of the stride: the phase is kept
        if head + tail < size[index]:
            dims.append((index - len(size), size[index], head, tail, stride))
    return Windows(tuple(dims)) if dims else None


class _Reaches:
    """The reach of each node of a region from the activations it reads (all of one spatial size)."""

    def __init__(self, nodes: Sequence[fx.Node], rank: int, is_constant: Callable[[fx.Node], bool]) -> None:
        self.rank, self.is_constant = rank, is_constant
        self.inside = set(nodes)
        self.sizes: set[tuple[int, ...]] = set()
        self.reach: dict[fx.Node, Any] = {}  # a Reach, _CONSTANT, or None (constant along every spatial dim)
        for node in nodes:
            self.reach[node] = self._op(node)

    def of(self, outputs: Sequence[fx.Node]) -> tuple[Reach, tuple[int, ...]]:
        reaches = [self.reach.get(node) for node in outputs]
        if not all(isinstance(reach, Reach) for reach in reaches) or len(self.sizes) != 1:
            raise _NotLocal("outputs that do not read one spatial map")
        union = reaches[0]
        for reach in reaches[1:]:
            union = union.union(reach)
        return union, next(iter(self.sizes))

    def _arg(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return _CONSTANT
        if arg in self.inside:
            return self.reach[arg]
        if self.is_constant(arg):  # not state the graph writes: the proof reads that as it runs
            return _CONSTANT
        value = arg.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise _NotLocal(f"{arg.name} is not a tensor")
        if not all(type(length) is int for length in value.shape[-self.rank:]):
            raise _NotLocal(f"{arg.name} has symbolic spatial sizes")  # windows are cut at fixed positions
        if all(length == 1 for length in value.shape[-self.rank:]):
            return None  # constant along space ([N, C, 1, 1]): read alike by every position
        if value.dim() != self.rank + 2:
            raise _NotLocal(f"{arg.name} has another layout")
        self.sizes.add(tuple(value.shape[2:]))
        return Reach((1,) * self.rank, (0,) * self.rank, (0,) * self.rank)

    def _op(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return _CONSTANT
        if node.op != "call_function":
            raise _NotLocal(node.op)
        target = node.target
        if target in _ELEMENTWISE:
            return self._elementwise(node)
        if target is operator.getitem:  # the output of a BatchNorm that returns its statistics too
            source, index = node.args
            if index != 0 or getattr(source, "target", None) not in _BATCH_NORM:
                raise _NotLocal("getitem")
            return self._arg(source)
        if target not in _WINDOWED:
            raise _NotLocal(str(target))
        arguments = node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True)
        if arguments is None:
            raise _NotLocal(f"{node.name}: arguments that do not match the schema")
        given = arguments.kwargs
        if target in _BATCH_NORM:
            if given.get("training"):
                raise _NotLocal("a BatchNorm in training mode averages over the whole map")
            window = None
        elif target in _CONV:
            if given.get("transposed"):
                raise _NotLocal("a transposed convolution")
            kernel = _shape(given["weight"])[-self.rank:]
            extent = [(k - 1) * d + 1 for k, d in zip(kernel, self._per_dim(given["dilation"]))]
            window = (self._per_dim(given["stride"]), extent, self._per_dim(given["padding"]))
        elif target in _POOL:
            kernel = self._per_dim(given["kernel_size"])
            window = (self._per_dim(given["stride"]) if given["stride"] else kernel, kernel,
                      self._per_dim(given["padding"]))
        else:  # a constant pad: [low, high] pairs from the last dim back
            if given.get("mode", "constant") != "constant":
                raise _NotLocal("a reflecting or replicating pad")  # reads the map, not a constant, past the border
            pad = list(given["pad"])
            if len(pad) > 2 * self.rank:
                raise _NotLocal("a pad of the channels")
            pad += [0] * (2 * self.rank - len(pad))
            window = ((1,) * self.rank, (1,) * self.rank, tuple(reversed(pad[0::2])))
        return self._windowed(node, given.get("input", given.get("self")), window)

    def _elementwise(self, node: fx.Node) -> Any:
        result = _CONSTANT
        for arg in node.all_input_nodes:
            reach = self._arg(arg)
            if reach is _CONSTANT:
                value = arg.meta.get("val")
                if value is None or arg.op == "get_attr":
                    value = _attr(arg)
                if isinstance(value, torch.Tensor) and any(length != 1 for length in value.shape[-self.rank:]):
                    raise _NotLocal(f"{arg.name} is a constant with a spatial extent")
                reach = None
            if isinstance(reach, Reach):
                result = reach if not isinstance(result, Reach) else result.union(reach)
            elif result is _CONSTANT:
                result = reach
        return result

    def _windowed(self, node: fx.Node, source: Any, window: tuple | None) -> Reach:
        """An op that reads ``source`` through ``window`` (None: position by position); its other
        operands (weights, statistics) must not depend on the inputs."""
        reach = self._arg(source)
        if not isinstance(reach, Reach):
            raise _NotLocal(f"{node.name} reads no spatial map")
        if any(self._arg(arg) is not _CONSTANT for arg in node.all_input_nodes if arg is not source):
            raise _NotLocal(f"{node.name} has weights computed from the inputs")
        return reach if window is None else reach.then(*window)

    def _per_dim(self, value: Any) -> tuple[int, ...]:
        values = [value] if isinstance(value, int) else list(value)
        if not all(isinstance(v, int) for v in values) or len(values) not in (1, self.rank):
            raise _NotLocal(f"geometry {value!r}")
        return tuple(values * self.rank if len(values) == 1 else values)


def _shape(node: Any) -> tuple[int, ...]:
    value = node.meta.get("val") if isinstance(node, fx.Node) else node
    if not isinstance(value, torch.Tensor) and isinstance(node, fx.Node) and node.op == "get_attr":
        value = _attr(node)
    if not isinstance(value, torch.Tensor):
        raise _NotLocal("a weight of unknown shape")
    return tuple(value.shape)


def _attr(node: fx.Node) -> Any:
    value: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value
