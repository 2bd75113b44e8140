"""All-or-nothing writes into directories repfx shares with the user: one ``Transaction``.

``repfx.export``'s output directory and a Triton model repository are written the same
way, and when one run writes both they succeed or fail together:

1. **claim** every path the run will write, before any heavy work. A claim is refused
   (``Refused``, one line naming the path and what to do) when the path is the input
   model, a directory or link is in the way, or an existing file fails the claim's
   ``may_replace`` rule: repfx only replaces files it can show it wrote. Claiming creates
   the destination directory if needed and a hidden temporary directory beside the
   targets (same file system, so every move is one atomic rename); creating it proves
   the destination writable.
2. **stage**: the artifacts are written to the claims' ``staged`` paths.
3. **commit**: every claim is checked again (files change while a model is rewritten),
   then each staged entry is moved in with ``os.replace``, a file it replaces first
   moved aside into the temporary directory. Every move is logged before it is made; if
   any step fails or the run is interrupted, the log is undone backwards, so every
   destination is exactly as it was.
4. **close**: the temporary directories are removed, and so are the directories the
   transaction created when nothing was committed.

A Ctrl-C during commit or close is held until they end (``interrupts_held``): the run
is then either not committed (nothing is left) or committed whole (``published`` names
what is in place, complete), never in between, and no temporary directory is left.

Nothing is ever deleted but repfx's own temporary directories (after a commit, they
hold the earlier copies of files repfx wrote itself and has now replaced).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

STAGING_PREFIX = ".repfx-staging-"

# An existing target -> why it may not be replaced (None: it may). Rules read the file
# system each time they are called, so a commit-time check sees the current state.
Rule = Callable[[Path], "str | None"]


class Refused(ValueError):
    """A path repfx will not write; the message is one line naming it and what to do."""


class RollbackFailed(OSError):
    """A failed commit could not restore every destination; the message says where the previous files are."""


def never(target: Path) -> str:
    """The default rule: nothing that exists is replaced."""
    return f"{target} is in the way: it exists and repfx did not write it; move it away, or write somewhere else"


@dataclass
class Claim:
    """One path this run will publish: ``staged`` (written now) becomes ``target`` on commit.

    A claim with nothing staged publishes nothing but is still checked at commit: it
    states a condition (e.g. "this config.pbtxt is still one repfx may keep") the
    commit depends on.
    """

    target: Path
    staged: Path
    may_replace: Rule = never
    is_directory: bool = False


class Transaction:
    """Claims in several directories, published together by ``commit`` or not at all.

    Use as a context manager: leaving the block without ``commit`` (an error, Ctrl-C)
    removes everything staged and leaves every destination as it was.
    """

    def __init__(self, protected: Sequence[os.PathLike | str] = ()) -> None:
        self.protected = {Path(p).resolve() for p in protected}
        self.claims: list[Claim] = []
        self._staging: dict[Path, Path] = {}  # destination (absolute) -> its temporary directory
        self._created: list[Path] = []  # directories this transaction made, outermost first
        self._moves: list[tuple[Path, Path, Path]] = []  # (target, source, destination) of each commit move
        self._committed = False
        self.published: list[Path] = []  # what the commit put in place, in claim order
        self._keep_staging = False  # a rollback left a previous file in a temporary directory

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def claim_file(self, target: os.PathLike | str, may_replace: Rule = never) -> Claim:
        """Claim the file ``target``; write its content to ``claim.staged``. Refused now if it conflicts."""
        return self._claim(Claim(Path(target), self._staged_path(Path(target)), may_replace))

    def claim_directory(self, target: os.PathLike | str) -> Claim:
        """Claim a new directory ``target`` (it must not exist); fill ``claim.staged``, created now.

        Plain ``mkdir`` (not ``mkdtemp``'s 0700), so the umask sets the mode readers such as
        a Triton server get once it is in place.
        """
        claim = self._claim(Claim(Path(target), self._staged_path(Path(target)), never, is_directory=True))
        os.mkdir(claim.staged)
        return claim

    def _claim(self, claim: Claim) -> Claim:
        self._check(claim)
        self.claims.append(claim)
        return claim

    def created(self, directory: os.PathLike | str) -> bool:
        """Whether this transaction made ``directory`` (it did not exist when the run started)."""
        return os.path.abspath(directory) in map(os.path.abspath, self._created)

    def _check(self, claim: Claim) -> None:
        reason = self._refusal(claim)
        if reason:
            raise Refused(reason)

    def _refusal(self, claim: Claim) -> str | None:
        target = claim.target
        if target.resolve() in self.protected:
            return f"refusing to write {target}: it is the input model (choose another --out or name)"
        if not os.path.lexists(target):
            return None
        if claim.is_directory:
            return (f"{target} appeared while repfx was working (it did not exist when the run started): "
                    "nothing was written; run again")
        if target.is_symlink():
            return f"{target} is a symbolic link in the way: repfx replaces only files it wrote; move it away"
        if target.is_dir():
            return f"{target} is a directory in the way: move it away, or choose another output directory or name"
        return claim.may_replace(target)

    @property
    def committed(self) -> bool:
        """Whether ``commit`` succeeded: every entry in ``published`` is in place and complete."""
        return self._committed

    def commit(self) -> None:
        """Move every staged entry into place, or, if anything fails, none. A Ctrl-C meanwhile is raised after."""
        for claim in self.claims:  # all of them, before the first move
            self._check(claim)
        with interrupts_held():
            staged = [claim for claim in self.claims if os.path.lexists(claim.staged)]  # else a condition only
            try:
                for claim in staged:
                    self._publish(claim)
            except BaseException:
                self._roll_back()
                raise
            self.published = [claim.target for claim in staged]
            self._committed = True

    def _publish(self, claim: Claim) -> None:
        """Move ``claim`` into place; an existing target (which its rule accepted) is first moved aside."""
        self._check(claim)  # again, right before touching it
        with reported_as(claim.target):
            if os.path.lexists(claim.target):  # kept aside until the whole commit succeeded
                aside = claim.staged.parent / ".replaced"
                aside.mkdir(exist_ok=True)
                self._move(claim.target, claim.target, aside / claim.target.name)
            self._move(claim.target, claim.staged, claim.target)

    def _move(self, target: Path, source: Path, destination: Path) -> None:
        """``os.replace``, logged first: an interrupt right after the rename still finds it in the log."""
        self._moves.append((target, source, destination))
        os.replace(source, destination)

    def _roll_back(self) -> None:
        """Undo the commit's moves, newest first (a move that never happened left nothing at its destination).

        Every step is tried even if one fails; a file that cannot be put back keeps its
        previous version in the temporary directory, which is then kept (not deleted) and named.
        """
        stranded = []
        for target, source, destination in reversed(self._moves):
            try:
                if os.path.lexists(destination):
                    os.replace(destination, source)
            except OSError:
                stranded.append(str(target))
        self._moves.clear()
        if stranded:
            self._keep_staging = True
            raise RollbackFailed(f"could not put {', '.join(dict.fromkeys(stranded))} back after a failed write: "
                                 f"the previous files are in {', '.join(map(str, self._staging.values()))}")

    def close(self) -> None:
        """Remove the temporary directories; without a commit, also the directories this transaction created."""
        if self._keep_staging:
            return  # the only copy of a previous file may be in there (see _roll_back)
        with interrupts_held():
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()
        if not self._committed:
            for directory in reversed(self._created):
                with suppress(OSError):  # not empty (someone else wrote there) or gone: not ours to remove
                    directory.rmdir()
        self._created.clear()

    def _staged_path(self, target: Path) -> Path:
        """Where ``target`` is staged: the temporary directory beside it (created, with its folder, on first use)."""
        key = Path(os.path.abspath(target.parent))
        if key not in self._staging:
            self._make_directory(target.parent)
            with reported_as(target.parent):
                self._staging[key] = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
        return self._staging[key] / target.name

    def _make_directory(self, directory: Path) -> None:
        """``mkdir -p directory``, remembering what was created so that a failed run can remove it."""
        for path in reversed([directory, *(p for p in directory.parents if not p.is_dir())]):
            try:
                os.mkdir(path)
            except FileExistsError:
                if not path.is_dir():
                    raise Refused(f"{path} exists and is not a directory: choose another output directory") from None
                continue  # there already (or made meanwhile by someone else): not ours to remove
            except OSError as error:
                raise _naming(error, path) from error
            self._created.append(path)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """A Ctrl-C (SIGINT) inside the block is handed to the handler in place when the block ends, not inside it
    (Python's own raises ``KeyboardInterrupt`` then).

    Only in the main thread (the only one signals reach) and where a Python function
    handles SIGINT; ignored or left to the OS, it stays so.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if received:
            handler(signal.SIGINT, None)


def repfx_version() -> str:
    """The version repfx stamps on what it writes (so a reader can tell which release wrote it)."""
    from repfx import __version__  # imported here: the package imports this module while it initializes

    return __version__


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (artifacts can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def reported_as(path: Path) -> Iterator[None]:
    """OS errors inside the block name ``path`` (the place the user chose), not a staging path or none at all:
    a ``write()`` that fails for a full disk carries no file name."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise  # not an OS call's error (no errno, so no reason to restate)
        raise _naming(error, path) from error


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` as the same kind of OSError (errno kept), naming ``path``: the place the user chose."""
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))
