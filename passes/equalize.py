"""Cross-layer equalization of a plain graph, for INT8: rescale channels between two layers, proven exact.

Folding BN and identity branches into one kernel widens per-channel weight ranges; a
channel whose range dwarfs the rest costs every other channel its INT8 resolution.
Where a convolution (or linear) feeds another through a positively homogeneous
activation (relu, leaky_relu, prelu: ``f(x / s) = f(x) / s`` for s > 0, whatever the
slopes' layout) or through nothing, and nothing else reads the tensors between, output
channel i of the first layer is divided by s_i and input channel i of the second
multiplied by s_i (``repfx.passes.algebra.equalization``: s_i = sqrt(r1_i / r2_i) from
per-channel largest |weight|), round after round over every pair until the scales
settle, since a layer between two pairs is rescaled by both.

Grouped and depthwise layers are handled like dense ones (input channel i lives in
group ``i // (in / groups)``). Transposed convolutions are refused (their weight is
``[in, out / groups, ...]``).

Bias absorption (moving the first layer's bias c into the second: ``W (y - c) + b + W c``)
is exact only with no activation between and a second layer that pads nothing. After
a ReLU it is not: ``relu(x) - c = relu(x - c)`` only where x >= c, so it would hold for
the inputs seen (Nagel et al. pick c from BN statistics), not for every input, and
repfx commits no rewrite that is not exact.

The graph is never modified: ``equalize`` works on a copy. New weights are computed
in float64 and the copy is run against the graph as given in float64 on the given
inputs (the one rounding to the model's dtype comes after the proof); a difference
beyond ``PROOF_RTOL`` of the output's magnitude undoes everything, with the reason.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from repfx.passes.algebra import equalization as eq
from repfx.passes.constants import attribute, float64_values
from repfx.passes.emit import _unique_attr
from repfx.passes.refusals import Refused

aten = torch.ops.aten
PROOF_RTOL = 1e-9  # float64 rescaling moves outputs by ~1e-15 relative; a wrong scale moves them by far more
LAYERS = {aten.conv1d.default: "conv", aten.conv2d.default: "conv", aten.conv3d.default: "conv",
          aten.conv1d.padding: "conv", aten.conv2d.padding: "conv", aten.conv3d.padding: "conv",
          aten.convolution.default: "conv", aten.linear.default: "linear"}
HOMOGENEOUS = {aten.relu.default: "relu", aten.relu_.default: "relu", aten.leaky_relu.default: "leaky_relu",
               aten.leaky_relu_.default: "leaky_relu", aten.prelu.default: "prelu",
               aten._prelu_kernel.default: "prelu"}
WHY_NOT = {aten.hardtanh.default: "clips at fixed bounds (relu6 is hardtanh(0, 6))",
           aten.hardtanh_.default: "clips at fixed bounds (relu6 is hardtanh(0, 6))",
           aten.clamp.default: "clips at fixed bounds"}


@dataclass(frozen=True)
class EqualizedPair:
    """Two layers rescaled against each other, and their per-channel ranges (largest |w|) before and after."""

    first: str  # node names in the graph
    second: str
    activation: str  # "relu", "leaky_relu", "prelu" or "identity"
    first_before: tuple[float, ...]  # per output channel of the first layer
    second_before: tuple[float, ...]  # per input channel of the second layer
    first_after: tuple[float, ...]
    second_after: tuple[float, ...]
    bias_absorbed: bool = False

    def spread(self, after: bool = True) -> float:
        """max / median of the first layer's channel ranges (what a per-tensor INT8 scale suffers)."""
        return eq.range_spread(torch.tensor(self.first_after if after else self.first_before))


@dataclass(frozen=True)
class Equalized:
    graph: fx.GraphModule  # a new graph; the one given is untouched
    pairs: list[EqualizedPair]
    refusals: list[Refused]  # node is "first -> second"
    rounds: int  # rescaling rounds run over all pairs
    worst_relative_error: float  # of the float64 proof: max|d| / max(1, max|y|) over outputs and input sets

    @property
    def modified(self) -> bool:
        return bool(self.pairs)


@dataclass(frozen=True)
class Layer:
    """A convolution or linear node, with what equalization needs to know of it."""

    node: fx.Node
    kind: str  # "conv" or "linear"
    weight: fx.Node | None  # the get_attr node, None when the weight is computed
    bias: fx.Node | None
    has_bias: bool
    groups: int
    pads: bool
    transposed: bool

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]


@dataclass(frozen=True)
class _Pair:
    first: Layer
    second: Layer
    activation: str

    @property
    def name(self) -> str:
        return f"{self.first.node.name} -> {self.second.node.name}"


