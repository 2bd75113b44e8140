"""No data loss: ``--out`` and ``--triton-repo`` never replace what repfx did not write; both succeed or neither.

Every test builds its own files in ``tmp_path`` and compares whole directory trees
(every path, hidden staging directories included, and every file's bytes) before
and after. The CLI runs in-process (``main(argv)``, the function ``python -m
repfx.trt`` calls) on a one-block RepVGG, except the headline case, which runs as a
user runs it. How repfx knows it wrote a file: ``<name>.report.json`` carries
``"written_by": "repfx"`` and ``"files"`` (name -> SHA-256 as written); a config.pbtxt
carries a first comment line ``# written by repfx VERSION (sha256 ...)`` over its content.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

import repfx
import repfx.deploy.export
import repfx.cli.trt as cli
from repfx.deploy.staging import Refused, sha256_of
from repfx.samples import RepVGGBlock
from repfx.deploy.triton import TensorSpec, mark, write_model_repository, written_by_repfx

from helpers import build, rand

SHAPE = (1, 3, 8, 8)
TIMEOUT_S = 300


def tiny_net() -> nn.Module:
    return nn.Sequential(RepVGGBlock(3, 4))


def save_program(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.export.save(torch.export.export(build(tiny_net), (rand(*SHAPE),)), path)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return save_program(tmp_path / "net.pt2")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) -> the file's bytes, or None for a directory."""
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
            for path in sorted(root.rglob("*"))}


def run(tmp_path: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``python -m repfx.trt ARGS`` in-process, from ``tmp_path``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    code = cli.main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repfx.trt: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


TRITON = ("--triton-repo", "triton", "--out", "out", "--name", "net", "--no-verify", "--quiet")


# --- the Triton repository ---------------------------------------------------------------------------------------

def test_triton_repo_over_the_input_models_own_folder_is_refused_and_changes_nothing(tmp_path):
    """The reported defect: ``python -m repfx.trt models/good/good.pt2 --triton-repo models`` deleted models/good/."""
    save_program(tmp_path / "models" / "good" / "good.pt2")
    (tmp_path / "models" / "good" / "labels.txt").write_text("cat\ndog\n")
    before = tree(tmp_path)

    completed = subprocess.run([sys.executable, "-m", "repfx.trt", "models/good/good.pt2", "--triton-repo", "models"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert completed.returncode == 2, completed.stderr
    line = one_error_line(completed.stderr)  # the check precedes loading, so no progress line either
    assert "models/good" in line and "not a Triton model directory" in line, line
    assert tree(tmp_path) == before, "every file byte-identical, nothing added (not even repfx-out/)"


def test_second_run_adds_version_2_and_keeps_version_1(tmp_path, model, monkeypatch, capsys):
    assert run(tmp_path, monkeypatch, capsys, str(model), *TRITON)[0] == 0
    entry = tmp_path / "triton" / "net"
    first = tree(entry / "1")

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *TRITON, "--precision", "fp16")

    assert code == 0, err
    assert sorted(tree(entry)) == ["1", "1/model.onnx", "2", "2/model.onnx", "config.pbtxt"], "no staging left"
    assert tree(entry / "1") == first, "version 1 byte-identical"
    assert tree(entry / "2")["model.onnx"] == (tmp_path / "out" / "net.onnx").read_bytes()
    text = (entry / "config.pbtxt").read_text()
    assert written_by_repfx(text), text.splitlines()[0]
    config = parse_config(entry / "config.pbtxt")  # the mark is a comment Triton's parser skips
    assert config.name == "net" and config.platform == "onnxruntime_onnx"
    assert [t.data_type for t in config.input] == [model_config_pb2.TYPE_FP16], "the config follows version 2"


@pytest.mark.parametrize("config", [
    pytest.param('name: "net"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n', id="user-written"),
    pytest.param(None, id="repfx-written-then-edited"),
])
def test_a_config_repfx_did_not_write_that_differs_is_refused(tmp_path, model, monkeypatch, capsys, config):
    entry = tmp_path / "triton" / "net"
    (entry / "1").mkdir(parents=True)
    (entry / "1" / "model.onnx").write_bytes(b"the user's model")
    edited = mark('name: "net"\nplatform: "onnxruntime_onnx"\n') + "max_batch_size: 4\n"
    (entry / "config.pbtxt").write_text(config if config is not None else edited)
    before = tree(tmp_path)

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *TRITON)

    assert code == 2
    line = one_error_line(err)
    assert "triton/net/config.pbtxt" in line and "not written by repfx" in line and "move it away" in line, line
    assert tree(tmp_path) == before, "repository untouched, --out not written"


def test_a_config_of_the_users_that_says_the_same_is_kept_as_it_is(tmp_path, model, monkeypatch, capsys):
    """Configs written before repfx marked them (or copied without the mark) are not refused when nothing changes."""
    assert run(tmp_path, monkeypatch, capsys, str(model), *TRITON)[0] == 0
    config = tmp_path / "triton" / "net" / "config.pbtxt"
    config.write_text(config.read_text().split("\n", 1)[1])  # the same config, without repfx's mark
    unmarked = config.read_bytes()

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *TRITON)

    assert code == 0, err
    assert config.read_bytes() == unmarked
    assert (tmp_path / "triton" / "net" / "2" / "model.onnx").is_file()


