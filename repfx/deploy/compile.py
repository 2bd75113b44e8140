"""``repfx.compile``: training-form model -> verified plain graph -> a backend, in one call.

Re-parameterization happens once, in fp32/fp64, whatever the deploy precision;
the plain graph is then cast (fp16/bf16) and handed to the backend, and the
backend's output is checked against the fp32 plain graph, so a backend that
miscompiles is an error here rather than in production.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repfx.capture.inputs import as_input_sets
from repfx.backends.base import BuildRequest
from repfx.backends.precision import (PRECISIONS, PrecisionName, cast_floating, deploy_copy, is_quantized,
                                     precision_dtype)
from repfx.backends.registry import get_backend, module_fallback, resolve_backend
from repfx.capture.export import SupportedModel, keeps_dynamic_batch
from repfx.int8.calibration import load_calibration
from repfx.int8.quantizers import ensure_tool
from repfx.int8.deploy import int8_options, quantize_plain, training_graph
from repfx.passes.cost import DEFAULT_MAX_PARAM_GROWTH
from repfx.pipeline import is_folded_in_parts, report_of, run, run_whole
from repfx.report import Report
from repfx.settings import Settings
from repfx.targets import Target, device_target
from repfx.verify.mismatch import judge_backend
from repfx.verify.numeric import ErrorStats, verify as verify_outputs

logger = logging.getLogger("repfx")


def planned_target(target: Target, backend_device: torch.device | None) -> Target:
    """The target asked for; else the backend's device; else (None) where the example inputs are."""
    if target is not None or backend_device is None:
        return target
    return device_target(backend_device)


