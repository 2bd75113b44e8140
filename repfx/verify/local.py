"""Per-region proofs: every rewrite is checked where it happens, in float64, on the values that reach it.

The end-to-end comparison sees a rewrite only through the rest of the model: through
fp32 rounding, which a deep or cancelling model amplifies, and through discontinuous
ops (a top-k over near-ties flips on the last bit). A local proof has neither
problem. The graph runs on the example and seeded inputs; where a rewritten region
starts, the activations that actually reach it are taken, upcast to float64, and fed
to the region as written and to its replacement (with the replacement's constants at
their exact float64 values, before the one rounding to the model's dtype). Folding is
exact algebra, so the two agree to float64 rounding; a difference beyond
``LOCAL_RTOL`` relative to the region's output is a wrong rewrite, which the pass then
erases instead of committing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from repfx.passes import Candidate
from repfx.passes.constants import ConstantFolder, float64_values, written_attributes

from repfx.errors import first_line
from repfx.verify.numeric import copy_inputs, difference, magnitude

LOCAL_RTOL = 1e-9  # float64 sums of a few thousand terms stay near 1e-13; folding errors are far above


@dataclass
class ProofSummary:
    """What the local proofs of one re-parameterization established (for the report)."""

    regions_proven: int = 0
    regions_failed: int = 0
    input_sets: int = 0
    worst_relative_error: float = 0.0  # max over regions of max|d| / max(1, max|region output|)


class LocalProver:
    """A ``repfx.passes.Prover``: checks candidates on ``input_sets``, remembers a summary."""

    def __init__(self, input_sets: Sequence[tuple]) -> None:
        self.input_sets = [tuple(inputs) for inputs in input_sets]
        self.summary = ProofSummary(input_sets=len(self.input_sets))

    def __call__(self, gm: fx.GraphModule, candidates: Sequence[Candidate]) -> dict[Candidate, str]:
        failed: dict[Candidate, str] = {}
        for set_index, inputs in enumerate(self.input_sets):
            pending = [candidate for candidate in candidates if candidate not in failed]
            if not pending:
                break
            try:
                outcomes = _RegionRun(gm, pending).outcomes(inputs)
            except Exception as error:  # the graph itself does not run here: nothing can be proven
                reason = f"local proof not possible: running the graph failed ({first_line(error, 200)})"
                return failed | {candidate: reason for candidate in pending}
            for candidate, (relative, reason) in outcomes.items():
                self.summary.worst_relative_error = max(self.summary.worst_relative_error, relative)
                if reason is not None:
                    failed[candidate] = f"local proof failed on input set {set_index}: {reason}; not rewritten"
        self.summary.regions_failed += len(failed)
        self.summary.regions_proven += len(candidates) - len(failed)
        return failed


class _RegionRun(fx.Interpreter):
    """One run of the graph that checks each candidate when the run reaches its root.

    Emitted nodes are skipped (nothing reads them yet); the values a region or its
    replacement read from outside are kept until every candidate that needs them is
    checked. State the graph writes is fetched as copies, so proving never advances it.
    """

    def __init__(self, gm: fx.GraphModule, candidates: Sequence[Candidate]) -> None:
        super().__init__(gm)
        self.by_root = {candidate.emission.root: candidate for candidate in candidates}
        self.emitted = {node for candidate in candidates for node in candidate.emission.nodes}
        self.needs = {candidate: _external_inputs(candidate) for candidate in candidates}
        self.remaining = Counter(node for needed in self.needs.values() for node in needed)
        self.kept: dict[fx.Node, Any] = {}
        self.written = set(written_attributes(gm))
        self.state_copies: dict[str, Any] = {}
        self.results: dict[Candidate, tuple[float, str | None]] = {}
        self.order = {node: index for index, node in enumerate(gm.graph.nodes)}
        self.constants = ConstantFolder(gm)

    def outcomes(self, inputs: tuple) -> dict[Candidate, tuple[float, str | None]]:
        """(relative error, failure reason or None) per candidate."""
        with torch.no_grad():
            self.run(*copy_inputs(inputs))  # the Interpreter flattens pytree inputs itself
        unreached = {candidate: (0.0, "the run never reached the region") for candidate in self.needs
                     if candidate not in self.results}
        return self.results | unreached

    def run_node(self, node: fx.Node) -> Any:
        if node in self.emitted:
            return None
        value = super().run_node(node)
        if node in self.remaining:
            self.kept[node] = value
        candidate = self.by_root.get(node)
        if candidate is not None:
            self.results[candidate] = self._check(candidate)
            self._release(self.needs[candidate])
        return value

    def fetch_attr(self, target: str) -> Any:
        if target not in self.written:
            return super().fetch_attr(target)
        if target not in self.state_copies:
            self.state_copies[target] = super().fetch_attr(target).clone()
        return self.state_copies[target]

    def _check(self, candidate: Candidate) -> tuple[float, str | None]:
        emission = candidate.emission
        try:
            region = sorted(candidate.ops, key=self.order.__getitem__)
            original = _evaluate(region, self._outside, {})[emission.root]
            rewritten = _evaluate(emission.nodes, self._outside, emission.exact)[emission.result]
        except Exception as error:
            return 0.0, f"evaluating the region in float64 failed ({first_line(error, 200)})"
        if original.shape != rewritten.shape:
            return float("inf"), f"replacement has shape {tuple(rewritten.shape)}, region {tuple(original.shape)}"
        scale = magnitude(original)
        relative = difference(original, rewritten) / scale
        if not relative <= LOCAL_RTOL:
            return relative, (f"in float64 the replacement differs from the region by {relative * scale:.3e} "
                              f"(max|y| {scale:.3g}, bound {LOCAL_RTOL:g} relative)")
        return relative, None

    def _outside(self, node: fx.Node) -> Any:
        """A value read from outside: constants recomputed in float64 (as the fold computed them),
        activations as the run produced them, upcast."""
        if self.constants.is_constant(node):
            return float64_values(self.constants.value(node))
        return float64_values(self.kept[node])

    def _release(self, nodes: set[fx.Node]) -> None:
        for node in nodes:
            self.remaining[node] -= 1
            if self.remaining[node] <= 0:
                del self.remaining[node]
                self.kept.pop(node, None)


def _external_inputs(candidate: Candidate) -> set[fx.Node]:
    """Nodes outside the region and outside the emission that either of them reads."""
    inside = set(candidate.ops) | set(candidate.emission.nodes)
    nodes = list(candidate.ops) + list(candidate.emission.nodes)
    return {arg for node in nodes for arg in node.all_input_nodes if arg not in inside}


def _evaluate(nodes: Sequence[fx.Node], outside: Callable[[fx.Node], Any], exact: dict[str, torch.Tensor]) -> dict:
    """Run ``nodes`` in float64: values from ``outside(node)``, emitted constants from ``exact``."""
    env: dict[fx.Node, Any] = {}

    def load(arg: fx.Node) -> Any:
        return env[arg] if arg in env else outside(arg)

    for node in nodes:
        if node.op == "get_attr":
            env[node] = exact[node.target] if node.target in exact else float64_values(_attr(node))
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), load)
        env[node] = node.target(*args, **kwargs)
    return env


def _attr(node: fx.Node) -> Any:
    value: Any = node.graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part)
    return value

