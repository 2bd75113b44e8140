"""repfx.passes: graph rewrites that re-parameterize training-form networks.

``kernels`` and ``forms`` are pure tensor algebra; ``linear_regions`` finds what can
be merged; ``emit`` and ``fold_linear_regions`` rewrite the graph.
"""

from repfx.passes.fold import AppliedRewrite, Candidate, PassResult, Prover, fold_linear_regions, run_to_fixed_point
from repfx.passes.algebra.forms import ConvForm, NotExact

__all__ = ["AppliedRewrite", "Candidate", "ConvForm", "NotExact", "PassResult", "Prover", "fold_linear_regions", "run_to_fixed_point"]
