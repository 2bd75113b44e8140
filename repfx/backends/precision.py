"""The deploy precisions: one table from ``"fp32"``/``"fp16"``/``"bf16"``/``"int8"`` to a dtype and a tolerance.

Re-parameterization folds in fp32/fp64 whatever the deploy precision; the plain
graph is cast afterwards, and what a backend returns is compared with the fp32
plain graph at the precision's ``rtol`` (fp16 and bf16 round every activation,
bf16 with 8 mantissa bits more coarsely). INT8 is no cast: the backend runs a model
quantized on calibration data (``repfx.int8``) and it is judged on held-out data.
``repfx.compile``, the files
``repfx.export`` checks and ``DeployedModel`` all read this table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.utils import _pytree as pytree

PrecisionName = Literal["fp32", "fp16", "bf16", "int8"]  # the public signatures' spelling of the table's keys


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    rtol: float  # backend output vs the fp32 plain graph
    # INT8: the graph stays in ``dtype`` and the backend runs a model quantized on the user's calibration data
    # (``repfx.int8``), judged on held-out data against a target (agreement, SNR), not by ``rtol``.
    quantized: bool = False
    suffix: str = ""  # in the names of the files written for it: <name><suffix>.onnx


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(torch.float32, 1e-4),
    "fp16": Precision(torch.float16, 1e-2),
    "bf16": Precision(torch.bfloat16, 3e-2),
    "int8": Precision(torch.float32, 1e-4, quantized=True, suffix=".int8"),
}


def is_quantized(name: str) -> bool:
    return name in PRECISIONS and PRECISIONS[name].quantized


def precision_dtype(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name].dtype


def cast_floating(value: Any, dtype: torch.dtype, device: torch.device | str | None = None) -> Any:
    """``value``'s floating tensors in ``dtype`` (and on ``device``); everything else as it is."""
    def cast(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        leaf = leaf.to(device) if device is not None else leaf
        return leaf.to(dtype) if leaf.is_floating_point() else leaf

    return pytree.tree_map(cast, value)


def deploy_copy(plain: fx.GraphModule, inputs: tuple, precision: str,
                device: torch.device | None = None) -> tuple[fx.GraphModule, tuple]:
    """The plain graph and example inputs in the deploy precision, on ``device`` (None: where they are).

    The graph is a copy whose floating weights are always cast, fp32 included: a float64 model deployed
    at fp32 must not keep float64 weights next to the float32 inputs the deployed model is fed.
    """
    dtype = precision_dtype(precision)
    graph = copy.deepcopy(plain).to(dtype)
    return (graph if device is None else graph.to(device)), cast_floating(inputs, dtype, device)
