"""``cost="measure"``: time two forms of a region on the device, side by side, in the runtime being built for.

A ``Work`` lists ops with their geometry; ``WorkModule`` builds them again with
seeded random weights. An op reads the previous op's output when the shapes match
(a chain, or a branch reading what was just written, as the region does: the data
is in cache), else a random input of its own of the real size. The timer runs that
module as the runtime would (``Runtime.timed``: the module itself for eager PyTorch).

Only contested comparisons are timed (``MeasuredCost``). The two forms are timed in
alternating rounds, so that a load that comes and goes on the machine weighs on both
alike, and each pair is timed once per shape signature: the same block repeated
through a network costs one measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from repfx.capture.inputs import drawer
from repfx.passes.cost import Op, Work
from repfx.targets.clock import interleaved_seconds
from repfx.targets.runtime import Runtime, as_module

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class WorkModule(nn.Module):
    """Every op of a work, in order, each reading its predecessor's output or its own input (``inputs()``);
    weights and inputs are drawn by the one draw rule (``repfx.capture.inputs``), from one seeded generator."""

    def __init__(self, work: Work, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        self.ops = work.ops
        self.batch, self.dtype, self.device = batch, dtype, device
        self.draw = drawer(seed)
        self.weights = nn.ParameterList([nn.Parameter(self._random(*shape), requires_grad=False)
                                         for op in self.ops for shape in _weight_shapes(op)])

    def _random(self, *shape: int) -> torch.Tensor:
        return self.draw(shape, self.dtype, self.device)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """One random input per op, of its real size; ``forward`` uses it where the op does not read its
        predecessor's output (an unused input costs a runtime nothing but being passed)."""
        return tuple(self._random(self.batch, *_input_shape(op)) for op in self.ops)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs no later op reads: what the form hands on. Returning every intermediate would make
        a compiled runtime write out (ONNX Runtime: copy out) values the region keeps inside."""
        weights = iter(self.weights)
        outputs: list[torch.Tensor] = []
        read: set[int] = set()
        for op, x in zip(self.ops, inputs):
            previous = outputs[-1] if outputs else None
            if previous is not None and previous.shape == x.shape:
                x = previous
                read.add(len(outputs) - 1)
            outputs.append(_run(op, x, weights))
        return tuple(output for index, output in enumerate(outputs) if index not in read)


def _input_shape(op: Op) -> tuple[int, ...]:
    """Per sample: ``(C, *spatial)``, and a linear's rows first, its channel last (``F.linear`` mixes the last dim)."""
    shape = tuple(op.layout[0])
    return shape[1:] + shape[:1] if op.kind == "linear" else shape


def _weight_shapes(op: Op) -> list[tuple[int, ...]]:
    if op.kind == "elementwise":
        shape, _operands = op.layout
        return [(shape[0],), (shape[0],)] if op.params else []  # a per-channel scale and shift (a lone BN)
    in_shape, out_channels, kernel, _stride, _padding, _dilation, groups = op.layout[:7]
    if op.kind == "linear":
        return [(out_channels, in_shape[0]), (out_channels,)]
    if op.kind == "conv_transpose":
        return [(in_shape[0], out_channels // groups, *kernel), (out_channels,)]
    return [(out_channels, in_shape[0] // groups, *kernel), (out_channels,)]


def _run(op: Op, x: torch.Tensor, weights) -> torch.Tensor:
    if op.kind == "elementwise":
        shape, operands = op.layout
        if op.params:  # one kernel, as an inference BatchNorm is
            scale, shift = next(weights), next(weights)
            view = (-1,) + (1,) * (len(shape) - 1)
            return torch.addcmul(shift.view(view), x, scale.view(view))
        if operands == 1:
            return x.clone()  # a copy (a concatenation writes each part once)
        return sum((x for _ in range(operands - 1)), x)  # an n-way add reads n tensors of this size
    weight, bias = next(weights), next(weights)
    if op.kind == "linear":
        return F.linear(x, weight, bias)
    _in, _out, kernel, stride, padding, dilation, groups = op.layout[:7]
    if op.kind == "conv_transpose":
        return _CONV_T[len(kernel)](x, weight, bias, stride, padding, op.layout[7], groups, dilation)
    return _CONV[len(kernel)](x, weight, bias, stride, padding, dilation, groups)


class WorkTimer:
    """Seconds to run each of two works once on ``device`` at ``batch`` and ``dtype``, in ``runtime``
    (None: eager PyTorch), timed in alternating rounds; cached per pair of works."""

    def __init__(self, device: torch.device | str, batch: int, dtype: str, runtime: Runtime | None = None) -> None:
        self.device, self.batch, self.dtype, self.runtime = torch.device(device), batch, dtype, runtime
        self.seconds: dict[tuple, tuple[float, float]] = {}

    def __call__(self, first: Work, second: Work) -> tuple[float, float]:
        key = (_signature(first), _signature(second))
        if key not in self.seconds:
            timed = [work for work in (first, second) if work.ops]  # a work of no ops takes no time
            seconds = iter(interleaved_seconds([self._call(work) for work in timed], self.device))
            self.seconds[key] = tuple(next(seconds) if work.ops else 0.0 for work in (first, second))
        return self.seconds[key]

    def _call(self, work: Work) -> Callable[[], object]:
        module = WorkModule(work, self.batch, getattr(torch, self.dtype), self.device).eval()
        inputs = module.inputs()
        run = (self.runtime.timed if self.runtime is not None else as_module)(module, inputs)
        return lambda: run(*inputs)


def _signature(work: Work) -> tuple:
    return tuple((op.kind, op.layout) for op in work.ops)
