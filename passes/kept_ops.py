"""Account for what folding left: every BatchNorm, affine, pad, pool and parameter-only op the plain graph still
executes, each with the one reason it stays.

A user reads the report to learn what still runs and why. The refusals say why a merge
was declined, but they name the op where the merge failed, which is often not the op
that stays (a conv whose output is read twice keeps the BN after it), and an op no rule
could touch (a BN between two ReLUs, a max pool) is refused nowhere. So, after the fold
has reached its fixed point, ``account`` walks the plain graph once and gives each such
op exactly one ``Kept`` entry: the refused merge that explains it (its code from
``refusals.CODES``), else the reason it was left as written (``refusals.LEFT_AS_WRITTEN``),
else ``unexplained``, which is a gap in this accounting that a test catches.

It also names the ops of normalizations by the input's own statistics (``x - mean(x)``,
``/ sqrt(var + eps)``, a LayerNorm or GroupNorm written out): their refusals ("channel
mismatch") describe algebra that was never a candidate, so the report drops them and
says once, per op it keeps, that a normalization is not linear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from repfx.passes.constants import ConstantFolder
from repfx.passes.dataflow import ancestry, input_free, is_view
from repfx.passes.fold import _is_executed, _keeps_leading_shape
from repfx.passes.normalizations import normalizations, op_name
from repfx.passes.refusals import Refused
from repfx.passes.regions.analyzer import Analysis, Analyzer, Expr
from repfx.passes.regions.values import per_channel

aten = torch.ops.aten

_AFFINE = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar,
           aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
           aten.addcmul.default}  # addcmul(shift, x, scale): how the fold writes a scale and shift left alone
_NOTES = {"chain-partition", "weight-copied"}  # refusal codes that note a choice, weaker than a failed merge
_LINEAR_OPS = {"convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
               "conv_transpose3d", "linear", "addmm", "mm", "bmm", "matmul"}


@dataclass(frozen=True)
class Kept:
    """One op the plain graph still executes, and why it stays."""

    node: str
    kind: str  # "batch_norm", "affine", "pad", "pool" or "parameter-subgraph"
    code: str  # ``CODES`` (a refused merge), else ``LEFT_AS_WRITTEN``
    reason: str  # the sentence for people: the refusal's, or what the op reads and feeds
    refused_at: str = ""  # the node whose refusal explains it ("" when left as written)


@dataclass(frozen=True)
class Accounting:
    kept: list[Kept]
    # Ops of normalizations by the input's statistics, and the scales and shifts of their output kept as written:
    # their refusals ("channel mismatch") are noise, the ``Kept`` entries say why they stay.
    normalization: frozenset[str]


def account(gm: fx.GraphModule, analysis: Analysis | None, refusals: Sequence[Refused]) -> Accounting:
    """One ``Kept`` per BatchNorm, affine, pad, pool and parameter-only op ``gm`` executes.

    ``analysis``: the analysis that merges everything exact (``"always"``) of ``gm`` as it
    stands, as the fold's last round left it (None: built here). ``refusals``: those of the
    fold, the rounds that read ``gm`` as it stands first (a node's refusals are read in that order).
    """
    analysis = analysis if analysis is not None else Analyzer(gm, "always").run()
    walk = _Walk(gm, analysis, refusals)
    kept = [walk.explain(node, kind) for node in gm.graph.nodes if (kind := walk.kind(node))]
    inside = {node.name for node in walk.normalization} | {op.node for op in kept if op.code == "normalization"}
    return Accounting(kept, frozenset(inside))


class _Walk:
    """What ``account`` reads about the graph, built once: regions, refusals, parameter-only and statistic ops."""

    def __init__(self, gm: fx.GraphModule, analysis: Analysis, refusals: Sequence[Refused]) -> None:
        self.analysis = analysis
        self.constants = ConstantFolder(gm, upcast=False)
        self.refused: dict[str, list[Refused]] = {}
        for refusal in refusals:
            self.refused.setdefault(refusal.node, []).append(refusal)
        self.region: dict[fx.Node, fx.Node] = {op: root for root in analysis.roots() for op in analysis.exprs[root].ops}
        self.free = input_free(gm)
        self.normalization = normalizations(gm, self.free)

    # -- which ops are accounted for ---------------------------------------------------------
    def kind(self, node: fx.Node) -> str | None:
        if not _is_executed(node) or not _is_floating(node):
            return None
        if node in self.free:
            return "parameter-subgraph" if not is_view(node) and self._reads_parameters(node) else None
        name = op_name(node)
        if "batch_norm" in name:
            return "batch_norm"
        if "pool" in name:
            return "pool"
        if "pad" in name:
            return "pad"
        if node.target in _AFFINE and len(self._tensor_operands(node)) == 1:
            return "affine"
        return None

    def _tensor_operands(self, node: fx.Node) -> list[fx.Node]:
        """The operands that depend on graph inputs (an affine op has one; the other is a constant)."""
        return [arg for arg in node.args if isinstance(arg, fx.Node) and not self.constants.is_constant(arg)]

    def _reads_parameters(self, node: fx.Node) -> bool:
        return any(op.op == "get_attr" for op in ancestry(node))

    # -- why each stays ------------------------------------------------------------------------
    def explain(self, node: fx.Node, kind: str) -> Kept:
        if kind == "parameter-subgraph":
            return self._parameter_subgraph(node)
        if node in self.normalization or self._normalizes(node):
            return Kept(node.name, kind, "normalization", f"{node.name} is part of a normalization by its input's "
                        "own statistics (a LayerNorm or GroupNorm written out), which is not linear")
        refusals = [refusal for place in self._places(node) for refusal in self.refused.get(place.name, ())]
        failures = [refusal for refusal in refusals if refusal.code not in _NOTES]
        if failures:
            return Kept(node.name, kind, failures[0].code, failures[0].reason, failures[0].node)
        root = self.region.get(node)
        if root is not None and self.analysis.exprs[root].channel_last and not _keeps_leading_shape(
                root, self.analysis.exprs[root]):
            return Kept(node.name, kind, "layout", f"{node.name} is in a channel-last region a reshape runs through "
                        f"({root.name}); no single linear emits it in its layout")
        if refusals:  # how a chain was cut: the cost rule kept the ops apart
            return Kept(node.name, kind, refusals[0].code, refusals[0].reason, refusals[0].node)
        if root is None:
            return self._outside_any_region(node, kind)
        return self._region_not_rewritten(node, kind, root, self.analysis.exprs[root])

    def _places(self, node: fx.Node) -> Iterable[fx.Node]:
        """Where a refusal that keeps ``node`` would be recorded, most specific first: the op itself, the root of
        its region, the region's other ops, the tensors the region reads (an output read twice) and the region's
        readers (a padded conv after it)."""
        yield node
        root = self.region.get(node)
        if root is None:
            return  # outside every region: only its own rule could have refused it
        expr = self.analysis.exprs[root]
        yield root
        yield from sorted(expr.ops)
        yield from dict.fromkeys(term.source for term in expr.terms)
        yield from root.users

    def _normalizes(self, node: fx.Node) -> bool:
        """``node`` scales or shifts what a normalization produced (a LayerNorm's own weight and bias)."""
        root = self.region.get(node)
        sources = ([term.source for term in self.analysis.exprs[root].terms] if root is not None
                   else self._tensor_operands(node))
        return any(_below_views(source) in self.normalization for source in sources)

    def _region_not_rewritten(self, node: fx.Node, kind: str, root: fx.Node, expr: Expr) -> Kept:
        """A region the fold found exact but did not write back, and no refusal says why: it would not run fewer ops."""
        if any(op_name(op) in _LINEAR_OPS for op in expr.ops):
            return self._unexplained(node, kind, f"its region ({root.name}) holds a conv or linear yet was not "
                                     "rewritten, and no refusal says why")
        sources = list(dict.fromkeys(term.source for term in expr.terms))
        return self._nothing_to_fold(node, kind, sources, list(root.users))

    def _outside_any_region(self, node: fx.Node, kind: str) -> Kept:
        """An op no rule gave an expression, and no refusal names: the rule found it outside the algebra."""
        name = op_name(node)
        if kind == "batch_norm" and not self._has_running_statistics(node):
            return Kept(node.name, kind, "batch-statistics", f"{node.name} normalizes with the batch's own "
                        "statistics (training mode, or a BatchNorm without running statistics)")
        if kind == "pool" and "max" in name:
            return Kept(node.name, kind, "max-pool", f"{node.name}: max pooling is not linear")
        if kind == "pool" and "adaptive" in name:
            return Kept(node.name, kind, "adaptive-pool", f"{node.name}: its windows follow the input size, so no "
                        "fixed kernel computes it" + (" (a pool over the whole map)" if _to_one_pixel(node) else ""))
        value = _output(node)
        if value.dim() < 2:
            return Kept(node.name, kind, "no-channel-dim", f"{node.name} computes a {value.dim()}-d tensor: no "
                        "channel dim for a convolution to act on")
        if kind == "affine" and not self._per_channel(node):
            return Kept(node.name, kind, "not-per-channel", f"{node.name}: its constant of shape "
                        f"{self._constant_shape(node)} varies along more than the channel dim")
        return self._unexplained(node, kind, "no rule gave it a linear form and no refusal names it")

    def _has_running_statistics(self, node: fx.Node) -> bool:
        if node.target is aten.batch_norm.default:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            running = node.args[3:5] if len(node.args) > 4 else ()
            return not training and all(stat is not None for stat in running)
        return node.target is aten._native_batch_norm_legit_no_training.default

    def _constant(self, node: fx.Node) -> object:
        """The constant operand of an affine op."""
        tensors = self._tensor_operands(node)
        return next((self.constants.value(arg) for arg in node.args[:2] if arg not in tensors), None)

    def _per_channel(self, node: fx.Node) -> bool:
        shape = tuple(_output(node).shape[1:])
        return all(isinstance(size, int) for size in shape) and per_channel(self._constant(node), shape) is not None

    def _constant_shape(self, node: fx.Node) -> tuple[int, ...]:
        constant = self._constant(node)
        return tuple(constant.shape) if isinstance(constant, torch.Tensor) else ()

    def _nothing_to_fold(self, node: fx.Node, kind: str, sources: list[fx.Node], readers: list[fx.Node]) -> Kept:
        """No conv or linear on either side: say what the op reads and what reads it."""
        def named(nodes: list[fx.Node]) -> str:
            shown = (f"{n.name} ({op_name(n) if n.op == 'call_function' else n.op})" for n in nodes[:3])
            return ", ".join(shown) or "nothing"

        if sources and all(source.op == "placeholder" for source in sources):
            return Kept(node.name, kind, "reads-input", f"{node.name} reads the model input {named(sources)} and "
                        f"feeds {named(readers)}: nothing it could fold into")
        return Kept(node.name, kind, "nothing-to-fold", f"{node.name} reads {named(sources)} and feeds "
                    f"{named(readers)}: no conv or linear on either side to fold into")

    def _parameter_subgraph(self, node: fx.Node) -> Kept:
        """A value of parameters alone, still computed on every call: the refusal of the subgraph it is part of."""
        for reader in _free_descendants(node, self.free):
            for refusal in self.refused.get(reader.name, ()):
                if refusal.code in ("parameter-subgraph", "param-growth"):
                    return Kept(node.name, "parameter-subgraph", refusal.code, refusal.reason, refusal.node)
        return self._unexplained(node, "parameter-subgraph", "it reads only parameters and constants, yet was "
                                 "neither stored nor refused")

    @staticmethod
    def _unexplained(node: fx.Node, kind: str, why: str) -> Kept:
        return Kept(node.name, kind, "unexplained", f"{node.name}: {why}")


def _output(node: fx.Node) -> object:
    """The tensor an op computes (a functional BatchNorm returns (out, mean, invstd): its out)."""
    value = node.meta.get("val")
    return (value[0] if value else None) if isinstance(value, (tuple, list)) else value


def _is_floating(node: fx.Node) -> bool:
    value = _output(node)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _below_views(node: fx.Node) -> fx.Node:
    """The tensor ``node`` is a view (or a chain of views) of."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _to_one_pixel(node: fx.Node) -> bool:
    size = node.args[1] if len(node.args) > 1 else None
    return isinstance(size, (list, tuple)) and all(s == 1 for s in size)


def _free_descendants(node: fx.Node, free: set[fx.Node]) -> list[fx.Node]:
    """``node`` and the input-free ops computed from it, in graph order (the subgraph's value is among them)."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user in free and user not in seen:
                seen.add(user)
                todo.append(user)
    return sorted(seen)


__all__ = ["Accounting", "Kept", "account"]