def equalize(gm: fx.GraphModule, input_sets: Sequence[tuple], *, max_rounds: int = 20, settle: float = 1e-3,
             absorb_bias: bool = True) -> Equalized:
    """A copy of ``gm`` with every eligible pair equalized, proven in float64 on ``input_sets``.

    Rounds stop when every scale is within ``settle`` of 1 (or after ``max_rounds``).
    """
    if not input_sets:
        raise ValueError("equalize needs at least one input set to prove the rescaled graph on")
    new = copy.deepcopy(gm)
    pairs, refusals = find_pairs(new)
    if not pairs:
        return Equalized(new, [], refusals, 0, 0.0)
    targets = {layer.weight.target: None for pair in pairs for layer in (pair.first, pair.second)}
    targets |= {pair.first.bias.target: None for pair in pairs if pair.first.bias is not None}
    originals = {target: attribute(new, target) for target in targets}
    weights = {target: value.detach().to(torch.float64) for target, value in originals.items()}
    before = [_ranges(weights, pair) for pair in pairs]
    rounds = _rescale(weights, pairs, max_rounds, math.log1p(settle))
    absorbed = _absorb_biases(new, weights, originals, pairs) if absorb_bias else set()
    for target, value in weights.items():
        _set_attribute(new, target, value)  # float64 until proven
    new.recompile()
    worst = _prove(gm, new, input_sets)
    if not worst <= PROOF_RTOL:  # also NaN
        reason = (f"the equalized graph differs from the original in float64 by {worst:.1e} of the output's "
                  f"magnitude (more than {PROOF_RTOL:.0e}); left as written")
        return Equalized(copy.deepcopy(gm), [], refusals + [Refused(p.name, "local-proof", reason) for p in pairs],
                         rounds, worst)
    for target, value in weights.items():
        _set_attribute(new, target, value.to(originals.get(target, value).dtype))
    records = [EqualizedPair(pair.first.node.name, pair.second.node.name, pair.activation, *old,
                             *_ranges(weights, pair), bias_absorbed=pair in absorbed)
               for pair, old in zip(pairs, before)]
    return Equalized(new, records, refusals, rounds, worst)


def find_pairs(gm: fx.GraphModule) -> tuple[list[_Pair], list[Refused]]:
    """Every layer -> [homogeneous activation] -> layer pair that can be rescaled, and the near misses, with why."""
    reads = _reads(gm)
    pairs, refusals = [], []
    for node in gm.graph.nodes:
        second = layer(gm, node)
        if second is None or not isinstance(second.input, fx.Node):
            continue
        between, first_node = None, second.input
        if first_node.target not in LAYERS:
            producers = [arg for arg in first_node.all_input_nodes if arg.op != "get_attr"]
            if first_node.op != "call_function" or len(producers) != 1 or producers[0].target not in LAYERS:
                continue  # not a layer -> op -> layer chain (a sum, a pool of two maps, an input)
            between, first_node = first_node, producers[0]
        first = layer(gm, first_node)
        if first is None:
            continue
        pair_or_refusal = _pair(first, between, second, reads)
        (pairs if isinstance(pair_or_refusal, _Pair) else refusals).append(pair_or_refusal)
    return pairs, refusals


def _pair(first: Layer, between: fx.Node | None, second: Layer,
          reads: Counter) -> _Pair | Refused:
    name = f"{first.node.name} -> {second.node.name}"
    if between is not None and between.target not in HOMOGENEOUS:
        op = getattr(getattr(between.target, "overloadpacket", between.target), "__name__", str(between.target))
        why = WHY_NOT.get(between.target, "is not positively homogeneous")
        return Refused(name, "not-homogeneous", f"{op} between them {why}: f(x / s) != f(x) / s, so rescaling "
                       "channels across it would change the output (relu, leaky_relu and prelu are homogeneous)")
    for tensor in (first.node, between):
        if tensor is not None and len(tensor.users) != 1:
            return Refused(name, "shared-output", f"{tensor.name} is read by {len(tensor.users)} ops; rescaling "
                           "its channels would change what the others read")
    if first.transposed or second.transposed:
        return Refused(name, "layer-pair", "a transposed convolution's weight is [in, out / groups, ...]; "
                       "equalization rescales direct convolutions and linears")
    if first.kind != second.kind:
        return Refused(name, "layer-pair", f"a {first.kind} feeding a {second.kind}: their channels do not line up")
    weights = [first.weight, second.weight, first.bias if first.has_bias else None]
    if first.weight is None or second.weight is None or (first.has_bias and first.bias is None):
        return Refused(name, "not-constant", "a weight or bias of the pair is computed, not a stored constant")
    for weight in filter(None, weights):
        if reads[weight.target] != 1:
            return Refused(name, "shared-weight", f"{weight.target} is read {reads[weight.target]} times; "
                           "rescaling it for one use would change the others")
    return _Pair(first, second, "identity" if between is None else HOMOGENEOUS[between.target])


def _reads(gm: fx.GraphModule) -> Counter:
    """How many ops read each attribute (through any of its get_attr nodes)."""
    reads = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            reads[node.target] += len(node.users)
    return reads


