"""Does repfx's merge decision pick the faster form? Contested blocks, measured side by side.

    python bench/cost_model.py                        # CPU eager + ONNX Runtime, batch 1 and 8
    python bench/cost_model.py --quick                # fewer rounds, eager only
    python bench/cost_model.py --device cuda --batches 1 128 --precisions fp32 fp16

A *contested* block is one where the exact merge adds multiply-accumulates: a kxk
concatenated with a 1x1, a depthwise kxk beside a dense 1x1, a 1x1 bottleneck before a
kxk, a depthwise kxk followed by a 1x1, branches of different groups, a dilated 3x3
beside a 1x1. Small, overhead-bound sizes favour merging despite the extra MACs;
large, compute-bound sizes favour keeping the ops apart (the RepVGG paper's lesson:
FLOPs are not speed). Each block is built twice: fully merged (``cost="always"``) and
with the contested merge kept apart (``cost="macs"``, which refuses every merge that
adds MACs; the table checks the two forms really differ). Both forms are timed
interleaved, per runtime and batch, and each policy's choice is looked up: a *hit* is
a choice within 10% of the faster form. Policies that this repfx does not know are
skipped with the reason.

Seeded; every BatchNorm is randomized; the two forms' outputs are compared before
timing. Exit status 0 whatever the hit rates (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import repfx
from _tables import print_environment, table  # bench/ is on sys.path when a script runs
from repfx.backends import get_backend
from repfx.samples import randomize_bn_
from repfx.targets import cost_rule, device_profile

HIT_MARGIN = 1.10  # a choice within 10% of the faster form counts as a hit
POLICIES = ("macs", "latency", "measure")


def conv_bn(cin: int, cout: int, k: int, *, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout))


class Concat(nn.Module):
    """cat(kxk, 1x1) of one input: merged, one conv with the 1x1 padded to kxk."""

    def __init__(self, cin: int, half: int, k: int = 3) -> None:
        super().__init__()
        self.big, self.small = conv_bn(cin, half, k), conv_bn(cin, half, 1)

    def forward(self, x):
        return torch.cat([self.big(x), self.small(x)], dim=1)


class Parallel(nn.Module):
    """Sum of branches of one input (different kernels, groups, dilations), plus an optional identity BN."""

    def __init__(self, *branches: nn.Module, identity: int = 0) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = nn.BatchNorm2d(identity) if identity else None

    def forward(self, x):
        y = sum(branch(x) for branch in self.branches)
        return y + self.identity(x) if self.identity is not None else y


class Chain(nn.Module):
    """Two convs in a row with no nonlinearity: merged, one conv."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


@dataclass(frozen=True)
class Case:
    name: str
    regime: str  # "overhead" or "compute": where the measurements put it
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # without the batch


CASES = [
    Case("cat(3x3,1x1) 3->16+16", "overhead", lambda: Concat(3, 16), (3, 56, 56)),
    Case("cat(3x3,1x1) 8->4+4", "overhead", lambda: Concat(8, 4), (8, 16, 16)),
    Case("cat(3x3,1x1) 128->64+64", "compute", lambda: Concat(128, 64), (128, 28, 28)),
    Case("dw3x3 || 1x1, 32 ch", "overhead", lambda: Parallel(conv_bn(32, 32, 3, groups=32), conv_bn(32, 32, 1)),
         (32, 16, 16)),
    Case("dw3x3 || 1x1, 256 ch", "compute", lambda: Parallel(conv_bn(256, 256, 3, groups=256), conv_bn(256, 256, 1)),
         (256, 14, 14)),
    # The bottleneck 1x1 has no BN or bias: a shift before the 3x3's zero padding would not fold exactly.
    Case("1x1 64->16 -> 3x3", "overhead", lambda: Chain(nn.Conv2d(64, 16, 1, bias=False), conv_bn(16, 64, 3)),
         (64, 16, 16)),
    Case("1x1 256->64 -> 3x3", "compute", lambda: Chain(nn.Conv2d(256, 64, 1, bias=False), conv_bn(64, 256, 3)),
         (256, 28, 28)),
    Case("dw7x7 -> 1x1, 16 ch", "overhead", lambda: Chain(conv_bn(16, 16, 7, groups=16), conv_bn(16, 16, 1)),
         (16, 16, 16)),
    Case("dw7x7 -> 1x1, 128 ch", "compute", lambda: Chain(conv_bn(128, 128, 7, groups=128), conv_bn(128, 128, 1)),
         (128, 28, 28)),
    Case("3x3 g4 + 1x1 g2 + id, 8 ch", "overhead",
         lambda: Parallel(conv_bn(8, 8, 3, groups=4), conv_bn(8, 8, 1, groups=2), identity=8), (8, 16, 16)),
    Case("3x3 g4 + 1x1 g2 + id, 128 ch", "compute",
         lambda: Parallel(conv_bn(128, 128, 3, groups=4), conv_bn(128, 128, 1, groups=2), identity=128),
         (128, 28, 28)),
    Case("3x3 dil2 + 1x1, 16 ch", "overhead", lambda: Parallel(conv_bn(16, 16, 3, dilation=2), conv_bn(16, 16, 1)),
         (16, 16, 16)),
    Case("3x3 dil2 + 1x1, 128 ch", "compute",
         lambda: Parallel(conv_bn(128, 128, 3, dilation=2), conv_bn(128, 128, 1)), (128, 28, 28)),
]


# ----------------------------------------------------------------------------- timing

