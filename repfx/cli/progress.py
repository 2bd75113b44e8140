"""Phase-by-phase progress on stderr: a spinner while a phase runs, a line with its time when it ends.

stdout stays clean for the report (``--report json`` pipes into ``jq``).
"""

from __future__ import annotations

import time

from rich.console import Console


class PhaseProgress:
    """Call with a phase name as each phase starts; ``close()`` ends the last one."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.phase: str | None = None
        self.started = 0.0
        self.status = None

    def __call__(self, phase: str) -> None:
        self.close()
        self.phase, self.started = phase, time.perf_counter()
        if self.enabled:
            self.status = self.console.status(f"{phase} ...")
            self.status.start()

    def close(self, failed: bool = False) -> None:
        if self.phase is None:
            return
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.enabled:
            mark = "[red]x[/red]" if failed else "[green]ok[/green]"
            self.console.print(f"{mark} {self.phase:<8} {time.perf_counter() - self.started:6.2f} s", highlight=False)
        self.phase = None
