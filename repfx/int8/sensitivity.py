"""Which weighted layers INT8 hurts most, and the few to leave in float so the model meets its target.

Folding BN and identity branches into one kernel widens per-channel weight ranges; on some models
one or two layers then dominate the quantization error (issue 18: one layer of a RepVGG-style net
took top-1 agreement from 98% to 89%). Sensitivity finds them the direct way: quantize one weighted
layer (Conv, ConvTranspose, Gemm, MatMul reading a constant weight) at a time with the same tool and
format, every other node left in float, run it in ONNX Runtime on held-out feeds (never the
calibration feeds, never random data) and score it against fp32 (``metrics``).

``plan_fallback``'s rule, generic: if everything the tool quantizes already meets the target, nothing
stays float. Otherwise it tries sets of layers in float, fewest first (``fallback_candidates``): the k
most sensitive (lowest single-layer agreement, then SNR), and those k with the layers that feed them,
for k = 1 .. ``max_float``, never more than ``max_float`` layers nor half of them (with most layers in
float the model is not INT8 any more: then the target is missed, and said), all from one tool start.
It takes the first set that meets the target, else the one whose held-out scores improve most on the
smaller ones (agreement up, or the same agreement and at least ``min_gain_db`` more SNR), else none.
Sets rather than one layer at a time, because layers are coupled: ONNX Runtime's CPU format quantizes
a tensor when its producer *or* its consumer is int8, so a wide activation between two convolutions
stays int8 until both are float.
Each layer left in float says why.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from repfx.backends.onnx import cpu_session
from repfx.int8.metrics import Scores, Target, score
from repfx.int8.quantizers import WEIGHTED, Feed, Format, check_feeds, constant_names, quantize, quantize_many


@dataclass(frozen=True)
class LayerSensitivity:
    """Held-out scores of the model with only ``name`` quantized."""

    name: str
    op_type: str
    scores: Scores


@dataclass(frozen=True)
class FallbackPlan:
    """What stays in float and why, and the held-out scores before (``plain``) and after (``final``)."""

    float_layers: tuple[tuple[str, str], ...]  # (node name, why)
    plain: Scores
    final: Scores
    met_target: bool
    model: bytes  # the final INT8 model
    sensitivity: tuple[LayerSensitivity, ...]  # most sensitive first


def run_onnx(model: bytes, feeds: Sequence[Feed]) -> list[np.ndarray]:
    """Every output of ``model`` over all ``feeds`` (joined along the batch axis), in ONNX Runtime on the CPU."""
    session = cpu_session(model)
    runs = [session.run(None, feed) for feed in feeds]
    return [np.concatenate(parts) if parts[0].ndim else np.stack(parts) for parts in zip(*runs)]


def weighted_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose weight (second input) is a constant: the layers int8 weights apply to."""
    constants = constant_names(model)
    return [node.name for node in model.graph.node
            if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in constants]


