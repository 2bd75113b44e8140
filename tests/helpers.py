"""Shared helpers for the tests (``from helpers import ...``).

Every helper here follows the same standards:

* models are built under a fixed seed and every BatchNorm gets random statistics
  and affine parameters (``samples.randomize_bn_``), so no BN is an identity;
* results are compared with the ORIGINAL eager model in eval mode, with a
  tolerance relative to the output magnitude: ``max|d| <= 1e-4 * max(1, max|y|)``;
* structure is checked on the ops the result actually executes (``count_ops``).

Nothing here is autouse, so other test modules in this directory are unaffected.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import repfx
from repfx import samples
from repfx.capture.inputs import as_input_tuple
from repfx.passes.cost import DeviceProfile
from repfx.passes.refusals import CODES, LEFT_AS_WRITTEN
from repfx.verify.opcount import count_ops, summarize

RTOL = 1e-4  # float32: max|d| <= RTOL * max(1, max|y|)


def build(factory: Callable[[], nn.Module], seed: int = 0, *, train: bool = False) -> nn.Module:
    """``factory()`` under a fixed seed, every BatchNorm randomized, in eval mode (unless ``train``)."""
    torch.manual_seed(seed)
    model = factory()
    samples.randomize_bn_(model, seed)
    return model.train(train)


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    """Seeded standard normal float32 tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def max_error(expected: Any, actual: Any) -> tuple[float, float]:
    """(max|d|, allowed) for the worst tensor leaf (largest max|d| / allowed) of two outputs."""
    want, got = pytree.tree_leaves(expected), pytree.tree_leaves(actual)
    assert len(want) == len(got), f"{len(got)} outputs, expected {len(want)}"
    worst = (0.0, RTOL)
    for w, g in zip(want, got):
        assert isinstance(g, torch.Tensor), type(g)
        assert g.shape == w.shape, f"shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"dtype {g.dtype} != {w.dtype}"
        if not w.numel():
            continue
        w64, g64 = w.double(), g.double()
        error = (w64 - g64).abs().max().item()
        allowed = RTOL * max(1.0, w64.abs().max().item())
        if math.isnan(error) or math.isnan(allowed):
            return float("nan"), allowed
        if error / allowed > worst[0] / worst[1]:
            worst = (error, allowed)
    return worst


def assert_matches(model: Callable, result: Callable, inputs: Any, *, extra_seeds: Sequence[int] = (7,)) -> None:
    """``result`` computes what eval-mode ``model`` computes, on ``inputs`` and on fresh random
    inputs of the same shapes (a different draw than the one repfx saw)."""
    inputs = as_input_tuple(inputs)
    def fresh(value: Any, seed: int) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return rand(*value.shape, seed=seed).to(value.dtype)
        return value

    sets = [inputs] + [tuple(fresh(t, seed) for t in inputs) for seed in extra_seeds]
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        assert not model.training, "compare with the model in eval mode"
    for batch in sets:
        with torch.no_grad():
            expected = model(*batch)
            actual = result(*batch)
        error, allowed = max_error(expected, actual)
        assert error <= allowed, f"max|d| = {error:.3e} > {allowed:.3e}"  # False for NaN


def ops(module: Callable, inputs: Any) -> dict[str, int]:
    """Executed op summary (convolution, batch_norm, add, total) plus every raw aten op count."""
    raw = count_ops(module, as_input_tuple(inputs))
    summary: dict[str, int] = dict(raw)
    summary.update(summarize(raw))
    return Counter(summary)


def assert_ops(module: Callable, inputs: Any, **expected: int) -> dict[str, int]:
    """Exact executed counts, e.g. ``assert_ops(gm, x, convolution=1, batch_norm=0, add=0)``."""
    counts = ops(module, inputs)
    got = {name: counts[name] for name in expected}
    assert got == expected, f"executed {got}, expected {expected}; all ops: {dict(counts)}"
    return counts


def reparam(model: Any, inputs: Any, **kwargs: Any) -> tuple[torch.fx.GraphModule, repfx.Report]:
    gm = repfx.reparameterize(model, as_input_tuple(inputs), **kwargs)
    report = gm.repfx_report
    assert isinstance(report, repfx.Report)
    return gm, report


def reasons(report: repfx.Report) -> str:
    return "\n".join(f"{r.node}: {r.reason}" for r in report.refusals)


def assert_refused(report: repfx.Report, *keywords: str) -> None:
    """Each keyword occurs in some refusal reason (case-insensitive)."""
    text = [r.reason.lower() for r in report.refusals]
    for keyword in keywords:
        assert any(keyword.lower() in reason for reason in text), (
            f"no refusal mentions {keyword!r}; refusals:\n{reasons(report) or '  none'}")


def assert_idempotent(gm: torch.fx.GraphModule, inputs: Any, **kwargs: Any) -> None:
    """A second run over the result finds nothing to do and executes the same ops."""
    again, report = reparam(gm, inputs, **kwargs)
    assert report.rewrites == [], f"second run rewrote: {[r.kind for r in report.rewrites]}"
    before = ops(gm, inputs)
    after = ops(again, inputs)
    for name in ("convolution", "batch_norm", "add", "total"):
        assert after[name] == before[name], f"{name}: {before[name]} -> {after[name]} on the second run"
    assert_matches(gm, again, inputs)


