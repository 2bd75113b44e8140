"""All-or-nothing writes into directories repfx shares with the user: one ``Transaction``.

``repfx.export``'s output directory and a Triton model repository are written the same
way, and when one run writes both they succeed or fail together:

1. **claim** every path the run will write, before any heavy work. A claim is refused
   (``Refused``, one line naming the path and what to do) when the path is the input
   model, a directory is in the way, or something exists there that its ``may_replace``
   rule does not accept: repfx only replaces files it can show it wrote. Claiming
   creates the destination directory if needed and a private hidden staging directory
   in it, which proves the destination writable.
2. **stage**: the artifacts are written into the staging directories.
3. **commit**: every claim is checked again (things change while a model is being
   rewritten), then each staged entry is renamed into place (``os.replace`` /
   ``os.rename``: atomic per entry, because staging sits on the destination's
   filesystem). A file being replaced is first renamed aside into the staging
   directory. If any step fails, or the run is interrupted, every entry already
   published is renamed back and every file set aside is restored: all destinations
   are exactly as they were.
4. **close**: the staging directories (and the files set aside) are removed, and so are
   the directories the transaction created when nothing was committed.

Nothing is ever deleted except repfx's own staging directories and, after a successful
commit, the earlier copies of files repfx wrote itself and has now replaced.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    may_replace: Rule
    is_directory: bool = False


@dataclass
class _Move:
    """Bookkeeping to undo one published claim."""

    claim: Claim
    set_aside: Path | None = None  # where the replaced target waits, inside the staging directory
    published: bool = False

    def undo_steps(self) -> list[tuple[Path, Path]]:
        """The renames that undo this move: the new entry back into staging, then the old one back in place."""
        steps = [(self.claim.target, self.claim.staged)] if self.published else []
        if self.set_aside is not None:
            steps.append((self.set_aside, self.claim.target))
        return steps


class Transaction:
    """Claims in several directories, published together by ``commit`` or not at all.

    Use as a context manager: leaving the block without ``commit`` (an error, Ctrl-C)
    removes everything staged and leaves every destination as it was.
    """

    def __init__(self, protected: Sequence[os.PathLike | str] = ()) -> None:
        self.protected = {Path(p).resolve() for p in protected}
        self.claims: list[Claim] = []
        self._areas: dict[Path, Path] = {}  # destination (resolved) -> its staging directory
        self._created: list[Path] = []  # directories this transaction made, outermost first
        self._committed = False
        self._keep_staging = False  # set when a rollback left a previous file in staging

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- claim ------------------------------------------------------------------------------------------------

    def claim_file(self, target: os.PathLike | str, may_replace: Rule = never) -> Claim:
        """Claim the file ``target``; write its content to ``claim.staged``. Refused now if it conflicts."""
        target = Path(target)
        claim = Claim(target, self._area(target.parent) / target.name, may_replace)
        return self._add(claim)

    def claim_directory(self, target: os.PathLike | str) -> Claim:
        """Claim a new directory ``target`` (it must not exist); fill ``claim.staged``, created now.

        Plain ``mkdir`` (not ``mkdtemp``'s 0700), so the umask sets the mode readers such as
        a Triton server get once it is in place.
        """
        target = Path(target)
        claim = Claim(target, self._area(target.parent) / target.name, never, is_directory=True)
        self._add(claim)
        os.mkdir(claim.staged)
        return claim

    def _add(self, claim: Claim) -> Claim:
        if any(claim.target == other.target for other in self.claims):
            raise ValueError(f"{claim.target} is claimed twice in one run (a bug in repfx: please report it)")
        self._check(claim)
        self.claims.append(claim)
        return claim

    def created(self, directory: os.PathLike | str) -> bool:
        """Whether this transaction made ``directory`` (it did not exist when the run started)."""
        return _key(Path(directory)) in {_key(path) for path in self._created}

    # --- check ------------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``Refused`` for the first claim that would now conflict; changes nothing."""
        for claim in self.claims:
            self._check(claim)
        self._check_overlaps()

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

    def _check_overlaps(self) -> None:
        """A new directory must not hold another output of the same run (e.g. --out inside a new Triton entry)."""
        new_dirs = [_key(claim.target) for claim in self.claims if claim.is_directory]
        others = [_key(claim.target) for claim in self.claims] + [_key(path) for path in self._created]
        for new_dir in new_dirs:
            for path in others:
                if new_dir in path.parents or (path == new_dir and others.count(path) > 1):
                    raise Refused(f"two outputs of this run overlap at {path} ({new_dir} is created as a whole): "
                                  "choose separate locations for the outputs")

    # --- commit -----------------------------------------------------------------------------------------------

    def commit(self) -> dict[str, Path]:
        """Publish every staged entry, or, if anything fails, none: returns target name -> target."""
        if self._committed:
            raise RuntimeError("this transaction was already committed")
        self.check()
        moves: list[_Move] = []
        try:
            for claim in self.claims:
                if not os.path.lexists(claim.staged):
                    continue  # a condition only, checked above
                self._check(claim)  # again, right before touching it
                moves.append(self._publish(claim))
        except BaseException:
            self._undo(moves)
            raise
        self._committed = True
        return {move.claim.target.name: move.claim.target for move in moves}

    def _publish(self, claim: Claim) -> _Move:
        """Rename ``claim`` into place; an existing target (which its rule accepted) is first renamed aside."""
        move = _Move(claim)
        try:
            with reported_as(claim.target):
                if os.path.lexists(claim.target):  # kept aside until the whole commit succeeded
                    aside = self._areas[_key(claim.target.parent)] / ".replaced"
                    aside.mkdir(exist_ok=True)
                    os.replace(claim.target, aside / claim.target.name)
                    move.set_aside = aside / claim.target.name
                if claim.is_directory:
                    os.rename(claim.staged, claim.target)
                else:
                    os.replace(claim.staged, claim.target)
        except BaseException:
            self._undo([move])
            raise
        move.published = True
        return move

    def _undo(self, moves: list[_Move]) -> None:
        """Rename published entries back into staging and restore what they replaced, newest first.

        Every step is tried even if one fails; a file that cannot be put back keeps its
        previous version in the staging directory, which is then kept (not deleted) and named.
        """
        stranded: list[Path] = []
        for move in reversed(moves):
            for source, destination in move.undo_steps():
                try:
                    os.replace(source, destination)
                except OSError:
                    stranded.append(move.claim.target)
        if stranded:
            self._keep_staging = True
            raise RollbackFailed(f"could not put {', '.join(map(str, stranded))} back after a failed write: "
                                 f"the previous files are in {', '.join(map(str, self._areas.values()))}")

    # --- close ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the staging directories; without a commit, also the directories this transaction created."""
        if self._keep_staging:
            return  # the only copy of a previous file may be in there (see _undo)
        for area in self._areas.values():
            shutil.rmtree(area, ignore_errors=True)
        self._areas.clear()
        if not self._committed:
            for directory in reversed(self._created):
                _remove_if_empty(directory)
        self._created.clear()

    # --- staging directories ----------------------------------------------------------------------------------

    def _area(self, destination: Path) -> Path:
        """The staging directory inside ``destination`` (created, with ``destination``, on first use)."""
        key = _key(destination)
        if key not in self._areas:
            self._make_directory(destination)
            try:
                self._areas[key] = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destination))
            except OSError as error:
                raise _naming(error, destination) from error
        return self._areas[key]

    def _make_directory(self, directory: Path) -> None:
        """``mkdir -p directory``, remembering what was created so that a failed run can remove it."""
        if directory.is_dir():
            return
        if os.path.lexists(directory):
            raise Refused(f"{directory} exists and is not a directory: choose another output directory")
        missing = [directory, *(p for p in directory.parents if not p.is_dir())]
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                if not path.is_dir():
                    raise Refused(f"{path} exists and is not a directory: choose another output directory") from None
                continue
            except OSError as error:
                raise _naming(error, path) from error
            self._created.append(path)


@contextmanager
def staged(destination: os.PathLike | str, protected: Sequence[os.PathLike | str] = ()) -> Iterator[DirectoryStage]:
    """A one-directory ``Transaction``: ``stage.file(name)`` to claim and write, ``stage.commit()`` to publish."""
    with Transaction(protected) as transaction:
        yield DirectoryStage(transaction, Path(destination))


@dataclass
class DirectoryStage:
    """Claims in one directory of a ``Transaction`` (files that may not replace anything by default)."""

    transaction: Transaction
    destination: Path

    def file(self, name: str, may_replace: Rule = never) -> Path:
        """Where to write ``name`` now; it lands in the destination on ``commit``."""
        return self.transaction.claim_file(self.destination / name, may_replace).staged

    def commit(self) -> dict[str, Path]:
        return self.transaction.commit()


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


def _key(directory: Path) -> Path:
    return Path(os.path.abspath(directory))


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (someone else wrote there) or already gone: either way, not ours to remove
