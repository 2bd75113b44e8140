"""A folder of images as one float tensor, preprocessed the way timm evaluates ImageNet models.

Calibration images must look like what the deployed model will see, or the activation
ranges INT8 is calibrated on are the wrong ones. Most RepVGG-style checkpoints come
from timm, so a folder is read with timm's default eval transform
(``timm.data.transforms_imagenet_eval`` with ``crop_pct=0.875``, bicubic, ImageNet mean
and std), written here with PIL so that neither timm nor torchvision is needed:

1. RGB (palette, grayscale and alpha images are converted);
2. resize, bicubic: a square input of side S resizes the shorter edge to
   ``floor(S / 0.875)`` keeping the aspect ratio (the long edge to
   ``int(long * new_short / short)``, as torchvision's ``Resize(int)``); a non-square
   H x W input resizes to ``floor(H / 0.875) x floor(W / 0.875)`` exactly (as timm does);
3. center crop to H x W (the offset rounded as torchvision's ``CenterCrop``);
4. scale to [0, 1], then ``(x - mean) / std`` per channel with mean (0.485, 0.456, 0.406)
   and std (0.229, 0.224, 0.225).

Files are every file under the folder (subfolders too, as class folders are laid out)
whose suffix PIL can open, in sorted order of their path relative to the folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from repfx.errors import CalibrationError

CROP_PCT = 0.875
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted by their path relative to it."""
    image = _pil().Image
    suffixes = {suffix.lower() for suffix in image.registered_extensions()}
    return sorted((path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in suffixes),
                  key=lambda path: path.relative_to(folder).as_posix())


def load_images(files: list[Path], height: int, width: int) -> torch.Tensor:
    """``files`` as an [N, 3, height, width] float32 tensor (the module docstring gives the transform)."""
    return torch.stack([_preprocess(path, height, width) for path in files])


def resize_size(image_size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(width, height) to resize an image of ``image_size`` (PIL's width, height) to, before the center crop."""
    if height != width:
        return math.floor(width / CROP_PCT), math.floor(height / CROP_PCT)
    short = math.floor(height / CROP_PCT)
    w, h = image_size
    return (short, int(short * h / w)) if w <= h else (int(short * w / h), short)


def center_box(image_size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the centred height x width crop (torchvision's rounding)."""
    w, h = image_size
    left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))
    return left, top, left + width, top + height


def _preprocess(path: Path, height: int, width: int) -> torch.Tensor:
    pil = _pil()
    try:
        with pil.Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise CalibrationError(f"calibration image {path} could not be read ({error}): remove or replace it") from error
    image = image.resize(resize_size(image.size, height, width), pil.Image.Resampling.BICUBIC)
    image = image.crop(center_box(image.size, height, width))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _pil():
    try:
        import PIL.Image  # noqa: F401  (Pillow: an optional dependency, in the int8 extra)
    except ImportError as error:
        raise CalibrationError("a folder of calibration images needs Pillow: pip install pillow "
                               "(or pass the images as a tensor, .npy or .pt)") from error
    import PIL
    return PIL
