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
        """Move every staged file into place; on any failure, put the destination back as it was."""
        moves = [(self.path / name, self.destination / name) for name in self.names if (self.path / name).exists()]
        for _, target in moves:
            if target.is_dir():
                raise ValueError(f"cannot write {target}: a directory of that name is in the way")
        backups: list[tuple[Path, Path]] = []
        published: dict[str, Path] = {}
        try:
            for source, target in moves:
                if target.exists():
                    backup = self.path / f".previous-{target.name}"
                    os.replace(target, backup)
                    backups.append((backup, target))
                os.replace(source, target)
                published[target.name] = target
        except BaseException:
            restored = {target for _, target in backups}
            for target in published.values():
                if target not in restored:
                    target.unlink(missing_ok=True)
            for backup, target in backups:
                os.replace(backup, target)
            raise
        return published


@contextmanager
def staged(destination: os.PathLike, protected: Sequence[os.PathLike] = ()) -> Iterator[Staging]:
    """A ``Staging`` for ``destination`` (created if missing); removed whatever happens, committed by the caller."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"output directory {destination} exists and is not a directory")
    created = not destination.exists()
    destination.mkdir(parents=True, exist_ok=True)
    staging = Staging(destination, protected)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        if created and not any(destination.iterdir()):
            destination.rmdir()  # a failed run leaves no trace, not even the directory it made
        raise
    shutil.rmtree(staging.path, ignore_errors=True)
