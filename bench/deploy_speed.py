"""Deployed latency: training form vs repfx's plain form vs timm's own converter, per runtime.

    python bench/deploy_speed.py                    # full run (tens of minutes on 2 CPU cores)
    python bench/deploy_speed.py --quick            # RepVGG-A0 + MobileOne-S0, batch 1, fewer repetitions
    python bench/deploy_speed.py --skip-compile     # no torch.compile rows (inductor builds take minutes)

Re-parameterization pays off only if the runtime people deploy with cannot do the
same merge on its own. So each model runs in three forms in the same runtime:

- training: timm's model in eval() with randomized BatchNorm statistics (no BN is an
  identity, so a wrong fold cannot hide), exactly as trained;
- timm-deploy: ``timm.utils.reparameterize_model`` of the same model, the hand-written
  per-block converter that repfx must match without per-block code;
- repfx: ``repfx.reparameterize`` (eager) or ``repfx.compile(backend=...)``.

Runtimes on the CPU: eager PyTorch, torch.compile (inductor) and ONNX Runtime
(ORT_ENABLE_ALL). The training and timm-deploy forms are lowered through the same
path repfx uses (``torch.compile``; ``export_program`` + ``compile_onnx``), so a row
compares models, not exporters. With a CUDA device: batch 128 eager in fp32 and fp16;
with torch-tensorrt as well: TensorRT on each form. Where they cannot run the section
says why.

Latency is ``repfx.targets.clock.median_latency_ms`` (inference_mode, warm-up, median)
taken in rounds that cycle through the three forms, and the median over rounds is
reported, so load drift on a shared machine hits every form alike. Every form's
first output is compared with the training form's eager fp32 output (max |diff| /
max |output|): a benchmark of a wrong model is worthless, so a disagreement or an
exception makes the exit status 1. Performance verdicts never do.

Targets: (1) ONNX Runtime, MobileOne-S0, batch 1: repfx >= 3x faster than the
training form; (2) every model, batch and runtime: repfx within 5% of timm's
converter (repfx ms <= 1.05 x timm ms); (3) TensorRT: repfx >= 1.3x faster than
torch-tensorrt on the training form; (4) every output agrees.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import timm
import torch
from torch import nn

import repfx
from _tables import print_environment, table, verdict  # bench/ is on sys.path when a script runs
from repfx.backends import probe_onnxruntime, probe_torch_tensorrt
from repfx.backends.onnx import compile_onnx
from repfx.backends.program import export_program
from repfx.targets.clock import median_latency_ms
from repfx.samples import randomize_bn_

# The last three hold contested merges (exact merges that add MACs: each family's stride-2 dwkxk -> 1x1):
# there repfx's cost rule decides; the per-block converters never merge them.
MODELS = {"repvgg_a0": "RepVGG-A0", "repvgg_b0": "RepVGG-B0", "mobileone_s0": "MobileOne-S0",
          "fastvit_t8": "FastViT-T8", "repvit_m0_9": "RepViT-M0.9", "repghostnet_050": "RepGhostNet-0.5"}
QUICK_MODELS = ("repvgg_a0", "mobileone_s0")
FORMS = ("training", "timm", "repfx")
INPUT_SHAPE = (3, 224, 224)

ORT_SPEEDUP_TARGET = 3.0  # (1) training / repfx, ONNX Runtime, MobileOne-S0, batch 1
TIMM_RATIO_TARGET = 1.05  # (2) repfx / timm-deploy, everywhere
TENSORRT_SPEEDUP_TARGET = 1.3  # (3) torch-tensorrt(training) / repfx TensorRT

Factories = dict[str, Callable[[], Callable]]


# ----------------------------------------------------------------------------- results

@dataclass
class Row:
    """One model at one batch in one runtime; ``error`` is set instead of timings when it raised."""

    runtime: str
    model: str
    batch: int
    ms: dict[str, float] = field(default_factory=dict)
    rel_err: dict[str, float] = field(default_factory=dict)  # vs training form, eager fp32 CPU
    first_call_s: dict[str, float] = field(default_factory=dict)  # build + first call (compiles lazily)
    tolerance: float = 0.0
    error: str | None = None

    @property
    def speedup(self) -> float:
        return self.ms["training"] / self.ms["repfx"]

    @property
    def timm_ratio(self) -> float:
        return self.ms["repfx"] / self.ms["timm"]

    @property
    def agrees(self) -> bool:
        return self.error is None and all(e <= self.tolerance for e in self.rel_err.values())


@dataclass
class Section:
    """One runtime's table, or the reason it was not run."""

    runtime: str
    title: str
    rows: list[Row] = field(default_factory=list)
    skipped: str | None = None