_AFFINE = ("add", "sub", "rsub", "mul", "div")


def ops_to_account_for(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the BatchNorm, affine (a tensor with a parameter, buffer or number), pad and pool ops ``gm``
    executes: found here by op name alone, apart from how ``repfx.passes.kept_ops`` finds them."""
    free = set()  # nodes no graph input reaches
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and all(arg in free for arg in node.all_input_nodes)):
            free.add(node)
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in free or not str(node.target).startswith("aten."):
            continue
        name = str(node.target).split(".")[1].rstrip("_")
        operands = node.args[:2]
        affine = name in _AFFINE and sum(isinstance(arg, torch.fx.Node) and arg not in free for arg in operands) == 1
        value = node.meta.get("val")
        floating = isinstance(value, (tuple, list)) or (isinstance(value, torch.Tensor) and value.is_floating_point())
        if floating and (affine or any(word in name for word in ("batch_norm", "pool", "pad"))):
            names.append(node.name)
    return names


def assert_accounts_for_every_op_left(gm: torch.fx.GraphModule) -> None:
    """The report names every BatchNorm, affine, pad and pool op the plain graph executes, once, each with a known
    reason, and none of them is unexplained."""
    kept = gm.repfx_report.kept_ops
    named = Counter(op.node for op in kept)
    assert not [name for name, count in named.items() if count > 1], f"named twice: {named}"
    missing = [name for name in ops_to_account_for(gm) if name not in named]
    assert not missing, f"still executed, not in report.kept_ops: {missing}"
    unexplained = [op for op in kept if op.code == "unexplained" or op.code not in {**CODES, **LEFT_AS_WRITTEN}]
    assert not unexplained, f"unexplained: {unexplained}"


# --- small builders shared by the end-to-end fold tests ----------------------------------------

C = 8  # channels of most fold cases
HW = 8  # spatial size of most fold cases


def image(channels: int = C, size: int = HW, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A seeded ``[batch, channels, size, size]`` input."""
    return rand(batch, channels, size, size, seed=seed)


def conv_bn(cin: int, cout: int, k, padding=0, groups: int = 1, stride: int = 1, dilation: int = 1,
            bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias), nn.BatchNorm2d(cout))


def rewrite_kernels(report: repfx.Report) -> list[tuple[int, ...]]:
    """Weight shapes of every convolution / linear the rewrites emitted."""
    return [shape for rewrite in report.rewrites for shape in rewrite.kernel_shapes]


def assert_folds_idempotently(factory: Callable[[], nn.Module], shape: Sequence[int], **kwargs: Any) -> None:
    """Re-parameterizing the result of re-parameterizing ``factory()`` (with ``kwargs``) changes nothing."""
    model = build(factory)
    x = rand(*shape)
    gm, _ = reparam(model, x, **kwargs)
    assert_idempotent(gm, x, **kwargs)


def assert_dynamic_batch_folds(factory: Callable[[], nn.Module], example_batch: int) -> None:
    """Captured at ``example_batch`` with ``dynamic_batch``: one conv, and right at batches 1, 3 and 8."""
    model = build(factory)
    gm, _ = reparam(model, rand(example_batch, C, HW, HW), dynamic_batch=True)
    for batch in (1, 3, 8):
        x = rand(batch, C, HW, HW, seed=batch)
        assert_matches(model, gm, x)
        assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


# Two pinned device profiles at the extremes of the latency rule: every merge pays, or none that adds MACs.
LAUNCH_BOUND = DeviceProfile("launch-bound", "cpu", {"float32": 1e12}, bandwidth=1e12, overhead_s=1e-4)
COMPUTE_BOUND = DeviceProfile("compute-bound", "cpu", {"float32": 1e9}, bandwidth=1e12, overhead_s=1e-9)


class DepthwiseBesideDense(nn.Module):
    """dw3x3-BN beside a dense 1x1-BN, summed: merged, one dense 3x3 (9x the 1x1's MACs): a contested merge."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw, self.pw = conv_bn(channels, channels, 3, padding=1, groups=channels), conv_bn(channels, channels, 1)

    def forward(self, x):
        return torch.relu(self.dw(x) + self.pw(x))


# --- models whose inputs or forward make capture fail ----------------------------------------------------------------

class TwoInputs(nn.Module):
    """forward(image, mask): given one input, TorchScript's conversion hit a torch INTERNAL ASSERT."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(image)) * mask


class DataDependent(nn.Module):
    """How often the loop runs depends on the values: capture fails, for a reason that is not the input's shape
    (and TorchScript -> ExportedProgram conversion fails too: a data-dependent ``if`` converts, to ``torch.cond``;
    a data-dependent loop count does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        for _ in range(int(y.abs().sum().item()) % 3):
            y = y + 1
        return y