def quantized_layers(int8_model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose weight the quantized model dequantizes: what the tool chose to run in int8."""
    dequantized = {output for node in int8_model.graph.node if node.op_type == "DequantizeLinear"
                   for output in node.output}
    wanted = set(names)
    return [node.name for node in int8_model.graph.node
            if node.name in wanted and len(node.input) > 1 and node.input[1] in dequantized]


def layer_sensitivity(fp32_onnx: Path, calibration: list[Feed], held_out: list[Feed], fmt: Format, *,
                      layers: Sequence[str] | None = None) -> list[LayerSensitivity]:
    """Held-out scores with one layer at a time in int8 (every other node float), most sensitive first.

    ``layers``: which nodes to try; by default every weighted layer the tool quantizes in the full model.
    """
    fp32_onnx = Path(fp32_onnx)
    model = onnx.load(str(fp32_onnx))
    held_out = check_feeds(model, held_out)
    if layers is None:
        full = onnx.load_from_string(quantize(fp32_onnx, calibration, fmt))
        layers = quantized_layers(full, weighted_layers(model))
    nodes = [node.name for node in model.graph.node]
    op_types = {node.name: node.op_type for node in model.graph.node}
    excludes = [[name for name in nodes if name != layer] for layer in layers]
    reference = run_onnx(model.SerializeToString(), held_out)
    results = [LayerSensitivity(layer, op_types[layer], score(reference, run_onnx(int8, held_out)))
               for layer, int8 in zip(layers, quantize_many(fp32_onnx, calibration, fmt, excludes))]
    return sorted(results, key=lambda result: result.scores.key())


def improves(new: Scores, old: Scores, min_gain_db: float) -> bool:
    """Better agreement, or the same agreement and at least ``min_gain_db`` more SNR on the worst output."""
    new_agreement, old_agreement = new.key()[0], old.key()[0]
    if new_agreement != old_agreement:
        return new_agreement > old_agreement
    return new.worst_snr_db >= old.worst_snr_db + min_gain_db


def plan_fallback(fp32_onnx: Path, calibration: list[Feed], held_out: list[Feed], fmt: Format, *,
                  target: Target = Target(), max_float: int = 3, min_gain_db: float = 0.5,
                  exclude: Sequence[str] = (),
                  sensitivity: Sequence[LayerSensitivity] | None = None) -> FallbackPlan:
    """Quantize ``fp32_onnx`` and leave in float the few most sensitive layers the held-out scores need
    (the rule is the module docstring's). ``exclude``: nodes the caller already keeps in float."""
    fp32_onnx = Path(fp32_onnx)
    model = onnx.load(str(fp32_onnx))
    held_out = check_feeds(model, held_out)
    reference = run_onnx(model.SerializeToString(), held_out)
    current_model = quantize(fp32_onnx, calibration, fmt, exclude=exclude)
    plain = current = score(reference, run_onnx(current_model, held_out))
    if sensitivity is None:
        layers = quantized_layers(onnx.load_from_string(current_model), weighted_layers(model))
        sensitivity = layer_sensitivity(fp32_onnx, calibration, held_out, fmt,
                                        layers=[name for name in layers if name not in set(exclude)])
    ranked = sorted(sensitivity, key=lambda result: result.scores.key())
    floated: tuple[str, ...] = ()
    if not plain.meets(target) and ranked:
        limit = min(max_float, len(ranked) // 2)  # at most half: a model mostly in float is no INT8
        candidates = fallback_candidates(model, [result.name for result in ranked], limit)
        trials = quantize_many(fp32_onnx, calibration, fmt, [[*exclude, *names] for names in candidates])
        for names, trial in zip(candidates, trials):
            trial_scores = score(reference, run_onnx(trial, held_out))
            if trial_scores.meets(target) or improves(trial_scores, current, min_gain_db):
                floated, current, current_model = names, trial_scores, trial
                if trial_scores.meets(target):
                    break
    alone = {result.name: result for result in ranked}
    reasons = [(name, _why(name, alone, ranked, floated, plain, current)) for name in floated]
    return FallbackPlan(tuple(reasons), plain, current, current.meets(target), current_model, tuple(ranked))


def fallback_candidates(model: onnx.ModelProto, ranked: Sequence[str], limit: int) -> list[tuple[str, ...]]:
    """The sets of layers the fallback tries, fewest layers first: the k most sensitive, and the same with the
    layers that feed them (through ops without weights). A layer left in float alone may not take its input
    out of INT8: ONNX Runtime's format quantizes a tensor while its producer's side is INT8 (on the issue's net,
    floating the sensitive layer alone made things worse; with its producer it met the target)."""
    sets: list[tuple[str, ...]] = []
    for k in range(1, limit + 1):
        prefix = tuple(ranked[:k])
        coupled = tuple(dict.fromkeys(layer for name in prefix for layer in (*feeding_layers(model, name), name)))
        sets += [names for names in (prefix, coupled) if len(names) <= limit and names not in sets]
    return sorted(sets, key=len)  # stable: at equal size, the order above


def feeding_layers(model: onnx.ModelProto, name: str, depth: int = 4) -> list[str]:
    """Weighted layers whose output reaches ``name``'s data input through at most ``depth`` ops without weights."""
    producer = {output: node for node in model.graph.node for output in node.output}
    weighted = set(weighted_layers(model))
    node = next(node for node in model.graph.node if node.name == name)
    found, frontier = [], [node.input[0]]
    for _ in range(depth):
        nodes = [producer[tensor] for tensor in frontier if tensor in producer]
        found += [node.name for node in nodes if node.name in weighted]
        frontier = [tensor for node in nodes if node.name not in weighted for tensor in node.input]
    return list(dict.fromkeys(found))


def _why(name: str, alone: dict[str, LayerSensitivity], ranked: Sequence[LayerSensitivity], floated: Sequence[str],
         before: Scores, after: Scores) -> str:
    others = [result.scores.worst_snr_db for result in ranked if result.name not in floated]
    median = f" (the layers kept in int8: median {statistics.median(others):.1f} dB)" if others else ""
    own = (f"alone in int8 it gives {alone[name].scores.describe()}{median}" if name in alone
           else "it feeds a sensitive layer")
    return (f"{own}; with {len(floated)} layer(s) in float the held-out result goes from {before.describe()} "
            f"to {after.describe()}")
