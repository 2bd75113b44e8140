"""Check whether the constant tensors of a graph survive a cast to fp16 / bf16.

Folding BatchNorm multiplies a kernel by ``gamma / sqrt(running_var + eps)``: a channel
with a near-zero running variance (dead or rarely active channels) or a large gamma gets
weights far beyond fp16's largest finite value (65504), which become ``inf`` when an
engine is built in fp16. Tiny folded weights fall below fp16's smallest normal value
(~6.1e-5) and lose precision as subnormals, or flush to zero. The training-form model
never showed either, so this report is the first place the problem can be seen.

What is checked: every floating-point tensor fetched by a ``get_attr`` node that has at
least one user, not only conv / linear weights and biases. Every such constant is cast
when the engine is built in reduced precision (a bias fed to ``aten.add``, a scale fed to
``aten.mul`` just as much as a convolution weight), and an ``inf`` in any of them poisons
the output. Integer and bool constants are skipped: they are not cast. Unused constants
are skipped: they never reach an engine.

What is counted is what the cast actually does (``tensor.to(dtype)``), not a comparison
with ``finfo`` alone: under round-to-nearest 65519 still becomes 65504 in fp16, and only
values from 65520 up become ``inf``.

What is a problem: any overflow, always. Underflow only when more than
``UNDERFLOW_SHARE`` of a tensor's values underflow. Randomly initialized or trained
weights always have a few values near zero (up to ~0.4% of a tensor in the bundled
samples); as subnormals they keep an absolute error below 6e-8, which is harmless. A
tensor whose values largely sit below the smallest normal (a BN-scaled channel with a tiny
gamma) has lost its relative precision, and that is what is flagged. The counts themselves
are always exact.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from repfx.backends.precision import PRECISIONS

# Share of a tensor's values that may underflow before the tensor is flagged (see above).
UNDERFLOW_SHARE = 0.05

# Short names for the summary line; others fall back to str(dtype).
_LABELS = {precision.dtype: name for name, precision in PRECISIONS.items() if not precision.quantized} | {
    torch.float64: "fp64"}


@dataclass(frozen=True)
class LayerRange:
    """How one constant tensor fares when cast to ``dtype``.

    ``node`` is the first node (in graph order) that consumes the tensor, the layer a
    user recognizes; ``tensor`` is the ``get_attr`` target. ``overflow`` counts finite
    values that become ``±inf``; ``underflow`` counts nonzero values that become zero or
    subnormal. ``max_abs`` / ``min_abs_nonzero`` are taken before the cast;
    ``min_abs_nonzero`` is None when every value is zero.
    """

    node: str
    tensor: str
    numel: int
    overflow: int
    underflow: int
    max_abs: float
    min_abs_nonzero: float | None
    dtype: torch.dtype = torch.float16

    def has_problem(self, underflow_share: float = UNDERFLOW_SHARE) -> bool:
        """True when any value overflows, or more than ``underflow_share`` of the values underflow."""
        return self.overflow > 0 or self.underflow > underflow_share * self.numel


@dataclass(frozen=True)
class RangeSummary:
    """Totals over a report, and the rows that have a problem."""

    dtype: torch.dtype
    tensors: int
    values: int
    overflow: int
    underflow: int
    problems: tuple[LayerRange, ...]


def check_tensor(tensor: torch.Tensor, dtype: torch.dtype = torch.float16) -> tuple[int, int, float, float | None]:
    """``(overflow, underflow, max_abs, min_abs_nonzero)`` of casting ``tensor`` to ``dtype``.

    Pure tensor math, so it can be used on a state dict as well as on a graph.
    """
    _check_dtype(dtype)
    t = tensor.detach()
    if t.numel() == 0:
        return 0, 0, 0.0, None
    cast = t.to(dtype)
    overflow = int((torch.isfinite(t) & torch.isinf(cast)).sum())
    nonzero = t != 0
    # NaN is neither overflow nor underflow: the cast keeps it NaN and the comparison is False.
    underflow = int((nonzero & (cast.abs() < torch.finfo(dtype).tiny)).sum())
    magnitude = t.abs()
    max_abs = float(magnitude.max())
    min_abs_nonzero = float(magnitude[nonzero].min()) if bool(nonzero.any()) else None
    return overflow, underflow, max_abs, min_abs_nonzero


def weight_range_report(gm: fx.GraphModule, dtype: torch.dtype = torch.float16) -> list[LayerRange]:
    """One :class:`LayerRange` per used floating-point constant of ``gm``, in graph order."""
    _check_dtype(dtype)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}  # node names do not sort in graph order
    rows = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        if not node.users:
            continue  # dead constant: it is never cast into an engine
        try:
            value = operator.attrgetter(node.target)(gm)  # a dotted path into gm
        except AttributeError as e:
            raise ValueError(f"get_attr target {node.target!r} does not exist on the graph module") from e
        if not isinstance(value, torch.Tensor):
            continue  # a submodule or other object (e.g. a higher-order op's body), not data
        if not value.is_floating_point():
            continue  # integer / bool constants are not cast to reduced precision
        overflow, underflow, max_abs, min_abs = check_tensor(value, dtype)
        consumer = min(node.users, key=position.__getitem__)
        rows.append(
            LayerRange(consumer.name, str(node.target), value.numel(), overflow, underflow, max_abs, min_abs, dtype)
        )
    return rows


def summarize_ranges(
    rows: Sequence[LayerRange],
    dtype: torch.dtype | None = None,
    *,
    underflow_share: float = UNDERFLOW_SHARE,
) -> RangeSummary:
    """Totals of ``rows`` and the rows with a problem (see :meth:`LayerRange.has_problem`).

    ``dtype`` defaults to the rows' own (fp16 for an empty report).
    """
    dtypes = {row.dtype for row in rows}
    if len(dtypes) > 1:
        raise ValueError(
            f"rows were checked against different dtypes {sorted(map(str, dtypes))}; summarize each separately"
        )
    if dtype is None:
        dtype = dtypes.pop() if dtypes else torch.float16
    elif dtypes and dtype not in dtypes:
        raise ValueError(f"rows were checked against {dtypes.pop()}, not {dtype}")
    return RangeSummary(
        dtype=dtype,
        tensors=len(rows),
        values=sum(r.numel for r in rows),
        overflow=sum(r.overflow for r in rows),
        underflow=sum(r.underflow for r in rows),
        problems=tuple(r for r in rows if r.has_problem(underflow_share)),
    )


def format_range_table(
    rows: Sequence[LayerRange],
    dtype: torch.dtype | None = None,
    *,
    underflow_share: float = UNDERFLOW_SHARE,
    limit: int = 20,
) -> str:
    """A short text report: the problem rows (at most ``limit``) and one summary line.

    With no problem the report is the summary line alone, so CLI output stays one line
    for the common case.
    """
    summary = summarize_ranges(rows, dtype, underflow_share=underflow_share)
    label = _LABELS.get(summary.dtype, str(summary.dtype))
    line = (
        f"{label} range: {summary.tensors} tensors, {summary.values} values checked: "
        f"{summary.overflow} beyond {label} max, {summary.underflow} below smallest normal"
    )
    if not summary.problems:
        return line
    header = ("node", "tensor", "values", "overflow", "underflow", "max|v|", "min|v|>0")
    table = [header] + [
        (
            r.node,
            r.tensor,
            str(r.numel),
            str(r.overflow),
            str(r.underflow),
            f"{r.max_abs:.3g}",
            "-" if r.min_abs_nonzero is None else f"{r.min_abs_nonzero:.3g}",
        )
        for r in summary.problems[:limit]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    hidden = len(summary.problems) - limit
    if hidden > 0:
        lines.append(f"... and {hidden} more tensors with problems")
    return "\n".join(lines + [line])


def _check_dtype(dtype: torch.dtype) -> None:
    """Only floating targets have a range to fall out of."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")

