"""repfx.passes: the graph passes that re-parameterize a captured aten graph, declared in the order they run.

``PIPELINE`` is that order, each pass with its name and why it is there
(``describe_pipeline()`` prints it; so does ``python -m repfx.passes``).
``run_pipeline`` is the one driver: ``repfx.reparameterize`` and the torch-tensorrt
lowering pass both call it. Each pass runs once, in order, except that

* a pass marked ``to_fixed_point`` is repeated until it changes nothing (its rounds
  are what the driver returns and the report counts), and
* a pass marked ``eager_runtime`` runs only when the result will execute in eager
  PyTorch (``eager_runtime=True``); a compiler re-functionalizes the graph anyway.

What a pass that runs once reports (rewrites, refusals) is told with the first round
of the fixed-point pass after it, the round a report reads whole.

Layout: ``algebra/`` is pure tensor algebra (kernels, forms); ``regions/`` finds what
can be merged (the analyzer, and one module of rules per family of ops); ``emit``
writes a region back as convolutions; ``fold``, ``canonicalize`` and
``inplace_activations`` are the passes; ``constants`` folds constant subgraphs for the
analysis, and ``parameter_subgraphs`` stores those the graph computes on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx

from repfx.passes.algebra.forms import ConvForm, NotExact
from repfx.passes import cost as cost_rule
from repfx.passes.canonicalize import reshape_as_to_static_shape, see_through_value_aliases
from repfx.passes.fold import AppliedRewrite, Candidate, PassResult, Prover, fold_linear_regions
from repfx.passes.inplace_activations import inplace_activations
from repfx.passes.parameter_subgraphs import fold_parameter_subgraphs
from repfx.passes.refusals import CODES, Refused
from repfx.passes.regions.analyzer import CostPolicy


@dataclass(frozen=True)
class PassSettings:
    """What a pipeline run is asked for, handed to every pass."""

    cost: CostPolicy = "macs"  # "macs": a merge may not cost more MACs than the ops it replaces
    prover: Prover | None = None  # proves each fold before it is committed (``repfx.verify.local``)


@dataclass(frozen=True)
class Pass:
    """One entry of the pipeline: ``run(gm, settings)`` rewrites ``gm`` in place."""

    name: str
    run: Callable[[fx.GraphModule, PassSettings], PassResult]  # ``modified`` says whether it changed gm
    why: str  # one line: what would go wrong without it
    to_fixed_point: bool = False  # repeated until it changes nothing
    eager_runtime: bool = False  # only for a result that runs in eager PyTorch

    def describe(self) -> str:
        marks = [mark for flag, mark in ((self.to_fixed_point, "to a fixed point"),
                                         (self.eager_runtime, "eager runtime only")) if flag]
        flags = f" [{', '.join(marks)}]" if marks else ""
        return f"{self.name}{flags}: {self.why}"


def _canonicalize(gm: fx.GraphModule, settings: PassSettings) -> PassResult:
    return PassResult(reshape_as_to_static_shape(gm))


def _see_through(gm: fx.GraphModule, settings: PassSettings) -> PassResult:
    return PassResult(see_through_value_aliases(gm))


def _parameter_subgraphs(gm: fx.GraphModule, settings: PassSettings) -> PassResult:
    with torch.no_grad():  # the bound is the one merges obey: a stored value is a parameter like a merged kernel
        return fold_parameter_subgraphs(gm, cost_rule.resolve(settings.cost).max_param_growth)


def _fold(gm: fx.GraphModule, settings: PassSettings) -> PassResult:
    with torch.no_grad():  # folding computes new weights from parameters: no autograd history
        return fold_linear_regions(gm, settings.cost, settings.prover)


def _inplace(gm: fx.GraphModule, settings: PassSettings) -> PassResult:
    return PassResult(inplace_activations(gm) > 0)


PIPELINE: tuple[Pass, ...] = (
    Pass("reshape_as_to_static_shape", _canonicalize,
         "reshape_as(a, b) reads b only for its shape, yet the edge counts as a second use that stops b folding"),
    Pass("see_through_value_aliases", _see_through,
         "x.detach(), x.clone(), x.to(x.dtype) are x, but branches reading them and x would not count as one input"),
    Pass("fold_parameter_subgraphs", _parameter_subgraphs,
         "a weight computed in forward from parameters alone runs on every call, and a conv reading it is no "
         "plain conv, so it would not merge"),
    Pass("fold_linear_regions", _fold,
         "each linear region becomes the fewest convolutions that compute it exactly; a rewrite can free an op "
         "for the next round", to_fixed_point=True),
    Pass("inplace_activations", _inplace,
         "export functionalized nn.ReLU(inplace=True); in eager PyTorch the extra activation tensor costs time",
         eager_runtime=True),
)


def describe_pipeline(pipeline: Sequence[Pass] = PIPELINE) -> str:
    """The passes in the order they run, one numbered line each (like torch-tensorrt's ``dump_lowering_passes``)."""
    lines = [f"repfx.passes: {len(pipeline)} passes, in order"]
    lines += [f"  {index}. {step.describe()}" for index, step in enumerate(pipeline, 1)]
    return "\n".join(lines)


def run_pipeline(gm: fx.GraphModule, cost: CostPolicy = "macs", *, prover: Prover | None = None,
                 eager_runtime: bool = False, max_iterations: int = 8,
                 pipeline: Sequence[Pass] = PIPELINE) -> list[PassResult]:
    """Run ``pipeline`` over ``gm`` in place; returns the rounds of its fixed-point passes, in order.

    ``eager_runtime``: the result will run in eager PyTorch (``repfx.reparameterize``),
    so the passes that only help eager execution run too; a graph handed to a compiler
    (the torch-tensorrt lowering pass) skips them.
    """
    settings = PassSettings(cost, prover)
    rounds: list[PassResult] = []
    told: list[PassResult] = []  # what passes that ran once found, not yet told with a round
    for step in pipeline:
        if step.eager_runtime and not eager_runtime:
            continue  # a compiler re-functionalizes: the rewrite would only be undone
        if not step.to_fixed_point:
            outcome = step.run(gm, settings)
            told += [outcome] if outcome.rewrites or outcome.refusals else []
            continue
        first = len(rounds)
        for _ in range(max_iterations):
            rounds.append(step.run(gm, settings))
            if not rounds[-1].modified:
                break  # DBB's nested blocks take one round; ``y * g + y`` after a linear y, two (then y is read once)
        rounds[first], told = _told_with(told, rounds[first]), []
    return rounds + told


def _told_with(earlier: list[PassResult], round_: PassResult) -> PassResult:
    """``round_`` with the rewrites and refusals of the passes that ran once before it, theirs first."""
    return replace(round_, rewrites=[r for step in earlier for r in step.rewrites] + round_.rewrites,
                   refusals=[r for step in earlier for r in step.refusals] + round_.refusals)


def run_to_fixed_point(gm: fx.GraphModule, cost: CostPolicy = "macs", max_iterations: int = 8,
                       prover: Prover | None = None) -> list[PassResult]:
    """The pipeline without its eager-runtime passes, under the name and signature it had before ``run_pipeline``."""
    return run_pipeline(gm, cost, prover=prover, max_iterations=max_iterations)


__all__ = ["CODES", "PIPELINE", "AppliedRewrite", "Candidate", "ConvForm", "NotExact", "Pass", "PassResult",
           "PassSettings", "Prover", "Refused", "describe_pipeline", "fold_linear_regions", "run_pipeline",
           "run_to_fixed_point"]
