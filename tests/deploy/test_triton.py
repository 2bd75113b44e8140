"""Triton model repository writer: layout, config.pbtxt as Triton parses it, atomicity.

The config is parsed with tritonclient's generated ModelConfig protobuf (a test extra),
so every assertion is about what Triton itself would read, not about our formatting.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from repfx.deploy.staging import Refused
from repfx.deploy.triton import write_model_repository
from repfx.deploy.triton_config import TensorSpec, render_config

# Safety net only: tritonclient + grpcio are in the test extra.
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

IMAGE = TensorSpec("input", torch.float32, (-1, 3, 224, 224))
LOGITS = TensorSpec("logits", torch.float32, (-1, 1000))


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def data_type(name: str) -> int:
    return model_config_pb2.DataType.Value(name)


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "engine.bin"
    path.write_bytes(b"\x00artifact-bytes\xff")
    return path


@pytest.fixture
def repo(tmp_path):
    return tmp_path / "repo"


def write(repo, artifact, name="repvgg", **kwargs):
    kwargs.setdefault("platform", "tensorrt_plan")
    kwargs.setdefault("inputs", [IMAGE])
    kwargs.setdefault("outputs", [LOGITS])
    return write_model_repository(repo, name, artifact_path=artifact, **kwargs)


def listing(model_dir):
    """Every path under a model directory, relative to it."""
    return sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*"))


def entries(repo):
    """Everything in the repository directory, hidden staging directories included."""
    return sorted(p.name for p in repo.iterdir()) if repo.exists() else []


@pytest.mark.parametrize(
    "platform, filename, instance_kind",
    [
        pytest.param("tensorrt_plan", "model.plan", "KIND_GPU", id="tensorrt"),
        pytest.param("onnxruntime_onnx", "model.onnx", None, id="onnxruntime"),
    ],
)
def test_layout_and_platform(repo, artifact, platform, filename, instance_kind):
    model_dir = write(repo, artifact, platform=platform, max_batch_size=8)

    assert model_dir == repo / "repvgg"
    assert listing(model_dir) == ["1", f"1/{filename}", "config.pbtxt"]
    assert (model_dir / "1" / filename).read_bytes() == artifact.read_bytes()
    config = parse((model_dir / "config.pbtxt").read_text())
    assert (config.name, config.platform) == ("repvgg", platform)
    kinds = [g.kind for g in config.instance_group]
    assert kinds == ([model_config_pb2.ModelInstanceGroup.Kind.Value(instance_kind)] if instance_kind else [])
    assert entries(repo) == ["repvgg"], "no staging directory left behind"


def test_batched_dims_exclude_batch_dimension():
    config = parse(render_config("m", platform="tensorrt_plan", inputs=[IMAGE], outputs=[LOGITS], max_batch_size=8))

    assert config.max_batch_size == 8
    assert [tuple(t.dims) for t in config.input] == [(3, 224, 224)]
    assert [tuple(t.dims) for t in config.output] == [(1000,)]


def test_unbatched_dims_are_full_shape():
    fixed = TensorSpec("input", torch.float32, (1, 3, 224, 224))
    config = parse(render_config("m", platform="onnxruntime_onnx", inputs=[fixed], outputs=[LOGITS]))

    assert config.max_batch_size == 0
    assert [tuple(t.dims) for t in config.input] == [(1, 3, 224, 224)]
    assert [tuple(t.dims) for t in config.output] == [(-1, 1000)]


def test_dynamic_spatial_dims_and_none():
    spec = TensorSpec("input", torch.float32, (None, 3, None, -1))
    assert spec.shape == (-1, 3, -1, -1)
    config = parse(render_config("m", platform="tensorrt_plan", inputs=[spec], outputs=[LOGITS], max_batch_size=4))
    assert tuple(config.input[0].dims) == (3, -1, -1)


def test_fixed_batch_of_one_with_max_batch_size_one():
    one = TensorSpec("input", torch.float32, (1, 3, 8, 8))
    config = parse(render_config("m", platform="tensorrt_plan", inputs=[one], outputs=[LOGITS], max_batch_size=1))
    assert tuple(config.input[0].dims) == (3, 8, 8)


@pytest.mark.parametrize(
    "dtype, triton",
    [
        pytest.param(torch.float32, "TYPE_FP32", id="fp32"),
        pytest.param(torch.float16, "TYPE_FP16", id="fp16"),
        pytest.param(torch.bfloat16, "TYPE_BF16", id="bf16"),
        pytest.param(torch.float64, "TYPE_FP64", id="fp64"),
        pytest.param(torch.int64, "TYPE_INT64", id="int64"),
        pytest.param(torch.int32, "TYPE_INT32", id="int32"),
        pytest.param(torch.int8, "TYPE_INT8", id="int8"),
        pytest.param(torch.uint8, "TYPE_UINT8", id="uint8"),
        pytest.param(torch.bool, "TYPE_BOOL", id="bool"),
    ],
)
def test_data_types(dtype, triton):
    spec = TensorSpec("t", dtype, (-1, 4))
    config = parse(render_config("m", platform="onnxruntime_onnx", inputs=[spec], outputs=[spec], max_batch_size=2))
    assert config.input[0].data_type == config.output[0].data_type == data_type(triton)


def test_several_inputs_and_outputs_keep_order():
    inputs = [TensorSpec("a", torch.float32, (-1, 2)), TensorSpec("b", torch.int64, (-1, 5))]
    outputs = [TensorSpec("y", torch.float16, (-1, 7)), TensorSpec("z", torch.bool, (-1, 1))]
    config = parse(render_config("m", platform="onnxruntime_onnx", inputs=inputs, outputs=outputs, max_batch_size=2))
    assert [(t.name, t.data_type, tuple(t.dims)) for t in config.input] == [
        ("a", data_type("TYPE_FP32"), (2,)),
        ("b", data_type("TYPE_INT64"), (5,)),
    ]
    assert [(t.name, t.data_type, tuple(t.dims)) for t in config.output] == [
        ("y", data_type("TYPE_FP16"), (7,)),
        ("z", data_type("TYPE_BOOL"), (1,)),
    ]


def test_tensor_name_is_escaped():
    spec = TensorSpec('in"put\\0', torch.float32, (-1, 2))
    config = parse(render_config("m", platform="onnxruntime_onnx", inputs=[spec], outputs=[LOGITS], max_batch_size=2))
    assert config.input[0].name == 'in"put\\0'


def test_spec_like_tensor():
    spec = TensorSpec.like("input", torch.zeros(2, 3, 8, 8, dtype=torch.float16), dynamic_dims=(0, -1))
    assert spec == TensorSpec("input", torch.float16, (-1, 3, 8, -1))


@pytest.mark.parametrize("enabled", [pytest.param(True, id="on"), pytest.param(False, id="off")])
def test_dynamic_batching(repo, artifact, enabled):
    model_dir = write(repo, artifact, max_batch_size=16, dynamic_batching=enabled)
    config = parse((model_dir / "config.pbtxt").read_text())
    assert config.HasField("dynamic_batching") is enabled


def test_dynamic_batching_without_batch_dimension_is_refused():
    with pytest.raises(ValueError, match="max_batch_size > 0"):
        render_config("m", platform="tensorrt_plan", inputs=[IMAGE], outputs=[LOGITS], dynamic_batching=True)


def test_version_directory(repo, artifact):
    model_dir = write(repo, artifact, platform="onnxruntime_onnx", version=3)
    assert (model_dir / "3" / "model.onnx").is_file()


def test_existing_version_is_refused(repo, artifact, tmp_path):
    model_dir = write(repo, artifact)
    (model_dir / "marker").write_text("old")
    other = tmp_path / "other.bin"
    other.write_bytes(b"new")

    with pytest.raises(Refused, match="1 already exists.*never replaced"):
        write(repo, other, version=1)

    assert (model_dir / "marker").read_text() == "old", "the existing model is untouched"
    assert (model_dir / "1" / "model.plan").read_bytes() == artifact.read_bytes()
    assert listing(model_dir) == ["1", "1/model.plan", "config.pbtxt", "marker"]
    assert entries(repo) == ["repvgg"]


def test_second_write_adds_a_version_and_keeps_the_first(repo, artifact, tmp_path):
    model_dir = write(repo, artifact, platform="tensorrt_plan")
    (model_dir / "marker").write_text("old")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")

    assert write(repo, onnx, platform="onnxruntime_onnx") == model_dir

    assert listing(model_dir) == ["1", "1/model.plan", "2", "2/model.onnx", "config.pbtxt", "marker"]
    assert (model_dir / "1" / "model.plan").read_bytes() == artifact.read_bytes()
    assert (model_dir / "marker").read_text() == "old"
    assert parse((model_dir / "config.pbtxt").read_text()).platform == "onnxruntime_onnx", "repfx's config updated"
    assert entries(repo) == ["repvgg"], "no staging directory left behind"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("../escape", id="traversal"),
        pytest.param("a/b", id="slash"),
        pytest.param(".hidden", id="hidden"),
        pytest.param("-rf", id="option-like"),
        pytest.param("has space", id="space"),
        pytest.param("x" * 129, id="too-long"),
    ],
)
def test_bad_model_name(repo, artifact, name):
    with pytest.raises(ValueError, match="not a safe directory name"):
        write(repo, artifact, name=name)
    assert entries(repo) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"platform": "pytorch_libtorch"}, "unsupported platform", id="platform"),
        pytest.param({"max_batch_size": -1}, "max_batch_size", id="negative-batch"),
        pytest.param({"version": 0}, "version", id="version-zero"),
        pytest.param({"inputs": []}, "at least one input", id="no-inputs"),
        pytest.param({"outputs": [LOGITS, LOGITS]}, "duplicate output", id="duplicate-output"),
        pytest.param(
            {"inputs": [TensorSpec("input", torch.float32, (1, 3, 8, 8))], "max_batch_size": 8},
            "fixed at 1",
            id="fixed-batch",
        ),
    ],
)
def test_bad_arguments_write_nothing(repo, artifact, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write(repo, artifact, **kwargs)
    assert entries(repo) == []


@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param(("x", torch.complex64, (1,)), "no Triton data type", id="dtype"),
        pytest.param(("x", torch.float32, (2, -2)), "dimensions", id="negative-dim"),
        pytest.param(("x", torch.float32, (True, 2)), "dimensions", id="bool-dim"),
        pytest.param(("", torch.float32, (2,)), "non-empty", id="empty-name"),
        pytest.param(("a\nb", torch.float32, (2,)), "printable", id="newline-name"),
    ],
)
def test_bad_tensor_spec(args, match):
    with pytest.raises(ValueError, match=match):
        TensorSpec(*args)


def test_missing_artifact_leaves_nothing(repo, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.plan"):
        write(repo, tmp_path / "missing.plan")
    assert entries(repo) == []


def test_failed_copy_leaves_no_partial_directory(repo, artifact, monkeypatch):
    def broken_copy(src, dst, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write(repo, artifact)
    assert entries(repo) == [], "staging directory removed, model directory never created"


def test_failed_overwrite_keeps_old_model(repo, artifact, monkeypatch):
    model_dir = write(repo, artifact)
    before = (model_dir / "config.pbtxt").read_text()

    def broken_copy(src, dst, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write(repo, artifact, max_batch_size=4)
    assert entries(repo) == ["repvgg"]
    assert listing(model_dir) == ["1", "1/model.plan", "config.pbtxt"], "no version 2, no staging directory"
    assert (model_dir / "config.pbtxt").read_text() == before


def test_path_that_is_a_file_is_refused(repo, artifact):
    repo.mkdir()
    (repo / "repvgg").write_text("not a model")
    with pytest.raises(Refused, match="not a directory"):
        write(repo, artifact)
    assert (repo / "repvgg").read_text() == "not a model"
