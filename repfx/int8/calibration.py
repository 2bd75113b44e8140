"""The user's INT8 calibration data, read from whatever they pass, checked against the model's inputs and split.

INT8 scales are only as good as the data they are calibrated on, and repfx never
calibrates on random data: random inputs drive an outlier model's activations to
1e8 and give scales no real input needs. So the data is required, and part of it
is held out to judge the quantized model on samples its scales never saw.

What may be passed (``load_calibration``'s ``source``):

* an iterable of input tuples (a list, a generator, a DataLoader yielding inputs only);
  an item may be a bare tensor for a model with one input;
* a tensor (or numpy array) of samples along dim 0, for a model with one input;
* a path: a folder of images (``repfx.int8.images``: timm's default eval transform),
  a ``.npy`` (one input) or ``.npz`` (one array per model input, in the order stored),
  or a ``.pt``/``.pth`` file holding a tensor or a list/tuple of tensors (one per
  input), read with ``torch.load(weights_only=True)``: a file that needs code to
  unpickle is refused, never run.

Every input's samples must have the example input's per-sample shape (all dims but
the batch dim) and dtype. Samples are regrouped into batches of the example's batch
size, since a model exported with a static batch takes no other; samples beyond the
last whole batch are left out (``source`` says how many).

The split is deterministic and spread over the data (a folder sorted by class keeps
every class on both sides): sample ``i`` (in the order given) is held out exactly
when ``floor((i + 1) * held_out) > floor(i * held_out)``, i.e. every fifth sample for
0.2. Held-out samples are never calibrated on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repfx.errors import CalibrationError
from repfx.int8.images import image_files, load_images

MIN_SAMPLES = 8  # fewer gives scales from a handful of activations: an error, not a warning
Batch = tuple[torch.Tensor, ...]
SOURCES = ("an iterable of input tuples, a tensor of samples along dim 0, or a path to a folder of images, "
           "a .npy/.npz or a .pt file")


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration batches, held-out batches (never calibrated on), and what they were read from."""

    calibrate: list[Batch]
    held_out: list[Batch]
    source: str  # one line, e.g. "folder images/ (40 images; timm eval transform): 32 calibrate, 8 held out"


def load_calibration(source: Any, example_inputs: tuple, *, held_out: float = 0.2) -> CalibrationSet:
    """``source`` (see the module docstring) as batches like ``example_inputs``, split ``held_out`` of the samples
    off for judging; raises ``CalibrationError`` with one line naming what to fix."""
    if source is None:
        raise CalibrationError(f"precision='int8' needs calibration data: pass calibration= {SOURCES} of real "
                               "inputs (repfx never calibrates on random data)")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 <= held_out < 1:
        raise CalibrationError(f"held_out must be a fraction in [0, 1), got {held_out!r}")
    examples = _example_tensors(example_inputs)
    inputs, described = _read(source, examples)
    count = _check(inputs, examples)
    if count < MIN_SAMPLES:
        raise CalibrationError(f"calibration data ({described}) holds {count} sample(s); INT8 needs at least "
                               f"{MIN_SAMPLES} real samples (a few hundred is usual)")
    held = torch.tensor([math.floor((i + 1) * held_out) > math.floor(i * held_out) for i in range(count)])
    batch = examples[0].shape[0]
    calibrate, left_a = _batches([x[~held] for x in inputs], batch)
    judged, left_b = _batches([x[held] for x in inputs], batch)
    if not calibrate or (held_out > 0 and not judged):
        raise CalibrationError(f"calibration data ({described}) holds {count} sample(s): too few for one batch of "
                               f"{batch} (the example inputs' batch) on each side of a {held_out:g} held-out split; "
                               "pass more samples or a smaller example batch")
    dropped = f", {left_a + left_b} left out (not a whole batch of {batch})" if left_a + left_b else ""
    line = (f"{described}: {len(calibrate) * batch} samples calibrate, {len(judged) * batch} held out "
            f"({_spread(held_out)}){dropped}")
    return CalibrationSet(calibrate, judged, line)


def _example_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    examples = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not examples or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in examples):
        raise CalibrationError("INT8 calibration needs example inputs that are all tensors with a batch dim")
    if len({x.shape[0] for x in examples}) > 1:
        raise CalibrationError("the example inputs' batch sizes (dim 0) differ: calibration batches like them "
                               "need one batch size")
    return examples


def _read(source: Any, examples: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], str]:
    """One [N, ...] tensor per model input, and a description of where they came from."""
    if isinstance(source, (str, Path)):
        return _read_path(Path(source), examples)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return [_tensor(source, "the calibration tensor")], f"a tensor of {len(source)} samples"
    if not isinstance(source, Iterable):
        raise CalibrationError(f"calibration={type(source).__name__} is not calibration data: pass {SOURCES}")
    items = []
    for index, item in enumerate(source):
        item = (item,) if isinstance(item, (torch.Tensor, np.ndarray)) else item
        if not isinstance(item, (tuple, list)) or len(item) != len(examples):
            got = f"{len(item)} values" if isinstance(item, (tuple, list)) else type(item).__name__
            raise CalibrationError(f"calibration item {index} holds {got}; the model takes {len(examples)} "
                                   "input(s): yield model inputs only (no labels), one tuple per call")
        items.append([_tensor(value, f"calibration item {index}, input {k}") for k, value in enumerate(item)])
    if not items:
        raise CalibrationError("the calibration iterable is empty: pass real input samples")
    _check_items(items, examples)
    inputs = [torch.cat([item[k] for item in items]) for k in range(len(examples))]
    return inputs, f"{len(items)} input tuple(s)"