def median_ms(run: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def interleaved_ms(runners: dict[str, Callable[[], object]], rounds: int, repeats: int, sync: Callable) -> dict:
    """Median over rounds of each runner's median; rounds cycle through the runners so drift hits all alike."""
    for run in runners.values():  # warm-up
        for _ in range(3):
            run()
        sync()
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            def timed(run=run):
                run()
                sync()
            per_round[name].append(median_ms(timed, repeats))
    return {name: statistics.median(values) for name, values in per_round.items()}


def runner(form: Callable, inputs: tuple, runtime: str, cost: str, precision: str, device: str) -> Callable:
    """A zero-argument call of ``form`` in ``runtime`` (eager, or ONNX Runtime through repfx.compile)."""
    if runtime == "eager":
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        module = copy.deepcopy(form).to(device=device, dtype=dtype)  # the form itself stays fp32 on the CPU
        args = tuple(t.to(device=device, dtype=dtype) for t in inputs)

        def run():
            with torch.inference_mode():
                module(*args)
        return run
    deployed = repfx.compile(form, inputs, backend="onnx", cost=cost, precision=precision, verify=False)
    return lambda: deployed(*inputs)


# ----------------------------------------------------------------------------- one case

def convolutions(gm: torch.fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and "conv" in str(node.target))


def choices(model: nn.Module, inputs: tuple, merged_convs: int, apart_convs: int, policies: list[str],
            device: str, batch: int, precision: str, runtime: str) -> dict[str, str]:
    """Which form each policy picks ("merged", "apart", "other") for this device, batch, precision and runtime."""
    picked = {}
    for policy in policies:
        try:
            rule = cost_rule(policy, target=device, batch=batch, precision=precision, example_inputs=inputs,
                             runtime=get_backend(runtime).runtime)
            gm = repfx.reparameterize(model, inputs, cost=rule, verify=False)
        except ValueError as error:  # a policy this repfx cannot apply here
            picked[policy] = f"n/a ({str(error).splitlines()[0][:60]})"
            continue
        count = convolutions(gm)
        picked[policy] = "merged" if count == merged_convs else "apart" if count == apart_convs else "other"
    return picked


def run_case(case: Case, batch: int, runtimes: list[str], policies: list[str], args) -> list[list[str]]:
    torch.manual_seed(0)
    model = randomize_bn_(case.build(), 0).eval()
    inputs = (torch.randn((batch, *case.sample_shape), generator=torch.Generator().manual_seed(1)),)
    merged = repfx.reparameterize(model, inputs, cost="always", verify=False)
    apart = repfx.reparameterize(model, inputs, cost="macs", verify=False)
    merged_convs, apart_convs = convolutions(merged), convolutions(apart)
    if merged_convs == apart_convs:
        return [[case.name, case.regime, str(batch), "-", "-", "-", "same form"] + ["not contested"] * len(policies)]
    with torch.no_grad():
        reference = model(*inputs)
        for form in (merged, apart):
            error = (form(*inputs) - reference).abs().max().item() / max(1.0, reference.abs().max().item())
            assert error < 1e-4, f"{case.name}: a form disagrees with the model ({error:.2e})"
    rows = []
    for runtime in runtimes:
        for precision in args.precisions:
            picked = choices(model, inputs, merged_convs, apart_convs, policies, args.device, batch, precision,
                             runtime)
            sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
            runners = {"merged": runner(merged, inputs, runtime, "always", precision, args.device),
                       "apart": runner(apart, inputs, runtime, "macs", precision, args.device)}
            ms = interleaved_ms(runners, args.rounds, args.repeats, sync)
            fastest = min(ms.values())
            row = [case.name, case.regime, str(batch), f"{runtime} {precision}", f"{ms['merged']:.3f}",
                   f"{ms['apart']:.3f}", f"{ms['merged'] / ms['apart']:.2f}"]
            for policy in policies:
                choice = picked[policy]
                if choice in ms:
                    row.append(f"{choice} {'hit' if ms[choice] <= HIT_MARGIN * fastest else 'MISS'}")
                else:
                    row.append(choice)
            rows.append(row)
    return rows


def hit_rates(rows: list[list[str]], policies: list[str]) -> list[str]:
    lines = []
    for index, policy in enumerate(policies):
        cells = [row[7 + index] for row in rows if len(row) > 7]
        hits = sum(cell.endswith(" hit") for cell in cells)
        decided = sum(cell.endswith((" hit", " MISS")) for cell in cells)
        lines.append(f"{policy}: {hits}/{decided} within {HIT_MARGIN - 1:.0%} of the faster form"
                     if decided else f"{policy}: not available ({cells[0] if cells else 'no cases'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, eager only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runtimes", nargs="+", default=None, help="eager, onnx (default: both on CPU)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--only", default="", help="run only the blocks whose name contains this text")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 2, 3
    runtimes = args.runtimes or (["eager"] if args.quick or args.device != "cpu" else ["eager", "onnx"])
    print_environment(args.quick, "-", "; timings are noisy")
    target = "cuda" if args.device.startswith("cuda") else args.device
    for runtime in runtimes:  # the profile each runtime's latency rule plans with
        print(f"profile ({runtime}): {device_profile(target, get_backend(runtime).runtime)}")
    rows = []
    for case in (case for case in CASES if args.only in case.name):
        for batch in args.batches:
            rows += run_case(case, batch, runtimes, args.policies, args)
            print(f"  done: {case.name} batch {batch}", flush=True)
    header = ["block", "regime", "batch", "runtime", "merged ms", "apart ms", "merged/apart"] + args.policies
    print()
    print(table(header, rows, f"Contested merges on {args.device}: the faster form vs each policy's choice"))
    print()
    print("\n".join(hit_rates(rows, args.policies)))


if __name__ == "__main__":
    main()
