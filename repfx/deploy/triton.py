"""Add an exported artifact to a Triton Inference Server model repository, as a new version.

Triton loads a model from ``REPO/NAME/VERSION/model.plan`` (TensorRT) or
``model.onnx`` (ONNX Runtime) next to ``REPO/NAME/config.pbtxt`` (rendered by
``repfx.deploy.triton_config``). This module adds the artifact as a new version, the way
Triton expects models to be updated: old versions are never touched, and a directory that
is not a Triton model (no config.pbtxt) is never written into. Entries are staged and
renamed into place by ``repfx.deploy.staging.Transaction``, because Triton may be polling
the repository: a half-written model directory would be loaded (and fail). The configs
repfx writes carry a first comment line, ``# written by repfx VERSION (sha256 ...)``, which
is how a later run knows it may replace them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from repfx.deploy.staging import Claim, Refused, Transaction, reported_as, repfx_version
from repfx.deploy.triton_config import ARTIFACT_NAMES, TensorSpec, check_model_name, check_platform, render_config

_VERSION = re.compile(r"[1-9][0-9]*")  # Triton ignores other names, e.g. "01" or ".repfx-staging-..."
_MARK_PREFIX = "# written by repfx"
_MARK = re.compile(re.escape(_MARK_PREFIX) + r" \S+ \(sha256 (?P<sha256>[0-9a-f]{64})\)")


def write_model_repository(
    repo_dir: str | os.PathLike[str],
    model_name: str,
    *,
    artifact_path: str | os.PathLike[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int = 0,
    dynamic_batching: bool = False,
    version: int | None = None,
) -> Path:
    """Add ``artifact_path`` to ``repo_dir/model_name`` as a new version; returns the model directory.

    Triton's convention, never replacing anything a user has: a new model directory gets
    ``config.pbtxt`` and ``VERSION/model.plan|model.onnx`` (``version`` defaults to 1); an
    existing Triton model directory gets a new version directory (``version`` defaults to
    one more than the highest there) and an updated config.pbtxt, which replaces only a
    config repfx wrote or one that already says the same. Anything else (a directory
    without config.pbtxt, a config of the user's that differs, an existing ``version``)
    is refused with ``repfx.deploy.staging.Refused``. The entry is staged and renamed into
    place, so a polling Triton never sees a partial model; a failure changes nothing.
    """
    text = render_config(model_name, platform=platform, inputs=inputs, outputs=outputs,
                         max_batch_size=max_batch_size, dynamic_batching=dynamic_batching)
    artifact = Path(artifact_path)
    if not artifact.is_file():
        raise FileNotFoundError(f"artifact {str(artifact)!r} does not exist or is not a file")
    with Transaction() as transaction:
        entry = plan_model_entry(transaction, repo_dir, model_name, platform=platform, version=version)
        entry.stage(artifact, text)
        transaction.commit()
    return entry.model_dir


@dataclass
class ModelEntry:
    """The version one run adds to a Triton model directory: claimed in a ``Transaction`` by
    ``plan_model_entry`` before the artifact exists, filled by ``stage``, published by the
    transaction's commit (together with whatever else the run writes)."""

    model_dir: Path
    version: int
    platform: str
    content: Claim  # the new model directory, or the new version directory inside an existing one
    config: Claim | None = None  # an existing model's config.pbtxt (a new model's is inside ``content``)
    config_text: str | None = None  # the config this run wants, once known (``stage``)

    @property
    def is_new(self) -> bool:
        return self.config is None

    def stage(self, artifact: os.PathLike[str] | str, config_text: str) -> None:
        """Copy ``artifact`` into the staged version and stage ``config_text`` (from ``render_config``).

        An existing config.pbtxt the user wrote is judged here, the first moment the new
        config is known: kept when it already says the same, otherwise refused.
        """
        self.config_text = config_text
        version_dir = self.content.staged / str(self.version) if self.is_new else self.content.staged
        with reported_as(self.model_dir / str(self.version)):
            if self.is_new:
                (self.content.staged / "config.pbtxt").write_text(mark(config_text), encoding="utf-8")
                version_dir.mkdir()
            shutil.copyfile(artifact, version_dir / ARTIFACT_NAMES[self.platform])
        if self.config is None:
            return  # a new model: its config is staged inside the new directory
        reason = self.config_refusal(self.config.target)
        if reason:
            raise Refused(reason)
        existing = _read(self.config.target)
        if written_by_repfx(existing) and existing != mark(config_text):  # else it says this already: kept
            with reported_as(self.config.target):  # (the claim stays a condition checked at commit)
                self.config.staged.write_text(mark(config_text), encoding="utf-8")

    def config_refusal(self, config: Path) -> str | None:
        """Why an existing config.pbtxt may not stay or be replaced (None: it may).

        A config repfx wrote (its marker line matches its content) may be replaced; one
        the user wrote only stays, and only when it says what this run would write. Before
        ``stage`` the new config is not known yet, so a user's config is not judged then.
        """
        existing = _read(config)
        if written_by_repfx(existing) or self.config_text is None or unmarked(existing) == self.config_text:
            return None
        return (f"{config} was not written by repfx (or was edited since) and differs from this model's config: "
                f"move it away (repfx then adds version {self.version} with its own config), "
                "or choose another model name")


def plan_model_entry(
    transaction: Transaction,
    repo_dir: str | os.PathLike[str],
    model_name: str,
    *,
    platform: str,
    version: int | None = None,
) -> ModelEntry:
    """Claim, in ``transaction``, what adding a version of ``model_name`` to ``repo_dir`` will write.

    Called before any heavy work, so that a repository that would be refused is refused
    first: ``repo_dir/model_name`` must be absent (a new model directory) or a Triton
    model directory (it has config.pbtxt; versions are positive integers), never a
    directory of something else such as the user's own model files.
    """
    check_model_name(model_name)
    check_platform(platform)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(
            f"version must be an int >= 1 (Triton's version directories are positive integers), got {version!r}"
        )
    repo = Path(repo_dir)
    if os.path.lexists(repo) and not repo.is_dir():
        raise Refused(f"{repo} exists and is not a directory: choose another model repository")
    model_dir = repo / model_name
    if not os.path.lexists(model_dir):
        return ModelEntry(model_dir, version or 1, platform, transaction.claim_directory(model_dir))
    _check_model_directory(model_dir, transaction)
    versions = _versions(model_dir)
    version = version or max(versions, default=0) + 1
    if version in versions:
        raise Refused(f"{model_dir / str(version)} already exists: Triton versions are never replaced; "
                      "leave the version out to add the next one")
    entry = ModelEntry(model_dir, version, platform, transaction.claim_directory(model_dir / str(version)))
    entry.config = transaction.claim_file(model_dir / "config.pbtxt", entry.config_refusal)
    return entry


def _check_model_directory(model_dir: Path, transaction: Transaction) -> None:
    """Refuse an existing ``model_dir`` that is not a Triton model directory: repfx would write into someone's files."""
    if not model_dir.is_dir():
        raise Refused(f"{model_dir} exists and is not a directory: move it away, or choose another model name")
    if transaction.created(model_dir):
        raise Refused(f"{model_dir} is also this run's output directory: choose another --out or model name")
    if not (model_dir / "config.pbtxt").is_file():
        raise Refused(f"{model_dir} exists and is not a Triton model directory (no config.pbtxt), so repfx will not "
                      "write into it: choose another model repository or model name")


def _versions(model_dir: Path) -> set[int]:
    """Version numbers in use: entries named like a positive integer, as Triton reads them (no leading zero)."""
    return {int(entry.name) for entry in model_dir.iterdir() if _VERSION.fullmatch(entry.name)}


# --- repfx's mark on the configs it writes -----------------------------------------------------------------------

def mark(config_text: str) -> str:
    """``config_text`` under a first line saying repfx wrote it, with the SHA-256 of what follows.

    A ``#`` line is a comment in protobuf text format, so Triton reads the config as
    before. The hash makes a config the user edited afterwards count as the user's.
    """
    return f"{_MARK_PREFIX} {repfx_version()} (sha256 {_sha256(config_text)})\n{config_text}"


def written_by_repfx(text: str) -> bool:
    """Whether ``text`` starts with repfx's mark and is unchanged since (the hash matches)."""
    first, _, rest = text.partition("\n")
    found = _MARK.fullmatch(first)
    return found is not None and found["sha256"] == _sha256(rest)


def unmarked(text: str) -> str:
    """``text`` without a leading repfx mark line (what a config says, whoever wrote it)."""
    first, _, rest = text.partition("\n")
    return rest if _MARK.fullmatch(first) else text


def _read(config: Path) -> str:
    with reported_as(config):
        return config.read_text(encoding="utf-8", errors="replace")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
