"""The cost rule: whether a merge pays, and which of two partitions of a region is cheaper.

Every decision that weighs one way of computing a region against another (a single
merge in the analyzer, a whole region in ``fold.choose_regions``, a partition of a
chain in ``partition``) asks this module, so the measure can be swapped in one place
(a later latency model replaces MACs here). Costs are additive numbers per sample:
the cost of a partition is the sum of the costs of its parts. The passes read ``COST``
through this module (``cost.COST``), so replacing it here replaces it everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MacsCost:
    """Multiply-accumulates per sample; an op's MACs come from ``ConvForm.macs``."""

    unit: str = "MACs per sample"

    def pays(self, merged: int, separate: int) -> bool:
        """A merge is done when it costs no more than what it replaces (a tie merges: fewer ops run)."""
        return merged <= separate

    def cheaper(self, candidate: int, incumbent: int) -> bool:
        """``candidate`` replaces ``incumbent`` only when strictly cheaper, so a tie keeps the decision already made."""
        return self.key(candidate) < self.key(incumbent)

    @staticmethod
    def key(cost: int) -> int:
        """Orders costs, cheapest first (a sort key)."""
        return cost

    def _vs(self, merged: int, separate: int, what: str) -> str:
        return f"{merged:,} {self.unit} vs {separate:,} {what} ({merged / max(separate, 1):.2f}x)"

    def merge_refused(self, merged: int, separate: int) -> str:
        """The reason a single merge is refused."""
        return f"cost rule: merged op needs {self._vs(merged, separate, 'for the ops it would replace')}; kept separate"

    def region_refused(self, ops: int, merged: int, written: int) -> str:
        """The reason a whole region is not merged as far as exactness allows."""
        return (f"cost rule: merging this region into {ops} op(s) needs {self._vs(merged, written, 'as written')}; "
                "merged only where each step pays")


COST = MacsCost()
