"""Writing deploy artifacts all-or-nothing.

Every file is first written into a private staging directory next to its
destination and only moved into place (``os.replace``, atomic per file) once
every artifact of the run exists; a failure leaves the output directory as it
was. Destinations that are the user's input file are refused before anything
is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


class Staging:
    """Files written under ``.path`` and published into ``destination`` by ``commit``."""

    def __init__(self, destination: Path, protected: Sequence[os.PathLike] = ()) -> None:
        self.destination = destination
        self.protected = {Path(p).resolve() for p in protected}
        self.path = Path(tempfile.mkdtemp(prefix=".repfx-staging-", dir=destination))
        self.names: list[str] = []

    def file(self, name: str) -> Path:
        """Where to write ``name`` now; it lands in the destination on ``commit``."""
        target = (self.destination / name).resolve()
        if target in self.protected:
            raise ValueError(f"refusing to write {target}: it is the input model (choose another --out or name)")
        self.names.append(name)
        return self.path / name

    def commit(self) -> dict[str, Path]:
        published = {}
        for name in self.names:
            source = self.path / name
            if not source.exists():
                continue
            target = self.destination / name
            if target.is_dir() and source.is_dir():
                shutil.rmtree(target)
            os.replace(source, target)
            published[name] = target
        return published


@contextmanager
def staged(destination: os.PathLike, protected: Sequence[os.PathLike] = ()) -> Iterator[Staging]:
    """A ``Staging`` for ``destination`` (created if missing); removed whatever happens, committed by the caller."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"output directory {destination} exists and is not a directory")
    destination.mkdir(parents=True, exist_ok=True)
    staging = Staging(destination, protected)
    try:
        yield staging
    finally:
        shutil.rmtree(staging.path, ignore_errors=True)
