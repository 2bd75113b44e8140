"""Chain partition: the cheapest exact way to cut a chain of linear ops into merged segments.

The per-region cost rule (``fold.choose_regions``) merges a region whole when that
pays, else merges only where each single step pays. Along a *chain* (ops ``o1..on``,
each the only reader of the one before, no nonlinearity: dw3x3 -> 1x1 -> 3x3) that
misses cuts that pay only together, and it cannot move a cut across the border
between two regions that exactness drew (a padded 3x3 after a 3x3 is not one conv at the
border, so the chain above is two regions, and merging the 1x1 into the 3x3 belongs to neither).

Here every segment ``oj..ok`` is priced by re-running its rules on the segment's own
expression (``Analyzer.reapply``: exact or refused, as in the walk), and one pass of
dynamic programming picks the cuts minimizing the total cost (the analyzer's rule); a
segment of one op stays as written. ``improve`` replaces the regions chosen along a
chain only when the partition is strictly cheaper, so every decision the region
rule already got right stands, and it says for each split chain how it was cut.

A chain starts at a tensor it cannot absorb (an input, an activation, a tensor read
twice) and ends at an op no region absorbs: a chain feeding a sum, or fed by one, is
part of a larger region and left to the region rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from repfx.passes.algebra.forms import NotExact
from repfx.passes.cost import NOTHING, CostRule, Decisions, Work
from repfx.passes.refusals import Refused
from repfx.passes.regions.analyzer import Analysis, Analyzer, Expr

Region = tuple[fx.Node, Expr]
Emittable = Callable[[fx.Node, Expr], bool]  # whether the fold would write this region as fewer ops
MAX_SEGMENT = 32  # longest segment priced: the work per chain grows with its square


@dataclass(frozen=True)
class Segment:
    nodes: tuple[fx.Node, ...]  # chain nodes, in order
    expr: Expr | None  # the merged expression; None: one op, left as written
    cost: Work


@dataclass(frozen=True)
class Partition:
    chain: tuple[fx.Node, ...]
    segments: tuple[Segment, ...]
    whole: str  # what merging the whole chain would cost, or why it is not exact

    @property
    def cost(self) -> Work:
        return sum((segment.cost for segment in self.segments), NOTHING)

    def regions(self) -> list[Region]:
        return [(segment.nodes[-1], segment.expr) for segment in self.segments if segment.expr is not None]


def chains(analysis: Analysis, boundaries: frozenset[fx.Node] = frozenset()) -> list[tuple[fx.Node, ...]]:
    """Chains of two or more ops, each reading only the op before it, which nothing else reads.

    ``boundaries`` (uses that would only copy a shared weight) end chains like any tensor read twice.
    """
    single = {node: operands[0] for node, operands in analysis.operands.items()
              if len(operands) == 1 and node in analysis.exprs}
    absorbable = {node for node in analysis.exprs if len(node.users) == 1 and node not in boundaries}
    after = {source: node for node, source in single.items() if source in absorbable and source in single}
    roots = set(analysis.roots())
    inside = set(after.values())
    found = []
    for head, source in single.items():
        if head in inside:
            continue  # a chain goes on through it
        if source in absorbable:
            continue  # fed by a sum it absorbs: the region rule decides that region
        chain = [head]
        while chain[-1] in after:
            chain.append(after[chain[-1]])
        if len(chain) > 1 and chain[-1] in roots:
            found.append(tuple(chain))
    return found


def cheapest(analyzer: Analyzer, analysis: Analysis, chain: Sequence[fx.Node], emittable: Emittable,
             rule: CostRule) -> Partition:
    """The partition of ``chain`` with the lowest total cost (ties: fewer segments)."""
    segments = {(end, end): _lone(analysis, node) for end, node in enumerate(chain)}  # as written: always possible
    stopped = "not one op"  # why the segment from the first op stops short of the last, if it does
    for start in range(len(chain)):
        for end, merged in _merged_from(analyzer, analysis, chain, start):
            if isinstance(merged, str):
                stopped = merged if start == 0 else stopped
                break
            if end > start and emittable(chain[end], merged):
                segments[start, end] = Segment(tuple(chain[start:end + 1]), merged, merged.cost)
    whole = segments.get((0, len(chain) - 1))
    price = {span: math.inf if segment.expr is not None and rule.param_growth(
        segment.cost, analysis.region_cost(segment.expr)) else rule.key(segment.cost)
        for span, segment in segments.items()}  # a segment holding too many parameters is never cut
    best: list[tuple[float, int, int]] = [(0.0, 0, -1)]  # per prefix length: (cost, segments, start of the last one)
    for end in range(len(chain)):
        best.append(min((best[start][0] + price[start, end], best[start][1] + 1, start)
                        for start in range(end + 1) if (start, end) in segments))
    cut, end = [], len(chain)
    while end > 0:
        start = best[end][2]
        cut.append(segments[start, end - 1])
        end = start
    return Partition(tuple(chain), tuple(reversed(cut)), rule.amount(whole.cost) if whole else stopped)


def _merged_from(analyzer: Analyzer, analysis: Analysis, chain: Sequence[fx.Node], start: int):
    """``(end, expression of chain[start..end] merged)`` for growing ``end``; a string says why it stops.

    A segment the walk already merged (it starts where a region of the walk starts)
    is taken from the walk; the others are priced by running their rules again. A
    last op alone needs no expression: it stays as written.
    """
    expr: Expr | None = None
    for end in range(start, min(len(chain), start + MAX_SEGMENT)):
        previous = chain[end - 1] if end > start else None
        known = analysis.exprs[chain[end]]
        if chain[start] in known.ops and (start == 0 or chain[start - 1] not in known.ops):
            expr = known
        elif start == end == len(chain) - 1:
            return
        else:
            try:
                expr = analyzer.reapply(chain[end], lambda arg, prior=expr: prior if arg is previous else None)
            except NotExact as refusal:
                yield end, f"not exact ({chain[end].name}: {refusal})"
                return
            except Exception:  # NotLinear (an identity op alone) or a rule's own error: the segment stops here
                yield end, f"not one op ({chain[end].name} does not merge)"
                return
        if previous is not None and previous not in expr.ops:
            yield end, f"not one op ({chain[end].name} reads {previous.name} as a boundary)"
            return
        yield end, expr


def _lone(analysis: Analysis, node: fx.Node) -> Segment:
    return Segment((node,), None, analysis.own_cost.get(node, NOTHING))


def improve(analyzer: Analyzer, analysis: Analysis, chosen: list[Region], refusals: list[Refused],
            emittable: Emittable, rule: CostRule, decisions: Decisions) -> tuple[list[Region], list[Refused]]:
    """``chosen`` with each chain's regions replaced by its cheapest partition where that is strictly cheaper.

    Chains share no op, and every region touching one is rooted in it (checked), so
    each chain is decided on its own. A split chain gets one line saying how it is cut.
    The contested decisions taken go to ``decisions``.
    """
    touching: dict[fx.Node, list[Region]] = {}
    for region in chosen:
        for op in region[1].ops:
            touching.setdefault(op, []).append(region)
    replaced: set[int] = set()
    added: list[Region] = []
    for chain in chains(analysis, analyzer.boundaries):
        current = list({id(region): region for node in chain for region in touching.get(node, [])}.values())
        if any(root not in chain for root, _ in current):
            continue  # a region reaches into the chain from outside: the chain is not alone
        best = cheapest(analyzer, analysis, chain, emittable, rule)
        today = _as_partition(chain, current, analysis, emittable, best.whole)
        written = sum((analysis.own_cost.get(node, NOTHING) for node in chain), NOTHING)
        if not decisions.note(rule.cheaper(best.cost, today.cost, chain[-1].name)).won:
            if len(today.segments) > 1:
                refusals.append(Refused(chain[-1].name, "chain-partition", describe(rule, today, written, None)))
            continue
        replaced |= {id(region) for region in current}
        added += best.regions()
        ops = {node.name for node in frozenset(chain).union(*(expr.ops for _, expr in current))}
        for name in ops - {chain[-1].name}:
            decisions.pop(name, None)  # the chain's cut decides these ops now (one decision per region)
        refusals = [refusal for refusal in refusals if refusal.node not in ops or refusal.code != "cost"]
        refusals.append(Refused(chain[-1].name, "chain-partition", describe(rule, best, written, today.cost)))
    return [region for region in chosen if id(region) not in replaced] + added, refusals


def _as_partition(chain: Sequence[fx.Node], regions: list[Region], analysis: Analysis, emittable: Emittable,
                  whole: str) -> Partition:
    """The regions the region rule chose along ``chain``, as segments (ops in no region: lone segments)."""
    by_root = dict(regions)
    segments, pending = [], []
    for node in chain:
        pending.append(node)
        expr = by_root.get(node)
        if expr is None and node is not chain[-1] and any(node in e.ops for e in by_root.values()):
            continue  # inside a region that ends further on
        if expr is not None and emittable(node, expr):
            segments.append(Segment(tuple(pending), expr, expr.cost))
        else:
            segments += [Segment((op,), None, analysis.own_cost.get(op, NOTHING)) for op in pending]
        pending = []
    return Partition(tuple(chain), tuple(segments), whole)


def describe(rule: CostRule, partition: Partition, written: Work, replaced: Work | None) -> str:
    """One line for the report: how the chain was cut, what that costs, against what."""
    cut = " + ".join("(" + ", ".join(node.name for node in segment.nodes) + ")" for segment in partition.segments)
    against = "" if replaced is None else f", {rule.amount(replaced)} merging region by region"
    return (f"chain partition: {' -> '.join(node.name for node in partition.chain)} cut as {cut}: "
            f"{rule.amount(partition.cost)} vs {rule.amount(written)} as written{against} ({rule.describe()}); "
            f"merged whole: {partition.whole}")
