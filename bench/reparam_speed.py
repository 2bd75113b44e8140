"""How fast repfx re-parameterizes, how its rewrite phase scales, and how fast its result runs.

    python bench/reparam_speed.py            # full run (a few minutes on 2 CPU cores)
    python bench/reparam_speed.py --quick    # smoke test: fewer repetitions, smaller chains

(a) ``repfx.reparameterize`` wall time on RepVGG-A0 and MobileOne-S0 (samples, BN
    randomized) at 1x3x224x224, per phase: the first (cold) call in the process, which
    pays torch.export's warm-up, then warm calls with capture as torch.export does it by
    default ("before": node stack traces, code regenerated after every export pass) and
    as repfx does it (``repfx.capture.lean``, "after"), interleaved run by run, medians.
    Target: RepVGG-A0's median total <= 3 s (after).
(b) rewrite-phase scaling on a plain chain of N RepVGG blocks (3x3-BN + 1x1-BN +
    BN identity, ReLU; C=16, 16x16 input): N=40 vs N=160. Target ratio <= 5x
    (4x the blocks; linear would be 4x).
(c) CPU latency (torch.no_grad, warm-up, median of interleaved runs) at batch 1
    and 8 of the training form in eval mode, repfx's result, and timm's
    hand-written deploy form (``timm.utils.reparameterize_model``) when timm is
    installed. Target: repfx's result as fast as timm's deploy form (ratio ~1).
(d) the float64 local proofs on RepVGG-A0 and MobileOne-S0 (samples), RepVGG-B3 and
    FastViT-SA24 (timm) at 1x3x224x224, and RT-DETR-l (ultralytics' rtdetr-l.yaml, random
    weights) at 1x3x640x640: seconds spent proving (the report's "prove" phase) on whole
    maps ("before": windows switched off) and on windows ("after", ``repfx.verify.windows``),
    runs interleaved, medians and spread; prove / (capture + rewrite). Target: <= 1 after,
    on every model, with the same regions proven and the same refusals as before. A model
    whose library does not import is skipped with a line saying so.

Everything is seeded. Timings on a shared machine are noisy: the load average
is printed first, latency runs are interleaved so that drift hits every variant
alike, and the garbage collector is run before each timed call (a full Python
collection after torch.export costs ~0.3 s, enough to double a rewrite phase).
Two OpenMP threads on two cores stall badly when another process holds a core,
so (a) also shows a 1-thread row; if it is much faster, the machine was busy.
``--quick`` runs 1 repetition of (a) per variant and (b) (chains N=10 and 40) and 3
latency runs: a smoke test, not a measurement. The exit status is 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import repfx
from _tables import print_environment, table, verdict  # bench/ is on sys.path when a script runs
from repfx import samples
from repfx.capture import lean as capture_lean  # its private switch is for this benchmark
from repfx.verify import local as local_proofs  # (d) switches its windows off for the "before"
from repfx.verify.opcount import count_ops, summarize

try:
    import timm
except ImportError:  # timm is a test extra; (c) then has no deploy column
    timm = None

PHASES = ("capture", "rewrite", "verify", "count")
REPARAM_TARGET_S = 3.0
SCALING_TARGET = 5.0
LATENCY_NOISE = 1.10  # repfx / timm-deploy ratio still counted as "as fast" (timer noise on a shared CPU)


# ----------------------------------------------------------------------------- helpers

def seeded_randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build_sample(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = samples.build_sample(name)
    samples.randomize_bn_(model, seed)
    return model.eval()


def build_timm(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    samples.randomize_bn_(model, seed)
    return model.eval()


def build_rtdetr(cfg: str, seed: int = 0) -> nn.Module:
    """RT-DETR from an ultralytics yaml (random weights, nothing downloaded); imported here, not at the
    top, because importing ultralytics is slow and sets process-wide options the other parts need not see."""
    from ultralytics.nn.tasks import RTDETRDetectionModel
    torch.manual_seed(seed)
    model = RTDETRDetectionModel(cfg=cfg, verbose=False)
    samples.randomize_bn_(model, seed)
    return model.eval()


def max_rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    expected, actual = expected.double(), actual.double()
    return (expected - actual).abs().max().item() / max(1.0, expected.abs().max().item())


# ----------------------------------------------------------------------------- (a)

REPARAM_MODELS = ("repvgg_a0", "mobileone_s0")
REPARAM_LABELS = {"repvgg_a0": "RepVGG-A0", "mobileone_s0": "MobileOne-S0"}


def _reparam_phases(model: nn.Module, x: torch.Tensor, lean: bool = True) -> tuple[list[float], repfx.Report]:
    """Seconds per phase and in total; ``lean=False`` captures as torch.export does by default (the "before")."""
    gc.collect()  # see bench_rewrite_scaling: no leftover garbage from the previous run
    with contextlib.nullcontext() if lean else capture_lean._as_torch_default():
        start = time.perf_counter()
        gm = repfx.reparameterize(model, (x,))
        total = time.perf_counter() - start
    report = gm.repfx_report
    return [report.seconds.get(p, 0.0) for p in PHASES] + [total], report


def _medians(runs: list[list[float]]) -> list[float]:
    return [statistics.median(col) for col in zip(*runs)]


def _interleaved(model: nn.Module, x: torch.Tensor, runs: int) -> dict[bool, list[list[float]]]:
    """``runs`` calls per variant (key: lean), alternating which goes first so that drift hits both alike."""
    times: dict[bool, list[list[float]]] = {False: [], True: []}
    for index in range(runs):
        for lean in ((False, True) if index % 2 == 0 else (True, False)):
            times[lean].append(_reparam_phases(model, x, lean)[0])
    return times


def bench_reparam_model(name: str, runs: int) -> tuple[list[str], float]:
    """(a) for one model: the table and lines below it, and the warm median total after."""
    model = build_sample(name)
    x = seeded_randn(*samples.sample_input_shape(name), seed=1)
    cold, report = _reparam_phases(model, x)
    times = _interleaved(model, x, runs)
    before, after = _medians(times[False]), _medians(times[True])
    threads = torch.get_num_threads()
    checked = name == "repvgg_a0"
    target = f"{verdict(after[-1] <= REPARAM_TARGET_S)} (<= {REPARAM_TARGET_S:g} s)" if checked else "(info)"

    def row(label: str, seconds: list[float], note: str) -> list[str]:
        return [label, *(f"{s:.3f}" for s in seconds), note]

    body = [row("first call (cold), after", cold, "(info)"),
            row(f"median of {runs} warm, before", before, "(info)"),
            row(f"median of {runs} warm, after", after, target)]
    if threads != 1:
        # One intra-op thread is immune to OpenMP barrier stalls when another process
        # holds a core: if this row is much faster, the rows above measured the machine.
        torch.set_num_threads(1)
        try:
            single = _medians([_reparam_phases(model, x)[0] for _ in range(runs)])
        finally:
            torch.set_num_threads(threads)
        body.append(row(f"median of {runs} warm, after, 1 thread", single, "(info)"))
    shape = "x".join(map(str, x.shape))
    out = [table([f"{REPARAM_LABELS[name]} {shape}", *PHASES, "total", "target"], body,
                 f"(a) repfx.reparameterize wall time, seconds ({threads} threads unless noted)")]
    saved = before[0] - after[0]
    out.append(f"    capture before -> after: {before[0]:.3f} -> {after[0]:.3f} s ({saved:.3f} s less, "
               f"{100 * saved / before[0]:.0f}%); runs before/after " + "; ".join(
                   f"{b[0]:.2f}/{a[0]:.2f}" for b, a in zip(times[False], times[True])))
    out.append(f"    ops training form -> result: {report.ops_before} -> {report.ops_after}; "
               f"max |error| {report.max_abs_error:.2e}")
    return out, after[-1]


def bench_reparam_time(runs: int) -> tuple[list[str], bool]:
    out, totals = [], {}
    for name in REPARAM_MODELS:
        lines, totals[name] = bench_reparam_model(name, runs)
        out += lines + [""]
    out.append('    before = torch.export as it captures by default; after = repfx.capture.lean (no node stack '
               'traces, no code regenerated after each export pass); the later phases get the same graph either way.')
    return out, totals["repvgg_a0"] <= REPARAM_TARGET_S


# ----------------------------------------------------------------------------- (b)

def repvgg_chain(n_blocks: int, channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    chain = nn.Sequential(*(samples.RepVGGBlock(channels, channels) for _ in range(n_blocks)))
    samples.randomize_bn_(chain, 0)
    return chain.eval()


def bench_rewrite_scaling(sizes: tuple[int, int], runs: int) -> tuple[list[str], bool]:
    x = seeded_randn(1, 16, 16, 16, seed=1)
    rows, medians = [], []
    for n in sizes:
        chain = repvgg_chain(n)
        seconds, ops = [], None
        for _ in range(runs):
            # A full (generation 2) collection of the ~0.5M objects torch.export leaves
            # around costs ~0.3 s and lands in a random phase; start each run collected.
            gc.collect()
            gm = repfx.reparameterize(chain, (x,), verify=False)
            seconds.append(gm.repfx_report.seconds["rewrite"])
            ops = gm.repfx_report.ops_after
        medians.append(statistics.median(seconds))
        rows.append([f"N={n}", f"{medians[-1]:.3f}", f"{min(seconds):.3f}", f"{1e3 * medians[-1] / n:.2f}",
                     f"{ops['convolution']} conv, {ops['batch_norm']} bn, {ops['add']} add"])
    ratio = medians[1] / medians[0]
    out = [table(["chain", "rewrite s (median)", "min", "ms/block", "ops after"], rows,
                 f"(b) rewrite-phase scaling, RepVGG-block chain C=16 16x16 (median of {runs})")]
    out.append(f"    ratio N={sizes[1]} / N={sizes[0]}: {ratio:.2f}x for {sizes[1] / sizes[0]:g}x the blocks  "
               f"{verdict(ratio <= SCALING_TARGET)} (<= {SCALING_TARGET:g}x)")
    return out, ratio <= SCALING_TARGET


# ----------------------------------------------------------------------------- (c)

def median_latencies(variants: dict[str, Callable], x: torch.Tensor, warmup: int, runs: int) -> dict[str, float]:
    """Median ms per variant; the variants are interleaved run by run so load drift is shared."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    gc.collect()
    with torch.no_grad():
        for _ in range(warmup):
            for fn in variants.values():
                fn(x)
        for _ in range(runs):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def latency_cases() -> list[tuple[str, Callable[[], nn.Module], str | None]]:
    """(label, training-form factory, timm model whose deploy form is the reference)."""
    cases = [("repvgg_a0 (samples)", lambda: build_sample("repvgg_a0"), "repvgg_a0"),
             ("mobileone_s0 (samples)", lambda: build_sample("mobileone_s0"), "mobileone_s0")]
    if timm is not None:
        cases += [("repvgg_a0 (timm)", lambda: build_timm("repvgg_a0"), "repvgg_a0"),
                  ("mobileone_s0 (timm)", lambda: build_timm("mobileone_s0"), "mobileone_s0")]
    return cases


