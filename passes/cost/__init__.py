"""Cost: what a way of computing a region does (``work``), and the rules that price it (``rules``).

The passes take a ``CostRule`` (or the name of one that needs no device: ``"macs"``,
``"always"``); ``resolve`` turns either into a rule. Rules that need a device
(``LatencyCost``, ``MeasuredCost``) are built by ``repfx.targets``, which knows the
device the model will run on; the passes never measure anything themselves.
"""

from __future__ import annotations

from typing import Literal, Union

from repfx.passes.cost.profile import DTYPE_BYTES, DeviceProfile, roofline_seconds
from repfx.passes.cost.rules import (DEFAULT_MAX_PARAM_GROWTH, AlwaysMerge, CostRule, Decision, Decisions, LatencyCost,
                                     MacsCost, MeasuredCost, Timer, Verdict, amount_text, check_param_growth)
from repfx.passes.cost.work import NOTHING, Op, Work, elementwise, of_form

CostPolicy = Union[Literal["macs", "always"], CostRule]


def resolve(cost: CostPolicy) -> CostRule:
    """The rule ``cost`` names; a rule is returned as it is."""
    if isinstance(cost, CostRule):
        return cost
    if cost == "macs":
        return MacsCost()
    if cost == "always":
        return AlwaysMerge()
    raise ValueError(f"the passes take cost='macs', 'always' or a CostRule, got {cost!r} "
                     "('latency' and 'measure' need a device: build them with repfx.targets.cost_rule)")


__all__ = ["DEFAULT_MAX_PARAM_GROWTH", "DTYPE_BYTES", "NOTHING", "AlwaysMerge", "amount_text", "CostPolicy", "CostRule",
           "Decision", "Decisions", "DeviceProfile", "LatencyCost", "MacsCost", "MeasuredCost", "Op", "Timer", "Verdict",
           "Work", "check_param_growth", "elementwise", "of_form", "resolve", "roofline_seconds"]
