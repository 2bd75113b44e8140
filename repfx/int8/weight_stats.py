"""How INT8-friendly each weighted layer of a plain graph is, and how folding changed that.

Folding BN and identity branches into one kernel widens per-channel weight ranges (an
identity BN scale of 300 lands on one tap); these numbers say where. Per layer:

* ``max_over_std``: per output channel, max|w| / std(w) (std about the channel's mean,
  ``correction=0``; channels with std 0 are left out), reported as the largest and the
  median over channels. A Gaussian 3x3 kernel sits near 3; INT8 resolution falls as
  it grows, since one scale per channel must cover the max;
* ``identity_tap_share``: the share of output channels whose largest |w| is the centre
  tap on their own input channel (output o reading input o, in its group): what
  folding an identity branch makes. None where no identity could have been folded
  (input and output channel counts differ, or a kernel dim is even);
* ``channel_range_spread``: max over output channels of max|w|, over its median: what
  one per-tensor scale suffers, and what cross-layer equalization evens out. A folded
  identity tap of 300 in one channel shows here (max/std is bounded by sqrt(taps per
  channel), ~8.5 for a 3x3 over 8 channels, however large one tap is);
* ``sqnr_db``: 10 log10(sum w^2 / sum (w - q(w))^2) over the whole weight, q being
  symmetric per-channel int8 (scale max|w| / 127, round to nearest even, clamp to
  [-127, 127]), as TensorRT and ModelOpt quantize weights; ``worst_channel_sqnr_db`` the
  same per output channel, its lowest. Energy ratios are carried by the largest taps:
  a channel whose identity tap is 300 keeps a high SQNR while its other taps lose their
  resolution, which ``max_over_std`` shows and SQNR does not;
* ``before``: ``max_over_std`` of the weights the layer was folded from, where they can
  be matched (``before_from`` says which, or why not).

Matching a folded layer to its weights before folding: every op the fold emits
carries the name of the region it replaced (``node.meta["repfx_rewrite"]``), which is
a node of the ``Rewrite`` in the training form's report (``Report.rewrites``) whose
``nodes`` name the replaced ops as in the captured training-form graph
(``repfx.capture.export.capture(model, inputs).graph``). Of that rewrite's convolutions
and linears, the one with the most weights per output channel (the kxk conv of a
RepVGG block) stands for the layer before folding: per output channel, max/std does
not change under folding its BN (a per-channel scale). It is "unknown" where the
plain node carries no rewrite name, the rewrite is not in the report (a region folded
in a later round from already emitted ops), or no replaced layer reads a stored weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from repfx.passes.algebra.equalization import output_ranges, range_spread
from repfx.passes.constants import attribute
from repfx.passes.emit import REWRITE_META
from repfx.passes.equalize import layer
from repfx.report import Rewrite

INT8_LEVELS = 127  # symmetric: [-127, 127], zero point 0


@dataclass(frozen=True)
class Spread:
    """A per-channel number over a layer's output channels."""

    largest: float
    median: float


@dataclass(frozen=True)
class LayerWeightStats:
    layer: str  # the node in the plain graph
    module: str  # the module torch recorded for it ("" where none)
    shape: tuple[int, ...]
    max_over_std: Spread
    identity_tap_share: float | None
    channel_range_spread: float
    sqnr_db: float
    worst_channel_sqnr_db: float
    before: Spread | None  # None: unknown (or not folded: then equal to max_over_std)
    before_from: str  # e.g. "conv2d_1 [8, 8, 3, 3]", "not folded", "unknown: ..."


def max_over_std(weight: Tensor) -> Tensor:
    """[out]: max|w| / std(w) per output channel (NaN where the channel's std is 0)."""
    flat = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    std = flat.std(dim=1, correction=0)
    return torch.where(std > 0, flat.abs().amax(1) / torch.where(std > 0, std, 1), math.nan)


def spread(values: Tensor) -> Spread:
    """Largest and median of ``values``, NaNs left out (both NaN when nothing is left)."""
    kept = values[~values.isnan()]
    if not kept.numel():
        return Spread(math.nan, math.nan)
    return Spread(float(kept.max()), float(kept.median()))