class DeployedModel(nn.Module):
    """The compiled model: call it like the original; ``.report`` says what happened.

    Floating inputs are cast to the deploy precision (and moved to the backend's
    device); floating outputs come back in the dtype of the first floating input,
    as torch-tensorrt does for reduced-precision engines.
    """

    def __init__(self, runner: Callable, *, backend: str, precision: str, plain: fx.GraphModule, report: Report,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.runner = runner
        self.backend, self.precision, self.plain, self.report = backend, precision, plain, report
        self.device = device
        self._dtype = precision_dtype(precision)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and all(isinstance(arg, torch.Tensor) and arg.dtype == self._dtype
                              and (self.device is None or arg.device == self.device) for arg in args):
            return self.runner(*args)  # already in the deploy dtype and place: nothing to cast on either side
        caller_dtype = next((leaf.dtype for leaf in pytree.tree_leaves((args, kwargs))
                             if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()), torch.float32)
        args, kwargs = cast_floating((args, kwargs), self._dtype, self.device)
        outputs = self.runner(*args, **kwargs)
        return outputs if self._dtype == caller_dtype else cast_floating(outputs, caller_dtype)


def compile(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    *,
    backend: str = "auto",
    precision: PrecisionName = "fp32",
    dynamic_batch: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    strict: bool = False,
    cost: Literal["latency", "measure", "macs", "always"] = "latency",
    target: Target = None,
    batch: int | None = None,
    max_param_growth: float | None = DEFAULT_MAX_PARAM_GROWTH,
    batch_range: tuple[int, int, int] | None = None,
    calibration: Any = None,
    int8_target: Any = None,
    accept_below_target: bool = False,
    progress: Callable[[str], None] | None = None,
    **backend_options: Any,
) -> DeployedModel:
    """Re-parameterize ``model`` and lower the plain graph to ``backend``; returns a callable module.

    ``backend`` is a name in ``repfx.backends.registry`` (built in: ``"tensorrt"``, ``"onnx"``,
    ``"inductor"``, ``"eager"``; each module of ``repfx.backends`` says what runs) or ``"auto"``:
    tensorrt where usable, else inductor (one log line on logger ``repfx`` says why).

    ``dynamic_batch`` makes dim 0 of every input symbolic (``batch_range`` = (min, opt, max) for
    TensorRT's optimization profile). ``verify`` checks the rewrite (fp32) and then the backend's
    output against the plain graph with the precision's rtol (``repfx.backends.precision``);
    ``rtol``/``atol``, where given, are the tolerance of both checks, and both judge a difference
    alike: accepted with a note where discontinuous ops explain it, refused under ``strict``.
    ``backend_options`` go to the backend (torch_tensorrt.dynamo.compile settings, torch.compile
    kwargs, ``threads`` for onnxruntime). ``cost``, ``target``, ``batch`` and ``max_param_growth`` decide which merges
    pay (``repfx.reparameterize``); the target defaults to the backend's device (TensorRT: CUDA),
    the precision is the one being built, and ``cost="measure"`` times forms with this backend.

    ``precision="int8"`` (backends ``onnx`` and ``tensorrt``) quantizes the plain graph in the backend's format
    on ``calibration`` (required; ``repfx.int8.calibration`` says what it may be), with the sensitivity fallback
    and equalization where it pays (``repfx.int8.deploy``), judged on a held-out part of the data against
    ``int8_target`` = (agreement, snr_db), default (0.99, 20.0): below it ``Int8TargetMissed``, unless
    ``accept_below_target``. ``report.int8`` says what was decided, per layer.

    A model torch.export cannot capture whole is folded in parts (``repfx.reparameterize``)
    for the ``eager`` and ``inductor`` backends (``auto`` then means inductor); the others
    lower one graph and raise ``CaptureError`` naming what blocks it and the part to use.
    """
    precision_dtype(precision)  # an unknown precision is refused before anything else
    name, reason = resolve_backend(backend, precision)
    if backend == "auto":
        logger.info("repfx.compile: backend %r (%s)", name, reason)
    chosen = get_backend(name)
    sets = as_input_sets(example_inputs)  # one example input set, or a list of them (all recorded and checked)
    inputs = sets[0]
    quantized = is_quantized(precision)
    if quantized:  # missing or unfit data and a bad target are refused before any work
        calibration = load_calibration(calibration, inputs)
        int8 = int8_options(int8_target, accept_below_target)
        ensure_tool(chosen.int8_format)

    dynamic_batch = keeps_dynamic_batch(model, dynamic_batch)
    # A model folded in parts is a module, not one graph: only backends that run modules take it.
    in_parts = (backend == "auto" or chosen.runs_modules) and not quantized  # INT8 quantizes one graph
    settings = Settings(verify=verify, rtol=rtol, atol=atol, strict=strict, dynamic_batch=dynamic_batch,
                        progress=progress, cost=cost, target=planned_target(target, chosen.device), batch=batch,
                        precision=precision, runtime=chosen.runtime, max_param_growth=max_param_growth)
    plain = (run if in_parts else run_whole)(model, sets, settings)
    report: Report = report_of(plain)
    if is_folded_in_parts(plain) and not chosen.runs_modules:  # "auto" had chosen a one-graph backend
        chosen = module_fallback()
        reason = f"the model was folded in parts and {name!r} lowers one graph"
        logger.info("repfx.compile: backend %r (%s)", chosen.name, reason)
        name = chosen.name
    if backend == "auto":  # the choice is part of what was built, not only a log line
        report.notes.append(f"backend='auto' chose {name!r}: {reason}")
    deploy_graph, deploy_inputs = deploy_copy(plain, inputs, precision, chosen.device)
    model_int8 = None
    if quantized:
        model_int8 = quantize_plain(plain, inputs, calibration, chosen.int8_format, f"the {chosen.title} backend "
                                    "runs it", int8, report, training=training_graph(model, inputs),
                                    progress=progress)
    if progress is not None:
        progress("build")
    runner = chosen.build(BuildRequest(deploy_graph, deploy_inputs, precision, report, dynamic_batch=dynamic_batch,
                                       batch_range=batch_range, options=backend_options, quantized=model_int8))
    deployed = DeployedModel(runner, backend=name, precision=precision, plain=plain, report=report,
                             device=chosen.device)
    report.backend, report.precision = name, precision
    if verify and not quantized:  # INT8 was judged on held-out data (report.int8), not by a tolerance
        stats = check_against_plain(plain, deployed, sets, precision, settings,
                                    f"the {name} backend")
        report.backend_max_abs_error = stats.max_abs_error
        report.backend_tolerance = stats.tolerance
    return deployed


def check_against_plain(plain: fx.GraphModule, deployed: DeployedModel, sets: list[tuple], precision: str,
                        settings: Settings, what: str) -> ErrorStats:
    """``deployed`` must reproduce the fp32 plain graph within the precision's rtol (``settings.rtol`` where set)
    on every example input set, seeded ones, and a wider batch where the batch is dynamic. A difference is judged
    as the rewrite's is (``repfx.verify.mismatch.judge_backend``); an accepted one is a note of the report."""
    candidate = deployed if deployed.device is None else _outputs_on(_device_of(sets[0]), deployed)
    rtol = PRECISIONS[precision].rtol if settings.rtol is None else settings.rtol
    stats = verify_outputs(plain, candidate, sets[0], rtol=rtol, atol=settings.atol, more=sets[1:],
                           extra_batch=3 if settings.dynamic_batch else None, raise_on_mismatch=False)
    if stats.mismatches:
        deployed.report.backend_note = judge_backend(stats, plain, what, strict=settings.strict)
    return stats


def _outputs_on(device: torch.device, module: Callable) -> Callable:
    """Verification compares on the reference's device when the backend runs elsewhere (TensorRT on CUDA)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        return pytree.tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf,
                               module(*args, **kwargs))

    return run


def _device_of(inputs: tuple) -> torch.device:
    return next((leaf.device for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)),
                torch.device("cpu"))


__all__ = ["DeployedModel", "check_against_plain", "compile"]
