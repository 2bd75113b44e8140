"""Quantize an fp32 ONNX file to INT8 with the field's tools, in the format its target runs fastest.

``"tensorrt"``: NVIDIA ModelOpt's ONNX PTQ, TensorRT's explicit quantization (symmetric int8,
per-channel weights on axis 0, per-tensor activations, Q/DQ on the inputs of the ops TensorRT runs
in int8, float bias). ModelOpt patches ``onnxruntime.quantization`` when it is imported, after which
ONNX Runtime's own ``quantize_static`` fails in that process, so ModelOpt runs in a subprocess
(``repfx.int8.modelopt_worker``) and never in ours. ``"cpu"``: ONNX Runtime's ``quantize_static``
in the QDQ format its CPU provider fuses to ``QLinearConv`` (uint8 activations, int8 per-channel
weights, MinMax calibration): TensorRT-style QDQ runs *slower* than fp32 there (dequantize, then an
fp32 conv), this one about 3x faster. Both calibrate on the caller's feeds, never random data
(random inputs drive outlier models' activations far beyond real ranges).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from repfx.backends.availability import Probe, ensure
from repfx.errors import LoweringError, first_line

Format = Literal["tensorrt", "cpu"]
FORMATS: tuple[Format, ...] = ("tensorrt", "cpu")
Feed = dict[str, np.ndarray]
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ops whose second input is the weight INT8 applies to

# Not nvidia-modelopt[onnx]: that extra swaps onnxruntime for onnxruntime-gpu (whose CPU QuantizeLinear truncates
# fp16 instead of rounding) and downgrades onnx; its ONNX PTQ needs only these beside the base package.
MODELOPT_PACKAGES = ("modelopt", "onnx_graphsurgeon", "onnxslim", "lief")
MODELOPT_INSTALL_HINT = "install repfx's int8 extra from the repfx clone: pip install -e '.[int8]'"
WORKER = "repfx.int8.modelopt_worker"


def probe_modelopt() -> Probe:
    """Is ModelOpt's ONNX PTQ installed? Found, not imported: importing it here would patch onnxruntime."""
    missing = [name for name in MODELOPT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return Probe(False, f"{', '.join(missing)} not installed; {MODELOPT_INSTALL_HINT}")
    return Probe(True, "nvidia-modelopt (ONNX PTQ, run in a subprocess)")


def ensure_tool(fmt: Format) -> None:
    """``BackendUnavailable`` now, before any work, when the tool of ``fmt`` is not installed (ModelOpt for
    TensorRT's format; ONNX Runtime's comes with repfx)."""
    if fmt == "tensorrt":
        ensure(probe_modelopt(), "INT8 (TensorRT format)")


def quantize(fp32_onnx: Path, calibration: list[Feed], fmt: Format, *, exclude: Sequence[str] = ()) -> bytes:
    """The INT8 model of ``fp32_onnx`` in ``fmt``, calibrated on ``calibration`` (one feed dict per batch);
    the nodes named in ``exclude`` stay in float."""
    return quantize_many(fp32_onnx, calibration, fmt, [exclude])[0]


def quantize_many(fp32_onnx: Path, calibration: list[Feed], fmt: Format,
                  excludes: Sequence[Sequence[str]]) -> list[bytes]:
    """One INT8 model per exclusion list, from one tool start: ModelOpt is imported once for all of them."""
    fp32_onnx = Path(fp32_onnx)
    if fmt not in FORMATS:
        raise ValueError(f"fmt is {fmt!r}; choose one of {', '.join(map(repr, FORMATS))}")
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"no ONNX file at {fp32_onnx}")
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    feeds = check_feeds(model, calibration)
    names = {node.name for node in model.graph.node}
    for exclude in excludes:
        if isinstance(exclude, str):
            raise ValueError(f"exclude is the string {exclude!r}; pass a list of node names")
        unknown = sorted(set(exclude) - names)
        if unknown:
            raise ValueError(f"exclude names {', '.join(unknown[:5])}, not nodes of {fp32_onnx.name}; "
                             "pass names of its nodes")
    if not excludes:
        return []
    if fmt == "tensorrt":
        return _modelopt(fp32_onnx, model, feeds, excludes)
    return [_onnxruntime(fp32_onnx, feeds, exclude) for exclude in excludes]