def identity_tap_share(weight: Tensor, groups: int = 1) -> float | None:
    """Share of output channels o whose largest |w| is the centre tap reading input channel o."""
    out, per_group = weight.shape[0], weight.shape[1]
    if out != per_group * groups or any(size % 2 == 0 for size in weight.shape[2:]):
        return None
    magnitude = weight.detach().abs()
    own = torch.arange(out) % per_group  # input channel o, as numbered inside its group
    centre = magnitude[(torch.arange(out), own, *(torch.full((out,), size // 2) for size in weight.shape[2:]))]
    largest = magnitude.reshape(out, -1).amax(1)
    return float(((centre == largest) & (largest > 0)).double().mean())


def int8_sqnr_db(weight: Tensor, *, worst_channel: bool = False) -> float:
    """SQNR in dB of symmetric per-output-channel int8 quantization of ``weight`` (inf when exact); of its worst
    output channel with ``worst_channel``."""
    w = weight.detach().to(torch.float64)
    scale = w.abs().reshape(w.shape[0], -1).amax(1) / INT8_LEVELS
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    safe = torch.where(scale > 0, scale, 1)
    dequantized = torch.where(scale > 0, (w / safe).round().clamp(-INT8_LEVELS, INT8_LEVELS) * safe, 0)
    dims = tuple(range(1, w.dim())) if worst_channel else tuple(range(w.dim()))
    noise, signal = ((w - dequantized) ** 2).sum(dims), (w ** 2).sum(dims)
    ratios = torch.where(noise > 0, signal / torch.where(noise > 0, noise, 1), math.inf)
    return 10 * math.log10(float(ratios.min()))


def weight_stats(plain: fx.GraphModule, *, training: fx.GraphModule | None = None,
                 rewrites: Sequence[Rewrite] = ()) -> list[LayerWeightStats]:
    """The statistics of every convolution and linear of ``plain`` with a stored weight, in graph order.

    ``training`` (the captured training-form graph) and ``rewrites`` (its report's)
    give ``before``; without them it is unknown.
    """
    by_node = {name: rewrite for rewrite in rewrites for name in rewrite.nodes}
    stats = []
    for node in plain.graph.nodes:
        found = layer(plain, node)
        if found is None or found.weight is None or found.transposed:
            continue
        weight = attribute(plain, found.weight.target)
        before, before_from = _before(node, by_node, training, weight)
        stats.append(LayerWeightStats(node.name, _module(node), tuple(weight.shape), spread(max_over_std(weight)),
                                      identity_tap_share(weight, found.groups), range_spread(output_ranges(weight)),
                                      int8_sqnr_db(weight),
                                      int8_sqnr_db(weight, worst_channel=True),
                                      before, before_from))
    return stats


def _before(node: fx.Node, by_node: dict[str, Rewrite], training: fx.GraphModule | None,
            weight: Tensor) -> tuple[Spread | None, str]:
    root = node.meta.get(REWRITE_META)
    if root is None:
        return spread(max_over_std(weight)), "not folded"
    if training is None:
        return None, "unknown: no training-form graph given"
    rewrite = by_node.get(root)
    if rewrite is None:
        return None, f"unknown: the region {root} is not among the report's rewrites (folded from emitted ops)"
    graph_nodes = {n.name: n for n in training.graph.nodes}
    layers = [found for name in rewrite.nodes if name in graph_nodes
              for found in [layer(training, graph_nodes[name])] if found is not None and found.weight is not None]
    if not layers:
        return None, f"unknown: no replaced layer of {root} reads a stored weight"
    widest = max(layers, key=lambda found: _per_channel(attribute(training, found.weight.target)))
    old = attribute(training, widest.weight.target)
    return spread(max_over_std(old)), f"{widest.node.name} {list(old.shape)}"


def _per_channel(weight: Tensor) -> int:
    return weight[0].numel() if weight.dim() else 0




def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


__all__ = ["LayerWeightStats", "Spread", "identity_tap_share", "int8_sqnr_db", "max_over_std", "spread",
           "weight_stats"]
