"""``python -m repfx.trt --precision int8``: calibration required, the target enforced by the exit code, nothing
written below it unless accepted, and the INT8 file written beside the float program when it is met.

Calls ``main(argv)`` in-process on the bundled RepVGG block with a seeded ``.npy`` of smooth images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from repfx.cli import trt as cli

SHAPE = (1, 32, 16, 16)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(40, 32, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=SHAPE[2:], mode="bilinear", align_corners=False)
    path = tmp_path_factory.mktemp("calibration") / "calibration.npy"
    np.save(path, ((images - 0.5) / 0.25).numpy())
    return path


def run(tmp_path: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(tmp_path)
    code = cli.main(["--sample", "repvgg_block", "--input-shape", "x".join(map(str, SHAPE)), "--out", "out",
                     "--precision", "int8", "--quiet", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_int8_without_calibration_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    code, _, err = run(tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs calibration data" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_missed_target_exits_1_with_the_numbers_and_writes_nothing(tmp_path, monkeypatch, capsys, calibration):
    code, _, err = run(tmp_path, monkeypatch, capsys, "--calibration", str(calibration), "--int8-target", "100:200")
    assert code == 1
    assert "misses its target (100% top-1 agreement, 200 dB)" in err and "dB" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_accepted_below_target_writes_the_int8_file_and_says_so(tmp_path, monkeypatch, capsys, calibration):
    code, out, _ = run(tmp_path, monkeypatch, capsys, "--calibration", str(calibration), "--int8-target", "100:200",
                       "--int8-accept-below-target", "--triton-repo", "models")
    assert code == 0
    assert "MISSES (accepted below target)" in out
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["repvgg_block.int8.onnx", "repvgg_block.pt2", "repvgg_block.report.json"]
    # The Triton entry serves the INT8 model, in ONNX Runtime.
    served = tmp_path / "models" / "repvgg_block" / "1" / "model.onnx"
    assert served.read_bytes() == (tmp_path / "out" / "repvgg_block.int8.onnx").read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (tmp_path / "models" / "repvgg_block" / "config.pbtxt").read_text()


@pytest.mark.parametrize("target", ["abc", "99", "150:20", "99:inf"])
def test_a_bad_target_is_a_usage_error(tmp_path, monkeypatch, capsys, target):
    with pytest.raises(SystemExit) as raised:
        run(tmp_path, monkeypatch, capsys, "--int8-target", target)
    assert raised.value.code == 2 and "--int8-target" in capsys.readouterr().err
