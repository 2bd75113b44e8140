"""How long repfx's rewrite phase takes on big timm models, against timm's own per-block conversion.

    python bench/rewrite_speed.py            # full run: median of 3 (several minutes on 2 CPU cores)
    python bench/rewrite_speed.py --quick    # smoke test: one run each

For RepVGG-B3 and FastViT-SA24 (timm, BN randomized, eval) at 1x3x224x224, in the
same process and interleaved run by run, so that load drift hits every variant alike:

* timm: ``timm.utils.reparameterize_model(copy, inplace=True)`` on a deepcopy made
  outside the timer (the per-block conversion itself, the same weight arithmetic);
* repfx: ``report.seconds["rewrite"]`` of ``repfx.reparameterize`` (the fold pipeline
  to its fixed point) with ``verify=True``, which includes the per-region float64
  proofs on the example and a seeded input set, and with ``verify=False``.

Target: the rewrite phase at most 1.5x timm's time, for each model; the proofs are
shown apart because they evaluate every region twice in float64, work timm does not
do at all. The garbage collector runs before each timed call (a full collection
after torch.export costs ~0.3 s); one may still fall inside a timed phase, so the notes
show the collector's seconds within each rewrite phase. Everything is seeded; the exit
status is 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import torch
from torch import nn

import repfx
from _tables import print_environment, table, verdict  # bench/ is on sys.path when a script runs
from repfx import samples

try:
    import timm
    from timm.utils import reparameterize_model
except ImportError:  # timm is a test extra, and the reference this benchmark measures against
    timm = None

MODELS = {"repvgg_b3": "RepVGG-B3", "fastvit_sa24": "FastViT-SA24"}
TARGET_RATIO = 1.5
INPUT_SHAPE = (1, 3, 224, 224)


def build_timm(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    samples.randomize_bn_(model, seed)
    return model.eval()


def timm_seconds(model: nn.Module) -> float:
    """timm's conversion of a deepcopy (the copy is not timed: repfx's copies are in its capture phase)."""
    duplicate = copy.deepcopy(model)
    gc.collect()
    start = time.perf_counter()
    reparameterize_model(duplicate, inplace=True)
    return time.perf_counter() - start


class CollectorPauses:
    """Seconds the garbage collector ran during each phase of one ``reparameterize`` call.

    torch.export leaves a heap of some 500k objects; a full collection over it (~0.3 s) runs when
    enough allocations have piled up since the last, so whether it lands in the rewrite phase of
    a run is a matter of where the collector's counters stand. It is shown apart, not subtracted.
    """

    def __init__(self) -> None:
        self.phase = "capture"
        self.seconds: dict[str, float] = {}
        self._started = 0.0

    def progress(self, phase: str) -> None:
        self.phase = phase

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            self._started = time.perf_counter()
            return
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + time.perf_counter() - self._started


def repfx_seconds(model: nn.Module, x: torch.Tensor, verify: bool, cost: str) -> tuple[float, float, repfx.Report]:
    """The rewrite phase's seconds, the collector's share of them, and the report."""
    gc.collect()
    pauses = CollectorPauses()
    gc.callbacks.append(pauses)
    try:
        gm = repfx.reparameterize(model, (x,), verify=verify, cost=cost, progress=pauses.progress)
    finally:
        gc.callbacks.remove(pauses)
    report = gm.repfx_report
    return report.seconds["rewrite"], pauses.seconds.get("rewrite", 0.0), report


def bench_model(name: str, runs: int, cost: str) -> tuple[list[str], list[str], bool]:
    """One table row, notes, and whether both rewrite phases meet the target."""
    model = build_timm(name)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"timm": [], "on": [], "off": []}
    collector: dict[str, list[float]] = {"on": [], "off": []}  # of the rewrite seconds, the collector's
    reports: dict[str, repfx.Report] = {}
    order = ["timm", "on", "off"]
    for index in range(runs):
        for variant in order[index % 3:] + order[:index % 3]:  # rotate who goes first
            if variant == "timm":
                times["timm"].append(timm_seconds(model))
                continue
            seconds, collecting, reports[variant] = repfx_seconds(model, x, variant == "on", cost)
            times[variant].append(seconds)
            collector[variant].append(collecting)
    median = {variant: statistics.median(values) for variant, values in times.items()}
    ratio_on, ratio_off = median["on"] / median["timm"], median["off"] / median["timm"]
    ok = ratio_on <= TARGET_RATIO and ratio_off <= TARGET_RATIO
    row = [MODELS[name], f"{median['timm']:.3f}", f"{median['on']:.3f}", f"{ratio_on:.2f}x",
           verdict(ratio_on <= TARGET_RATIO), f"{median['off']:.3f}", f"{ratio_off:.2f}x",
           verdict(ratio_off <= TARGET_RATIO), f"{median['on'] - median['off']:.3f}"]
    on = reports["on"]
    proofs = on.local_proofs
    notes = [f"    {MODELS[name]}: runs (timm / verify on / verify off) " + "; ".join(
                 f"{t:.2f}/{a:.2f}/{b:.2f}" for t, a, b in zip(times["timm"], times["on"], times["off"])),
             f"    {MODELS[name]}: {len(on.rewrites)} rewrites in {on.iterations} rounds; "
             f"{proofs.regions_proven} regions proven, {proofs.regions_failed} failed, worst relative "
             f"{proofs.worst_relative_error:.1e}; end to end max |error| {on.max_abs_error:.2e}; "
             f"ops {on.ops_before['total']} -> {on.ops_after['total']}",
             f"    {MODELS[name]}: garbage collector within the rewrite phase, runs (verify on / off) " + "; ".join(
                 f"{a:.2f}/{b:.2f}" for a, b in zip(collector["on"], collector["off"]))]
    return row, notes, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: one run per variant")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant, median taken (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--cost", default="macs", help="repfx cost rule (default macs: no device timing)")
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = parser.parse_args(argv)
    if timm is None:
        print("timm is not installed: it is the reference this benchmark compares with")
        return 0
    torch.set_num_threads(args.threads)
    print_environment(args.quick, timm.__version__, ". Every variant shares the load (runs interleave), "
                      "but the ratios are noisier than on a quiet machine.")
    runs = 1 if args.quick else args.runs
    rows, notes, results = [], [], []
    for name in [name for name in MODELS if not args.only or name in args.only.split(",")]:
        row, lines, ok = bench_model(name, runs, args.cost)
        rows.append(row)
        notes += lines
        results.append(ok)
        print(f"{MODELS[name]} done", file=sys.stderr, flush=True)
    shape = "x".join(map(str, INPUT_SHAPE))
    header = ["model", "timm s", "verify on s", "ratio", "target", "verify off s", "ratio", "target", "proofs s"]
    print(table(header, rows, f"rewrite phase at {shape}, cost={args.cost!r}, median of {runs} "
                              f"(target <= {TARGET_RATIO:g}x timm.utils.reparameterize_model)"))
    print("\n".join(notes))
    print("    proofs s = verify on - verify off: each proven region and its replacement evaluated in float64 on "
          "the example and a seeded input set, after a float32 run of the graph on each")
    print("    garbage collector: seconds of the rewrite phase spent in collections (a full one over the heap "
          "torch.export leaves takes ~0.3 s and lands in whichever phase its counters reach; included above)")
    print(f"\nsummary: rewrite phase <= {TARGET_RATIO:g}x timm {verdict(all(results))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
