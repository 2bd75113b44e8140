"""INT8 of a verified plain graph, for ``repfx.compile`` / ``repfx.export`` at ``precision="int8"``.

The order is issue 18's, and each step is the field's own tool or an exact rewrite:

1. the user's calibration data is read and split (``calibration``): never random data, and a
   held-out part that scales are never calibrated on judges every candidate;
2. the plain graph is exported to ONNX and quantized in the target's format (``quantizers``:
   ModelOpt for TensorRT, ONNX Runtime's CPU format for ONNX Runtime on the CPU);
3. sensitivity first (``sensitivity.plan_fallback``): one layer at a time in INT8, and the few
   layers far below the rest stay float when the whole model misses the target;
4. equalization where it pays: cross-layer equalization (``repfx.passes.equalize``, exact and
   proven in float64) is tried when step 3 left layers in float or missed the target, and kept
   only when its held-out scores beat the plain graph's: on benign nets it costs about 1 dB;
5. the best candidate must meet the target (top-1 agreement and SNR against the fp32 plain graph
   in ONNX Runtime); below it, ``Int8TargetMissed`` carries the numbers, unless the caller
   accepts it, which the report then says loudly.

What is decided and why, per layer, goes into ``report.int8`` (a plain dict, so the report
stays JSON): the format and its reason, the calibration data, the scores of each candidate,
the layers left in float and why, and the weight statistics that show what folding did.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from repfx.backends.onnx import export_onnx
from repfx.backends.program import export_program
from repfx.capture.export import capture
from repfx.errors import Int8TargetMissed, LoweringError, warn_user
from repfx.int8.calibration import CalibrationSet, load_calibration
from repfx.int8.metrics import Target
from repfx.int8.qdq_check import check_tensorrt_qdq
from repfx.int8.quantizers import Feed, Format, model_inputs
from repfx.int8.sensitivity import FallbackPlan, plan_fallback
from repfx.int8.weight_stats import weight_stats
from repfx.passes.equalize import equalize, layer
from repfx.report import Report

REASONS = {"tensorrt": "TensorRT's explicit quantization (ModelOpt ONNX PTQ: symmetric int8 QDQ, float bias): "
                       "what a TensorRT engine is built from",
           "cpu": "ONNX Runtime's CPU format (quantize_static, uint8 activations, fused to QLinearConv): "
                  "TensorRT-style QDQ runs slower than fp32 on ONNX Runtime's CPU provider"}


@dataclass(frozen=True)
class Int8Options:
    """What ``precision="int8"`` is asked for beside the data: the held-out target and whether missing it is
    accepted. ``repfx.compile``'s and ``repfx.export``'s ``int8_target`` / ``accept_below_target``."""

    target: Target = field(default_factory=Target)
    accept_below_target: bool = False
    max_float: int = 3  # layers at most left in float by the sensitivity fallback


def int8_options(target: Any = None, accept_below_target: bool = False) -> Int8Options:
    """``Int8Options`` from the public arguments: ``target`` a ``Target``, an (agreement, snr_db) pair, or None
    (99% agreement, 20 dB)."""
    if target is None:
        return Int8Options(accept_below_target=accept_below_target)
    if not isinstance(target, Target):
        try:
            agreement, snr = target
        except (TypeError, ValueError):
            raise ValueError(f"int8_target is (agreement, snr_db), e.g. (0.99, 20.0); got {target!r}") from None
        target = Target(agreement, snr)
    return Int8Options(target, accept_below_target)


def quantize_plain(plain: fx.GraphModule, inputs: tuple, calibration: Any, fmt: Format, why: str,
                   options: Int8Options, report: Report, *, training: fx.GraphModule | None = None,
                   progress=None) -> bytes:
    """The INT8 ONNX model of ``plain`` in ``fmt`` (chosen because ``why``), judged on held-out calibration data;
    ``report.int8`` says how.

    ``calibration`` is a ``CalibrationSet`` or anything ``load_calibration`` reads; ``training``, the captured
    training-form graph, lets the report show each folded layer's weight ranges before folding. Raises ``CalibrationError``
    for missing or unfit data and ``Int8TargetMissed`` when the best candidate misses ``options.target``
    (unless ``options.accept_below_target``).
    """
    data = calibration if isinstance(calibration, CalibrationSet) else load_calibration(calibration, inputs)
    if progress is not None:
        progress("int8")
    with tempfile.TemporaryDirectory(prefix="repfx-int8-") as folder:
        plans, weights = {}, {}
        plans["plain"] = _plan(plain, inputs, data, fmt, options, Path(folder, "plain.onnx"), weights)
        equalized = None
        if plans["plain"].float_layers or not plans["plain"].met_target:
            equalized = equalize(plain, data.calibrate[:2])
            if equalized.modified:
                plans["equalized"] = _plan(equalized.graph, inputs, data, fmt, options,
                                           Path(folder, "equalized.onnx"))
    pays, why_equalized = _better(plans["equalized"], plans["plain"]) if "equalized" in plans else (False, "")
    chosen = "equalized" if pays else "plain"
    plan = plans[chosen]
    if fmt == "tensorrt":  # what TensorRT's parser needs, checked here where no TensorRT is needed
        problems = check_tensorrt_qdq(onnx.load_from_string(plan.model))
        if problems:
            raise LoweringError(f"the INT8 model breaks TensorRT's explicit-quantization rules ({len(problems)} "
                                f"problem(s)): {problems[0]}")
    summary = _summary(plain, data, fmt, why, options, plans, chosen, _equalization_line(equalized, why_equalized,
                       plans, chosen), report, weights, training)
    report.int8 = summary
    if not plan.met_target:
        missed = (f"INT8 misses its target ({_target_text(options.target)}) on {len(data.held_out)} held-out "
                  f"batch(es): {plan.final.describe()}, with {len(plan.float_layers)} layer(s) in float")
        if not options.accept_below_target:
            raise Int8TargetMissed(f"{missed}; more or more representative calibration data may help; "
                                   "accept_below_target=True (--int8-accept-below-target) deploys it anyway")
        summary["accepted_below_target"] = True
        warn_user(f"{missed}; deployed anyway (accept_below_target)")
    return plan.model


def training_graph(model: Any, inputs: tuple) -> fx.GraphModule | None:
    """The model's training-form graph, captured again, for the report's weight ranges before folding; None (the
    column then reads "unknown") where it cannot be: only the report would lose, never the deploy."""
    try:
        return capture(model, inputs).graph
    except Exception:  # torch.export's failures are many; the fold itself already captured this model
        return None


def _plan(graph: fx.GraphModule, inputs: tuple, data: CalibrationSet, fmt: Format, options: Int8Options,
          path: Path, weights: dict[str, str] | None = None) -> FallbackPlan:
    """Quantize ``graph`` through its fp32 ONNX file at ``path``, with the sensitivity fallback. ``weights``, where
    given, gets each ONNX layer node's stored weight: the name of the graph's get_attr target it reads (the
    exporter renames nodes, not stored weights), how the report matches ONNX layers to the graph's."""
    exported = export_onnx(export_program(graph, inputs))
    path.write_bytes(exported)
    model = onnx.load_from_string(exported)
    if weights is not None:
        weights.update({node.name: node.input[1] for node in model.graph.node if len(node.input) > 1})
    names = [value.name for value in model_inputs(model)]
    return plan_fallback(path, _feeds(names, data.calibrate), _feeds(names, data.held_out), fmt,
                         target=options.target, max_float=options.max_float)


