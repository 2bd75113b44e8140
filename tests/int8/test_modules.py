"""modules.with_modules: a plain graph's convolutions and linears become nn.Conv*/nn.Linear submodules.

Numbers are compared bit for bit (the module runs the same aten call on the same tensors); structure
is counted on the graph (call_function convolutions left, call_module submodules made); calls no module
can express stay as they are; the input is untouched; a second pass changes nothing; and ModelOpt's
PyTorch quantizer, which finds work by module type, inserts its quantizers into the result.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch
from helpers import build, conv_bn, rand
from torch import nn

import repfx
from repfx.int8.metrics import snr_db
from repfx.int8.modules import with_modules

aten = torch.ops.aten


class Block(nn.Module):
    """A RepVGG-style training-form block: 3x3, 1x1 and identity branches, each with its BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense, self.one = conv_bn(channels, channels, 3, padding=1), conv_bn(channels, channels, 1)
        self.identity = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    result = model(x)
    return result[0] if isinstance(result, (tuple, list)) else result


def kinds(gm: torch.fx.GraphModule) -> Counter:
    counts = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.conv2d.default, aten.convolution.default,
                                                           aten.linear.default, aten.conv1d.default):
            counts["aten"] += 1
        elif node.op == "call_module":
            counts[type(gm.get_submodule(node.target)).__name__] += 1
    return counts


@pytest.fixture(scope="module")
def plain():
    x = rand(2, 3, 8, 8)
    return repfx.reparameterize(build(net), (x,)), x


def test_convolutions_and_linears_become_modules_with_the_same_numbers(plain):
    gm, x = plain
    before = kinds(gm)
    result = with_modules(gm)
    assert before["aten"] == 4 and kinds(result) == Counter({"Conv2d": 3, "Linear": 1, **{
        name: count for name, count in before.items() if name != "aten"}})
    assert torch.equal(output(result, x), output(gm, x))
    assert result.repfx_report is gm.repfx_report and result.meta["repfx"] is gm.repfx_report
    assert kinds(gm) == before  # the input graph is untouched
    for node in result.graph.nodes:
        if node.op == "call_module" and isinstance(result.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            assert node.target in node.meta["nn_module_stack"]
    numel = {name: sum(t.numel() for t in m.state_dict().values()) for name, m in (("before", gm), ("after", result))}
    assert numel["after"] == numel["before"]  # every tensor moved into its module, none duplicated


def test_a_second_pass_changes_nothing(plain):
    gm, x = plain
    once = with_modules(gm)
    twice = with_modules(once)
    assert kinds(twice) == kinds(once) and str(twice.graph) == str(once.graph)
    assert torch.equal(output(twice, x), output(once, x))


class NotExpressible(nn.Module):
    """A transposed convolution and a convolution whose weight is computed: no module holds either."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.up(x), self.weight * 2, padding=1)


def test_calls_no_module_can_express_stay():
    gm = torch.export.export(NotExpressible().eval(), (rand(1, 4, 4, 4),)).module()
    calls = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    result = with_modules(gm)
    assert [node.target for node in result.graph.nodes if node.op == "call_function"] == calls
    assert not any(isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) for module in result.modules())


class SharedWeight(nn.Module):
    """One convolution applied twice: one weight read by two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


def test_a_weight_read_twice_is_shared_not_copied():
    x = rand(1, 4, 6, 6)
    gm = torch.export.export(SharedWeight().eval(), (x,)).module()
    result = with_modules(gm)
    convs = [node for node in result.graph.nodes if node.op == "call_module"
             and isinstance(result.get_submodule(node.target), nn.Conv2d)]
    assert len(convs) == 2 and kinds(result)["aten"] == 0
    first, second = (result.get_submodule(node.target) for node in convs)
    assert first.weight is second.weight and torch.equal(output(result, x), output(gm, x))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                    reason="nvidia-modelopt is not installed (pip install -e '.[int8]')")
def test_modelopt_quantizes_the_result(plain):
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.nn import TensorQuantizer
    except Exception as error:  # a partial install: say why, do not fail
        pytest.skip(f"modelopt.torch.quantization does not import: {error}")
    gm, x = plain
    quantized = mtq.quantize(with_modules(gm), mtq.INT8_DEFAULT_CFG,
                             lambda model: [model(rand(2, 3, 8, 8, seed=seed)) for seed in range(4)])
    enabled = [name for name, module in quantized.named_modules()
               if isinstance(module, TensorQuantizer) and module.is_enabled]
    assert sum(name.endswith("weight_quantizer") for name in enabled) == 4
    assert snr_db(output(gm, x).detach().numpy(), output(quantized, x).detach().numpy()) > 20
