"""The cost rules: whether a merge pays, and which of two forms of a region is cheaper.

Every decision that weighs one way of computing a region against another (a single
merge in the analyzer, a whole region in ``fold``, a partition of a chain in
``partition``) asks the rule it was handed, so the measure is chosen in one place:

* ``MacsCost``: multiply-accumulates; a merge may not add any.
* ``LatencyCost``: modeled time on a ``DeviceProfile`` at a batch size and dtype
  (the roofline of ``profile``); a merge is done when it is not slower.
* ``MeasuredCost``: ``LatencyCost``, except that a *contested* comparison (the
  merged form does more MACs than the forms kept apart, so the answer depends on
  the device) is settled by timing both forms with the timer it is given.
* ``AlwaysMerge``: every exact merge is done.

Model size is a cost too: a rule with ``max_param_growth`` refuses any merge whose
convolutions hold more than that many times the parameters of the ops they replace
(``param_growth``), whatever time it saves (``AlwaysMerge`` has no such bound).

A rule holds no state: ``pays`` and ``cheaper`` return a ``Verdict``, which carries the
``Decision`` (the forms compared, their costs and the winner, for the report) when the
comparison was contested; the caller keeps the decisions of its round (``Decisions``).
Costs are ``Work``s, priced on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from repfx.passes.cost.profile import DeviceProfile, roofline_seconds
from repfx.passes.cost.work import Work


@dataclass(frozen=True)
class Decision:
    """One contested comparison: a form with more MACs against one with fewer, and which won."""

    where: str  # the node the decision is about
    merged: str  # the ops of the form that merges more
    apart: str  # the ops of the form kept apart
    merged_cost: float
    apart_cost: float
    unit: str
    merged_won: bool
    how: str  # "modeled", "measured" or "counted"

    def __str__(self) -> str:
        winner = "merged" if self.merged_won else "kept apart"
        return (f"{self.where}: merged [{self.merged}] {amount_text(self.merged_cost, self.unit)} vs apart "
                f"[{self.apart}] {amount_text(self.apart_cost, self.unit)} ({self.how}): {winner}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def amount_text(value: float, unit: str) -> str:
    """A cost as a person reads it: milliseconds for seconds, a count with its unit otherwise."""
    return f"{value * 1e3:.4g} ms" if unit == "s" else f"{value:,.0f} {unit}"


@dataclass(frozen=True)
class Verdict:
    """What one comparison decided; ``decision`` is set only when it was contested (see ``CostRule.verdict``)."""

    won: bool
    decision: Decision | None = None


class Decisions(dict[str, Decision]):
    """The contested decisions of one round, by node name, in the order last noted (what the report lists)."""

    def note(self, verdict: Verdict) -> Verdict:
        """One decision per node: a later level (a single merge after a whole region was refused, then the
        chain partition) refines an earlier one, and what it compared is what the graph shows."""
        if verdict.decision is not None:
            self.pop(verdict.decision.where, None)
            self[verdict.decision.where] = verdict.decision
        return verdict

    def add(self, decisions: dict[str, Decision]) -> None:
        """Note ``decisions`` (another ledger, in its order) as if each had been noted here."""
        for decision in decisions.values():
            self.note(Verdict(decision.merged_won, decision))


# A merge may hold at most this many times the parameters of the ops it replaces. The merges the training-form
# blocks are built for never grow them (branch kernels add into the largest one: RepVGG, ACNet, DBB, RepLKNet),
# a factorized 1xk -> kx1 grows them k/2 times (3.5 at Inception's 1x7); beyond 4 a merge turns a depthwise or
# pooling kernel dense (dw kxk + 1x1: about k*k times at 64 channels), trading model size for fewer launches.
DEFAULT_MAX_PARAM_GROWTH = 4.0


def check_param_growth(bound: float | None) -> float | None:
    """``bound`` if it can bound a merge's parameter growth: None, or a number >= 1 (a merge keeps what it adds)."""
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound >= 1
                              or bound == float("inf")):
        raise ValueError(f"max_param_growth must be a finite number >= 1 or None, got {bound!r}")
    return bound