def _feeds(names: Sequence[str], batches: Sequence[tuple[torch.Tensor, ...]]) -> list[Feed]:
    return [{name: tensor.detach().cpu().numpy().astype(np.float32) for name, tensor in zip(names, batch)}
            for batch in batches]


def _better(candidate: FallbackPlan, incumbent: FallbackPlan) -> tuple[bool, str]:
    """Whether equalization pays on held-out data, and why: it meets the target where the plain graph does not,
    or meets it with fewer layers in float, or scores higher."""
    if candidate.met_target != incumbent.met_target:
        return candidate.met_target, "it meets the target" if candidate.met_target else "it misses the target"
    if candidate.met_target and len(candidate.float_layers) != len(incumbent.float_layers):
        fewer = len(candidate.float_layers) < len(incumbent.float_layers)
        return fewer, (f"it meets the target with {len(candidate.float_layers)} layer(s) in float against "
                       f"{len(incumbent.float_layers)}")
    higher = candidate.final.key() > incumbent.final.key()
    return higher, "it scores higher on held-out data" if higher else "it does not score higher on held-out data"


def _target_text(target: Target) -> str:
    return f"{100 * target.agreement:g}% top-1 agreement, {target.snr_db:g} dB"


def _summary(plain: fx.GraphModule, data: CalibrationSet, fmt: Format, why: str, options: Int8Options,
             plans: dict[str, FallbackPlan], chosen: str, equalization: str, report: Report,
             weights: dict[str, str], training: fx.GraphModule | None) -> dict[str, Any]:
    plan = plans[chosen]
    return {
        "format": fmt,
        "format_reason": f"{REASONS[fmt]}; chosen because {why}"
                         + ("; TensorRT's rules checked: none broken" if fmt == "tensorrt" else ""),
        "calibration": data.source,
        "target": _target_text(options.target),
        "met_target": plan.met_target,
        "accepted_below_target": False,
        "chosen": chosen,
        "candidates": {name: {"all_int8": candidate.plain.describe(), "final": candidate.final.describe(),
                              "float_layers": len(candidate.float_layers), "met_target": candidate.met_target}
                       for name, candidate in plans.items()},
        "equalization": equalization,
        "float_layers": [{"layer": name, "why": why} for name, why in plan.float_layers],
        "layers": _layer_rows(plain, data, plan, report, weights, training),
    }