def constant_names(model: onnx.ModelProto) -> set[str]:
    """The tensors ``model`` stores: its initializers and the outputs of its Constant nodes."""
    return {tensor.name for tensor in model.graph.initializer} | {
        node.output[0] for node in model.graph.node if node.op_type == "Constant"}


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (old exporters also list initializers as inputs)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def check_feeds(model: onnx.ModelProto, calibration: Sequence[Feed]) -> list[Feed]:
    """``calibration`` as float32 arrays keyed by every input of ``model``; one clear line if it is not."""
    inputs = model_inputs(model)
    expected = [value.name for value in inputs]
    if isinstance(calibration, dict) or not isinstance(calibration, Sequence) or not calibration:
        raise ValueError("calibration must be a non-empty list of feeds, one dict {input name: array} per batch")
    feeds = []
    for index, feed in enumerate(calibration):
        if not isinstance(feed, dict) or sorted(feed) != sorted(expected):
            got = sorted(feed) if isinstance(feed, dict) else type(feed).__name__
            raise ValueError(f"calibration feed {index} has {got}; the model's inputs are {expected}")
        arrays = {}
        for value in inputs:
            array = np.asarray(feed[value.name])
            rank = len(value.type.tensor_type.shape.dim)
            if array.ndim != rank or not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"calibration feed {index}: input {value.name!r} is {array.dtype} of shape "
                                 f"{array.shape}; the model takes a float tensor of rank {rank}")
            if not np.isfinite(array).all():
                raise ValueError(f"calibration feed {index}: input {value.name!r} holds NaN or infinity")
            arrays[value.name] = np.ascontiguousarray(array, dtype=np.float32)
        feeds.append(arrays)
    return feeds


class FeedReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a list of feeds (a fresh one per calibration:
    calibration consumes it). ``get_first`` and ``rewind`` are what ModelOpt also calls."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> Feed | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def get_first(self) -> Feed:
        return self.feeds[0]

    def rewind(self) -> None:
        self.position = 0

    def __iter__(self):
        return iter(self.feeds)


def _onnxruntime(fp32_onnx: Path, feeds: list[Feed], exclude: Sequence[str]) -> bytes:
    """ONNX Runtime's CPU-style QDQ: uint8 asymmetric activations, int8 per-channel weights, MinMax ranges."""
    if "modelopt.onnx.quantization" in sys.modules:
        raise RuntimeError("ModelOpt's ONNX quantizer was imported in this process and patches "
                           "onnxruntime.quantization; quantize to 'cpu' in a process that has not imported it")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    reader = type("Reader", (FeedReader, CalibrationDataReader), {})(feeds)
    ranges = _ranges_cache(fp32_onnx, feeds)
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # ORT advises pre-processing on the root logger; its optimizer would rename nodes
    with tempfile.TemporaryDirectory(prefix="repfx-int8-") as folder:
        output = Path(folder) / "int8.onnx"
        try:
            quantize_static(str(fp32_onnx), str(output), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=ranges)
        except Exception as error:
            raise LoweringError(f"onnxruntime quantize_static failed: {first_line(error)}") from error
        finally:
            root.setLevel(level)
        return output.read_bytes()


@functools.cache
def _cache_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="repfx-int8-ranges-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _ranges_cache(fp32_onnx: Path, feeds: Sequence[Feed]) -> Path:
    """Where ONNX Runtime keeps the activation ranges of this model on these feeds: calibrated once, then read.

    The ranges do not depend on which nodes are excluded (ORT calibrates every tensor of the op types it
    quantizes), so the sensitivity scan's one-layer models and the fallback's trials all reuse the first
    calibration instead of running the model over the calibration data once per layer.
    """
    digest = hashlib.sha256(Path(fp32_onnx).read_bytes())
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return _cache_folder() / f"{digest.hexdigest()}.json"


def _modelopt(fp32_onnx: Path, model: onnx.ModelProto, feeds: list[Feed],
              excludes: Sequence[Sequence[str]]) -> list[bytes]:
    """Run ModelOpt's ONNX PTQ in a subprocess; its failure comes back as one line."""
    ensure(probe_modelopt(), "INT8 (TensorRT format)")
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer):
        raise ValueError(f"{fp32_onnx.name} keeps its weights in external data; pass a self-contained ONNX file")
    names = [value.name for value in model_inputs(model)]
    with tempfile.TemporaryDirectory(prefix="repfx-int8-") as folder:
        work = Path(folder)
        shutil.copyfile(fp32_onnx, work / "fp32.onnx")  # ModelOpt writes its intermediate files beside it
        np.savez(work / "calibration.npz", **{f"feed{i}_input{j}": feed[name]
                                              for i, feed in enumerate(feeds) for j, name in enumerate(names)})
        job = {"model": str(work / "fp32.onnx"), "calibration": str(work / "calibration.npz"), "inputs": names,
               "feeds": len(feeds), "excludes": [list(exclude) for exclude in excludes], "out": str(work)}
        (work / "job.json").write_text(json.dumps(job))
        run = subprocess.run([sys.executable, "-m", WORKER, str(work / "job.json")], capture_output=True,
                             text=True, cwd=folder)
        error_file = work / "error.txt"
        if run.returncode != 0 or error_file.exists():
            reason = error_file.read_text().strip() if error_file.exists() else _last_line(run.stderr)
            raise LoweringError(f"ModelOpt ONNX PTQ failed on {fp32_onnx.name}: {reason}")
        outputs = [work / f"int8_{index}.onnx" for index in range(len(excludes))]
        missing = [path.name for path in outputs if not path.is_file()]
        if missing:
            raise LoweringError(f"ModelOpt ONNX PTQ wrote no {missing[0]} for {fp32_onnx.name}: "
                                f"{_last_line(run.stderr)}")
        return [path.read_bytes() for path in outputs]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "the worker exited without a message"
