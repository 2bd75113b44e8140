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

from repfx.api import as_input_tuple, reparameterize
from repfx.backends import BACKENDS, resolve_backend
from repfx.backends.onnx import compile_onnx
from repfx.backends.program import (cast_floating, export_program, in_precision, precision_dtype,
                               record_tensorrt_coverage)
from repfx.backends.tensorrt import compile_tensorrt, resolve_batch_range
from repfx.capture.export import SupportedModel, keeps_dynamic_batch
from repfx.report import Report
from repfx.verify.numeric import verify as verify_outputs

logger = logging.getLogger("repfx")

# Backend output vs the fp32 plain graph: fp16/bf16 round every activation.
PRECISION_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}


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
        caller_dtype = next((leaf.dtype for leaf in pytree.tree_leaves((args, kwargs))
                             if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()), torch.float32)
        args, kwargs = cast_floating((args, kwargs), self._dtype, self.device)
        outputs = self.runner(*args, **kwargs)
        return outputs if self._dtype == caller_dtype else cast_floating(outputs, caller_dtype)


def compile(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    *,
    backend: Literal["auto", "tensorrt", "onnx", "inductor", "eager"] = "auto",
    precision: Literal["fp32", "fp16", "bf16"] = "fp32",
    dynamic_batch: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    cost: Literal["macs", "always"] = "macs",
    batch_range: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] | None = None,
    **backend_options: Any,
) -> DeployedModel:
    """Re-parameterize ``model`` and lower the plain graph to ``backend``; returns a callable module.

    - ``"tensorrt"``: ``torch_tensorrt.dynamo.compile`` of the re-exported plain graph, whole
      graph in TensorRT (no PyTorch fallback); needs torch_tensorrt and a CUDA device.
    - ``"onnx"``: ``torch.onnx.export(dynamo=True)`` run by onnxruntime (CUDA provider if present).
    - ``"inductor"``: ``torch.compile`` of the plain graph; ``"eager"``: the plain GraphModule.
    - ``"auto"``: tensorrt where usable, else inductor (one log line on logger ``repfx`` says why).

    ``dynamic_batch`` makes dim 0 of every input symbolic (``batch_range`` = (min, opt, max) for
    TensorRT's optimization profile). ``verify`` checks the rewrite (fp32) and then the backend's
    output against the plain graph with a precision-dependent rtol. ``backend_options`` go to the
    backend (torch_tensorrt.dynamo.compile settings, torch.compile kwargs, ``threads`` for onnxruntime).
    """
    dtype = precision_dtype(precision)
    name, reason = resolve_backend(backend, precision)
    if backend == "auto":
        logger.info("repfx.compile: backend %r (%s)", name, reason)
    inputs = as_input_tuple(example_inputs)

    dynamic_batch = keeps_dynamic_batch(model, dynamic_batch)
    plain = reparameterize(model, inputs, verify=verify, dynamic_batch=dynamic_batch, cost=cost, progress=progress)
    report: Report = plain.meta["repfx"]
    device = torch.device("cuda") if name == "tensorrt" else None
    deploy_graph = in_precision(plain, dtype)
    deploy_inputs = cast_floating(inputs, dtype, device)
    if device is not None:
        deploy_graph = deploy_graph.to(device)
    if progress is not None:
        progress("build")
    runner = _build(name, deploy_graph, deploy_inputs, dynamic_batch=dynamic_batch, batch_range=batch_range,
                    options=backend_options, report=report)
    deployed = DeployedModel(runner, backend=name, precision=precision, plain=plain, report=report, device=device)
    report.backend, report.precision = name, precision
    if verify:
        stats = verify_outputs(plain, _outputs_on(_device_of(inputs), deployed) if device is not None else deployed,
                               inputs,
                               rtol=PRECISION_RTOL[precision] if rtol is None else rtol,
                               extra_batch=3 if dynamic_batch else None)
        report.backend_max_abs_error = stats.max_abs_error
        report.backend_tolerance = stats.tolerance
    return deployed


def _build(name: str, graph: fx.GraphModule, inputs: tuple, *, dynamic_batch: bool,
           batch_range: tuple[int, int, int] | None, options: dict, report: Report) -> Callable:
    if name == "eager":
        return graph
    if name == "inductor":
        return torch.compile(graph, **({"dynamic": True if dynamic_batch else None} | options))
    program = export_program(graph, inputs, dynamic_batch=dynamic_batch)
    if name == "onnx":
        return compile_onnx(program, **options)
    record_tensorrt_coverage(program, report)  # says which op would block a single engine
    return compile_tensorrt(program, inputs, batch_range=resolve_batch_range(inputs, dynamic_batch, batch_range),
                            **options)


def _outputs_on(device: torch.device, module: Callable) -> Callable:
    """Verification compares on the reference's device when the backend runs elsewhere (TensorRT on CUDA)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        return pytree.tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf,
                               module(*args, **kwargs))

    return run


def _device_of(inputs: tuple) -> torch.device:
    return next((leaf.device for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)),
                torch.device("cpu"))


__all__ = ["BACKENDS", "DeployedModel", "compile"]