def _equalization_line(equalized: Any, why: str, plans: dict[str, FallbackPlan], chosen: str) -> str:
    if equalized is None:
        return "not tried: every layer is INT8 and the target is met without it"
    if not equalized.modified:
        return "not applicable: no conv/linear pair through a positively homogeneous activation"
    pairs = f"{len(equalized.pairs)} layer pair(s) rescaled, proven exact in float64 " \
            f"(worst {equalized.worst_relative_error:.1e} relative)"
    verdict = f"{'kept' if chosen == 'equalized' else 'not kept'}: {why}"
    return f"{pairs}; {verdict} ({plans['equalized'].final.describe()} against {plans['plain'].final.describe()})"


def _layer_rows(plain: fx.GraphModule, data: CalibrationSet, plan: FallbackPlan, report: Report,
                weights: dict[str, str], training: fx.GraphModule | None) -> list[dict[str, Any]]:
    """Per weighted layer of the plain graph: weight statistics before/after folding, the input's range on the
    calibration data, its sensitivity alone in INT8, and whether it stayed float. ONNX layers are matched to
    the graph's by the weight they read (``weights``, from ``_plan``)."""
    sensitivity = {weights.get(row.name): (rank, row) for rank, row in enumerate(plan.sensitivity)}
    floated = {weights.get(name): why for name, why in plan.float_layers}
    ranges = _input_ranges(plain, data.calibrate)
    nodes = {node.name: node for node in plain.graph.nodes}
    rows = []
    for stats in weight_stats(plain, training=training, rewrites=report.rewrites):
        weight = layer(plain, nodes[stats.layer]).weight.target
        rank, alone = sensitivity.get(weight, (None, None))
        rows.append(asdict(stats) | {
            "input_range": ranges.get(stats.layer),
            "sensitivity_rank": rank,  # 0: the layer that hurts most alone in INT8
            "alone_in_int8": None if alone is None else alone.scores.describe(),
            "in_float": floated.get(weight)})
    return rows


def _input_ranges(plain: fx.GraphModule, batches: Sequence[tuple]) -> dict[str, tuple[float, float]]:
    """(min, max) of each conv/linear's input over the calibration batches: what its activation scale covers."""
    layers = {node for node in plain.graph.nodes if layer(plain, node) is not None}
    ranges: dict[str, tuple[float, float]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            if node in layers:
                value = self.env[node.args[0]]
                if isinstance(value, torch.Tensor) and value.numel():
                    low, high = ranges.get(node.name, (math.inf, -math.inf))
                    ranges[node.name] = (min(low, float(value.min())), max(high, float(value.max())))
            return super().run_node(node)

    with torch.no_grad():
        for batch in batches:
            Recorder(plain).run(*batch)
    return ranges
