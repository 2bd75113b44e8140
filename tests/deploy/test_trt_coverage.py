"""repfx.deploy.trt_coverage: the torch-tensorrt op data, and the check of plain graphs against it.

The data is the real extraction from the torch-tensorrt 2.14.0 wheel; the graphs are real
re-parameterized samples and real exports. torch-tensorrt itself is never imported.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import os
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import torch

import repfx
from repfx.samples import build_sample, randomize_bn_, sample_input_shape
from repfx.deploy.trt_converters import Coverage, load_converter_table
from repfx.deploy.trt_coverage import analyze, conditional_ops, lower_like_torch_tensorrt, unconvertible_ops

aten = torch.ops.aten
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "extract_torch_tensorrt_ops.py"


@torch.library.custom_op("repfx_trt_test::opaque_split", mutates_args=())
def opaque_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An op no TensorRT converter can know: a torch.library op defined only here."""
    return x.clone(), x.clone()


@opaque_split.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


@pytest.fixture(scope="module")
def table():
    return load_converter_table("2.14.0")


@pytest.fixture(scope="module", params=["repvgg_a0", "mobileone_s0"])
def plain(request):
    """(name, plain GraphModule, example input) for a re-parameterized sample."""
    name = request.param
    torch.manual_seed(0)
    x = torch.randn(*sample_input_shape(name))
    # verify=False: numerics are test_samples.py's job; here only the ops matter, and verifying
    # would triple the forward passes this module spends its time budget on.
    gm = repfx.reparameterize(randomize_bn_(build_sample(name), 0).eval(), (x,), verify=False)
    return name, gm, x


@pytest.fixture(scope="module")
def program(plain):
    """The plain graph exported: what ``torch_tensorrt.dynamo.compile`` is given."""
    _, gm, x = plain
    return torch.export.export(gm, (x,))


def _call_targets(graph_module) -> set[str]:
    return {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}


# --------------------------------------------------------------------------- the data


def test_data_names_its_source(table):
    raw = json.loads(resources.files("repfx.deploy.data").joinpath("torch_tensorrt_2.14.0_ops.json").read_text())
    assert raw["source"] == table.source == "torch-tensorrt 2.14.0"
    assert raw["extracted_from"] == "torch_tensorrt-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert raw["generated_by"] == "scripts/extract_torch_tensorrt_ops.py"


@pytest.mark.parametrize("op", [
    "aten.convolution.default",  # conv2d lowers to this
    "aten.relu.default",
    "aten.add.Tensor",  # residual adds of unmerged blocks
    "aten.mean.dim",  # adaptive_avg_pool2d to 1x1 lowers to this
    "aten.linear.default",  # kept whole (torch_disabled_decompositions)
    "aten._reshape_copy.default",  # what torch-tensorrt's view decomposition emits
])
def test_plain_conv_net_ops_have_converters(table, op):
    assert op in table.converters


def test_every_torch_op_in_the_data_exists_in_this_torch(table):
    """A misread key would name no real op; torch-tensorrt's own ``tensorrt.*`` ops are exempt."""
    raw = json.loads(resources.files("repfx.deploy.data").joinpath("torch_tensorrt_2.14.0_ops.json").read_text())
    names = {e["op"] for section in ("converters", "decomposed", "kept_whole") for e in raw[section]}
    missing = []
    for name in sorted(names):
        namespace, op, *overload = name.split(".")
        if namespace in ("aten", "prims"):
            packet = getattr(getattr(torch.ops, namespace), op, None)
            if packet is None or (overload and overload[0] not in packet.overloads()):
                missing.append(name)
        elif namespace not in ("_operator", "torch", "tensorrt"):
            missing.append(name)
    assert missing == []


def test_unknown_version_is_refused():
    with pytest.raises(FileNotFoundError, match="2.14.0"):
        load_converter_table("0.0.1")


@pytest.mark.parametrize("target, expected", [
    pytest.param(aten.relu.default, True, id="plain-converter"),
    pytest.param(aten.convolution.default, None, id="validator-decides"),
    pytest.param(operator.mul, True, id="symint-arithmetic"),
    pytest.param(operator.getitem, None, id="getitem-validator"),
    pytest.param(aten.clone.default, True, id="complementary-validators"),
    pytest.param(aten.conv2d.default, True, id="decomposed-composite"),
    pytest.param(aten.hardswish.default, True, id="decomposed-torch-enabled"),
    pytest.param(aten.add_.Tensor, True, id="decomposed-inplace-loop"),
    pytest.param(aten.histc.default, False, id="absent"),
])
def test_covers(table, target, expected):
    assert table.covers(target) is expected


def test_packet_converter_matches_the_packet_only(table):
    """The registry is a dict: the ``aten.batch_norm`` key does not answer for ``.default``."""
    assert table.converters["aten.batch_norm"][0].all_overloads
    assert table.support(aten.batch_norm).coverage is Coverage.CONVERTED
    assert table.support(aten.batch_norm.default).coverage is Coverage.DECOMPOSED


