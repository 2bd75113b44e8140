"""Models tried: repfx on model code nobody here wrote, one row each (ops before/after, error, time).

    python bench/model_zoo.py                 # timm families, torchvision classifiers and detectors, samples
    python bench/model_zoo.py --only fastvit  # rows whose name contains the text
    python bench/model_zoo.py --only written  # blocks written the way their repositories write them
    python bench/model_zoo.py --quick         # three small models

Each model is built with random weights (no hub access), every BatchNorm randomized,
seeded, in eval mode, and re-parameterized with the defaults (``cost="latency"`` for
this CPU, per-region float64 proofs, end-to-end check). A row shows executed ops of the
model as given and of the result (convolutions, BatchNorms, total), the worst relative
error against the model as given, the wall time of ``repfx.reparameterize``, and how it
was captured (whole, or folded in parts: a detector's NMS cannot be exported). A
difference repfx accepted with a note (every region proven, discontinuous ops such as
NMS on tied random-weight scores after them) is marked so and not counted as a failure. A model
repfx cannot take is a row with its one-line error. Exit status 0 unless some result
disagrees with its model (a benchmark of a wrong model is worthless).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import repfx
from _tables import print_environment, table  # bench/ is on sys.path when a script runs
from repfx.pipeline import report_of
from repfx.samples import build_sample, randomize_bn_, sample_input_shape

TIMM = ("repvgg_a0", "repvgg_b0", "mobileone_s0", "fastvit_t8", "fastvit_sa12", "repghostnet_050", "repvit_m0_9",
        "levit_128s", "efficientvit_m0", "nextvit_small", "regnetx_002", "resnet18", "convnext_atto",
        "mobilenetv3_small_050", "ghostnetv2_100", "hgnetv2_b0", "rexnet_100", "efficientnet_b0")
TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5")
DETECTORS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large")
SAMPLES = ("dbb_net", "acb_net", "replknet_block")
# blocks written the way the original repositories write them (repfx.samples.ecbsr / .vanillanet)
WRITTEN_LIKE = {"ECBSR-style/ecbsr_net (eval: kernel computed in forward)": ("ecbsr", "ECBSRNet", (1, 3, 32, 32)),
                "VanillaNet-style/vanillanet_small (leaky_relu slope 1)": ("vanillanet", "VanillaNetSmall",
                                                                        (1, 3, 64, 64))}
QUICK = ("timm/repvgg_a0", "timm/mobileone_s0", "sample/dbb_net")
# Blocks written the way RepNeXt, ACNet (padding < k // 2: crops), Inception, MobileOne (SE), VanillaNet and RepMLP write
# theirs: the tests' own (tests/spatial_blocks.py), class name and input shape.
WRITTEN = {"RepNeXt-style": ("RepNeXtBlock", (1, 16, 56, 56)), "ACNet crop": ("ACBlockCrop", (1, 8, 56, 56)),
           "Inception 1x7->7x1": ("FactorizedConv", (1, 16, 17, 17)), "MobileOne SE": ("MobileOneSE", (1, 32, 20, 20)),
           "VanillaNet dw7x7+1x1": ("VanillaBlock", (1, 32, 28, 28)), "RepMLP-style": ("RepMLPUnit", (1, 8, 28, 28))}
# Channels-last FFNs written the way UniRepLKNet and ConvNeXt V2 write theirs (tests/channels_last_blocks.py).
WRITTEN_CHANNELS_LAST = {"UniRepLKNet-style block": ("UniRepLKNetBlock", (1, 16, 28, 28)),
                         "UniRepLKNet-style small net": ("UniRepLKNetSmall", (1, 3, 112, 112)),
                         "ConvNeXt-V2 GRN block": ("ConvNeXtV2Block", (1, 16, 28, 28))}


def catalogue() -> dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]]:
    """name -> (builder, input shape); families whose library is missing are left out (said in the header)."""
    models = {f"sample/{name}": (lambda name=name: build_sample(name), sample_input_shape(name)) for name in SAMPLES}
    models |= {name: (lambda module=module, cls=cls: getattr(importlib.import_module(f"repfx.samples.{module}"), cls)(),
                      shape) for name, (module, cls, shape) in WRITTEN_LIKE.items()}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import channels_last_blocks
    import spatial_blocks
    models |= {f"written/{name}": (getattr(spatial_blocks, block), shape) for name, (block, shape) in WRITTEN.items()}
    models |= {f"written/{name}": (getattr(channels_last_blocks, block), shape)
               for name, (block, shape) in WRITTEN_CHANNELS_LAST.items()}
    try:
        import timm
        models |= {f"timm/{name}": (lambda name=name: timm.create_model(name, pretrained=False), (1, 3, 224, 224))
                   for name in TIMM}
    except ImportError:
        print("timm is not installed: no timm rows")
    try:
        from torchvision import models as tv
        models |= {f"torchvision/{name}": (lambda name=name: tv.get_model(name, weights=None), (1, 3, 224, 224))
                   for name in TORCHVISION}
        models |= {f"torchvision/{name}": (lambda name=name: tv.get_model(name, weights=None, weights_backbone=None),
                                           (1, 3, 320, 320)) for name in DETECTORS}
    except ImportError:
        print("torchvision is not installed: no torchvision rows")
    return models


def executed(report, when: str, kind: str) -> str:
    return str(getattr(report, f"ops_{when}").get(kind, "-"))


def run(name: str, build: Callable[[], torch.nn.Module], shape: tuple[int, ...]) -> tuple[list[str], bool]:
    torch.manual_seed(0)
    model = randomize_bn_(build(), 0).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the folded-in-parts warning: the row says it
            result = repfx.reparameterize(model, [x] if "rcnn" in name or "ssd" in name else (x,))
    except Exception as error:  # noqa: BLE001  a row per model, whatever stops it
        return [name, "-", "-", "-", "-", f"{time.perf_counter() - start:.1f}",
                f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"], True
    seconds = time.perf_counter() - start
    report = report_of(result)
    how = f"in parts ({len(report.parts)} folded)" if report.capture_blocker else "whole"
    error = report.max_rel_error
    agrees = error is not None and (error <= 1e-3 or report.verification_note is not None)
    if report.verification_note:  # every region proven; the difference is explained (nms on tied scores)
        how += "; difference accepted with a note (every region proven)"
    return [name, f"{executed(report, 'before', 'convolution')}->{executed(report, 'after', 'convolution')}",
            f"{executed(report, 'before', 'batch_norm')}->{executed(report, 'after', 'batch_norm')}",
            f"{executed(report, 'before', 'total')}->{executed(report, 'after', 'total')}",
            "-" if error is None else f"{error:.1e}", f"{seconds:.1f}", how], agrees


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="rows whose name contains this text")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    args = parser.parse_args()
    print_environment(args.quick, "-", "; times are wall times on a busy machine")
    models = catalogue()
    names = [name for name in (QUICK if args.quick else models) if args.only in name and name in models]
    rows, failed = [], False
    for name in names:
        row, agrees = run(name, *models[name])
        rows.append(row)
        failed |= not agrees and row[4] != "-"
        print(f"  done: {name}", flush=True)
    print(table(["model", "conv", "BN", "ops", "rel. error", "seconds", "captured"], rows,
                "repfx.reparameterize on model code nobody here wrote (executed ops before -> after)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