def bench_latency(batches: tuple[int, ...], warmup: int, runs: int) -> tuple[list[str], bool | None]:
    rows, notes, ok = [], [], True
    for label, factory, timm_name in latency_cases():
        model = factory()
        x1 = seeded_randn(1, 3, 224, 224, seed=1)
        gm = repfx.reparameterize(model, (x1,), dynamic_batch=True)
        deploy = None
        if timm is not None and timm_name is not None:
            deploy = timm.utils.reparameterize_model(build_timm(timm_name)).eval()
        ops = {"train": summarize(count_ops(model, (x1,))), "repfx": summarize(count_ops(gm, (x1,)))}
        if deploy is not None:
            ops["timm"] = summarize(count_ops(deploy, (x1,)))
        params = f"; parameters repfx {gm.meta['repfx'].parameters_after:,}"
        if deploy is not None:
            params += f", timm {sum(p.numel() for p in deploy.parameters()):,}"
        notes.append(f"    {label}: executed conv/bn/add/total  " + "  ".join(
            f"{k} {v['convolution']}/{v['batch_norm']}/{v['add']}/{v['total']}" for k, v in ops.items()) + params)
        for batch in batches:
            x = seeded_randn(batch, 3, 224, 224, seed=batch)
            with torch.no_grad():
                err = max_rel_error(model(x), gm(x))
            variants = {"train": model, "repfx": gm}
            if deploy is not None:
                variants["timm"] = deploy
            ms = median_latencies(variants, x, warmup, runs)
            row = [label, batch, f"{ms['train']:.2f}", f"{ms['repfx']:.2f}"]
            if deploy is not None:
                ratio = ms["repfx"] / ms["timm"]
                ok &= ratio <= LATENCY_NOISE
                row += [f"{ms['timm']:.2f}", f"{ms['train'] / ms['repfx']:.2f}x", f"{ratio:.3f}",
                        verdict(ratio <= LATENCY_NOISE)]
            else:
                row += ["-", f"{ms['train'] / ms['repfx']:.2f}x", "-", "-"]
            row.append(f"{err:.1e}")
            rows.append(row)
    header = ["model", "batch", "train ms", "repfx ms", "timm-deploy ms", "train/repfx", "repfx/timm", "target",
              "rel err"]
    out = [table(header, rows, f"(c) CPU latency, {torch.get_num_threads()} threads, no_grad, "
                               f"median of {runs} interleaved runs after {warmup} warm-up "
                               f"(target repfx/timm <= {LATENCY_NOISE:g}, i.e. as fast within noise)")]
    out += notes
    out.append("    timm-deploy = timm.create_model(<name>) + timm.utils.reparameterize_model; for the (samples) "
               "rows it is the same architecture built by timm.")
    if timm is None:
        out.append("    timm is not installed: no deploy form to compare with")
        return out, None
    return out, ok


