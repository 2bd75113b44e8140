"""The Triton model-repository entry ``--triton-repo`` adds: claimed before the run, staged from its result."""

from __future__ import annotations

from pathlib import Path

import torch

from repfx.backends.program import output_names, output_values
from repfx.capture.inputs import user_input_nodes
from repfx.capture.loading import BadInput
from repfx.deploy.export import ExportPlan, ExportResult
from repfx.deploy.staging import Transaction
from repfx.deploy.triton import ModelEntry, plan_model_entry
from repfx.deploy.triton_config import TensorSpec, render_config


def plan_triton(transaction: Transaction, repo: Path, plan: ExportPlan) -> ModelEntry:
    """Claim the Triton entry (engine if one is built, else ONNX) before any work: its state is judged now."""
    platform, _ = _triton_artifact(plan)
    return plan_model_entry(transaction, repo, plan.name, platform=platform)


def _triton_artifact(plan: ExportPlan) -> tuple[str, str]:
    """(Triton platform, file kind of the artifact it serves)."""
    if "engine" in plan.wanted:
        return "tensorrt_plan", "engine"
    if "onnx" in plan.wanted:
        return "onnxruntime_onnx", "onnx"
    raise BadInput("--triton-repo needs the ONNX model or the TensorRT engine among --formats")


def stage_triton(entry: ModelEntry, plan: ExportPlan, result: ExportResult,
                 dynamic_batch: tuple[int, int, int] | None) -> None:
    """Stage the new version and its config.pbtxt next to the staged deploy files.

    Tensor names are the ones both artifacts carry: the program's input names and
    ``output0..N`` (torch-tensorrt's binding names, which the ONNX export reuses).
    """
    inputs = [TensorSpec.like(node.name, node.meta["val"], _symbolic_dims(node.meta["val"]))
              for node in user_input_nodes(result.program)]
    outputs = [TensorSpec.like(output_name, value, _symbolic_dims(value))
               for output_name, value in zip(output_names(result.program), output_values(result.program))]
    text = render_config(entry.model_dir.name, platform=entry.platform, inputs=inputs, outputs=outputs,
                         max_batch_size=dynamic_batch[2] if dynamic_batch else 0,
                         dynamic_batching=bool(dynamic_batch))
    entry.stage(plan.staged(_triton_artifact(plan)[1]), text)


def _symbolic_dims(value: torch.Tensor) -> tuple[int, ...]:
    """Dimensions the program leaves dynamic: ``-1`` in the Triton config."""
    return tuple(index for index, size in enumerate(value.shape) if not isinstance(size, int))