def test_writer_api_follows_the_same_rules(tmp_path):
    artifact = tmp_path / "a.onnx"
    artifact.write_bytes(b"onnx")
    spec = TensorSpec("x", torch.float32, (1, 4))
    write = lambda **kwargs: write_model_repository(tmp_path / "repo", "m", artifact_path=artifact,  # noqa: E731
                                                    platform="onnxruntime_onnx", inputs=[spec], outputs=[spec],
                                                    **kwargs)
    write()
    (tmp_path / "repo" / "m" / "7").mkdir()  # a version the user added by hand
    (tmp_path / "repo" / "m" / "01").mkdir()  # not a version for Triton (leading zero): ignored
    write()
    assert sorted(p.name for p in (tmp_path / "repo" / "m").iterdir()) == ["01", "1", "7", "8", "config.pbtxt"]
    (tmp_path / "repo" / "other").mkdir()
    (tmp_path / "repo" / "other" / "keep.bin").write_bytes(b"x")
    with pytest.raises(Refused, match="not a Triton model directory"):
        write_model_repository(tmp_path / "repo", "other", artifact_path=artifact, platform="onnxruntime_onnx",
                               inputs=[spec], outputs=[spec])
    assert tree(tmp_path / "repo" / "other") == {"keep.bin": b"x"}


# --- --out ---------------------------------------------------------------------------------------------------------

OUT = ("--out", "out", "--name", "net", "--no-verify", "--quiet")


def test_out_holding_a_user_file_named_like_an_output_is_refused(tmp_path, model, monkeypatch, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "net.onnx").write_bytes(b"my own onnx model")
    before = tree(tmp_path)

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *OUT)

    assert code == 2
    line = one_error_line(err)
    assert "out/net.onnx" in line and "repfx did not write it" in line and "move it away" in line, line
    assert tree(tmp_path) == before


def test_rerun_over_repfx_outputs_replaces_them(tmp_path, model, monkeypatch, capsys):
    assert run(tmp_path, monkeypatch, capsys, str(model), *OUT)[0] == 0
    first = tree(tmp_path / "out")
    record = json.loads(first["net.report.json"])
    assert record["written_by"] == "repfx"
    assert record["files"] == {name: sha256_of(tmp_path / "out" / name) for name in ("net.onnx", "net.pt2")}

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *OUT, "--formats", "pt2", "--precision", "fp16")
    assert code == 0, err
    second = tree(tmp_path / "out")
    assert sorted(second) == ["net.onnx", "net.pt2", "net.report.json"], "no staging directory left"
    assert second["net.pt2"] != first["net.pt2"], "repfx's own pt2 was replaced"
    assert second["net.onnx"] == first["net.onnx"], "not written this time: left alone"
    assert sorted(json.loads(second["net.report.json"])["files"]) == ["net.onnx", "net.pt2"], "still known as repfx's"

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *OUT)
    assert code == 0, err
    assert json.loads(tree(tmp_path / "out")["net.report.json"])["files"]["net.onnx"] == sha256_of(
        tmp_path / "out" / "net.onnx")


def test_a_repfx_output_the_user_changed_is_no_longer_replaced(tmp_path, model, monkeypatch, capsys):
    assert run(tmp_path, monkeypatch, capsys, str(model), *OUT, "--formats", "pt2")[0] == 0
    (tmp_path / "out" / "net.pt2").write_bytes(b"edited by hand")
    before = tree(tmp_path)

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *OUT, "--formats", "pt2")

    assert code == 2 and "out/net.pt2" in one_error_line(err)
    assert tree(tmp_path) == before


def test_python_api_refuses_a_user_file_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"mine")
    monkeypatch.setattr(repfx.deploy.export, "run_whole", heavy_work_started)
    with pytest.raises(Refused, match="m.onnx exists and repfx did not write it"):
        repfx.export(build(tiny_net), (rand(*SHAPE),), tmp_path, name="m")
    assert tree(tmp_path) == {"m.onnx": b"mine"}