# ----------------------------------------------------------------------------- (d)

PROOF_MODELS = (("RepVGG-A0", "repvgg_a0", "samples", 224), ("RepVGG-B3 (timm)", "repvgg_b3", "timm", 224),
                ("MobileOne-S0", "mobileone_s0", "samples", 224),
                ("FastViT-SA24 (timm)", "fastvit_sa24", "timm", 224),
                ("RT-DETR-l (ultralytics)", "rtdetr-l.yaml", "ultralytics", 640))
PROOF_BUILDERS = {"samples": build_sample, "timm": build_timm, "ultralytics": build_rtdetr}
PROVE_TARGET = 1.0  # prove / (capture + rewrite), both phases of the report


@contextlib.contextmanager
def _proof_variant(whole_maps: bool):
    """``whole_maps`` proves as before windows existed (every region on whole maps)."""
    real_windows = local_proofs.windows
    if whole_maps:
        local_proofs.windows = lambda *args: None
    try:
        yield
    finally:
        local_proofs.windows = real_windows


def _proof_run(model: nn.Module, x: torch.Tensor, whole_maps: bool) -> tuple[float, float, tuple]:
    """(prove s, capture + rewrite s, what was proven and refused); "prove" is its own phase, outside "rewrite"."""
    gc.collect()
    with _proof_variant(whole_maps):
        report = repfx.reparameterize(model, (x,)).repfx_report
    rest = report.seconds["capture"] + report.seconds["rewrite"]
    proofs = report.local_proofs
    return report.seconds.get("prove", 0.0), rest, (proofs.regions_proven, proofs.regions_failed,
                                           tuple(map(str, report.refusals)))


