"""Per-region proofs: every rewrite is checked where it happens, in float64, on the values that reach it.

The end-to-end comparison sees a rewrite only through the rest of the model: through
fp32 rounding, which a deep or cancelling model amplifies, and through discontinuous
ops (a top-k over near-ties flips on the last bit). A local proof has neither
problem. The graph runs on the example and seeded inputs (one pass over its nodes,
every input set in lock step, so that each region's float64 constants are computed
once); where a rewritten region starts, the activations that actually reach it are
taken, upcast to float64, and fed to the region as written and to its replacement
(with the replacement's constants at their exact float64 values, before the one
rounding to the model's dtype). Folding is exact algebra, so the two agree to float64
rounding; a difference beyond ``LOCAL_RTOL`` relative to the region's output is a
wrong rewrite, which the pass then erases instead of committing.

A spatially local region is proven on windows of those activations (the first and
last inputs of each spatial dim, the stride phase kept; ``repfx.verify.windows``
argues why that checks every border case and the interior algebra as the whole map
does) rather than on whole maps: in float64 the whole maps were most of a proof's
cost. A refutation is always stated from the whole maps, with their numbers.
"""

from __future__ import annotations

import time
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
from repfx.verify.windows import Windows, windows

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
        self.seconds = 0.0  # spent proving, over every call (the pipeline's "prove" phase)

    def __call__(self, gm: fx.GraphModule, candidates: Sequence[Candidate]) -> dict[Candidate, str]:
        start = time.perf_counter()
        try:
            return self._prove(gm, candidates)
        finally:
            self.seconds += time.perf_counter() - start

    def _prove(self, gm: fx.GraphModule, candidates: Sequence[Candidate]) -> dict[Candidate, str]:
        try:
            outcomes = _RegionRun(gm, candidates, self.input_sets).outcomes()
        except _GraphFailed:  # say on which input set: run them one at a time
            outcomes = self._set_by_set(gm, candidates)
        failed: dict[Candidate, str] = {}
        for candidate, (relatives, failure) in outcomes.items():
            self.summary.worst_relative_error = max([self.summary.worst_relative_error, *relatives])
            if failure is not None:
                failed[candidate] = failure
        self.summary.regions_failed += len(failed)
        self.summary.regions_proven += len(candidates) - len(failed)
        return failed

    def _set_by_set(self, gm: fx.GraphModule, candidates: Sequence[Candidate]) -> dict[Candidate, _Outcome]:
        """The graph fails to run on some input set: the sets before it still prove, or refute, what they can."""
        outcomes: dict[Candidate, _Outcome] = {candidate: ([], None) for candidate in candidates}
        for set_index, inputs in enumerate(self.input_sets):
            pending = [candidate for candidate in candidates if outcomes[candidate][1] is None]
            if not pending:
                break
            try:
                results = _RegionRun(gm, pending, [inputs], first_set=set_index).outcomes()
            except _GraphFailed as error:
                reason = f"local proof not possible: running the graph failed ({first_line(error.__cause__, 200)})"
                return outcomes | {candidate: (outcomes[candidate][0], reason) for candidate in pending}
            for candidate, (relatives, failure) in results.items():
                outcomes[candidate] = (outcomes[candidate][0] + relatives, failure)
        return outcomes


_Outcome = tuple[list[float], "str | None"]  # relative errors, in input-set order; the failure, if one


class _GraphFailed(Exception):
    """Running the graph itself raised (the cause): nothing can be proven on that input set."""


class _SetRun(fx.Interpreter):
    """The graph on one input set, a node at a time (``_RegionRun`` steps every set in turn).

    Emitted nodes are skipped (nothing reads them yet). State the graph writes is
    fetched as copies, so proving never advances it.
    """

    def __init__(self, gm: fx.GraphModule, emitted: set[fx.Node], written: set[str], inputs: tuple) -> None:
        super().__init__(gm)
        self.emitted = emitted
        self.written = written
        self.state_copies: dict[str, Any] = {}
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*copy_inputs(inputs)))  # pytree inputs flattened

    def step(self, node: fx.Node) -> Any:
        """``node``'s value (dropping values no later node reads), as ``Interpreter.run`` does."""
        value = None if node in self.emitted else self.run_node(node)
        self.env[node] = value
        for dead in self.user_to_last_uses.get(node, []):
            del self.env[dead]
        return value

    def fetch_attr(self, target: str) -> Any:
        if target not in self.written:
            return super().fetch_attr(target)
        if target not in self.state_copies:
            self.state_copies[target] = super().fetch_attr(target).clone()
        return self.state_copies[target]


