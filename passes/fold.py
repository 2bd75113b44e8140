"""Pass: fold every linear region into the fewest convolutions that compute it exactly.

Relies on ``forms`` for exactness and on ``regions`` for the regions; this
module only picks which regions to rewrite and calls the emitter. A region is
rewritten only when its emission executes fewer ops than the region did, so a
lone conv or a lone BN after a ReLU stays as it is, and once the pipeline has run
this pass to a fixed point a further run finds nothing to do (idempotence).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from repfx.passes.emit import Emission, EmissionPlan, Emitter, plan, remove_dead_code
from repfx.passes.regions.analyzer import Analysis, CostPolicy, Expr, analyze


@dataclass(frozen=True)
class AppliedRewrite:
    root: str
    replaced_ops: tuple[str, ...]  # names of the nodes removed
    replaced_kinds: dict[str, int]  # op kind -> count
    produced: tuple[str, ...]  # descriptions of emitted ops
    kernel_shapes: tuple[tuple[int, ...], ...]
    ops_before: int
    ops_after: int

    @property
    def kind(self) -> str:
        left = " + ".join(f"{count} {name}" for name, count in self.replaced_kinds.items())
        return f"{left} -> {', '.join(self.produced) or 'identity'}"


@dataclass
class PassResult:
    modified: bool
    rewrites: list[AppliedRewrite] = field(default_factory=list)
    refusals: list[tuple[str, str]] = field(default_factory=list)


def _is_executed(node: fx.Node) -> bool:
    return node.op == "call_function" and not node.target.__module__.startswith("_operator")


def _kind(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if "batch_norm" in name:
        return "batch_norm"
    if name.startswith("conv"):
        return "conv"
    return name


def _roots(analysis: Analysis) -> list[fx.Node]:
    """Nodes whose expression no consumer absorbed: each one is a region to consider."""
    absorbed = {op for node, expr in analysis.exprs.items() for op in expr.ops if op is not node}
    return [node for node in analysis.exprs if node not in absorbed]


def choose_regions(gm: fx.GraphModule, cost: CostPolicy) -> tuple[list[tuple[fx.Node, Expr]], list[tuple[fx.Node, str]]]:
    """Regions to rewrite (root, expression) and the refusals that explain the rest.

    The cost rule is applied globally first, then locally: the *eager* analysis
    merges everything exact; its region is kept when the merged ops cost no more
    MACs than the ops they replace (DBB: the 1x1->avg-pool chain alone is dearer
    than the two ops, but it vanishes into the block's dense kxk). Otherwise the
    region is rebuilt from the *careful* analysis, where every single merge must
    pay for itself (depthwise kxk + dense 1x1, bottleneck 1x1->kxk).
    """
    eager = analyze(gm, "always")
    if cost == "always":
        return [(root, eager.exprs[root]) for root in _roots(eager)], list(eager.refusals)
    careful: Analysis | None = None  # only built when some region fails the global rule
    chosen, refusals = [], []
    fallback_ops: set[fx.Node] = set()
    for root in _roots(eager):
        expr = eager.exprs[root]
        merged, original = expr.cost, eager.region_cost(expr)
        if merged <= original:
            chosen.append((root, expr))
            continue
        if careful is None:
            careful = analyze(gm, "macs")
            careful_roots = set(_roots(careful))
        fallback_ops |= expr.ops
        refusals.append((root, f"cost rule: merging this region into {len(expr.terms)} op(s) needs {merged:,} MACs "
                               f"per sample vs {original:,} as written ({merged / max(original, 1):.2f}x); "
                               "merged only where each step pays"))
        chosen += [(node, careful.exprs[node]) for node in expr.ops if node in careful_roots]
    refusals += [(node, reason) for node, reason in eager.refusals if node not in fallback_ops]
    if careful is not None:
        refusals += [(node, reason) for node, reason in careful.refusals if node in fallback_ops]
    return chosen, refusals


def _keeps_leading_shape(root: fx.Node, expr: Expr) -> bool:
    """A channel-last region emits ``linear(source)``, which has the source's leading
    dims; a reshape inside the region (flatten(0, 1) before a BatchNorm1d) is only
    foldable when the region ends in the source's layout again."""
    if not expr.channel_last:
        return True
    leading = str(tuple(root.meta["val"].shape[:-1]))
    return all(str(tuple(term.source.meta["val"].shape[:-1])) == leading for term in expr.terms)


@dataclass(frozen=True, eq=False)
class Candidate:
    """A region and its emitted replacement, awaiting proof (the graph still uses ``ops``)."""

    ops: frozenset[fx.Node]  # the region as written; ``emission.root`` computes its value
    sources: tuple[fx.Node, ...]  # tensors the region reads from outside (its boundary)
    emission: Emission


class Prover(Protocol):
    """Decides, on values, whether each emitted replacement computes what its region computes.

    Returns the candidates that failed, each with a one-line reason; those are not committed.
    """

    def __call__(self, gm: fx.GraphModule, candidates: Sequence[Candidate]) -> dict[Candidate, str]: ...


def fold_linear_regions(gm: fx.GraphModule, cost: CostPolicy = "macs", prover: Prover | None = None) -> PassResult:
    """Rewrite ``gm`` in place; see the module docstring for what is rewritten.

    With a ``prover``, every replacement is emitted first, proven, and only then
    wired in; a replacement that fails its proof is erased and the region stays as
    written (reported as a refusal with the prover's reason).
    """
    regions, refusals = choose_regions(gm, cost)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    regions.sort(key=lambda region: order[region[0]])
    emitter = Emitter(gm)
    result = PassResult(False, refusals=[(node.name, reason) for node, reason in refusals])
    candidates = []
    for root, expr in regions:
        executed = sorted((op for op in expr.ops if _is_executed(op)), key=order.__getitem__)
        emission = plan(expr)
        if not 0 < emission.op_count < len(executed) or not _keeps_leading_shape(root, expr):
            continue  # not fewer ops (a lone identity op stays as written)
        sources = tuple(dict.fromkeys(term.source for term in expr.terms))
        candidates.append((Candidate(expr.ops, sources, emitter.emit(root, emission)), executed, emission))
    failed = prover(gm, [candidate for candidate, _, _ in candidates]) if prover and candidates else {}
    for candidate, executed, emission in candidates:
        if candidate in failed:
            emitter.discard(candidate.emission)
            result.refusals.append((candidate.emission.root.name, failed[candidate]))
            continue
        emitter.commit(candidate.emission)
        for op in sorted(candidate.ops, key=order.__getitem__, reverse=True):
            if not op.users:
                gm.graph.erase_node(op)
        result.modified = True
        result.rewrites.append(_applied(candidate.emission.root, executed, emission))
    if candidates:
        remove_dead_code(gm)
    return result


def _applied(root: fx.Node, executed: list[fx.Node], emission: EmissionPlan) -> AppliedRewrite:
    return AppliedRewrite(
        root=root.name,
        replaced_ops=tuple(op.name for op in executed),
        replaced_kinds=dict(Counter(_kind(op) for op in executed)),
        produced=("copy",) if emission.is_plain_copy else (
            tuple(term.form.describe() for term in emission.convs)
            + ("scale",) * len(emission.scales)
            + ("add",) * (emission.op_count - len(emission.convs) - len(emission.scales))),
        kernel_shapes=tuple(tuple(term.form.weight.shape) for term in emission.convs),
        ops_before=len(executed),
        ops_after=emission.op_count,
    )

