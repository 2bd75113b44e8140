"""The ``tensorrt`` backend: torch-tensorrt's dynamo path (``torch_tensorrt.dynamo.compile``) on a CUDA device.

The plain program goes to TensorRT whole: ``require_full_compilation`` and
``min_block_size=1`` make a graph that would need PyTorch fallback segments an
error instead of a silently slower hybrid. torch-tensorrt 2.14 builds strongly
typed networks (``enabled_precisions`` is gone from the dynamo API), so the
precision is the dtype of the program's weights and inputs: fp16 means the
plain graph is cast to half *after* folding in fp32/fp64.

torch_tensorrt is imported only here, lazily; without it (or without a CUDA
device) ``BackendUnavailable`` says which piece is missing. ``repfx.export`` writes
``<name>.engine`` (the serialized engine: ``trtexec --loadEngine``, Triton's
``model.plan``) and ``<name>_trt.pt2`` (``torch_tensorrt.save``) where it is usable.

Which nodes would block a single engine is asked of torch-tensorrt's own converter
registry, where torch_tensorrt imports; where it does not, nothing is said (a prediction
from a copy of its tables went stale with every release).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from repfx.backends.availability import Probe, imported_torch_tensorrt, probe_torch_tensorrt, require_torch_tensorrt
from repfx.backends.base import Artifact, ArtifactJob, Backend, BuildRequest
from repfx.backends.precision import cast_floating, precision_dtype
from repfx.backends.program import export_program, output_names
from repfx.errors import LoweringError
from repfx.report import Report

FULL_GRAPH_OPTIONS = {"require_full_compilation": True, "min_block_size": 1}


def resolve_batch_range(inputs: Sequence[Any], dynamic_batch: bool,
                        batch_range: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """TensorRT's optimization profile for dim 0: None when static, else the given or a default range.

    The default optimizes for the example's batch and admits 1..max(batch, 64).
    """
    if not dynamic_batch:
        return None
    if batch_range is not None:
        return batch_range
    batch = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) else 1
    return (1, batch, max(batch, 64))


def tensorrt_inputs(example_inputs: Sequence[Any], batch_range: tuple[int, int, int] | None) -> list[Any]:
    """Example tensors as ``torch_tensorrt.Input`` specs; with ``batch_range`` dim 0 spans (min, opt, max)."""
    torch_tensorrt = require_torch_tensorrt()
    specs = []
    for tensor in example_inputs:
        if batch_range is None or not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            specs.append(tensor)
            continue
        low, opt, high = batch_range
        rest = tuple(tensor.shape[1:])
        specs.append(torch_tensorrt.Input(min_shape=(low, *rest), opt_shape=(opt, *rest), max_shape=(high, *rest),
                                          dtype=tensor.dtype))
    return specs


def compile_tensorrt(program: torch.export.ExportedProgram, example_inputs: Sequence[Any], *,
                     batch_range: tuple[int, int, int] | None = None, **options: Any) -> torch.nn.Module:
    """A module that runs ``program`` as TensorRT engine(s); inputs must be CUDA tensors."""
    return require_torch_tensorrt().dynamo.compile(program, arg_inputs=tensorrt_inputs(example_inputs, batch_range),
                                                   **(FULL_GRAPH_OPTIONS | options))


def serialize_engine(program: torch.export.ExportedProgram, example_inputs: Sequence[Any], *,
                     batch_range: tuple[int, int, int] | None = None, **options: Any) -> bytes:
    """The serialized TensorRT engine (``.engine`` / Triton ``model.plan``) for ``program``."""
    return require_torch_tensorrt().dynamo.convert_exported_program_to_serialized_trt_engine(
        program, arg_inputs=tensorrt_inputs(example_inputs, batch_range), **(FULL_GRAPH_OPTIONS | options))


def engine_from_onnx(model: bytes, inputs: Sequence[Any], batch_range: tuple[int, int, int] | None = None) -> bytes:
    """A strongly typed TensorRT engine of an explicitly quantized (QDQ) ONNX model: how TensorRT takes INT8.

    TensorRT's own ONNX parser reads the Q/DQ pairs; strongly typed, the precision of every layer is the one
    the model's types and Q/DQ nodes give, never a builder flag's choice. Never run on repfx's CI (no TensorRT).
    """
    require_torch_tensorrt()  # the TensorRT it pins, and a CUDA device, or one line saying what is missing
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model):
        errors = "; ".join(str(parser.get_error(index).desc()) for index in range(parser.num_errors))
        raise LoweringError(f"TensorRT's ONNX parser refused the INT8 model: {errors or 'no reason given'}")
    config = builder.create_builder_config()
    if batch_range is not None:
        profile = builder.create_optimization_profile()
        for index, tensor in enumerate(inputs):
            rest = tuple(tensor.shape[1:])
            profile.set_shape(network.get_input(index).name, *((size, *rest) for size in batch_range))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise LoweringError("TensorRT could not build an engine from the INT8 model (its log says why)")
    return bytes(engine)


def run_engine(engine: bytes, program: torch.export.ExportedProgram) -> torch.nn.Module:
    """A module running a serialized engine on CUDA tensors, with the program's input and output names."""
    runtime = require_torch_tensorrt().runtime
    return runtime.PythonTorchTensorRTModule(engine, input_binding_names=_input_names(program),
                                             output_binding_names=list(output_names(program)))


