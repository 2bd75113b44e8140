"""Measure a CPU ``DeviceProfile`` as ONNX Runtime attains it: the runtime the ``onnx`` backend deploys to.

ONNX Runtime runs a whole graph per call from C++, so an op costs it a kernel
dispatch, not a Python call: its per-op overhead is a fraction of eager PyTorch's,
and its convolutions (MLAS) reach their own rates. A merge decided with eager's
figures would be decided for the wrong runtime (the small blocks where merging wins
in eager may not win here). So the same four numbers are measured in ONNX Runtime
itself, on graphs written directly with ``onnx.helper`` (no export needed):

* rate: dense 3x3 convolutions large enough to be compute-bound (the better of two shapes);
* bandwidth: one elementwise add of tensors larger than a core's caches;
* overhead: what each further op of a chain of small convolutions adds beyond its
  modeled work (a chain, because one ``session.run`` has a fixed cost of its own that a
  deployed model pays once, not per op);
* conv output time: a depthwise 3x3 convolution's time per output element.

Each figure is the fastest of single calls, as in ``microbench``; a session with one
thread is measured too, and when it is faster the machine is busy (the profile is
then estimated from it, flagged and not cached). The sessions come from the ``onnx``
backend (``session``), configured as it configures its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from repfx.backends.availability import require_onnxruntime
from repfx.passes.cost import DeviceProfile
from repfx.targets.clock import fastest_call_seconds
from repfx.targets.microbench import (COMPUTE_CONVS, DEPTHWISE_CONVS, SMALL_CONV, STREAM_ELEMENTS, Figures,
                                     busy_estimate, cpu_model)

Session = Callable[[bytes, int], Any]  # (model, intra-op threads; 0: ONNX Runtime's default) -> a CPU session

CHAIN = 16  # convolutions in the chain whose per-op cost is the overhead
OPSET = 17
IR_VERSION = 8  # an IR version every supported onnxruntime loads


def runtime_version() -> str:
    return require_onnxruntime().__version__  # onnxruntime is imported only when it is planned for


def measure_onnxruntime_profile(session: Session) -> DeviceProfile:
    """This CPU's profile in ONNX Runtime (float32: the CPU provider has no faster float16 convolution)."""
    measured, single = _measure(session, threads=0), _measure(session, threads=1)
    name = f"cpu: {cpu_model()}, onnxruntime {runtime_version()}"
    if single.flops["float32"] > measured.flops["float32"]:  # the default pool ran slower than one thread
        # ONNX Runtime sizes its own pool (physical cores by default); torch's thread count is the
        # estimate's stand-in for it, as the backend runs sessions beside torch with that many cores.
        threads = max(1, torch.get_num_threads())
        return busy_estimate(name, single, threads, f"estimated from one thread x {threads}: the thread pool "
                                                    "ran slower than one thread (a busy machine)")
    return DeviceProfile(name, "cpu", measured.flops, measured.bandwidth, measured.overhead_s,
                         f"measured in onnxruntime {runtime_version()}", conv_output_s=measured.conv_output_s)


def _measure(session: Session, threads: int) -> Figures:
    """The four figures with ``threads`` intra-op threads (0: ONNX Runtime's default)."""
    rng = np.random.default_rng(0)
    rates = []
    for batch, channels, size in COMPUTE_CONVS["cpu"]:
        x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
        weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32)
        seconds = _best(session(_conv_graph(x.shape, weight, 1), threads), {"X": x})
        rates.append(2 * batch * channels * channels * 9 * size * size / seconds)
    rate = max(rates)

    a, b = (rng.standard_normal(STREAM_ELEMENTS["cpu"], dtype=np.float32) for _ in range(2))
    add = session(_add_graph(a.shape), threads)
    bandwidth = 3 * a.nbytes / _best(add, {"X": a, "Z": b})

    channels, size = SMALL_CONV
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) / (3 * channels)
    one, chain = (_best(session(_conv_graph(x.shape, weight, count), threads), {"X": x}, calls=50)
                  for count in (1, CHAIN))
    macs = channels * channels * 9 * size * size
    modeled = max(2 * macs / rate, (2 * x.nbytes + weight.nbytes) / bandwidth)
    per_op = (chain - one) / (CHAIN - 1)
    overhead = max(per_op - modeled, per_op / 10)  # never below a tenth of an op's whole time
    conv_output = min(_depthwise_output_seconds(session, shape, rng, threads, one) for shape in DEPTHWISE_CONVS["cpu"])
    return Figures({"float32": rate}, bandwidth, overhead, conv_output)


def _depthwise_output_seconds(session: Session, shape: tuple[int, int, int], rng: np.random.Generator,
                              threads: int, fixed: float) -> float:
    """Per output element, less ``fixed`` (a small conv's whole ``session.run``), taking off at most half."""
    batch, channels, size = shape
    x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
    weight = rng.standard_normal((channels, 1, 3, 3), dtype=np.float32)
    seconds = _best(session(_conv_graph(x.shape, weight, 1, groups=channels), threads), {"X": x})
    return max(seconds - fixed, seconds / 2) / x.size


def _best(session: Any, feeds: dict[str, np.ndarray], calls: int = 10) -> float:
    return fastest_call_seconds(lambda: session.run(None, feeds), "cpu", calls=calls)


def _conv_graph(x_shape: tuple, weight: np.ndarray, count: int, groups: int = 1):
    """``count`` same-padded convolutions in a chain, sharing one weight (channels in = out)."""
    from onnx import helper, numpy_helper

    pad = weight.shape[-1] // 2
    names = ["X"] + [f"h{index}" for index in range(count - 1)] + ["Y"]
    nodes = [helper.make_node("Conv", [names[index], "W"], [names[index + 1]], pads=[pad] * 4, group=groups)
             for index in range(count)]
    return _model(nodes, {"X": x_shape}, [numpy_helper.from_array(weight, "W")])


def _add_graph(shape: tuple):
    from onnx import helper

    return _model([helper.make_node("Add", ["X", "Z"], ["Y"])], {"X": shape, "Z": shape}, [])


def _model(nodes: list, inputs: dict[str, tuple], initializers: list) -> bytes:
    from onnx import TensorProto, helper

    declared = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()]
    graph = helper.make_graph(nodes, "repfx_profile", declared,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, next(iter(inputs.values())))],
                              initializers)  # every graph here keeps its first input's shape
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()