def _proof_model(source: str, name: str) -> nn.Module | str:
    """The model, or the one-line reason it is skipped (its library does not import)."""
    if source == "timm" and timm is None:
        return "timm is not installed"
    try:
        return PROOF_BUILDERS[source](name)
    except ImportError as error:  # ultralytics is no dependency of repfx, not even a test extra
        return f"{source} does not import ({error})"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def bench_proofs(runs: int) -> tuple[list[str], bool | None]:
    rows, skipped, ok = [], [], True
    for label, name, source, size in PROOF_MODELS:
        model = _proof_model(source, name)
        if isinstance(model, str):
            skipped.append(f"    {label} skipped: {model}.")
            continue
        x = seeded_randn(1, 3, size, size, seed=1)
        _proof_run(model, x, False)  # warm-up: torch.export's first call
        times: dict[bool, list[tuple]] = {True: [], False: []}
        for index in range(runs):
            for whole in ((True, False) if index % 2 == 0 else (False, True)):
                times[whole].append(_proof_run(model, x, whole))
        same = len({outcome for runs_ in times.values() for *_, outcome in runs_}) == 1
        before, after = ([t[0] for t in times[w]] for w in (True, False))
        rest = [t[1] for t in times[False]]
        ratio = [p / r for p, r, _ in times[False]]
        speedup = [b / a for b, a in zip(before, after)]
        passed = statistics.median(ratio) <= PROVE_TARGET and same
        ok &= passed
        regions = times[False][0][2]
        rows.append([f"{label} {size}x{size}", _spread(before), _spread(after), _spread(speedup), _spread(rest),
                     _spread([b / r for (b, r, _) in times[True]]), _spread(ratio),
                     f"{regions[0]}/{regions[1]}/{len(regions[2])}", "yes" if same else "NO",
                     verdict(passed)])
    header = ["model", "prove s before", "after", "before/after", "capture+rewrite s", "prove/rest before",
              "after", "proven/failed/refusals", "same", "target"]
    out = [table(header, rows, f"(d) float64 local proofs, batch 1, {torch.get_num_threads()} threads: "
                               f"median [min-max] of {runs} interleaved runs per variant "
                               f"(target prove/rest <= {PROVE_TARGET:g} after, same regions and refusals)")]
    out.append("    before = whole maps (repfx.verify.windows switched off); after = windows; rest = capture + "
               "rewrite (the after runs); \"same\": every run proved and refused the same regions.")
    return out + skipped, ok


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced smoke-test version (fewer repetitions)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    print_environment(args.quick, getattr(timm, "__version__", "not installed"),
                      f". If another process is running, {torch.get_num_threads()} OpenMP threads stall and "
                      "timings can be far off (compare the 1-thread row of (a)).")

    results: dict[str, bool | None] = {}
    parts = {
        "a": ("reparameterize <= 3 s", lambda: bench_reparam_time(runs=1 if args.quick else 5)),
        "b": ("rewrite scaling <= 5x", lambda: bench_rewrite_scaling((10, 40) if args.quick else (40, 160),
                                                                     runs=1 if args.quick else 5)),
        "c": ("latency repfx <= timm deploy", lambda: bench_latency((1, 8), *((1, 3) if args.quick else (5, 20)))),
        "d": ("prove <= capture + rewrite", lambda: bench_proofs(runs=1 if args.quick else 3)),
    }
    for key, (label, run) in parts.items():
        if key in skip:
            continue
        lines, ok = run()
        results[label] = ok
        print("\n".join(lines), end="\n\n", flush=True)
    print("summary: " + "; ".join(f"{label} {'n/a' if ok is None else verdict(ok)}"
                                  for label, ok in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
