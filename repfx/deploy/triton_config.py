"""Render a Triton Inference Server ``config.pbtxt`` from plain tensor specs (pure: no files).

Triton reads a model's ``config.pbtxt``, a ModelConfig protobuf in text format, next to its
versions. Shapes are given as the model sees them, batch dimension included; the Triton
convention is applied here: with ``max_batch_size > 0`` the leading (batch) dimension is
left out of ``dims``, with ``max_batch_size == 0`` ``dims`` is the full shape. A dynamic
dimension is ``-1`` (``None`` is accepted for it). Names, dtypes, platforms and batch sizes
Triton would reject are refused here with ``ValueError``, before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Platform -> the file name Triton looks for inside the version directory by default.
ARTIFACT_NAMES: dict[str, str] = {
    "tensorrt_plan": "model.plan",
    "onnxruntime_onnx": "model.onnx",
}

# torch dtype -> Triton DataType enum name (model_config.proto). Strings, complex and
# float8 types have no torch/Triton counterpart both sides agree on, so they are refused.
TRITON_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "TYPE_BOOL",
    torch.uint8: "TYPE_UINT8",
    torch.uint16: "TYPE_UINT16",
    torch.uint32: "TYPE_UINT32",
    torch.uint64: "TYPE_UINT64",
    torch.int8: "TYPE_INT8",
    torch.int16: "TYPE_INT16",
    torch.int32: "TYPE_INT32",
    torch.int64: "TYPE_INT64",
    torch.float16: "TYPE_FP16",
    torch.bfloat16: "TYPE_BF16",
    torch.float32: "TYPE_FP32",
    torch.float64: "TYPE_FP64",
}

# A model name becomes a directory name and must match it exactly (Triton's rule), so
# it is kept to characters that are safe on every filesystem and in URLs (Triton's
# HTTP API puts the name in the path). The leading character excludes ".", "..",
# hidden directories and option-like names.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

DYNAMIC = -1  # Triton's marker for a dimension that varies between requests



@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, element type and full shape (batch included).

    ``shape`` entries are sizes >= 0 or ``-1`` for a dynamic dimension; ``None`` is
    normalized to ``-1`` so shapes can be written the way ``torch.export`` users think.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not self.name.isprintable():
            raise ValueError(f"tensor name must be a non-empty printable string, got {self.name!r}")
        if self.dtype not in TRITON_DTYPES:
            supported = ", ".join(str(d) for d in TRITON_DTYPES)
            raise ValueError(
                f"tensor {self.name!r}: dtype {self.dtype} has no Triton data type (supported: {supported})"
            )
        shape = tuple(DYNAMIC if d is None else d for d in self.shape)
        for d in shape:
            # bool is an int subclass; True as a dimension is a caller mistake, not 1.
            if isinstance(d, bool) or not isinstance(d, int) or d < DYNAMIC:
                raise ValueError(
                    f"tensor {self.name!r}: dimensions must be ints >= 0 or -1 (dynamic), got {self.shape!r}"
                )
        object.__setattr__(self, "shape", shape)  # frozen: normalize once, here

    @classmethod
    def like(cls, name: str, tensor: torch.Tensor, dynamic_dims: Sequence[int] = ()) -> TensorSpec:
        """The spec of ``tensor``, with the dimensions listed in ``dynamic_dims`` marked dynamic.

        Typical use: ``TensorSpec.like("input", x, dynamic_dims=(0,))`` for a batchable input.
        """
        shape = list(tensor.shape)
        for dim in dynamic_dims:
            shape[dim] = DYNAMIC
        return cls(name, tensor.dtype, tuple(shape))


def render_config(
    model_name: str,
    *,
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int = 0,
    dynamic_batching: bool = False,
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ModelConfig).

    Pure: validates and formats, touches no files, so the config can be previewed or
    tested without a repository.
    """
    check_model_name(model_name)
    check_platform(platform)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ValueError(f"max_batch_size must be an int >= 0 (0 disables batching), got {max_batch_size!r}")
    if dynamic_batching and max_batch_size == 0:
        # Triton's dynamic batcher forms batches along the batch dimension, which a
        # max_batch_size of 0 declares absent; silently dropping the request would hide that.
        raise ValueError("dynamic_batching needs max_batch_size > 0: with 0 the model has no batch dimension")
    if not inputs or not outputs:
        raise ValueError("a Triton model needs at least one input and one output")
    for kind, specs in (("input", inputs), ("output", outputs)):
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate {kind} names: {duplicates}")

    lines = [
        f"name: {_quote(model_name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {max_batch_size}",
    ]
    lines += _tensor_block("input", inputs, max_batch_size)
    lines += _tensor_block("output", outputs, max_batch_size)
    if platform == "tensorrt_plan":
        # A TensorRT plan is built for one GPU architecture and only runs on a GPU.
        lines += ["instance_group [", "  {", "    kind: KIND_GPU", "  }", "]"]
    if dynamic_batching:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _tensor_block(kind: str, specs: Sequence[TensorSpec], max_batch_size: int) -> list[str]:
    """The ``input [...]`` or ``output [...]`` list, one entry per spec."""
    lines = [f"{kind} ["]
    for i, spec in enumerate(specs):
        dims = _config_dims(spec, max_batch_size)
        lines += [
            "  {",
            f"    name: {_quote(spec.name)}",
            f"    data_type: {TRITON_DTYPES[spec.dtype]}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            "  }," if i < len(specs) - 1 else "  }",
        ]
    lines.append("]")
    return lines


def _config_dims(spec: TensorSpec, max_batch_size: int) -> tuple[int, ...]:
    """``spec.shape`` as Triton's ``dims``: the batch dimension dropped when batching."""
    if max_batch_size == 0:
        dims = spec.shape
    else:
        if not spec.shape:
            raise ValueError(f"tensor {spec.name!r} is a scalar, so it has no batch dimension; use max_batch_size=0")
        batch, dims = spec.shape[0], spec.shape[1:]
        # A fixed batch size can only serve batches of exactly that size, while Triton
        # sends any size up to max_batch_size; the only fixed size that agrees is 1 of 1.
        if batch != DYNAMIC and not (batch == 1 == max_batch_size):
            raise ValueError(
                f"tensor {spec.name!r}: batch dimension is fixed at {batch} but max_batch_size is "
                f"{max_batch_size}; export with a dynamic batch dimension (-1) or use max_batch_size=0"
            )
    if not dims:
        # Triton expresses per-item scalars with a reshape entry, which is not generated here.
        raise ValueError(f"tensor {spec.name!r}: no dimensions left for 'dims' (scalar per item is not supported)")
    return dims


def check_model_name(name: str) -> None:
    """Refuse names that are not one safe directory component."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} is not a safe directory name: use 1-128 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


def check_platform(platform: str) -> None:
    """Refuse platforms this writer does not know the artifact file name of."""
    if platform not in ARTIFACT_NAMES:
        raise ValueError(f"unsupported platform {platform!r}; expected one of {sorted(ARTIFACT_NAMES)}")


def _quote(text: str) -> str:
    """A protobuf text-format string literal (backslash and double quote escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
