"""Public entry points: ``reparameterize`` and ``explain``, which build the ``Settings`` and run the one driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from repfx.capture.export import SupportedModel
from repfx.passes.cost import DEFAULT_MAX_PARAM_GROWTH, CostRule
from repfx.pipeline import report_of, run
from repfx.report import Report
from repfx.settings import CostName, Settings
from repfx.targets import Target


def reparameterize(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    *,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    dynamic_batch: bool = False,
    cost: CostName | CostRule = "latency",
    target: Target = None,
    batch: int | None = None,
    max_param_growth: float | None = DEFAULT_MAX_PARAM_GROWTH,
    strict: bool = False,
    partial: bool = True,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Training-form ``model`` -> plain GraphModule with eval semantics; ``gm.repfx_report`` is the Report.

    Every linear region (convs, eval BN, identities, scales, avg-pools, zero pads,
    concats, linears with no nonlinearity inside) is folded into as few convolutions
    as compute it exactly, unless that would make the model slower on the device it
    will run on. ``cost="latency"`` (the default) models each form's time op by op
    (a roofline: arithmetic, memory traffic, launch overhead) on ``target``: the
    example inputs' device unless named (``"cpu"``, ``"cuda"``, or a GPU this
    machine lacks, ``"cuda:h200"``), at ``batch`` samples (default: the example
    inputs' batch). ``cost="measure"`` times the contested forms on the device
    instead; ``cost="macs"`` counts multiply-accumulates; ``cost="always"`` merges
    everything exact. The report lists each contested decision (a merge that adds
    MACs) with both forms' costs. ``max_param_growth`` (default 4): a merge whose convolutions
    would hold more than that many times the parameters of the ops they replace is refused,
    whatever time it saves (None: no bound; ``cost="always"`` has none). ``model`` is never modified.

    With ``verify``, each rewrite is first proven locally: the region and its
    replacement are evaluated in float64 on the activations that reach it (example
    and seeded inputs), and a rewrite that fails is undone and reported. Then the
    whole result is compared with the captured original in the model's dtype. A
    difference there, with every region proven, comes from fp32 rounding through
    discontinuous ops (top-k, argmax...) or an ill-conditioned model: it is accepted
    with a warning and a report note naming those ops, or refused with
    ``VerificationError`` when ``strict``. ``progress`` is called with each phase's
    name ("capture", "rewrite", "verify") as it starts.

    An ``nn.Module`` that torch.export cannot capture whole (NMS, top-k, loops over
    data) is folded in parts (``repfx.pipeline.parts``), with a ``UserWarning`` naming
    the line that blocked the whole: the result is then a copy of the model whose
    capturable submodules are replaced by their plain graphs, checked end to end
    against the model. Either way the Report is ``result.repfx_report``. ``partial=False``
    raises the ``CaptureError`` instead.
    """
    return run(model, example_inputs, Settings(verify=verify, rtol=rtol, atol=atol, dynamic_batch=dynamic_batch,
                                               cost=cost, target=target, batch=batch, strict=strict, partial=partial,
                                               max_param_growth=max_param_growth, progress=progress))


def explain(model: SupportedModel, example_inputs: Sequence[Any], *, cost: CostName | CostRule = "latency",
            target: Target = None, batch: int | None = None, partial: bool = True,
            max_param_growth: float | None = DEFAULT_MAX_PARAM_GROWTH) -> Report:
    """What ``reparameterize`` would merge and refuse (and op counts, and each contested decision with its
    costs), without verification; for a model folded in parts, part by part (``report.parts``,
    ``report.kept_parts``)."""
    return report_of(run(model, example_inputs, Settings(verify=False, cost=cost, target=target, batch=batch,
                                                         partial=partial, max_param_growth=max_param_growth)))
