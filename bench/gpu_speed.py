"""Training form vs repfx's plain form on a CUDA GPU at the RepVGG paper's batch 128 (its Figure 4 setting).

    python bench/gpu_speed.py                     # RepVGG-A0, RepVGG-B0, MobileOne-S0; fp32 and fp16; eager, inductor
    python bench/gpu_speed.py --device cpu --batch 2 --quick   # a smoke test where there is no GPU

Models come from ``repfx.samples`` (timm may be missing where this runs), every
BatchNorm randomized, seeded. The plain form is ``repfx.reparameterize`` with the
default ``cost="latency"`` planned for this device and batch. Each runtime times the
two forms interleaved (median of rounds); outputs are compared first. Exit status 0
unless a form disagrees with the training form.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import repfx
from _tables import table  # bench/ is on sys.path when a script runs
from repfx.samples import build_sample, randomize_bn_
from repfx.targets.clock import seconds_per_call

MODELS = ("repvgg_a0", "repvgg_b0", "mobileone_s0")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def forms(name: str, batch: int, device: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, str]:
    torch.manual_seed(0)
    training = randomize_bn_(build_sample(name), 0).eval().to(device)
    x = torch.randn((batch, 3, 224, 224), generator=torch.Generator().manual_seed(1)).to(device)
    plain = repfx.reparameterize(training, (x,))
    report = plain.repfx_report
    return training, plain, x, f"{report.ops_before['convolution']}->{report.ops_after['convolution']} convs"


def runner(module: torch.nn.Module, runtime: str) -> torch.nn.Module:
    return torch.compile(module, dynamic=False) if runtime == "inductor" else module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES))
    parser.add_argument("--runtimes", nargs="+", default=["eager", "inductor"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds, eager only")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.runtimes = 2, ["eager"]
    rows, failed = [], False
    for name in args.models:
        training, plain, x, convs = forms(name, args.batch, args.device)
        for precision in args.precisions:
            dtype = DTYPES[precision]
            model, deployed, inputs = training.to(dtype), plain.to(dtype), x.to(dtype)
            for runtime in args.runtimes:
                runs = {"training": runner(model, runtime), "repfx": runner(deployed, runtime)}
                with torch.inference_mode():
                    reference = runs["training"](inputs).float()
                    error = (runs["repfx"](inputs).float() - reference).abs().max().item()
                relative = error / max(1.0, reference.abs().max().item())
                failed |= relative > (1e-2 if precision == "fp16" else 1e-3)
                times = {form: [] for form in runs}
                for _ in range(args.rounds):
                    for form, run in runs.items():
                        times[form].append(seconds_per_call(lambda run=run: run(inputs), args.device) * 1e3)
                ms = {form: statistics.median(values) for form, values in times.items()}
                rows.append([name, convs, precision, runtime, f"{ms['training']:.2f}", f"{ms['repfx']:.2f}",
                             f"{ms['training'] / ms['repfx']:.2f}x", f"{relative:.1e}"])
                print(f"  done: {name} {precision} {runtime}", flush=True)
            training, plain = training.float(), plain.float()
    print(table(["model", "convs", "precision", "runtime", "training ms", "repfx ms", "speed-up", "rel. error"],
                rows, f"{args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
                      f"batch {args.batch}, median of {args.rounds} interleaved rounds"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
