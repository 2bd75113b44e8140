"""The ``onnx`` backend: the plain program exported with ``torch.onnx.export(dynamo=True)``, run by onnxruntime.

ONNX is the interchange TensorRT's own parser (``trtexec --onnx``) and ONNX
Runtime consume; after re-parameterization each merged block is a single Conv
node. Sessions use ``ORT_ENABLE_ALL`` and the CUDA provider when onnxruntime has it.
``repfx.export`` writes ``<name>.onnx`` and checks it in onnxruntime; onnxruntime has
no bfloat16 Conv kernel, so this backend refuses bf16 (``OnnxBackend.supports``).
Merges are planned with a CPU profile measured in onnxruntime (``onnx_profile``) and
``cost="measure"`` times forms exported and run here (``ONNXRUNTIME``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from repfx.backends.availability import Probe, probe_onnxruntime, require_onnxruntime
from repfx.backends.base import Artifact, ArtifactJob, Backend, BuildRequest, Check, Unsupported
from repfx.backends.onnx_profile import measure_onnxruntime_profile, runtime_version
from repfx.backends.program import output_names
from repfx.errors import LoweringError, first_line
from repfx.targets.runtime import Runtime


def export_onnx(program: torch.export.ExportedProgram) -> bytes:
    """The serialized ONNX model of ``program`` (weights embedded; models here are far below 2 GB)."""
    require_onnxruntime()
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, report=False,
                                         output_names=output_names(program))
        return onnx_program.model_proto.SerializeToString()
    except Exception as error:
        raise LoweringError(f"torch.onnx.export failed on the plain graph: {first_line(error)}") from error


def session_options(threads: int | None = None):
    """This backend's session settings; ``threads`` intra-op threads (0 or None: onnxruntime's default)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    if threads:
        options.intra_op_num_threads = threads
    return options


def cpu_session(model: bytes, threads: int = 0):
    """A session of ``model`` on the CPU provider, configured as this backend's own: what its CPU profile is
    measured in."""
    return require_onnxruntime().InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])


def providers() -> list[str]:
    available = require_onnxruntime().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeModule(torch.nn.Module):
    """Runs an ONNX model in onnxruntime behind the exported program's calling convention.

    Arguments are bound to the program's signature (keywords by name, not by the order
    they are written) and flattened like ``torch.export`` flattened them. Non-tensor
    arguments were baked into the ONNX graph at export, so a call with different
    values is refused. Outputs come back as torch tensors on the first input's device,
    in the program's output structure, constants (``None``) included.
    """

    def __init__(self, model: bytes | os.PathLike, program: torch.export.ExportedProgram,
                 *, threads: int | None = None) -> None:
        super().__init__()
        options = session_options(threads)  # outside the try: a missing onnxruntime stays BackendUnavailable
        source = str(model) if isinstance(model, (str, os.PathLike)) else model
        try:
            self.session = require_onnxruntime().InferenceSession(source, options, providers=providers())
        except Exception as error:
            raise LoweringError(f"onnxruntime cannot load the exported model: {first_line(error)}") from error
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.signature = inspect.signature(program.module().forward)
        self.in_spec, self.out_spec = program.call_spec.in_spec, program.call_spec.out_spec
        example_leaves = pytree.tree_leaves(program.example_inputs) if program.example_inputs else []
        self.baked = {index: leaf for index, leaf in enumerate(example_leaves) if not isinstance(leaf, torch.Tensor)}
        output = next(node for node in program.graph.nodes if node.op == "output")
        self.output_template = [None if isinstance(value, torch.fx.Node) else value
                                for value in pytree.tree_leaves(output.args[0])]
        self.output_is_tensor = [isinstance(value, torch.fx.Node) for value in pytree.tree_leaves(output.args[0])]
        # Tensors passed positionally, one per ONNX input and nothing baked: feed them as they come (binding
        # arguments to the signature per call cost more than a small model's session.run).
        self.plain_call = not self.baked and self.in_spec == pytree.tree_structure(
            (tuple(range(len(self.input_names))), {}))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        as_they_come = self.plain_call and not kwargs and len(args) == len(self.input_names)
        leaves = args if as_they_come else self._flatten(args, kwargs)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} tensor inputs, got {len(tensors)}")
        device = tensors[0].device if tensors else torch.device("cpu")
        feeds = {name: leaf.detach().cpu().contiguous().numpy() for name, leaf in zip(self.input_names, tensors)}
        results = iter(torch.from_numpy(array).to(device) for array in self.session.run(None, feeds))
        flat = [next(results) if is_tensor else constant
                for is_tensor, constant in zip(self.output_is_tensor, self.output_template)]
        return pytree.tree_unflatten(flat, self.out_spec)

    def _flatten(self, args: tuple, kwargs: dict) -> list[Any]:
        """Bind like the program's forward, order like its ``in_spec``, and check baked constants."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"the ONNX model's inputs are {self.signature}: {error}") from None
        bound.apply_defaults()
        positional_count = self.in_spec.child(0).num_children
        names = list(bound.arguments)
        keyword_names = self.in_spec.child(1).context
        call = (tuple(bound.arguments[name] for name in names[:positional_count]),
                {name: bound.arguments[name] for name in keyword_names})
        leaves, spec = pytree.tree_flatten(call)
        if spec != self.in_spec:
            raise ValueError(f"inputs are structured as {spec}, the exported model takes {self.in_spec}")
        for index, value in self.baked.items():
            if leaves[index] != value:
                raise ValueError(f"input {index} is {leaves[index]!r}, but the ONNX model was exported with "
                                 f"{value!r} baked in (non-tensor inputs are constants in ONNX)")
        return leaves


def compile_onnx(program: torch.export.ExportedProgram, *, threads: int | None = None,
                 save_to: Path | None = None) -> OnnxRuntimeModule:
    model = export_onnx(program)
    if save_to is not None:
        Path(save_to).write_bytes(model)
    return OnnxRuntimeModule(model, program, threads=threads)


def write_onnx(job: ArtifactJob) -> Check:
    """``<name>.onnx`` (at int8 ``<name>.int8.onnx``, the quantized model), checked by running it in onnxruntime."""
    model = job.quantized if job.quantized is not None else export_onnx(job.program)
    job.out.write("onnx", model)
    return Check("the ONNX model", "onnxruntime", lambda: OnnxRuntimeModule(model, job.program))


ONNXRUNTIME = Runtime("onnxruntime", timed=lambda module, inputs: compile_onnx(torch.export.export(module, inputs)),
                      cpu_profile=lambda: measure_onnxruntime_profile(cpu_session), version=runtime_version)


class OnnxBackend(Backend):
    name, title = "onnx", "ONNX"
    runtime = ONNXRUNTIME
    int8_format = "cpu"  # ONNX Runtime's CPU provider runs its own QDQ format ~3x faster than fp32, TensorRT's slower
    artifacts = (Artifact("onnx", "ONNX", {"onnx": "{name}.onnx"}, write_onnx),)

    def probe(self) -> Probe:
        return probe_onnxruntime()

    def supports(self, precision: str) -> Unsupported | None:
        if precision == "bf16":
            return Unsupported("onnxruntime has no bfloat16 Conv kernel", instead="fp16")
        return super().supports(precision)

    def build(self, request: BuildRequest) -> OnnxRuntimeModule:
        if request.quantized is not None:
            return OnnxRuntimeModule(request.quantized, request.program, **request.options)
        return compile_onnx(request.program, **request.options)  # options: ``threads``


BACKEND = OnnxBackend()