@dataclass(frozen=True)
class CostRule:
    """The base every rule shares: compare two works and decide; a contested decision comes back in the verdict."""

    unit = "MACs per sample"
    merges_everything = False  # ``AlwaysMerge``: the analysis skips pricing altogether
    max_param_growth: float | None = field(default=DEFAULT_MAX_PARAM_GROWTH, kw_only=True)  # None: no bound

    def param_growth(self, merged: Work, apart: Work) -> str | None:
        """Why ``merged`` holds too many parameters for ``apart``, the ops it replaces (None: within the bound).

        Only convolutions and linears count (BatchNorms fold away); ops with none (adds, pads) bound nothing.
        """
        before, after = apart.kernel_params, merged.kernel_params
        if self.max_param_growth is None or not before or after <= self.max_param_growth * before:
            return None
        return (f"merged op holds {after:,} parameters for the {before:,} of the ops it replaces "
                f"({after / before:.1f}x > max_param_growth={self.max_param_growth:g}); kept separate")

    def price(self, work: Work) -> float:
        raise NotImplementedError

    def compare(self, merged: Work, apart: Work) -> tuple[float, float, str]:
        """Both costs and how they were found; ``MeasuredCost`` times contested pairs instead."""
        return self.price(merged), self.price(apart), "modeled"

    def key(self, work: Work) -> float:
        """Orders works, cheapest first (the chain partition's sort key)."""
        return self.price(work)

    def pays(self, merged: Work, apart: Work, where: str = "") -> Verdict:
        """A merge is done when it costs no more than what it replaces (a tie merges: fewer ops run)."""
        merged_cost, apart_cost, how = self.compare(merged, apart)
        won = merged_cost <= apart_cost
        return self.verdict(where, merged, apart, merged_cost, apart_cost, won, how)

    def cheaper(self, candidate: Work, incumbent: Work, where: str = "") -> Verdict:
        """``candidate`` replaces ``incumbent`` only when strictly cheaper, so a tie keeps the decision made."""
        candidate_cost, incumbent_cost, how = self.compare(candidate, incumbent)
        won = candidate_cost < incumbent_cost
        if candidate.macs >= incumbent.macs:
            verdict = self.verdict(where, candidate, incumbent, candidate_cost, incumbent_cost, won, how)
        else:
            verdict = self.verdict(where, incumbent, candidate, incumbent_cost, candidate_cost, not won, how)
        return Verdict(won, verdict.decision)

    def verdict(self, where: str, merged: Work, apart: Work, merged_cost: float, apart_cost: float, won: bool,
                how: str) -> Verdict:
        """``won``, with the decision when it is contested: the merged form does more MACs (else fewer MACs,
        fewer ops, fewer bytes: not a question any device answers differently) and it is about a node."""
        if merged.macs <= apart.macs or not where:
            return Verdict(won)
        return Verdict(won, Decision(where, merged.describe(), apart.describe(), merged_cost, apart_cost,
                                     self.unit, won, how))

    def amount(self, work: Work) -> str:
        return amount_text(self.price(work), self.unit)

    def describe(self) -> str:
        return "MACs"

    def _vs(self, merged: Work, apart: Work, what: str) -> str:
        merged_cost, apart_cost = self.price(merged), self.price(apart)
        return (f"{amount_text(merged_cost, self.unit)} vs {amount_text(apart_cost, self.unit)} {what} "
                f"({merged_cost / max(apart_cost, 1e-12):.2f}x, {self.describe()})")

    def merge_refused(self, merged: Work, apart: Work) -> str:
        """The reason a single merge is refused."""
        return f"cost rule: merged op needs {self._vs(merged, apart, 'for the ops it would replace')}; kept separate"

    def region_refused(self, ops: int, merged: Work, alternative: Work, against: str = "as written") -> str:
        """The reason a whole region is not merged as far as exactness allows; ``against`` names the
        alternative priced (the region as written, or cut where each merge pays)."""
        return (f"cost rule: merging this region into {ops} op(s) needs {self._vs(merged, alternative, against)}; "
                "merged only where each step pays")


@dataclass(frozen=True)
class MacsCost(CostRule):
    """Multiply-accumulates per sample; the rule before latency, kept for comparison (``cost="macs"``)."""

    def price(self, work: Work) -> float:
        return work.macs

    def compare(self, merged: Work, apart: Work) -> tuple[float, float, str]:
        return merged.macs, apart.macs, "counted"


@dataclass(frozen=True)
class AlwaysMerge(MacsCost):
    """Every exact merge (``cost="always"``): what the per-block converters do."""

    merges_everything = True
    max_param_growth: float | None = field(default=None, kw_only=True)

    def pays(self, merged: Work, apart: Work, where: str = "") -> Verdict:
        return Verdict(True)


@dataclass(frozen=True)
class LatencyCost(CostRule):
    """Modeled seconds on ``profile`` for ``batch`` samples of ``dtype`` (``cost="latency"``)."""

    profile: DeviceProfile = None  # type: ignore[assignment]  # required; a dataclass default keeps field order
    batch: int = 1
    dtype: str = "float32"
    unit = "s"

    def __post_init__(self) -> None:
        if not isinstance(self.profile, DeviceProfile):
            raise TypeError(f"LatencyCost needs a DeviceProfile, got {type(self.profile).__name__}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be a positive int, got {self.batch!r}")

    def price(self, work: Work) -> float:
        return sum(roofline_seconds(op, self.profile, self.batch, self.dtype) for op in work.ops)

    def describe(self) -> str:
        return f"modeled on {self.profile.name}, batch {self.batch}, {self.dtype}"


# Seconds to run every op of each of two works once, at the rule's batch and dtype: timed side by side, since
# only the comparison matters and a machine's load drifts between two separate measurements.
Timer = Callable[[Work, Work], tuple[float, float]]


@dataclass(frozen=True)
class MeasuredCost(LatencyCost):
    """``LatencyCost`` whose contested comparisons are timed with ``timer`` (``cost="measure"``)."""

    timer: Timer | None = None

    def compare(self, merged: Work, apart: Work) -> tuple[float, float, str]:
        if merged.macs <= apart.macs or self.timer is None:
            return super().compare(merged, apart)
        merged_seconds, apart_seconds = self.timer(merged, apart)
        return merged_seconds, apart_seconds, "measured"

    def describe(self) -> str:
        return f"measured on {self.profile.name}, batch {self.batch}, {self.dtype}"