# ----------------------------------------------------------------------------- models

def seeded_input(batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, *INPUT_SHAPE), generator=torch.Generator().manual_seed(seed))


def training_form(name: str, seed: int = 0) -> nn.Module:
    """timm's model in eval(), BN randomized: fresh BNs are identities and would flatter every form."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    randomize_bn_(model, seed)
    return model.eval()


def timm_deploy(model: nn.Module) -> nn.Module:
    """timm's own converter on a copy, so it starts from the very weights repfx folds."""
    return timm.utils.reparameterize_model(copy.deepcopy(model)).eval()


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """max |diff| / max |reference|: randomized BN drives MobileOne's logits to ~1e12."""
    reference, output = reference.detach().cpu().double(), output.detach().cpu().double()
    return (reference - output).abs().max().item() / max(reference.abs().max().item(), 1e-30)


# ----------------------------------------------------------------------------- runtimes
# Each returns a zero-argument factory per form, so building (and compiling) is timed apart.

def eager_forms(model: nn.Module, deploy: nn.Module, x: torch.Tensor, threads: int) -> Factories:
    """The plain GraphModule itself: what eager users of repfx run."""
    return {"training": lambda: model, "timm": lambda: deploy,
            "repfx": lambda: repfx.reparameterize(model, (x,))}


def inductor_forms(model: nn.Module, deploy: nn.Module, x: torch.Tensor, threads: int) -> Factories:
    """Static shapes everywhere: ``dynamic=False`` keeps dynamo from going dynamic when the training
    and deploy forms (the same ByobNet.forward code object) recompile; repfx's graph compiles once."""
    torch._dynamo.reset()
    return {"training": lambda: torch.compile(model, dynamic=False),
            "timm": lambda: torch.compile(deploy, dynamic=False),
            "repfx": lambda: repfx.compile(model, (x,), backend="inductor", verify=True)}


def onnx_forms(model: nn.Module, deploy: nn.Module, x: torch.Tensor, threads: int) -> Factories:
    """All three exported the way repfx exports: torch.export -> torch.onnx (dynamo) -> one ORT session."""
    return {"training": lambda: compile_onnx(export_program(model, (x,)), threads=threads),
            "timm": lambda: compile_onnx(export_program(deploy, (x,)), threads=threads),
            "repfx": lambda: repfx.compile(model, (x,), backend="onnx", verify=True, threads=threads)}


def cuda_eager_forms(dtype: torch.dtype, device: str = "cuda") -> Callable[..., Factories]:
    """Folding stays on the CPU in fp32/fp64 (exact, no TF32); the plain graph is then cast and moved,
    as ``repfx.compile(backend="eager", precision=...)`` casts it. Batch 1 with a symbolic batch
    keeps the CPU-side verification cheap; eager runs any batch at the same speed."""
    def forms(model: nn.Module, deploy: nn.Module, x: torch.Tensor, threads: int) -> Factories:
        def on_device(module: nn.Module) -> nn.Module:
            return copy.deepcopy(module).to(device=device, dtype=dtype)

        def plain() -> nn.Module:
            return repfx.reparameterize(model, (x[:1],), dynamic_batch=True).to(device=device, dtype=dtype)

        return {"training": lambda: on_device(model), "timm": lambda: on_device(deploy), "repfx": plain}

    return forms


def tensorrt_forms(model: nn.Module, deploy: nn.Module, x: torch.Tensor, threads: int) -> Factories:
    """torch-tensorrt fuses conv+BN itself but cannot merge branches; repfx hands it the merged graph."""
    import torch_tensorrt  # only here: importing it without TensorRT's libraries fails (see skip_reason)

    def trt(module: nn.Module) -> Callable:
        x_cuda = x.cuda()
        return torch_tensorrt.compile(copy.deepcopy(module).cuda(), ir="dynamo", inputs=[x_cuda])

    # repfx.compile verifies against the CPU example itself and moves inputs to CUDA; the timed input is there.
    return {"training": lambda: trt(model), "timm": lambda: trt(deploy),
            "repfx": lambda: repfx.compile(model, (x,), backend="tensorrt", verify=True)}