class _RegionRun:
    """One pass over the graph, every input set in lock step, checking each candidate when
    the pass reaches its root.

    A candidate is checked on the input sets in order, up to the first that refutes it;
    the float64 values of its constants are computed once for all of them. The values a
    region or its replacement read from outside are kept until every candidate that
    needs them is checked.
    """

    def __init__(self, gm: fx.GraphModule, candidates: Sequence[Candidate], input_sets: Sequence[tuple],
                 first_set: int = 0) -> None:
        self.gm = gm
        self.first_set = first_set  # the index the first of ``input_sets`` has in the reports
        self.by_root = {candidate.emission.root: candidate for candidate in candidates}
        emitted = {node for candidate in candidates for node in candidate.emission.nodes}
        written = set(written_attributes(gm))
        self.runs = [_SetRun(gm, emitted, written, inputs) for inputs in input_sets]
        self.needs = {candidate: _external_inputs(candidate) for candidate in candidates}
        self.remaining = Counter(node for needed in self.needs.values() for node in needed)
        self.kept: list[dict[fx.Node, Any]] = [{} for _ in self.runs]
        self.results: dict[Candidate, _Outcome] = {}
        self.order = {node: index for index, node in enumerate(gm.graph.nodes)}
        self.constants = ConstantFolder(gm)

    def outcomes(self) -> dict[Candidate, _Outcome]:
        """Per candidate: relative errors and the failure message (None: proven). Raises ``_GraphFailed``."""
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                for run, kept in zip(self.runs, self.kept):
                    try:
                        value = run.step(node)
                    except Exception as error:
                        raise _GraphFailed from error
                    if node in self.remaining:
                        kept[node] = value
                candidate = self.by_root.get(node)
                if candidate is not None:
                    self.results[candidate] = self._check(candidate)
                    self._release(self.needs[candidate])
                if node.op == "output":
                    break
        unreached = ([0.0], self._failure(0, "the run never reached the region"))
        return self.results | {candidate: unreached for candidate in self.needs if candidate not in self.results}

    def _failure(self, set_index: int, reason: str) -> str:
        return f"local proof failed on input set {self.first_set + set_index}: {reason}; not rewritten"

    def _check(self, candidate: Candidate) -> _Outcome:
        region = sorted(candidate.ops, key=self.order.__getitem__)
        emission = candidate.emission
        constants: dict[fx.Node | str, Any] = {}  # float64 values, shared by the input sets
        crop = windows(region + emission.nodes, (emission.root, emission.result), self.constants.is_constant)
        if crop is not None:
            proven = self._check_windows(candidate, region, constants, crop)
            if proven is not None:
                return proven
        relatives = []  # whole maps, set by set: what every refutation is stated from
        for set_index, kept in enumerate(self.kept):
            relative, reason = self._check_on(candidate, region, self._reader(kept.__getitem__, constants), constants)
            relatives.append(relative)
            if reason is not None:
                return relatives, self._failure(set_index, reason)
        return relatives, None

    def _check_windows(self, candidate: Candidate, region: list[fx.Node], constants: dict,
                       crop: Windows) -> _Outcome | None:
        """The relative errors when the windows of every input set, stacked along the batch (the region
        is computed sample by sample), prove the candidate; None: the whole maps decide."""
        sets, batch = len(self.kept), set()

        def stacked(node: fx.Node) -> Any:
            values = [crop.crop(kept[node]) for kept in self.kept]
            if not all(isinstance(value, torch.Tensor) and value.dim() for value in values):
                raise ValueError("an activation without a batch dim")
            batch.update(value.shape[0] for value in values)
            if len(batch) != 1:
                raise ValueError("activations of different batch sizes")  # not one sample per batch row
            return torch.cat(values)

        results = self._evaluate_both(candidate, region, self._reader(stacked, constants), constants)
        if isinstance(results, str):
            return None
        original, rewritten = results
        if (original.shape != rewritten.shape or original.shape[0] != sets * next(iter(batch), -1)
                or not crop.fits(original, candidate.emission.root.meta["val"].shape)):
            return None
        relatives = [difference(want, got) / magnitude(want)
                     for want, got in zip(original.chunk(sets), rewritten.chunk(sets))]
        return (relatives, None) if all(relative <= LOCAL_RTOL for relative in relatives) else None

    def _check_on(self, candidate: Candidate, region: list[fx.Node], outside: Callable[[fx.Node], Any],
                  constants: dict) -> tuple[float, str | None]:
        results = self._evaluate_both(candidate, region, outside, constants)
        if isinstance(results, str):
            return 0.0, results
        original, rewritten = results
        if original.shape != rewritten.shape:
            return float("inf"), f"replacement has shape {tuple(rewritten.shape)}, region {tuple(original.shape)}"
        scale = magnitude(original)
        relative = difference(original, rewritten) / scale
        if not relative <= LOCAL_RTOL:
            return relative, (f"in float64 the replacement differs from the region by {relative * scale:.3e} "
                              f"(max|y| {scale:.3g}, bound {LOCAL_RTOL:g} relative)")
        return relative, None

    @staticmethod
    def _evaluate_both(candidate: Candidate, region: list[fx.Node], outside: Callable[[fx.Node], Any],
                       constants: dict) -> tuple[torch.Tensor, torch.Tensor] | str:
        """The region's value and its replacement's in float64, or why they could not be computed."""
        emission = candidate.emission
        try:
            return (_evaluate(region, outside, {}, constants)[emission.root],
                    _evaluate(emission.nodes, outside, emission.exact, constants)[emission.result])
        except Exception as error:
            return f"evaluating the region in float64 failed ({first_line(error, 200)})"

    def _reader(self, activation: Callable[[fx.Node], Any], constants: dict) -> Callable[[fx.Node], Any]:
        """Values read from outside, each upcast once: constants recomputed in float64 (as the fold
        computed them, shared by the input sets), activations as ``activation`` gives them."""
        activations: dict[fx.Node, Any] = {}

        def outside(node: fx.Node) -> Any:
            if self.constants.is_constant(node):
                if node not in constants:
                    constants[node] = float64_values(self.constants.value(node))
                return constants[node]
            if node not in activations:
                activations[node] = float64_values(activation(node))
            return activations[node]
        return outside

    def _release(self, nodes: set[fx.Node]) -> None:
        for node in nodes:
            self.remaining[node] -= 1
            if self.remaining[node] <= 0:
                del self.remaining[node]
                for kept in self.kept:
                    kept.pop(node, None)


def _external_inputs(candidate: Candidate) -> set[fx.Node]:
    """Nodes outside the region and outside the emission that either of them reads."""
    inside = set(candidate.ops) | set(candidate.emission.nodes)
    nodes = list(candidate.ops) + list(candidate.emission.nodes)
    return {arg for node in nodes for arg in node.all_input_nodes if arg not in inside}


def _evaluate(nodes: Sequence[fx.Node], outside: Callable[[fx.Node], Any], exact: dict[str, torch.Tensor],
              constants: dict) -> dict:
    """Run ``nodes`` in float64: values from ``outside(node)``, emitted constants from ``exact``,
    other attributes upcast once into ``constants``."""
    env: dict[fx.Node, Any] = {}

    def load(arg: fx.Node) -> Any:
        return env[arg] if arg in env else outside(arg)

    for node in nodes:
        if node.op == "get_attr":
            if node.target in exact:
                env[node] = exact[node.target]
            else:
                if node.target not in constants:
                    constants[node.target] = float64_values(_attr(node))
                env[node] = constants[node.target]
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), load)
        env[node] = node.target(*args, **kwargs)
    return env


def _attr(node: fx.Node) -> Any:
    value: Any = node.graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part)
    return value

