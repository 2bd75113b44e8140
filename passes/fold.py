"""Pass: fold every linear region into the fewest convolutions that compute it exactly.

Relies on ``forms`` for exactness and on ``regions`` for the regions; this
module only picks which regions to rewrite and calls the emitter. A region is
rewritten only when its emission executes fewer ops than the region did, so a
lone conv or a lone BN after a ReLU stays as it is, and once the pipeline has run
this pass to a fixed point a further run finds nothing to do (idempotence).

Unless every merge is forced, chains of linear ops are then cut where that is cheapest
(``partition``). A weight other ops read too is never written: a use that folds gets
new weights (the report says so), and a use that would only copy it stays a boundary
(``regions.sharing``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Protocol

from torch import Tensor, fx

from repfx.passes import partition
from repfx.passes import cost as cost_rule
from repfx.passes.constants import ConstantFolder
from repfx.passes.cost import CostRule, Decision, Decisions, Verdict
from repfx.passes.cost.work import NOTHING, Work
from repfx.passes.emit import Emission, Emitter, Plan, plan, remove_dead_code
from repfx.passes.refusals import Refused
from repfx.passes.regions import sharing
from repfx.passes.regions.analyzer import Analysis, Analyzer, CostPolicy, Expr, analyze


@dataclass(frozen=True)
class AppliedRewrite:
    root: str
    replaced_ops: tuple[str, ...]  # names of the nodes removed
    replaced_kinds: dict[str, int]  # op kind -> count
    produced: tuple[str, ...]  # descriptions of emitted ops
    kernel_shapes: tuple[tuple[int, ...], ...]
    ops_before: int
    ops_after: int
    copied: tuple[str, ...] = ()  # shared weights this rewrite folded into new ones while other ops still read them
    params_before: int = 0  # floating elements of the constants the replaced ops read
    params_after: int = 0  # floating elements of the weights emitted for them
    growth_note: str = ""  # set when parameters more than double: what the merge bought (``growth_note``)

    @property
    def kind(self) -> str:
        left = " + ".join(f"{count} {name}" for name, count in self.replaced_kinds.items())
        return f"{left} -> {', '.join(self.produced) or 'identity'}"


@dataclass
class PassResult:
    modified: bool
    rewrites: list[AppliedRewrite] = field(default_factory=list)
    refusals: list[Refused] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)  # contested cost decisions of this round
    rule_counts: dict[str, int] = field(default_factory=dict)  # rule name -> forms it gave the regions rewritten
    # The analysis merging all that is exact of the graph a round left as it found it (the last round): what
    # ``kept_ops`` reads to explain each op that stays. None in a round that rewrote the graph.
    final: Analysis | None = None


@dataclass
class Choice:
    """What ``choose_regions`` decided: the regions to rewrite and why the rest stays as written."""

    regions: list[tuple[fx.Node, Expr]]
    refusals: list[Refused]
    decisions: Decisions  # the contested cost decisions the regions follow
    rules: dict[fx.Node, str]  # node -> the rule that gave its expression (the analysis that merges all it can)
    written: Analysis  # that analysis: what each op costs as written (``Analysis.region_cost``)


def _is_executed(node: fx.Node) -> bool:
    return node.op == "call_function" and not node.target.__module__.startswith("_operator")


def _kind(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if "batch_norm" in name:
        return "batch_norm"
    if name.startswith("conv"):
        return "conv"
    return name


def choose_regions(gm: fx.GraphModule, cost: CostPolicy | CostRule) -> Choice:
    """Regions to rewrite (root, expression), the refusals that explain the rest and the decisions taken.

    A use of a shared weight that some region would only copy (the shared op alone,
    carried through a sum) is made a boundary and the regions are chosen again, until
    no region copies a shared weight for nothing.
    """
    boundaries: frozenset[fx.Node] = frozenset()
    constants = ConstantFolder(gm)  # the graph does not change while regions are chosen: fold each constant once
    decisions = Decisions()
    while True:
        chosen, refusals, eager = _choose(gm, cost_rule.resolve(cost), boundaries, constants, decisions)
        copies = sharing.copy_only_uses(chosen) - boundaries
        if not copies:
            return Choice(chosen, refusals, decisions, eager.rules, eager)
        boundaries |= copies


def _choose(gm: fx.GraphModule, rule: CostRule, boundaries: frozenset[fx.Node], constants: ConstantFolder,
            decisions: Decisions) -> tuple[list[tuple[fx.Node, Expr]], list[Refused], Analysis]:
    """The cost rule, applied globally first, then locally, then along chains.

    The *eager* analysis merges everything exact; its region is kept when the merged
    ops cost no more, by the rule, than the ops they replace (DBB: the 1x1->avg-pool chain alone
    is dearer than the two ops, but it vanishes into the block's dense kxk), or, when merging
    adds MACs to the convs as written (contested), than the careful cut of the region. Otherwise
    the region is rebuilt from the *careful* analysis, where every single merge must
    pay for itself (depthwise kxk + dense 1x1, bottleneck 1x1->kxk). Last, each chain
    of ops is cut where that is cheapest, where that beats the choice so far. ``decisions``
    collects the contested decisions as they are taken.
    """
    analyzer = Analyzer(gm, "always", boundaries, constants)
    eager = analyzer.run()
    if rule.merges_everything:
        return [(root, eager.exprs[root]) for root in eager.roots()], list(eager.refusals), eager
    careful: Analysis | None = None  # only built when some region is contested or fails the global rule
    careful_roots: set[fx.Node] = set()

    def careful_analysis() -> tuple[Analysis, set[fx.Node]]:
        """The careful analysis and its roots, built the first time a region needs them."""
        nonlocal careful, careful_roots
        if careful is None:
            careful = analyze(gm, rule, boundaries, constants)
            careful_roots = set(careful.roots())
            decisions.add(careful.decisions)
        return careful, careful_roots

    chosen, refusals = [], []
    fallback_ops: set[str] = set()  # names of the ops of regions rebuilt from the careful analysis
    accepted, refused = [], {}
    for root in eager.roots():
        expr = eager.exprs[root]
        merged, alternative, against = expr.cost, eager.region_cost(expr), "as written"
        contested = _adds_macs(merged, alternative)
        if contested:
            # What a refusal gives the graph: the region cut where each merge pays (its BatchNorms folded
            # too). Against the region as written, a merge would be credited with folds any cut makes.
            alternative, against = _careful_plan(*careful_analysis(), eager, expr), "cut where each merge pays"
        verdict = rule.pays(merged, alternative, root.name)
        growth = verdict.won and rule.param_growth(merged, eager.region_cost(expr))  # against the ops as written
        verdict = Verdict(False) if growth else decisions.note(verdict)
        if verdict.won:
            chosen.append((root, expr))
            # A region the careful analysis merged just as far was decided by its single merges.
            decided_inside = contested and verdict.decision is None and alternative.ops == merged.ops
            accepted += list(expr.ops) if decided_inside else [root]
            continue
        refused[root] = (expr, decisions.get(root.name))
        careful, careful_roots = careful_analysis()
        fallback_ops |= {op.name for op in expr.ops}
        refusals.append(Refused(root.name, "param-growth", growth) if growth else
                        Refused(root.name, "cost", rule.region_refused(len(expr.terms), merged, alternative, against)))
        chosen += [(node, careful.exprs[node]) for node in expr.ops if node in careful_roots]
    refusals += [refusal for refusal in eager.refusals if refusal.node not in fallback_ops]
    if careful is not None:
        refusals += [refusal for refusal in careful.refusals if refusal.node in fallback_ops]
        _keep_decisions_that_decided(decisions, accepted, refused)
    return (*partition.improve(analyzer, eager, chosen, refusals, _rewrites_fewer_ops, rule, decisions), eager)


def _adds_macs(merged: Work, original: Work) -> bool:
    """Whether merging a region does more multiply-accumulates than its convs as written (a contested merge).

    The elementwise ops as written (BatchNorms, adds) do not count: they fold into the
    convs whichever way the region is cut, so they are not what merging trades against.
    """
    return merged.macs > sum(op.macs for op in original.ops if op.kind != "elementwise")


def _careful_plan(careful: Analysis, careful_roots: set[fx.Node], eager: Analysis, expr: Expr) -> Work:
    """The work of ``expr``'s region as the careful analysis would cut it: each of its careful
    regions merged, and the ops no careful region covers as written."""
    ops = sorted(expr.ops)  # graph order: a set of nodes iterates in memory order (see ``Analysis.region_cost``)
    inside = [careful.exprs[node] for node in ops if node in careful_roots]
    covered = set().union(*(part.ops for part in inside)) if inside else set()
    rest = [eager.own_cost.get(op, NOTHING) for op in ops if op not in covered]
    return sum((part.cost for part in inside), NOTHING) + sum(rest, NOTHING)


def _keep_decisions_that_decided(decisions: Decisions, accepted: list[fx.Node],
                                 refused: dict[fx.Node, tuple[Expr, Decision | None]]) -> None:
    """The contested decisions the graph follows, one set per region.

    The careful analysis walks the whole graph, so it also notes merges inside
    regions merged whole, which decided nothing; and a refused region has both its
    whole-region decision and the single merges that replaced it. Kept: the decision
    of each region merged whole (the careful analysis's single merges when it merged the
    region just as far, so the whole merge added nothing to compare), and inside a refused region the single-merge
    decisions (its whole-region decision only when no single merge was contested).
    ``refused`` maps each refused root to its expression and its whole-region decision.
    """
    kept = {node.name for node in accepted}
    for root, (expr, whole) in refused.items():
        inside = {op.name for op in expr.ops} & set(decisions)
        if any(decisions[name] is not whole for name in inside):
            inside = {name for name in inside if decisions[name] is not whole}
        kept |= inside
    for name in [name for name in decisions if name not in kept]:
        del decisions[name]


def _executed(expr: Expr) -> list[fx.Node]:
    return [op for op in expr.ops if _is_executed(op)]


def _rewrites_fewer_ops(root: fx.Node, expr: Expr) -> bool:
    """Whether the fold writes this region back: only as fewer ops, in the layout it had."""
    return 0 < plan(expr).op_count < len(_executed(expr)) and _keeps_leading_shape(root, expr)


def _keeps_leading_shape(root: fx.Node, expr: Expr) -> bool:
    """A channel-last region emits ``linear(source)``, which has the source's leading
    dims; a reshape inside the region (flatten(0, 1) before a BatchNorm1d) is only
    foldable when the region ends in the source's layout again."""
    if not expr.channel_last:
        return True
    leading = str(tuple(root.meta["val"].shape[:-1]))
    return all(str(tuple(term.read_shape[:-1])) == leading for term in expr.terms)


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


def fold_linear_regions(gm: fx.GraphModule, cost: CostPolicy | CostRule = "macs", prover: Prover | None = None) -> PassResult:
    """Rewrite ``gm`` in place; see the module docstring for what is rewritten.

    With a ``prover``, every replacement is emitted first, proven, and only then
    wired in; a replacement that fails its proof is erased and the region stays as
    written (reported as a ``local-proof`` refusal with the prover's reason).
    """
    rule = cost_rule.resolve(cost)
    choice = choose_regions(gm, rule)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    regions = sorted(choice.regions, key=lambda region: order[region[0]])
    emitter = Emitter(gm)
    result = PassResult(False, refusals=choice.refusals, decisions=list(choice.decisions.values()))
    candidates = []
    constant = sharing.constant_nodes(gm)
    for root, expr in regions:
        if not _rewrites_fewer_ops(root, expr):
            continue  # not fewer ops (a lone identity op stays as written)
        executed = sorted(_executed(expr), key=order.__getitem__)
        planned = plan(expr)
        sources = tuple(dict.fromkeys(node for term in expr.terms for node in term.reads))
        read = sharing.constants_read(expr.ops, constant)
        bought = (choice.written.region_cost(expr), expr.cost, choice.decisions.get(root.name))
        candidates.append((Candidate(expr.ops, sources, emitter.emit(root, planned)), executed, planned, read,
                           (_floating_numel(gm, read), bought)))
    failed = prover(gm, [candidate for candidate, *_ in candidates]) if prover and candidates else {}
    committed = []
    counts: Counter[str] = Counter()
    for candidate, executed, planned, read, growth in candidates:
        if candidate in failed:
            emitter.discard(candidate.emission)
            result.refusals.append(Refused(candidate.emission.root.name, "local-proof", failed[candidate]))
            continue
        emitter.commit(candidate.emission)
        ops = sorted(candidate.ops, key=order.__getitem__)
        counts.update(choice.rules[op] for op in ops if op in choice.rules)
        for op in reversed(ops):
            if not op.users:
                gm.graph.erase_node(op)
        result.modified = True
        committed.append((candidate.emission, executed, planned, read, growth))
    if candidates:
        remove_dead_code(gm)
    for emission, executed, planned, read, (before, bought) in committed:
        copied = sharing.copied_weights(gm, read)
        parameters = sum(value.numel() for value in emission.exact.values())
        note = growth_note(rule, before, parameters, *bought)
        result.rewrites.append(replace(_applied(emission.root, executed, planned, tuple(copied)), params_before=before,
                                       params_after=parameters, growth_note=note))
        if copied:
            result.refusals.append(Refused(emission.root.name, "weight-copied", sharing.copy_note(copied, parameters)))
    result.rule_counts = dict(counts)
    result.final = None if result.modified else choice.written
    return result


def _floating_numel(gm: fx.GraphModule, names: set[str]) -> int:
    values = (attrgetter(name)(gm) for name in names)
    return sum(value.numel() for value in values if isinstance(value, Tensor) and value.is_floating_point())


def growth_note(rule: CostRule, before: int, after: int, written: Work, merged: Work,
                decision: Decision | None) -> str:
    """What a merge that more than doubles its parameters bought, for the report ("" when it does not).

    Priced by the rule that decided (modeled seconds, or MACs); a contested decision adds what was compared
    then, measured where the rule times forms.
    """
    if after <= 2 * before:
        return ""
    note = (f"parameters {before:,} -> {after:,} ({after / max(before, 1):.1f}x) for {rule.amount(written)} as "
            f"written -> {rule.amount(merged)} merged ({rule.describe()})")
    return note if decision is None else f"{note}; decided: {decision}"


def _applied(root: fx.Node, executed: list[fx.Node], planned: Plan, copied: tuple[str, ...]) -> AppliedRewrite:
    return AppliedRewrite(
        root=root.name,
        replaced_ops=tuple(op.name for op in executed),
        replaced_kinds=dict(Counter(_kind(op) for op in executed)),
        produced=planned.produced(),
        kernel_shapes=tuple(tuple(form.weight.shape) for form in planned.conv_forms()),
        ops_before=len(executed),
        ops_after=planned.op_count,
        copied=copied,
    )

