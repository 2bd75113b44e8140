"""The subprocess that runs ModelOpt's ONNX PTQ for ``quantizers``: ``python -m repfx.int8.modelopt_worker JOB``.

ModelOpt patches ``onnxruntime.quantization`` in the process that imports it, so it lives here, apart
from the caller's onnxruntime. ``JOB`` is the JSON ``quantizers._modelopt`` writes: the fp32 model, the
calibration feeds (an ``.npz``), and one exclusion list per output. Each output is ``int8_<k>.onnx`` in
the job's folder; a failure is one line in ``error.txt`` (ModelOpt's own log goes to stderr).

The settings are TensorRT's explicit quantization: int8, max calibration (ModelOpt's entropy fails
on outlier-heavy models, and ONNX Runtime's entropy gave exactly the max scales here), calibration
on the CPU provider, float (fp32) for everything left unquantized so the file is checked in ONNX
Runtime as TensorRT will run it. ModelOpt reads exclusions as regular expressions: names are escaped.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


def run_job(job: dict) -> None:
    from modelopt.onnx.quantization import quantize
    from onnxruntime.quantization import CalibrationDataReader

    from repfx.int8.quantizers import FeedReader

    reader_type = type("Reader", (FeedReader, CalibrationDataReader), {})
    data = np.load(job["calibration"])
    feeds = [{name: data[f"feed{i}_input{j}"] for j, name in enumerate(job["inputs"])} for i in range(job["feeds"])]
    out = Path(job["out"])
    for index, exclude in enumerate(job["excludes"]):
        quantize(job["model"], quantize_mode="int8", calibration_data_reader=reader_type(feeds),
                 calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp32",
                 nodes_to_exclude=[re.escape(name) + "$" for name in exclude],
                 output_path=str(out / f"int8_{index}.onnx"), log_level="ERROR")


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        run_job(job)
    except BaseException as error:  # noqa: BLE001 - every failure becomes the caller's one line
        text = str(error).strip().splitlines()
        line = f"{type(error).__name__}: {text[0] if text else 'no message'}"
        (Path(job["out"]) / "error.txt").write_text(line[:500])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