# --- both together: all or nothing ------------------------------------------------------------------------------

def failing_publish(monkeypatch, target: Path, published: list[str]) -> None:
    """Make publishing ``target`` fail like a full disk would; record every other path published before it."""
    real_rename, real_replace = os.rename, os.replace

    def guarded(real):
        def move(source, destination, *args, **kwargs):
            if Path(os.path.abspath(destination)) == target:
                raise OSError(28, "No space left on device", str(destination))
            if ".repfx-staging-" in str(source):
                published.append(str(destination))
            return real(source, destination, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", guarded(real_rename))
    monkeypatch.setattr(os, "replace", guarded(real_replace))


def test_triton_failure_after_out_was_published_restores_both(tmp_path, model, monkeypatch, capsys):
    assert run(tmp_path, monkeypatch, capsys, str(model), *TRITON)[0] == 0
    before = tree(tmp_path)
    published: list[str] = []
    failing_publish(monkeypatch, (tmp_path / "triton" / "net" / "2").absolute(), published)

    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *TRITON, "--precision", "fp16")

    assert code == 2
    line = one_error_line(err)
    assert "triton/net/2: No space left on device" in line, line
    assert {Path(p).name for p in published} >= {"net.pt2", "net.onnx", "net.report.json"}, \
        "the --out files were in place before the Triton step failed"
    assert tree(tmp_path) == before, "--out restored to its previous files, the repository as it was"


def test_triton_staging_failure_writes_neither(tmp_path, model, monkeypatch, capsys):
    import shutil

    def disk_full(source, destination, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    code, _, err = run(tmp_path, monkeypatch, capsys, str(model), *TRITON)

    assert code == 2
    assert "triton/net/1: No space left on device" in one_error_line(err)
    assert tree(tmp_path) == {"net.pt2": model.read_bytes()}, "no out/, no triton/, no staging directory"


# --- refused before any heavy work -----------------------------------------------------------------------------

def heavy_work_started(*args, **kwargs):
    raise AssertionError("heavy work started before the outputs were checked")


def _out_below_a_file(root: Path) -> tuple[str, ...]:
    (root / "file").write_text("x")
    return "--out", "file/out"


def _directory_in_the_way(root: Path) -> tuple[str, ...]:
    (root / "out" / "net.pt2").mkdir(parents=True)
    return "--out", "out"


def _user_report(root: Path) -> tuple[str, ...]:
    (root / "out").mkdir()
    (root / "out" / "net.report.json").write_text('{"my": "notes"}')
    return "--out", "out"


def _triton_entry_not_a_model(root: Path) -> tuple[str, ...]:
    (root / "triton" / "net").mkdir(parents=True)
    (root / "triton" / "net" / "data.csv").write_text("1,2\n")
    return "--out", "out", "--triton-repo", "triton"


def _out_is_the_new_triton_entry(root: Path) -> tuple[str, ...]:
    return "--out", "triton/net", "--triton-repo", "triton"


def _input_is_a_target(root: Path) -> tuple[str, ...]:
    return "--out", "."


CONFLICTS = [
    pytest.param(_out_below_a_file, "file exists and is not a directory", id="out-not-creatable"),
    pytest.param(_directory_in_the_way, "out/net.pt2 is a directory in the way", id="directory-in-the-way"),
    pytest.param(_user_report, "out/net.report.json exists and is not a report repfx wrote", id="user-report"),
    pytest.param(_triton_entry_not_a_model, "triton/net exists and is not a Triton model directory",
                 id="triton-entry-not-a-model"),
    pytest.param(_out_is_the_new_triton_entry, "triton/net is also this run's output directory",
                 id="out-is-the-new-triton-entry"),
    pytest.param(_input_is_a_target, "it is the input model", id="input-is-a-target"),
]  # a read-only --out: tests/test_cli_errors.py (a real one, in a subprocess)


@pytest.mark.parametrize("setup, says", CONFLICTS)
def test_conflicts_are_refused_before_the_model_is_touched(tmp_path, model, monkeypatch, capsys, setup, says):
    extra = setup(tmp_path)
    before = tree(tmp_path)
    monkeypatch.setattr(cli, "load_model", heavy_work_started)
    monkeypatch.setattr(cli, "build_export", heavy_work_started)

    code, _, err = run(tmp_path, monkeypatch, capsys, "net.pt2", "--name", "net", *extra)  # progress on

    assert code == 2
    assert says in one_error_line(err), err  # one line: not even a progress phase had started
    assert tree(tmp_path) == before