def _read_path(path: Path, examples: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], str]:
    if not path.exists():
        raise CalibrationError(f"calibration path {path} does not exist: pass a folder of images, a .npy/.npz or "
                               "a .pt file")
    if path.is_dir():
        return _read_images(path, examples)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return [_tensor(np.load(path, allow_pickle=False), str(path))], f"{path.name}"
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return [_tensor(arrays[name], f"{path.name}[{name}]") for name in arrays.files], f"{path.name}"
    if suffix in (".pt", ".pth"):
        return _read_pt(path), path.name
    raise CalibrationError(f"calibration file {path.name} is no .npy, .npz, .pt or .pth: save the samples as one "
                           "of those, or pass a folder of images")


def _read_images(folder: Path, examples: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], str]:
    first = examples[0]
    if len(examples) != 1 or first.dim() != 4 or first.shape[1] != 3:
        raise CalibrationError(f"a folder of images calibrates a model with one [N, 3, H, W] input; its example "
                               f"inputs are {[tuple(x.shape) for x in examples]}: pass a tensor, .npy or .pt instead")
    files = image_files(folder)
    if not files:
        raise CalibrationError(f"calibration folder {folder} holds no image files PIL can read")
    height, width = first.shape[2:]
    pixels = load_images(files, height, width)
    if first.is_floating_point():
        pixels = pixels.to(first.dtype)  # the transform's own float32, as the model's float type
    return [pixels], f"folder {folder.name}/ ({len(files)} images; timm eval transform to {height}x{width})"


def _read_pt(path: Path) -> list[torch.Tensor]:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (an unpickling error names the refused global)
        raise CalibrationError(f"{path.name} could not be read with torch.load(weights_only=True) "
                               f"({str(error).splitlines()[0][:160]}): save a tensor or a list of tensors "
                               "(torch.save), which loads without running code") from error
    values = [value] if isinstance(value, torch.Tensor) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in values):
        raise CalibrationError(f"{path.name} holds a {type(value).__name__}: save a tensor of samples, or a list of "
                               "tensors (one per model input), with torch.save")
    return [_tensor(v, f"{path.name}[{k}]") for k, v in enumerate(values)]


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CalibrationError(f"{what} is an object array: pass numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise CalibrationError(f"{what} is a {type(value).__name__}, not a tensor: pass tensors or numpy arrays")
    return value.detach().to("cpu")  # a view, or a copy off the device: the user's tensor is never written


def _check_items(items: list[list[torch.Tensor]], examples: tuple[torch.Tensor, ...]) -> None:
    for index, item in enumerate(items):
        for k, (value, example) in enumerate(zip(item, examples)):
            _check_input(value, example, f"calibration item {index}, input {k}")


def _check(inputs: list[torch.Tensor], examples: tuple[torch.Tensor, ...]) -> int:
    """The number of samples, after checking each input against its example (count, shape, dtype)."""
    if len(inputs) != len(examples):
        raise CalibrationError(f"the calibration data holds {len(inputs)} input array(s); the model takes "
                               f"{len(examples)}: pass one array per model input")
    for k, (value, example) in enumerate(zip(inputs, examples)):
        _check_input(value, example, f"calibration input {k}")
    counts = {len(value) for value in inputs}
    if len(counts) > 1:
        raise CalibrationError(f"the calibration inputs hold different sample counts {sorted(counts)}: pass as many "
                               "samples of each input")
    return counts.pop()


def _check_input(value: torch.Tensor, example: torch.Tensor, what: str) -> None:
    want = tuple(example.shape[1:])
    if value.dim() != example.dim() or tuple(value.shape[1:]) != want:
        hint = (" (one sample without its batch dim? add one with x[None])"
                if tuple(value.shape) == want else "")
        raise CalibrationError(f"{what} has shape {tuple(value.shape)}; the model's example input is "
                               f"{tuple(example.shape)}, so samples must be [N, {', '.join(map(str, want))}]{hint}")
    if value.dtype != example.dtype:
        raise CalibrationError(f"{what} is {value.dtype}; the model's example input is {example.dtype}: convert the "
                               f"samples (e.g. .to({example.dtype}) or numpy .astype)")


def _batches(inputs: list[torch.Tensor], batch: int) -> tuple[list[Batch], int]:
    """Whole batches of ``batch`` samples (each a tuple over inputs), and how many samples were left over."""
    count = len(inputs[0])
    whole = count // batch
    batches = [tuple(x[i * batch:(i + 1) * batch].clone() for x in inputs) for i in range(whole)]
    return batches, count - whole * batch


def _spread(fraction: float) -> str:
    if fraction == 0:
        return "none held out"
    step = 1 / fraction
    return f"1 sample in {round(step)}" if math.isclose(step, round(step)) else f"{fraction:g}, spread evenly"