@dataclass(frozen=True)
class Runtime:
    key: str
    title: str
    forms: Callable[..., Factories]
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    tolerance: float = 1e-4  # fp32 reassociation ~1e-6; a wrong fold is >> 1e-3


def cpu_runtimes(threads: int) -> list[Runtime]:
    ort = probe_onnxruntime()
    return [Runtime("eager", f"eager PyTorch, CPU, {threads} threads", eager_forms),
            Runtime("inductor", f"torch.compile (inductor), CPU, {threads} threads", inductor_forms),
            Runtime("onnx", f"ONNX Runtime ORT_ENABLE_ALL, {threads} intra-op threads ({ort.reason})", onnx_forms)]


def gpu_runtimes() -> list[Runtime]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    # TF32 convolutions (PyTorch's and TensorRT's default) and fp16 round far above 1e-4.
    return [Runtime("cuda-fp32", f"eager PyTorch, CUDA fp32 ({name})", cuda_eager_forms(torch.float32),
                    "cuda", torch.float32, 1e-2),
            Runtime("cuda-fp16", f"eager PyTorch, CUDA fp16 ({name})", cuda_eager_forms(torch.float16),
                    "cuda", torch.float16, 3e-2),
            Runtime("tensorrt", f"TensorRT via torch-tensorrt, fp32 ({name})", tensorrt_forms,
                    "cuda", torch.float32, 1e-2)]


def skip_reason(runtime: Runtime, args: argparse.Namespace) -> str | None:
    """Why ``runtime`` cannot or should not run here; None when it runs."""
    if runtime.key == "inductor" and args.skip_compile:
        return "--skip-compile"
    if runtime.key == "onnx" and not probe_onnxruntime().usable:
        return probe_onnxruntime().reason
    if runtime.key == "tensorrt" and not probe_torch_tensorrt().usable:
        return probe_torch_tensorrt().reason  # names the missing piece: the package, its libraries or the GPU
    if runtime.device == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA device)"
    return None


# ----------------------------------------------------------------------------- measuring