def test_dynamic_shapes_need_a_dynamic_converter(table):
    assert table.support(aten.log1p.default).coverage is Coverage.CONVERTED
    assert table.support(aten.log1p.default, dynamic_shapes=True) is None


# --------------------------------------------------------------------------- plain graphs


def test_plain_graph_module_is_convertible(plain):
    _, gm, _ = plain
    assert unconvertible_ops(gm) == []


def test_exported_plain_graph_is_convertible(program):
    """What dynamo.compile receives: the export, decomposed as torch-tensorrt decomposes it."""
    report = analyze(program)
    assert report.unconvertible == ()
    assert {c.op for c in report.conditional} == {"aten.convolution.default"}
    assert {c.conditions for c in report.conditional} == {("capability_validator convolution_capability_validator",)}


def test_export_is_checked_after_torch_tensorrt_decompositions(program):
    before, after = _call_targets(program.graph_module), _call_targets(lower_like_torch_tensorrt(program).graph_module)
    assert "aten.conv2d.default" in before and "aten.conv2d.default" not in after
    assert "aten.convolution.default" in after
    assert "aten.linear.default" in after  # kept whole, converted as is


# --------------------------------------------------------------------------- failures


class _Histogram(torch.nn.Module):
    def forward(self, x):
        return torch.histc(torch.relu(x), bins=4)


class _Opaque(torch.nn.Module):
    def forward(self, x):
        a, b = opaque_split(torch.relu(x))
        return a + b


def test_absent_aten_op_is_reported_by_node(table):
    assert table.covers(aten.histc.default) is False
    program = torch.export.export(_Histogram(), (torch.randn(2, 8),))
    assert [(u.node, u.op) for u in unconvertible_ops(program)] == [("histc", "aten.histc.default")]


@pytest.mark.parametrize("form", ["exported_program", "graph_module"])
def test_custom_op_and_its_getitems_are_reported(form):
    program = torch.export.export(_Opaque(), (torch.randn(2, 8),))
    graph = program if form == "exported_program" else program.module()
    found = {u.node: u for u in unconvertible_ops(graph)}
    assert set(found) == {"opaque_split", "getitem", "getitem_1"}
    assert found["opaque_split"].op == "repfx_trt_test.opaque_split.default"
    assert found["getitem"].reason == "indexes opaque_split, which is not converted"


def test_call_module_nodes_are_not_passed_as_convertible():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    assert [u.op for u in unconvertible_ops(gm)] == ["call_module 0"]


def test_symbolic_batch_is_checked_with_dynamic_converters():
    class Log1p(torch.nn.Module):
        def forward(self, x):
            return torch.log1p(x)

    program = torch.export.export(Log1p(), (torch.rand(4, 3),), dynamic_shapes=({0: torch.export.Dim("b", min=2)},))
    found = unconvertible_ops(program)
    assert [(u.node, u.reason) for u in found] == [
        ("log1p", "symbolic shapes, and no converter for it supports dynamic shapes")
    ]


