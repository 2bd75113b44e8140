"""A small trained RepVGG-style net for INT8 tests: scikit-learn's digits, trained in seconds on a CPU.

INT8 accuracy can only be judged on a net that has learned something, and random
weights say nothing about it; ImageNet is too heavy for tests. The digits data ships
with scikit-learn (1,797 8x8 grey images, 10 classes): upsampled to 16x16, a
10-block RepVGG net (``repfx.samples.repvgg.RepVGGBlock``: 3x3 + 1x1 + identity BN
branches; widths 8/16/32, stride 2 twice) reaches >= 95% top-1 on a held-out quarter
after a few epochs. ``trained_net`` caches the state under a folder (the tests
pass pytest's cache), so training runs once per machine.

``inject_near_dead`` then reproduces what ImageNet RepVGG checkpoints show (issue 18):
a few channels whose activations are nearly dead feed identity branches whose BN
scales them up by ~100-300. Block k-1's output channel c is scaled by a small
alpha (its branches' BN weights and biases; ReLU is positively homogeneous, so the
channel becomes exactly alpha times itself), and block k's identity BN gets scale
S = its old scale / alpha (its weight divided by alpha, its running mean times
alpha), so the identity branch computes what it did. The 3x3 and 1x1 branches of
block k are left alone: they now see channel c at alpha times its value, which
costs the net little accuracy (they lose one input channel), just as a near-dead
channel contributes next to nothing in a trained net.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from repfx.samples.repvgg import RepVGGBlock

SIZE = 16
BATCH = 128
JUDGED = 512  # training samples an injection is judged on
WIDTHS = (8, 8, 8, 16, 16, 16, 16, 32, 32, 32)  # 10 blocks; the width doubles with stride 2
INJECTED_SCALES = (318.0, 8.8, 112.0)  # identity BN scales reported for ImageNet RepVGG (issue 18)


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor  # [N, 1, 16, 16] float32, standardized
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass(frozen=True)
class Injection:
    block: int  # index in ``net.blocks`` of the block whose identity BN was scaled up
    channel: int
    scale: float  # the identity BN's gamma / sqrt(var + eps) after injection


class DigitsNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS, classes: int = 10) -> None:
        super().__init__()
        blocks, previous = [], 1
        for width in widths:
            blocks.append(RepVGGBlock(previous, width, stride=2 if width != previous and previous != 1 else 1))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def digits(seed: int = 0, test_share: float = 0.25) -> Digits:
    """The digits images as [N, 1, 16, 16] (bilinear upsampling, standardized), split at random under ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test = int(len(labels) * test_share)
    return Digits(images[order[test:]], labels[order[test:]], images[order[:test]], labels[order[:test]])


def train(model: nn.Module, data: Digits, *, epochs: int = 6, seed: int = 0) -> float:
    """Train ``model`` in place (Adam, one-cycle); returns the seconds it took."""
    with one_thread():
        return _train(model, data, epochs, seed)


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, restored after: on a busy 2-core machine two threads trained five times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, data: Digits, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    start = time.perf_counter()
    batches = (len(data.train_y) + BATCH - 1) // BATCH
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2, total_steps=epochs * batches)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y))
        for index in range(batches):
            chosen = order[index * BATCH:(index + 1) * BATCH]
            loss = F.cross_entropy(model(data.train_x[chosen]), data.train_y[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return time.perf_counter() - start


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (run as given) on ``x``."""
    with torch.no_grad(), one_thread():
        return float((model(x).argmax(1) == y).double().mean())


def trained_net(cache: Path | None = None, seed: int = 0) -> tuple[DigitsNet, float | None]:
    """The trained net (eval mode), from ``cache`` when it holds one; and the training seconds (None when cached)."""
    path = None if cache is None else Path(cache) / f"digits_net_seed{seed}.pt"
    torch.manual_seed(seed)
    model = DigitsNet()
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), None
    seconds = train(model, digits(seed), seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, seconds


def inject_near_dead(model: DigitsNet, data: Digits, seed: int = 0, scales: tuple[float, ...] = INJECTED_SCALES,
                     candidates: int = 4) -> tuple[DigitsNet, list[Injection]]:
    """A copy of ``model`` with one near-dead channel feeding an identity branch of scale ``scales[i]`` in each of
    ``len(scales)`` blocks chosen under ``seed``; ``model`` is not modified.

    In each block, of ``candidates`` channels drawn under ``seed``, the one whose injection
    keeps training accuracy highest is taken (ties: the first drawn): a channel the 3x3
    and 1x1 branches barely use, as a near-dead channel of a trained net is.
    """
    injected = copy.deepcopy(model)
    blocks = injected.blocks
    eligible = [k for k in range(1, len(blocks)) if blocks[k].identity is not None]
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(eligible[i] for i in torch.randperm(len(eligible), generator=generator)[:len(scales)].tolist())
    done = []
    for k, scale in zip(chosen, scales):
        drawn = torch.randperm(blocks[k].identity.num_features, generator=generator)[:candidates].tolist()
        kept = [(accuracy(_injected(injected, k, channel, scale), data.train_x[:JUDGED], data.train_y[:JUDGED]),
                 -index, channel)
                for index, channel in enumerate(drawn)]
        channel = max(kept)[2]
        injected = _injected(injected, k, channel, scale)
        done.append(Injection(k, channel, scale))
    return injected, done


def _injected(model: DigitsNet, k: int, channel: int, scale: float) -> DigitsNet:
    """A copy of ``model`` whose block ``k - 1`` output ``channel`` is scaled by alpha and block ``k``'s identity
    BN by 1 / alpha, so that its scale is ``scale``."""
    model = copy.deepcopy(model)
    identity = model.blocks[k].identity
    with torch.no_grad():
        old = float(identity.weight[channel].abs() / (identity.running_var[channel] + identity.eps).sqrt())
        alpha = old / scale  # > 0: ReLU passes a positive factor through
        for bn in _output_norms(model.blocks[k - 1]):
            bn.weight[channel] *= alpha
            bn.bias[channel] *= alpha
        identity.weight[channel] /= alpha
        identity.running_mean[channel] *= alpha
    return model


def _output_norms(block: RepVGGBlock) -> list[nn.BatchNorm2d]:
    """The BNs whose sum (then ReLU) is the block's output: scaling all of them by alpha > 0 scales the output."""
    return [block.dense.bn, block.pointwise.bn] + ([block.identity] if block.identity is not None else [])
