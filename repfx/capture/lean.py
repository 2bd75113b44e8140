"""Capture without the work repfx never reads: per-node stack traces and code nobody runs.

Two things cost torch.export much of its time on small models, and no stage of repfx uses them:

* a Python stack trace, extracted and symbolized for every node it traces
  (``node.meta["stack_trace"]``: comments in ``print_readable``). repfx's capture errors
  name the user's line from the exception itself (``failure``: torch's "The following
  call raised this error", or the traceback), never from node metadata; the passes
  only carry the key over when it is there. MobileOne-S0: 0.3 s of 2.7 s (CPU time,
  one thread; RepVGG-A0: 0.08 of 0.7 s).
* Python source generated and compiled after each of torch.export's graph passes
  (runtime asserts, set_grad/autocast regions, placeholder names) for a graph module
  that is never run: the ExportedProgram is built from a fresh GraphModule around the
  same graph. With torch's lazy graph modules that source is written only if asked
  for, which it is not: 5 of the 11 code generations of a capture. MobileOne-S0: 0.15 s.

Both are turned off with torch's own switches (``torch.fx.config.do_not_emit_stack_traces``,
``torch.fx._lazy_graph_module._use_lazy_graph_module``), for the duration of a capture
only: the previous values come back on the way out, errors included, so the user's own
tracing is as they left it (those switches are process-wide, so a torch.fx trace run
meanwhile on another thread would be lean too). The graph captured is the same, node for
node (tests/capture/test_capture_speed.py); the program and graph handed on are plain
``GraphModule``s either way. With ``REPFX_TRACEBACK=1`` (torch's capture logs shown,
see ``failure``) stack traces are recorded as well, for debugging a capture.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    from torch.fx._lazy_graph_module import _use_lazy_graph_module
except ImportError:  # a torch without lazy graph modules: passes regenerate code as before
    _use_lazy_graph_module = None

_enabled = True  # for bench/reparam_speed.py only (``_as_torch_default``): False captures as torch does by default


@contextlib.contextmanager
def lean_tracing() -> Iterator[None]:
    """Trace without stack traces and with lazy code generation; torch's switches restored afterwards."""
    if not _enabled:
        yield  # the benchmark's "before": torch's defaults
        return
    with contextlib.ExitStack() as stack:
        if _use_lazy_graph_module is not None:
            stack.enter_context(_use_lazy_graph_module(True))
        if not os.environ.get("REPFX_TRACEBACK"):  # debugging a capture: keep where each node came from
            stack.enter_context(_no_stack_traces())
        yield


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """``do_not_emit_stack_traces`` set by hand: ``torch.fx.config`` is a plain module, without ``patch``."""
    config = torch.fx.config
    if not hasattr(config, "do_not_emit_stack_traces"):
        yield  # a torch without the switch records them as before
        return
    previous = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = previous


@contextlib.contextmanager
def _as_torch_default() -> Iterator[None]:
    """Captures inside run as torch.export runs by default: the benchmark's "before" (bench/reparam_speed.py)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous
