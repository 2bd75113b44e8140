"""``python -m repfx``: re-parameterize a bundled training-form sample and print the report.

The shortest way to see what repfx does: RepVGG-A0 (22 blocks of 3x3 + 1x1 +
identity, every BatchNorm randomized so none is an identity) becomes 22 plain
convolutions, verified against the original.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from repfx import reparameterize
from repfx.capture.inputs import InputSpec, random_inputs
from repfx.cli.planning import add_check_arguments, add_planning_arguments
from repfx.errors import CaptureError, VerificationError


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    from repfx.samples import SAMPLES, build_sample, randomize_bn_, sample_input_shape

    parser = argparse.ArgumentParser(prog="python -m repfx", description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="repvgg_a0", choices=sorted(SAMPLES), metavar="NAME",
                        help="bundled training-form model (default: repvgg_a0); --list shows all")
    parser.add_argument("--list", action="store_true", help="list the bundled samples and exit")
    parser.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1x3x224x224")
    parser.add_argument("--seed", type=int, default=0, help="seed for BN statistics and inputs")
    add_planning_arguments(parser)
    add_check_arguments(parser)
    parser.add_argument("--report", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(SAMPLES)))
        return 0

    torch.manual_seed(args.seed)
    model = randomize_bn_(build_sample(args.sample), args.seed).eval()
    (example,) = random_inputs([InputSpec(args.input_shape or sample_input_shape(args.sample))], args.seed)
    try:
        gm = reparameterize(model, (example,), cost=args.cost, target=args.target, batch=args.batch, rtol=args.rtol,
                            atol=args.atol, strict=args.strict, max_param_growth=args.max_param_growth)
    except (CaptureError, VerificationError) as error:
        print(f"repfx: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    report = gm.repfx_report
    print(json.dumps(report.to_dict(), indent=2) if args.report == "json" else report)
    return 0

