"""Pass-level testing: small aten graphs built the way capture leaves them, and checks of what a pass did.

A rule's tests state a ``before`` graph and the ``expected`` graph the fold should
leave (TVM's style), without torch.export: ``GraphBuilder`` writes placeholders,
``get_attr`` constants (seeded; BatchNorm statistics and affine randomized, so no BN
is an identity) and aten calls, and gives every node its ``meta["val"]`` by running
the op on fake tensors, as capture does. ``structure`` lists what a graph executes
with the weights' values left out, so two graphs compare equal when they run the
same ops, in the same order, on the same arguments and weight shapes.

``assert_folds`` and ``assert_unchanged`` run the fold pass alone on such a graph (to
a fixed point, as the pipeline runs it) and check structure, numerics (against the
graph as written, on seeded inputs, tolerance relative to the output's magnitude)
and idempotence.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from repfx.passes import CODES, PIPELINE, PassResult, PassSettings, run_pipeline
from repfx.passes.regions.analyzer import CostPolicy

aten = torch.ops.aten
RTOL = 1e-5  # folding is exact algebra in float64, rounded once to float32
_CONV = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


class GraphBuilder:
    """Writes an aten graph node by node; every node gets ``meta["val"]`` as it is written."""

    def __init__(self, seed: int = 0) -> None:
        self.graph = fx.Graph()
        self.root = nn.Module()
        self._generator = torch.Generator().manual_seed(seed)
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self._constants = 0

    def input(self, name: str, *shape: int, dtype: torch.dtype = torch.float32) -> fx.Node:
        node = self.graph.placeholder(name)
        with self._fake:
            node.meta["val"] = torch.empty(shape, dtype=dtype)
        return node

    def constant(self, value: Tensor, name: str = "const") -> fx.Node:
        """A ``get_attr`` of a buffer holding ``value`` (capture lifts parameters and buffers alike)."""
        name = f"{name}_{self._constants}"  # numbered in the order written: unique
        self._constants += 1
        self.root.register_buffer(name, value)
        node = self.graph.get_attr(name)
        node.meta["val"] = self._fake.from_tensor(value)
        return node

    def randn(self, *shape: int, name: str = "weight") -> fx.Node:
        return self.constant(torch.randn(shape, generator=self._generator), name)

    def positive(self, *shape: int, name: str = "scale") -> fx.Node:
        """Uniform in [0.5, 1.5): a variance, a BN weight, a gain kept away from zero."""
        return self.constant(torch.rand(shape, generator=self._generator) + 0.5, name)

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        name = getattr(target, "__name__", "call").split(".")[0]  # aten.conv2d.default -> conv2d, as export names it
        node = self.graph.create_node("call_function", target, args, kwargs, name=name)
        fake_args, fake_kwargs = pytree.tree_map_only(fx.Node, lambda arg: arg.meta["val"], (args, kwargs))
        with self._fake:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def conv(self, x: fx.Node, out_channels: int, kernel: int | Sequence[int], *, stride: int = 1,
             padding: int | Sequence[int] = 0, dilation: int = 1, groups: int = 1, bias: bool = False) -> fx.Node:
        """``aten.convNd`` as export writes it: the trailing arguments left at their defaults are left out."""
        rank = x.meta["val"].dim() - 2
        kernel = [kernel] * rank if isinstance(kernel, int) else list(kernel)
        padding = [padding] * rank if isinstance(padding, int) else list(padding)
        weight = self.randn(out_channels, x.meta["val"].shape[1] // groups, *kernel)
        args = [x, weight, self.randn(out_channels, name="bias") if bias else None,
                [stride] * rank, padding, [dilation] * rank, groups]
        defaults = [None, None, None, [1] * rank, [0] * rank, [1] * rank, 1]
        while len(args) > 2 and args[-1] == defaults[len(args) - 1]:
            args.pop()
        return self.call(_CONV[rank], *args)

    def batch_norm(self, x: fx.Node, *, functionalized: bool = False, eps: float = 1e-5) -> fx.Node:
        """Eval BN with random statistics and affine: ``aten.batch_norm``, or what functionalization leaves
        (``_native_batch_norm_legit_no_training`` and ``getitem(.., 0)``)."""
        weight, bias, mean, var = self.bn_parameters(x.meta["val"].shape[1])
        if not functionalized:
            return self.call(aten.batch_norm.default, x, weight, bias, mean, var, False, 0.1, eps, False)
        stats = self.call(aten._native_batch_norm_legit_no_training.default, x, weight, bias, mean, var, 0.1, eps)
        return self.call(operator.getitem, stats, 0)

    def bn_parameters(self, channels: int) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
        """Weight, bias, running mean and running variance: random, the weight and variance in [0.5, 1.5)."""
        return (self.positive(channels, name="bn_weight"), self.randn(channels, name="bn_bias"),
                self.randn(channels, name="running_mean"), self.positive(channels, name="running_var"))

    def build(self, *outputs: fx.Node) -> fx.GraphModule:
        self.graph.output(tuple(outputs))
        gm = fx.GraphModule(self.root, self.graph)
        return gm.eval()


def emitted_conv(channels: int, kernel: int, padding: int = 0) -> fx.GraphModule:
    """``x [2, channels, 8, 8]`` -> one conv with a bias and every argument written, as the fold emits it."""
    g = GraphBuilder()
    x = g.input("x", 2, channels, 8, 8)
    weight, bias = g.randn(channels, channels, kernel, kernel), g.randn(channels)
    return g.build(g.call(aten.conv2d.default, x, weight, bias, [1, 1], [padding] * 2, [1, 1], 1))


def structure(gm: fx.GraphModule) -> list[tuple]:
    """Each op in graph order, with its arguments: placeholders by name, constants as ``const[shape]``,
    earlier ops as ``#index``; lists as tuples. The output comes last."""
    positions: dict[fx.Node, str] = {}
    listing = []

    def describe(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                return f"const{list(getattr(gm, arg.target).shape)}"
            return positions.get(arg, f"%{arg.name}")
        if isinstance(arg, (list, tuple)):
            return tuple(describe(item) for item in arg)
        if isinstance(arg, dict):
            return tuple(sorted((key, describe(value)) for key, value in arg.items()))
        return arg

    for node in gm.graph.nodes:
        if node.op in ("call_function", "output"):
            listing.append((str(node.target), describe(node.args), describe(node.kwargs)))
            positions[node] = f"#{len(positions)}"
    return listing


def op_counts(gm: fx.GraphModule) -> Counter:
    """How often each op is called (``aten.conv2d.default`` -> ``conv2d``)."""
    return Counter(getattr(node.target, "__name__", str(node.target)).split(".")[0]
                   for node in gm.graph.nodes if node.op == "call_function")


def sample_inputs(gm: fx.GraphModule, seed: int = 1) -> tuple[Tensor, ...]:
    """Seeded standard normal tensors shaped like the graph's placeholders."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(node.meta["val"].shape, generator=generator).to(node.meta["val"].dtype)
                 for node in gm.graph.nodes if node.op == "placeholder")


def assert_same_values(reference: fx.GraphModule, candidate: fx.GraphModule, seeds: Sequence[int] = (1, 2)) -> None:
    """Both graphs compute the same outputs: ``max|d| <= RTOL * max(1, max|y|)`` on each seeded draw."""
    for seed in seeds:
        inputs = sample_inputs(reference, seed)
        with torch.no_grad():
            want, got = pytree.tree_leaves(reference(*inputs)), pytree.tree_leaves(candidate(*inputs))
        assert len(want) == len(got), f"{len(got)} outputs, expected {len(want)}"
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.dtype == w.dtype, f"{g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}"
            error, allowed = (w.double() - g.double()).abs().max().item(), RTOL * max(1.0, w.abs().max().item())
            assert error <= allowed, f"seed {seed}: max|d| = {error:.3e} > {allowed:.3e}"


_FOLD = next(step for step in PIPELINE if step.name == "fold_linear_regions")


def fold_once(gm: fx.GraphModule, cost: CostPolicy = "macs") -> PassResult:
    """One round of the fold pass, as the pipeline runs a round."""
    return _FOLD.run(gm, PassSettings(cost))


def fold_to_fixed_point(gm: fx.GraphModule, cost: CostPolicy = "macs") -> list[PassResult]:
    """The fold pass alone, as the pipeline runs it: rounds until one changes nothing."""
    return run_pipeline(gm, cost, pipeline=[_FOLD])


def assert_folds(before: fx.GraphModule, expected: fx.GraphModule, *, rounds: int = 1, cost: CostPolicy = "macs",
                 refused: str | None = None) -> PassResult:
    """Folding ``before`` leaves ``expected``'s structure with ``before``'s values, in ``rounds`` rounds that
    changed the graph; one more round changes nothing; ``refused`` is part of some refusal's reason.
    Returns the rounds' rewrites and refusals together."""
    original = copy.deepcopy(before)
    results = fold_to_fixed_point(before, cost)
    merged = PassResult(any(step.modified for step in results),
                        [rewrite for step in results for rewrite in step.rewrites],
                        [refusal for step in results for refusal in step.refusals])
    changed = sum(step.modified for step in results)
    assert changed == rounds, f"{changed} round(s) changed the graph, expected {rounds}; refusals: {merged.refusals}"
    assert structure(before) == structure(expected), "\n".join(map(str, structure(before)))
    assert_same_values(original, before)
    folded = structure(before)
    assert not fold_once(before, cost).modified and structure(before) == folded, "a second fold changed the graph"
    _assert_refused(merged, refused)
    return merged


def assert_unchanged(before: fx.GraphModule, *, cost: CostPolicy = "macs", refused: str | None = None) -> PassResult:
    """The fold leaves ``before`` exactly as written; ``refused`` is part of some refusal's reason."""
    written = structure(before)
    result = fold_once(before, cost)
    assert not result.modified and not result.rewrites, [rewrite.kind for rewrite in result.rewrites]
    assert structure(before) == written
    _assert_refused(result, refused)
    return result


def _assert_refused(result: PassResult, reason: str | None) -> None:
    assert all(r.code in CODES for r in result.refusals), [r.code for r in result.refusals]
    text = "\n".join(f"{r.node}: {r.reason}" for r in result.refusals)
    assert reason is None or reason in text, f"no refusal says {reason!r}; refusals:\n{text or '  none'}"
