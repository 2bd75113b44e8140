"""Public entry points: ``reparameterize`` and ``explain``."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import fx

from repfx.passes import run_to_fixed_point
from repfx.passes.inplace_activations import inplace_activations

from .capture import SupportedModel, capture
from .opcount import count_ops, summarize
from .report import Refusal, Report, Rewrite
from .verify import copy_inputs
from .verify import verify as verify_outputs


def reparameterize(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    *,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    dynamic_batch: bool = False,
    cost: Literal["macs", "always"] = "macs",
    progress: Callable[[str], None] | None = None,
) -> fx.GraphModule:
    """Training-form ``model`` -> plain GraphModule with eval semantics; ``gm.meta["repfx"]`` is the Report.

    Every linear region (convs, eval BN, identities, scales, avg-pools, zero pads,
    concats, linears with no nonlinearity inside) is folded into as few convolutions
    as compute it exactly, unless the merge would cost more MACs (``cost="always"``
    forces structural merges). With ``verify`` the result is checked against the
    captured original and ``VerificationError`` is raised instead of returning a
    wrong graph. ``model`` is never modified. ``progress`` is called with each phase's
    name ("capture", "rewrite", "verify") as it starts.
    """
    gm, report = _run(model, example_inputs, verify=verify, rtol=rtol, atol=atol,
                      dynamic_batch=dynamic_batch, cost=cost, progress=progress)
    return gm


def explain(model: SupportedModel, example_inputs: Sequence[Any], *, cost: Literal["macs", "always"] = "macs") -> Report:
    """What ``reparameterize`` would merge and refuse (and op counts), without verification."""
    _, report = _run(model, example_inputs, verify=False, rtol=None, atol=None, dynamic_batch=False, cost=cost)
    return report


def _run(model, example_inputs, *, verify, rtol, atol, dynamic_batch, cost,
         progress=None) -> tuple[fx.GraphModule, Report]:
    if cost not in ("macs", "always"):
        raise ValueError(f"cost must be 'macs' or 'always', got {cost!r}")
    progress = progress or (lambda phase: None)
    progress("capture")
    example_inputs = as_input_tuple(example_inputs)
    report = Report(model=_model_name(model))
    clock = time.perf_counter()
    gm = capture(model, example_inputs, dynamic_batch=dynamic_batch)
    reference = copy.deepcopy(gm)
    clock = _lap(report, "capture", clock)
    progress("rewrite")

    results = run_to_fixed_point(gm, cost)
    inplace_activations(gm)  # before verification, so the check covers it
    report.iterations = len(results)
    for step in results:
        report.rewrites += [Rewrite(r.kind, r.replaced_ops, r.kernel_shapes, r.ops_before, r.ops_after)
                            for r in step.rewrites]
    # The first round sees the graph as captured (the user's node names) and is complete:
    # later rounds only confirm the fixed point and would repeat its refusals.
    report.refusals = [Refusal(node, reason) for node, reason in results[0].refusals]
    clock = _lap(report, "rewrite", clock)

    progress("verify" if verify else "count")
    if verify:
        stats = verify_outputs(reference, gm, example_inputs, rtol=rtol, atol=atol,
                               extra_batch=3 if dynamic_batch else None)
        report.max_abs_error, report.max_rel_error, report.tolerance = (
            stats.max_abs_error, stats.max_rel_error, stats.tolerance)
        report.verification_note = stats.note or None
        ops_before, ops_after = stats.reference_ops, stats.candidate_ops  # counted while verifying
        _lap(report, "verify", clock)
    else:
        ops_before = count_ops(reference, copy_inputs(example_inputs))
        ops_after = count_ops(gm, copy_inputs(example_inputs))
        _lap(report, "count", clock)
    report.ops_before, report.ops_after = summarize(ops_before), summarize(ops_after)
    report.parameters_before = _parameter_count(reference)
    report.parameters_after = _parameter_count(gm)
    gm.meta["repfx"] = report
    return gm, report


def as_input_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional arguments (a lone tensor or object is one argument)."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _lap(report: Report, phase: str, start: float) -> float:
    now = time.perf_counter()
    report.seconds[phase] = now - start
    return now


def _parameter_count(gm: fx.GraphModule) -> int:
    """Elements of every tensor the graph reads (folded BN statistics vanish, so they count too)."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    return sum(t.numel() for name, t in tensors.items() if name in used and t.is_floating_point())


def _model_name(model: Any) -> str:
    return type(model).__name__
