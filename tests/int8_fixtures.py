"""The INT8 tests' shared parts: small seeded conv nets exported to ONNX as repfx exports, and image feeds.

Feeds are smooth images (low-resolution noise upsampled, plus a little pixel noise) normalized like
ImageNet inputs: activations then have the ranges of real data, which random Gaussian inputs do not.
``outlier`` is the same net with one channel scaled up 300x and the next convolution's matching input
scaled down 300x (exact through ReLU, which is positively homogeneous): the near-dead channel feeding an
identity branch that makes a folded RepVGG-style graph hard to quantize per tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from repfx.backends.onnx import export_onnx
from repfx.int8.quantizers import probe_modelopt

BATCH, SIZE = 8, 16
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
OUTLIER = 300.0

needs_modelopt = pytest.mark.skipif(not probe_modelopt().usable, reason=probe_modelopt().reason)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(32, 32, 3, padding=1)])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def small_net(*, outlier: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet().eval()
    if outlier:
        with torch.no_grad():
            model.convs[1].weight[0] *= OUTLIER
            model.convs[1].bias[0] *= OUTLIER
            model.convs[2].weight[:, 0] /= OUTLIER
    return model


def export(model: nn.Module, path: Path) -> Path:
    program = torch.export.export(model, (torch.zeros(BATCH, 3, SIZE, SIZE),))
    path.write_bytes(export_onnx(program))
    return path


def image_feeds(count: int, seed: int, name: str = "x") -> list[dict[str, np.ndarray]]:
    """``count`` feeds of ``BATCH`` smooth, normalized images."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 1, (count * BATCH, 3, 4, 4)))
    pixels = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    pixels = np.clip(pixels + rng.normal(0, 0.03, pixels.shape), 0, 1)
    images = ((pixels - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)
    return [{name: images[i * BATCH:(i + 1) * BATCH]} for i in range(count)]


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory) -> Path:
    return export(small_net(), tmp_path_factory.mktemp("int8") / "small.onnx")


@pytest.fixture(scope="session")
def outlier_onnx(tmp_path_factory) -> Path:
    return export(small_net(outlier=True), tmp_path_factory.mktemp("int8") / "outlier.onnx")


@pytest.fixture(scope="session")
def calibration() -> list[dict[str, np.ndarray]]:
    return image_feeds(8, seed=1)


@pytest.fixture(scope="session")
def held_out() -> list[dict[str, np.ndarray]]:
    return image_feeds(8, seed=2)