def build_and_check(factories: Factories, x: torch.Tensor, reference: torch.Tensor,
                    row: Row) -> dict[str, Callable]:
    """Build each form and compare its first output with the reference (compiling forms build here)."""
    runners = {}
    for form, factory in factories.items():
        gc.collect()
        start = time.perf_counter()
        runner = factory()
        with torch.inference_mode():
            output = runner(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        row.first_call_s[form] = time.perf_counter() - start
        row.rel_err[form] = relative_error(reference, output)
        runners[form] = runner
    return runners


def interleaved_latency(runners: dict[str, Callable], x: torch.Tensor, *, rounds: int, warmup: int,
                        repeat: int) -> dict[str, float]:
    """Median over rounds of each form's median: every round visits every form, so drift is shared."""
    per_round: dict[str, list[float]] = {form: [] for form in runners}
    for _ in range(rounds):
        for form, runner in runners.items():
            gc.collect()  # no collection of the previous form's garbage inside a timed call
            per_round[form].append(median_latency_ms(runner, (x,), warmup=warmup, repeat=repeat))
    return {form: statistics.median(times) for form, times in per_round.items()}


def release(runtime: Runtime) -> None:
    """Drop what the last row left behind, so it neither holds memory nor guards the next compile."""
    gc.collect()
    if runtime.key == "inductor":
        torch._dynamo.reset()
    if runtime.device == "cuda":
        torch.cuda.empty_cache()


def measure(runtime: Runtime, name: str, model: nn.Module, deploy: nn.Module, batch: int,
            reference: torch.Tensor, args: argparse.Namespace) -> Row:
    """One table row; an exception is printed whole (it is a finding) and recorded, not re-raised."""
    row = Row(runtime.key, name, batch, tolerance=runtime.tolerance)
    x_cpu = seeded_input(batch, seed=batch)
    x = x_cpu.to(device=runtime.device, dtype=runtime.dtype)
    try:
        runners = build_and_check(runtime.forms(model, deploy, x_cpu, args.threads), x, reference, row)
        row.ms = interleaved_latency(runners, x, rounds=args.rounds, warmup=args.warmup, repeat=args.repeat)
    except Exception as error:
        print(f"\n[{runtime.key}] {name} batch {batch} raised:\n{traceback.format_exc()}", file=sys.stderr)
        row.error = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
    finally:
        runners = None  # compiled forms, ORT sessions and CUDA copies go before the next row builds
        release(runtime)
    progress = ", ".join(f"{f} {row.ms[f]:.2f} ms (first call {row.first_call_s[f]:.1f} s)" for f in row.ms)
    print(f"[{runtime.key}] {name} batch {batch}: {row.error or progress}", file=sys.stderr, flush=True)
    return row


def reference_output(model: nn.Module, batch: int) -> torch.Tensor:
    """The training form's eager fp32 CPU output: the answer every form must reproduce."""
    with torch.inference_mode():
        return model(seeded_input(batch, seed=batch))


def run_model(name: str, plan: list[tuple[Runtime, tuple[int, ...]]], sections: dict[str, Section],
              args: argparse.Namespace) -> None:
    """All runtimes of one model back to back in this process, so its ratios share one machine state."""
    model = training_form(name, seed=args.seed)
    deploy = timm_deploy(model)
    for batch in sorted({b for _, batches in plan for b in batches}):
        reference = reference_output(model, batch)
        for runtime, batches in plan:
            if batch in batches:
                sections[runtime.key].rows.append(measure(runtime, name, model, deploy, batch, reference, args))


# ----------------------------------------------------------------------------- printing

def format_row(row: Row) -> list[str]:
    label = [MODELS[row.model], str(row.batch)]
    if row.error is not None:
        return label + ["error", "-", "-", "-", "-", row.error]
    errors = "/".join(f"{row.rel_err[f]:.0e}" for f in FORMS)
    return label + [f"{row.ms['training']:.2f}", f"{row.ms['timm']:.2f}", f"{row.ms['repfx']:.2f}",
                    f"{row.speedup:.2f}x", f"{row.timm_ratio:.3f}",
                    errors + ("" if row.agrees else f"  WRONG (> {row.tolerance:.0e})")]


def format_section(section: Section, args: argparse.Namespace) -> str:
    if section.skipped is not None:
        return f"{section.title}\n  skipped: {section.skipped}"
    header = ["model", "batch", "training ms", "timm-deploy ms", "repfx ms", "training/repfx", "repfx/timm",
              "rel err training/timm/repfx"]
    title = (f"{section.title}; median of {args.rounds} rounds x median of {args.repeat} runs "
             f"after {args.warmup} warm-up, inference_mode")
    first_calls = [f"    first call (build + compile + check), s: {MODELS[r.model]} b{r.batch} "
                   + " / ".join(f"{r.first_call_s[f]:.1f}" for f in FORMS if f in r.first_call_s)
                   for r in section.rows if r.first_call_s]
    return "\n".join([table(header, [format_row(r) for r in section.rows], title), *first_calls])


# ----------------------------------------------------------------------------- targets

def ort_target(sections: dict[str, Section]) -> tuple[str, bool | None, str]:
    label = f"(1) ONNX Runtime MobileOne-S0 b1: training/repfx >= {ORT_SPEEDUP_TARGET:g}x"
    rows = [r for r in sections["onnx"].rows if r.model == "mobileone_s0" and r.batch == 1 and r.ms]
    if not rows:
        return label, None, sections["onnx"].skipped or "not measured (MobileOne-S0 at batch 1 not run or failed)"
    return label, rows[0].speedup >= ORT_SPEEDUP_TARGET, f"{rows[0].speedup:.2f}x"


def timm_target(sections: dict[str, Section]) -> tuple[str, bool | None, str]:
    label = f"(2) every model/batch/runtime: repfx ms <= {TIMM_RATIO_TARGET:g} x timm-deploy ms"
    rows = [r for s in sections.values() for r in s.rows if r.ms]
    if not rows:
        return label, None, "nothing measured"
    worst = max(rows, key=lambda r: r.timm_ratio)
    failing = [f"{r.runtime} {MODELS[r.model]} b{r.batch} {r.timm_ratio:.3f}"
               for r in rows if r.timm_ratio > TIMM_RATIO_TARGET]
    detail = (f"{len(rows) - len(failing)}/{len(rows)} rows; worst {worst.runtime} {MODELS[worst.model]} "
              f"b{worst.batch} {worst.timm_ratio:.3f}")
    return label, not failing, detail + (f"; over: {', '.join(failing)}" if failing else "")


def tensorrt_target(sections: dict[str, Section]) -> tuple[str, bool | None, str]:
    label = f"(3) TensorRT: torch-tensorrt(training)/repfx >= {TENSORRT_SPEEDUP_TARGET:g}x"
    section = sections["tensorrt"]
    rows = [r for r in section.rows if r.ms]
    if not rows:
        return label, None, f"skipped: {section.skipped}" if section.skipped else "nothing measured"
    detail = ", ".join(f"{MODELS[r.model]} b{r.batch} {r.speedup:.2f}x" for r in rows)
    return label, all(r.speedup >= TENSORRT_SPEEDUP_TARGET for r in rows), detail


def agreement_target(sections: dict[str, Section]) -> tuple[str, bool | None, str]:
    label = "(4) every form's output agrees with the training form, and nothing raised"
    rows = [r for s in sections.values() for r in s.rows]
    bad = [f"{r.runtime} {MODELS[r.model]} b{r.batch}" for r in rows if not r.agrees]
    worst = max((r.rel_err.get("repfx", 0.0) for r in rows if r.runtime in ("eager", "inductor", "onnx")),
                default=0.0)
    detail = f"{len(rows) - len(bad)}/{len(rows)} rows; worst repfx rel err on CPU {worst:.1e}"
    return label, not bad, detail + (f"; WRONG or raised: {', '.join(bad)}" if bad else "")


def format_targets(results: list[tuple[str, bool | None, str]]) -> str:
    width = max(len(label) for label, _, _ in results)
    return "\n".join(["targets:"] + [f"  {label:<{width}}  {'n/a ' if ok is None else verdict(ok)}  {detail}"
                                     for label, ok, detail in results])


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="RepVGG-A0 + MobileOne-S0 at batch 1, 2 rounds: a smoke test, not a measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile (inductor) table")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--batches", default=None, help="comma-separated CPU batch sizes (default 1,8)")
    parser.add_argument("--gpu-batch", type=int, default=128, help="batch of the CUDA rows (default 128)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per form (default 5, quick 2)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per round (default 5, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per round (default 1, quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="weights and BN statistics seed (default 0)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows and verdicts here")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else MODELS)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    args.batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ((1,) if args.quick else (1, 8))
    for name, full, quick in (("rounds", 5, 2), ("repeat", 5, 5), ("warmup", 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def write_json(path: str, sections: dict[str, Section], targets: list[tuple[str, bool | None, str]],
               args: argparse.Namespace) -> None:
    rows = [asdict(r) | ({"speedup": r.speedup, "repfx_over_timm": r.timm_ratio} if r.ms else {})
            for s in sections.values() for r in s.rows]
    payload = {"torch": torch.__version__, "timm": timm.__version__, "repfx": repfx.__version__,
               "threads": args.threads, "rounds": args.rounds, "repeat": args.repeat, "warmup": args.warmup,
               "titles": {k: s.title for k, s in sections.items()},
               "skipped": {k: s.skipped for k, s in sections.items() if s.skipped},
               "rows": rows, "targets": [{"target": t, "pass": ok, "detail": d} for t, ok, d in targets]}
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    print_environment(args.quick, timm.__version__,
                      f": another process is running and {args.threads}-thread timings can be far off; "
                      "trust ratios within a row more than absolute ms.")
    start = time.perf_counter()

    runtimes = cpu_runtimes(args.threads) + gpu_runtimes()
    sections = {rt.key: Section(rt.key, rt.title, skipped=skip_reason(rt, args)) for rt in runtimes}
    plan = [(rt, (args.gpu_batch,) if rt.device == "cuda" else args.batches)
            for rt in runtimes if sections[rt.key].skipped is None]
    for name in args.models:
        run_model(name, plan, sections, args)

    for section in sections.values():
        print(format_section(section, args), end="\n\n")
    targets = [ort_target(sections), timm_target(sections), tensorrt_target(sections), agreement_target(sections)]
    print(format_targets(targets))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, sections, targets, args)
    return 0 if targets[-1][1] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
