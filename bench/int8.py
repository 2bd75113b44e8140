"""INT8 in ONNX Runtime on the CPU: what each format costs and saves, and what the fallback and equalization buy.

    python bench/int8.py                 # both parts (a few minutes on 2 cores)
    python bench/int8.py --speed-only    # RepVGG-A0 latency only
    python bench/int8.py --accuracy-only # the digits nets only (needs scikit-learn and the tests folder)

Speed: the bundled RepVGG-A0 (random weights, randomized BN: speed only), folded by repfx, as
fp32 ONNX and as INT8 in both formats repfx writes (``repfx.int8.quantizers``): ONNX
Runtime's CPU format and TensorRT's explicit-quantization format (ModelOpt; skipped where
it is not installed). Each file runs in one ONNX Runtime CPU session (ORT_ENABLE_ALL, 2
threads); the three take turns in every round (``repfx.targets.clock.interleaved_samples``),
batch 1 and 8, median and 25th-75th percentile. Target: the CPU format >= 2.5x fp32 at batch 1.

Accuracy: the trained digits RepVGG-style net of the tests (``tests/int8/digits.py``), as
trained and with near-dead channels feeding identity branches (issue 18's BN scales), folded
and quantized in the CPU format: all layers INT8 (plain), plus the sensitivity fallback,
plus cross-layer equalization (and equalization with the fallback). Calibration: 512 training
images; judged on the 449 test digits the net never saw: top-1 accuracy, agreement with the
fp32 plain graph, SNR of the logits. Seeded; no timing in this part.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import repfx
from repfx.backends.onnx import cpu_session, export_onnx
from repfx.backends.program import export_program
from repfx.int8.metrics import score
from repfx.int8.quantizers import probe_modelopt, quantize
from repfx.int8.sensitivity import plan_fallback
from repfx.passes.equalize import equalize
from repfx.samples import build_sample, randomize_bn_
from repfx.targets.clock import interleaved_samples

DIGITS = Path(__file__).resolve().parents[1] / "tests" / "int8" / "digits.py"  # the tests' trained net
THREADS = 2


def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """Normalized smooth images: activations in the ranges of real data (random noise is no calibration data)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return ((pixels - 0.45) / 0.225).numpy()


def speed(rounds: int) -> None:
    torch.manual_seed(0)
    model = randomize_bn_(build_sample("repvgg_a0"), 0).eval()
    formats = ["cpu"] + (["tensorrt"] if probe_modelopt().usable else [])
    if "tensorrt" not in formats:
        print(f"TensorRT format skipped: {probe_modelopt().reason}")
    print(f"RepVGG-A0, ONNX Runtime CPU provider, {THREADS} threads; median ms (25th-75th), speed-up vs fp32")
    for batch in (1, 8):
        x = torch.from_numpy(smooth_images(batch, 224, seed=0))
        plain = repfx.reparameterize(model, (x,))
        with tempfile.TemporaryDirectory() as folder:
            fp32 = Path(folder, "plain.onnx")
            fp32.write_bytes(export_onnx(export_program(plain, (x,))))
            calibration = [{"x": smooth_images(batch, 224, seed=1 + i)} for i in range(max(1, 32 // batch))]
            models = {"fp32": fp32.read_bytes()} | {f"int8 {fmt}": quantize(fp32, calibration, fmt)
                                                     for fmt in formats}
        sessions = {name: cpu_session(data, THREADS) for name, data in models.items()}
        feed = {"x": x.numpy()}
        runs = [lambda session=session: session.run(None, feed) for session in sessions.values()]
        samples = interleaved_samples(runs, rounds=rounds)
        base = statistics.median(samples[0])
        for (name, data), times in zip(models.items(), samples):
            quartiles = statistics.quantiles(times, n=4)
            print(f"  batch {batch}  {name:<14} {1e3 * statistics.median(times):8.2f} ms "
                  f"({1e3 * quartiles[0]:.2f}-{1e3 * quartiles[2]:.2f})  {base / statistics.median(times):5.2f}x  "
                  f"file {len(data) / 1e6:5.1f} MB")


def accuracy() -> None:
    spec = importlib.util.spec_from_file_location("digits", DIGITS)  # not "int8": this script is int8
    nets = sys.modules["digits"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(nets)
    data = nets.digits(seed=0)
    net, _ = nets.trained_net(Path(tempfile.gettempdir()) / "repfx-bench-int8-digits")
    injected, _ = nets.inject_near_dead(net, data)
    batch = 32
    test = data.test_x[: len(data.test_x) // batch * batch]
    labels = data.test_y[: len(test)].numpy()
    calibration = [{"x": data.train_x[i:i + batch].numpy()} for i in range(0, 512, batch)]
    judged = [{"x": test[i:i + batch].numpy()} for i in range(0, len(test), batch)]
    print("digits RepVGG-style net, CPU format, 512 calibration images, judged on the 448 test digits")
    print(f"  {'net':<9} {'form':<26} {'top-1':>6} {'agree':>6} {'SNR dB':>7}  in float")
    for name, model in (("trained", net), ("injected", injected)):
        plain = repfx.reparameterize(model, (test[:batch],))
        equalized = equalize(plain, [(test[:batch],)])
        with tempfile.TemporaryDirectory() as folder:
            files = {}
            for form, graph in (("plain", plain), ("equalized", equalized.graph)):
                files[form] = Path(folder, f"{form}.onnx")
                files[form].write_bytes(export_onnx(export_program(graph, (test[:batch],))))
            reference = _run(files["plain"].read_bytes(), judged)
            held = calibration[-4:]  # the fallback is judged on held-out calibration data, never the test digits
            rows = [("fp32 plain graph", files["plain"].read_bytes(), "")]
            for form in ("plain", "equalized"):
                prefix = "" if form == "plain" else "equalized, "
                rows.append((f"{prefix}all INT8", quantize(files[form], calibration[:-4], "cpu"), ""))
                plan = plan_fallback(files[form], calibration[:-4], held, "cpu")
                rows.append((f"{prefix}+ fallback", plan.model, ", ".join(layer for layer, _ in plan.float_layers)))
        for form, model_bytes, floated in rows:
            outputs = _run(model_bytes, judged)
            scores = score(reference, outputs)
            top1 = float((outputs[0].argmax(1) == labels).mean())
            print(f"  {name:<9} {form:<26} {100 * top1:5.1f}% {100 * scores.agreement[0]:5.1f}% "
                  f"{scores.snr_db[0]:7.1f}  {floated or '-'}")
        print(f"  {name:<9} equalization: {len(equalized.pairs)} pairs, float64 proof "
              f"{equalized.worst_relative_error:.1e} relative")


def _run(model: bytes, feeds: list[dict]) -> list[np.ndarray]:
    session = cpu_session(model, THREADS)
    return [np.concatenate(parts) for parts in zip(*(session.run(None, feed) for feed in feeds))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--accuracy-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per file (each file once per round)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if not args.accuracy_only:
        speed(args.rounds)
    if not args.speed_only:
        accuracy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