def test_validated_ops_are_conditional_not_unconvertible():
    """An unfolded eval BN lowers to a validated converter plus a getitem that follows it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    found = {c.node: c.conditions for c in conditional_ops(program)}
    assert unconvertible_ops(program) == []
    assert found["_native_batch_norm_legit_no_training"] == ("capability_validator one_user_validator",)
    assert found["getitem"] == ("_native_batch_norm_legit_no_training is converted",)


def test_graph_module_conv2d_is_decomposed_before_any_validator(plain):
    _, gm, _ = plain
    assert conditional_ops(gm) == []


# --------------------------------------------------------------------------- the extractor


FAKE_PACKAGE = {
    "_version.py": '__version__ = "9.9.9"\n',
    "dynamo/conversion/_ConverterRegistry.py": "def dynamo_tensorrt_converter(key, **kw):\n    pass\n",
    "dynamo/lowering/custom.py": "import torch\nmy_op = torch.ops.tensorrt.my_op.default\n",
    "dynamo/conversion/aten_ops_converters.py": """
        import operator
        import torch
        from torch_tensorrt.dynamo.conversion._ConverterRegistry import dynamo_tensorrt_converter
        from torch_tensorrt.dynamo.lowering.custom import my_op

        @dynamo_tensorrt_converter(torch.ops.aten.relu.default, supports_dynamic_shapes=True)
        @dynamo_tensorrt_converter(torch.ops.aten.batch_norm)
        def stacked(ctx, target, args, kwargs, name): ...

        @dynamo_tensorrt_converter(operator.mul, capability_validator=lambda node, settings: True)
        def mul(ctx, target, args, kwargs, name): ...

        @dynamo_tensorrt_converter(my_op, capability_validator=check)
        def imported(ctx, target, args, kwargs, name): ...

        for op in [torch.ops.aten.sin.default, torch.ops.aten.cos.default]:
            @dynamo_tensorrt_converter(op)
            def unary(ctx, target, args, kwargs, name): ...

        try:
            import modelopt
        except ImportError:
            pass
        else:
            @dynamo_tensorrt_converter(torch.ops.tensorrt.quant.default)
            def quant(ctx, target, args, kwargs, name): ...

        def generate(name):
            overload = getattr(torch.ops.aten, name).default
            dynamo_tensorrt_converter(overload)(lambda *a: None)

        @dynamo_tensorrt_converter(torch.ops.aten.tan.default, enabled=False)
        def disabled(ctx, target, args, kwargs, name): ...
    """,
    "dynamo/lowering/_decomposition_groups.py": """
        import torch
        aten = torch.ops.aten
        torch_enabled_decompositions = {aten.hardswish, aten.arange.default}
        torch_disabled_decompositions = {aten.linear.default}
        TORCH_TRT_DECOMPOSITIONS = {}
    """,
    "dynamo/lowering/_decompositions.py": """
        from ._decomposition_groups import TORCH_TRT_DECOMPOSITIONS, aten

        def register_torch_trt_decomposition(aten_op, registry=None): ...

        def replace_inplace_op(aten_op, outplace_op):
            @register_torch_trt_decomposition(aten_op, registry=TORCH_TRT_DECOMPOSITIONS)
            def inplace_op(*args): ...

        replace_inplace_op(aten.add_, aten.add)
        replace_inplace_op(aten.relu_, aten.relu)

        @register_torch_trt_decomposition(aten.view.default, registry=TORCH_TRT_DECOMPOSITIONS)
        def view(x, size): ...

        ATTENTION_DECOMPOSITION_OPS = {aten.scaled_dot_product_attention.default}

        def get_decompositions():
            return _collect_all_valid_cia_ops_for_aten_namespace()
    """,
}


@pytest.fixture(scope="module")
def fake_extraction(tmp_path_factory):
    """The extractor run on a small source tree holding each registration form it handles."""
    root = tmp_path_factory.mktemp("src") / "torch_tensorrt"
    for relpath, text in FAKE_PACKAGE.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(textwrap.dedent(text))
    spec = importlib.util.spec_from_file_location("extract_torch_tensorrt_ops", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up there
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its parsing module from its own folder
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return script.extract(root)


def _converter(data, op):
    (entry,) = [c for c in data["converters"] if c["op"] == op]
    return entry


@pytest.mark.parametrize("op, field, value", [
    ("aten.relu.default", "supports_dynamic_shapes", True),
    ("aten.batch_norm", "all_overloads", True),
    ("_operator.mul", "capability_validator", "lambda node, settings: True"),
    ("tensorrt.my_op.default", "capability_validator", "check"),
    ("aten.sin.default", "function", "unary"),
    ("aten.cos.default", "function", "unary"),
    ("tensorrt.quant.default", "guards", ["try-else: no exception from `import modelopt`"]),
])
def test_extractor_resolves_registration_forms(fake_extraction, op, field, value):
    assert _converter(fake_extraction, op)[field] == value


def test_extractor_lists_what_it_cannot_resolve(fake_extraction):
    assert fake_extraction["source"] == "torch-tensorrt 9.9.9"
    reasons = {u["expression"]: u["reason"] for u in fake_extraction["unresolved"]}
    assert reasons["overload"] == "'overload' is a local variable of generate() computed at run time"
    assert reasons["torch.ops.aten.tan.default"] == "registered with enabled=False, so never added"
    assert "_collect_all_valid_cia_ops_for_aten_namespace()" in reasons
    assert "aten.tan.default" not in {c["op"] for c in fake_extraction["converters"]}


def test_extractor_reads_decompositions(fake_extraction):
    decomposed = {(d["op"], d["decomposed_by"]) for d in fake_extraction["decomposed"]}
    assert decomposed == {
        ("aten.hardswish", "torch"), ("aten.arange.default", "torch"),
        ("aten.add_", "torch-tensorrt"), ("aten.relu_", "torch-tensorrt"), ("aten.view.default", "torch-tensorrt"),
    }
    assert {k["op"] for k in fake_extraction["kept_whole"]} == {
        "aten.linear.default", "aten.scaled_dot_product_attention.default",
    }


@pytest.mark.skipif(not os.environ.get("REPFX_TORCH_TENSORRT_WHEEL"),
                    reason="set REPFX_TORCH_TENSORRT_WHEEL to a torch_tensorrt-2.14.0 wheel to re-extract")
def test_committed_data_is_what_the_wheel_gives(fake_extraction):
    script = sys.modules["extract_torch_tensorrt_ops"]
    committed = json.loads(resources.files("repfx.deploy.data").joinpath("torch_tensorrt_2.14.0_ops.json").read_text())
    assert script.extract(Path(os.environ["REPFX_TORCH_TENSORRT_WHEEL"])) == committed