def layer(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """``node`` as a convolution or linear layer (its constant weight and bias nodes, groups, padding), else None."""
    if node.op != "call_function" or node.target not in LAYERS:
        return None
    arguments = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if arguments is None or not isinstance(node.args[0], fx.Node):
        return None
    op = arguments.kwargs
    constant = [arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
                for arg in (op["weight"], op.get("bias"))]
    padding = op.get("padding", 0)
    pads = padding != "valid" if isinstance(padding, str) else any(int(p) != 0 for p in pytree.tree_leaves(padding))
    return Layer(node, LAYERS[node.target], constant[0], constant[1], op.get("bias") is not None,
                  int(op.get("groups", 1)), pads, bool(op.get("transposed", False)))


def _ranges(weights: dict[str, Tensor], pair: _Pair) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (tuple(eq.output_ranges(weights[pair.first.weight.target]).tolist()),
            tuple(eq.input_ranges(weights[pair.second.weight.target], pair.second.groups).tolist()))


def _rescale(weights: dict[str, Tensor], pairs: list[_Pair], max_rounds: int, settled: float) -> int:
    """Equalize pair after pair, round after round; the rounds run (a layer shared by two pairs moves twice)."""
    for round_ in range(1, max_rounds + 1):
        largest = 0.0
        for pair in pairs:
            first, second = pair.first, pair.second
            w1, w2 = weights[first.weight.target], weights[second.weight.target]
            bias = weights[first.bias.target] if first.bias is not None else None
            scales = eq.equalizing_scales(eq.output_ranges(w1), eq.input_ranges(w2, second.groups))
            w1, bias = eq.scale_outputs(w1, bias, scales)
            weights[first.weight.target], weights[second.weight.target] = w1, eq.scale_inputs(w2, scales, second.groups)
            if bias is not None:
                weights[first.bias.target] = bias
            largest = max(largest, float(scales.log().abs().max()))
        if largest <= settled:
            return round_
    return max_rounds


def _absorb_biases(gm: fx.GraphModule, weights: dict[str, Tensor], originals: dict[str, Tensor],
                   pairs: list[_Pair]) -> set[_Pair]:
    """Move the first layer's bias into the second where that is exact (no activation, no padding)."""
    absorbed, reads = set(), _reads(gm)
    for pair in pairs:
        first, second = pair.first, pair.second
        if pair.activation != "identity" or second.pads or first.bias is None:
            continue
        if second.has_bias and (second.bias is None or reads[second.bias.target] != 1 or second.bias.target in weights):
            continue  # a computed or shared bias, or one another pair rescales: leave it
        shift = weights[first.bias.target]
        if second.bias is None:
            target = _new_attribute(gm, f"{second.node.name}_absorbed_bias", originals[first.bias.target])
            originals[target] = attribute(gm, target)
            with gm.graph.inserting_before(second.node):
                node = gm.graph.get_attr(target)
            node.meta["val"] = first.bias.meta.get("val")
            if len(second.node.args) > 2:
                second.node.update_arg(2, node)
            else:
                second.node.update_kwarg("bias", node)
            current = None
        else:
            target, current = second.bias.target, attribute(gm, second.bias.target).to(torch.float64)
            originals[target] = attribute(gm, target)
        weights[target] = eq.absorbed_bias(weights[second.weight.target], current, shift, second.groups)
        weights[first.bias.target] = torch.zeros_like(shift)
        absorbed.add(pair)
    return absorbed


class _Float64(fx.Interpreter):
    """The graph with every floating constant it reads upcast to float64."""

    def fetch_attr(self, target: str):
        return float64_values(super().fetch_attr(target))


def _prove(reference: fx.GraphModule, candidate: fx.GraphModule, input_sets: Sequence[tuple]) -> float:
    """The worst max|d| / max(1, max|y|) over float outputs and input sets, both graphs in float64."""
    worst = 0.0
    with torch.no_grad():
        for inputs in input_sets:
            want = pytree.tree_leaves(_Float64(reference).run(*float64_values(tuple(inputs))))
            got = pytree.tree_leaves(_Float64(candidate).run(*float64_values(tuple(inputs))))
            for w, g in zip(want, got):
                if isinstance(w, Tensor) and w.is_floating_point() and w.numel():
                    worst = max(worst, float((w - g).abs().max() / max(1.0, float(w.abs().max()))))
    return worst


def _set_attribute(gm: fx.GraphModule, target: str, value: Tensor) -> None:
    """Replace a parameter, buffer or plain tensor attribute, keeping which of the three it is."""
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value, requires_grad=owner._parameters[name].requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _new_attribute(gm: fx.GraphModule, name: str, like: Tensor) -> str:
    target = _unique_attr(gm, name)  # a name without dots: only the graph module's own attributes can take it
    gm.register_buffer(target, torch.zeros_like(like))
    return target
