"""``Settings``: everything a re-parameterization is asked for, built once where a user calls repfx.

Like torch-tensorrt's ``CompilationSettings``, one frozen object is made at the API
boundary (``reparameterize``, ``explain``, ``compile``, ``export``, the CLIs, the
dynamo backend, the torch-tensorrt hook) and handed down unchanged: no function in
between re-threads seven keyword arguments, and bad values (a NaN tolerance) are
refused before any work. ``planned`` resolves the cost plan (rule, target, batch,
precision, runtime) into a ``CostRule`` once, from the whole model's inputs: parts
folded alone see only their own inputs and must plan for the model's device and batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from repfx.passes.cost import DEFAULT_MAX_PARAM_GROWTH, CostRule, check_param_growth
from repfx.verify.numeric import check_tolerances

CostName = Literal["latency", "measure", "macs", "always"]
LOCAL_PROOF_TRIALS = 1  # seeded input sets besides the example inputs for the per-region proofs


def _silent(phase: str) -> None:
    """The default progress callback: phases are not shown."""


@dataclass(frozen=True)
class Settings:
    """What a run is asked for; ``repfx.reparameterize``'s keyword arguments mean the same here."""

    verify: bool = True  # per-region float64 proofs, then the end-to-end check
    rtol: float | None = None  # None: the dtype's default (repfx.verify.numeric.DEFAULT_RTOL)
    atol: float | None = None
    strict: bool = False  # refuse an end-to-end difference that rounding explains
    dynamic_batch: bool = False
    partial: bool = True  # fold an nn.Module that cannot be captured whole in parts
    cost: CostName | CostRule = "latency"
    target: Any = None  # repfx.targets.Target: "cpu", "cuda", "cuda:h200", a DeviceProfile; None: the inputs'
    batch: int | None = None  # None: the example inputs' batch
    max_param_growth: float | None = DEFAULT_MAX_PARAM_GROWTH  # most parameters a merge may hold per one replaced
    precision: str | None = None  # the deploy precision the cost rule plans for (None: the inputs' dtype)
    runtime: Any = None  # repfx.targets.runtime.Runtime deployed to: it times forms and picks the profile (None: eager)
    int8: Any = None  # precision "int8": repfx.int8.deploy.Int8Options (target, accept below it); None: defaults
    eager_runtime: bool = True  # the result runs in eager PyTorch (False: a compiler takes the graph)
    progress: Callable[[str], None] = _silent  # called with each phase's name as it starts

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol)
        check_param_growth(self.max_param_growth)
        if self.progress is None:
            object.__setattr__(self, "progress", _silent)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def planned(self, example_inputs: tuple) -> Settings:
        """These settings with ``cost`` resolved into the ``CostRule`` every part of the model plans with."""
        if isinstance(self.cost, CostRule):
            return self
        from repfx.targets import cost_rule  # measures a device profile: only when a rule is needed

        planning = {name: value for name, value in (("target", self.target), ("batch", self.batch),
                                                    ("precision", self.precision), ("runtime", self.runtime))
                    if value is not None}
        return self.replace(cost=cost_rule(self.cost, example_inputs=example_inputs,
                                           max_param_growth=self.max_param_growth, **planning))