def _input_names(program: torch.export.ExportedProgram) -> list[str]:
    return [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]


def save_compiled(module: torch.nn.Module, path: str, example_inputs: Sequence[Any]) -> None:
    """``torch_tensorrt.save`` as an ExportedProgram that embeds the engine (loads with ``torch.export.load``)."""
    require_torch_tensorrt().save(module, path, output_format="exported_program", arg_inputs=list(example_inputs))


def record_tensorrt_coverage(program: torch.export.ExportedProgram, report: Report) -> None:
    """Where torch_tensorrt imports, put into ``report`` the nodes of ``program`` its converter registry has no
    converter for, after its own decompositions (as ``dynamo.compile`` lowers); elsewhere leave it unsaid."""
    torch_tensorrt = imported_torch_tensorrt()
    if isinstance(torch_tensorrt, Probe):
        return
    from torch_tensorrt.dynamo._settings import CompilationSettings
    from torch_tensorrt.dynamo.conversion._ConverterRegistry import DYNAMO_CONVERTERS
    from torch_tensorrt.dynamo.lowering import get_decompositions

    settings = CompilationSettings(**FULL_GRAPH_OPTIONS)
    lowered = program.run_decompositions(get_decompositions(settings.enable_experimental_decompositions))
    DYNAMO_CONVERTERS.set_compilation_settings(settings)  # what its validators read, as dynamo.compile sets it
    report.tensorrt_ops_source = f"torch-tensorrt {torch_tensorrt.__version__}"
    report.tensorrt_unconvertible = [
        f"{node.name}: {_op_name(node.target)} "
        f"({'its converters refuse this node' if node.target in DYNAMO_CONVERTERS else 'no converter'})"
        for node in lowered.graph.nodes if node.op == "call_function" and node not in DYNAMO_CONVERTERS]


def _op_name(target: Any) -> str:
    """``aten.histc.default``, ``_operator.getitem``: how an op is named in the report."""
    return str(target) if isinstance(target, torch._ops.OpOverload) else f"{target.__module__}.{target.__name__}"


def write_engine(job: ArtifactJob) -> None:
    """``<name>.engine`` and ``<name>_trt.pt2``, built on the CUDA device from CUDA copies of the job's graph;
    at INT8 ``<name>.int8.engine`` only, built from the quantized ONNX model."""
    job.progress("build")
    if job.quantized is not None:
        batch_range = resolve_batch_range(job.inputs, job.dynamic_batch, job.batch_range)
        job.out.write("engine", engine_from_onnx(job.quantized, job.inputs, batch_range))
        return
    device = TensorRTBackend.device
    graph, inputs = job.graph.to(device), cast_floating(job.inputs, precision_dtype(job.precision), device)
    program = export_program(graph, inputs, dynamic_batch=job.dynamic_batch)
    batch_range = resolve_batch_range(inputs, job.dynamic_batch, job.batch_range)
    job.out.write("engine", serialize_engine(program, inputs, batch_range=batch_range, **job.options))
    compiled = compile_tensorrt(program, inputs, batch_range=batch_range, **job.options)
    with job.out.writing("trt_pt2") as path:
        save_compiled(compiled, str(path), inputs)


class TensorRTBackend(Backend):
    name, title = "tensorrt", "TensorRT"
    device = torch.device("cuda")
    auto_rank = 1  # backend="auto" takes it wherever it is usable
    int8_format = "tensorrt"  # explicit quantization: ModelOpt's QDQ, parsed by TensorRT into a strongly typed engine
    artifacts = (Artifact("engine", "the TensorRT engine", {"engine": "{name}.engine", "trt_pt2": "{name}_trt.pt2"},
                          write_engine, needs="TensorRT on an NVIDIA GPU"),)

    def probe(self) -> Probe:
        return probe_torch_tensorrt()

    def annotate(self, program: torch.export.ExportedProgram, report: Report) -> None:
        record_tensorrt_coverage(program, report)

    def build(self, request: BuildRequest) -> torch.nn.Module:
        if request.quantized is not None:
            batch_range = resolve_batch_range(request.inputs, request.dynamic_batch, request.batch_range)
            return run_engine(engine_from_onnx(request.quantized, request.inputs, batch_range), request.program)
        record_tensorrt_coverage(request.program, request.report)  # says which op would block a single engine
        batch_range = resolve_batch_range(request.inputs, request.dynamic_batch, request.batch_range)
        return compile_tensorrt(request.program, request.inputs, batch_range=batch_range, **request.options)


BACKEND = TensorRTBackend()
