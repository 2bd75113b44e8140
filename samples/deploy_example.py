"""Example deploy script: training-form model in, fused exported program out.

A typical workflow: train the multi-branch model, then at deploy time let
repfx trace it, fuse every branch sum / conv-BN chain into single convs, and
hand the result to ``torch.export`` for whatever runtime comes next. The
model class needs no deploy method of its own.

Run from the repository root::

    python -m samples.deploy_example
"""

from __future__ import annotations

import torch

import repfx
from repfx.samples import build_sample, randomize_bn_, sample_input_shape


def main(name: str = "repvgg_a0") -> None:
    model = randomize_bn_(build_sample(name)).eval()
    example = (torch.randn(*sample_input_shape(name)),)

    gm = repfx.reparameterize(model, example)
    print(gm.repfx_report)  # what was fused, and how

    with torch.no_grad():
        max_err = (model(*example) - gm(*example)).abs().max().item()
    print(f"max |training form - fused| = {max_err:.3e}")

    exported = torch.export.export(gm, example)
    print(exported.graph_module.code)


if __name__ == "__main__":
    main()
