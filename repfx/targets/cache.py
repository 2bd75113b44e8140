"""Measured profiles, kept in the user's cache directory so each machine measures once.

The file is JSON (never a pickle: nothing in it can run), written by repfx and
marked so (``written_by``); a file there that repfx did not write, or cannot read,
is left alone and the profile is measured again without being stored; so is a
profile measured on a busy machine (an estimate, ``DeviceProfile.busy``). The
directory is ``platformdirs.user_cache_dir("repfx")`` unless ``REPFX_CACHE_DIR``
names another (tests point it at a temporary directory).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from repfx.passes.cost import DeviceProfile

FILE_NAME = "device_profiles.json"
MARK = "repfx device profiles"


def cache_dir() -> Path:
    if os.environ.get("REPFX_CACHE_DIR"):
        return Path(os.environ["REPFX_CACHE_DIR"])
    try:
        import platformdirs  # a dependency; imported here so a source checkout run without it still plans
    except ImportError:
        return Path.home() / ".cache" / "repfx"
    return Path(platformdirs.user_cache_dir("repfx"))


def cached_profile(key: str, measure: Callable[[], DeviceProfile], refresh: bool = False) -> DeviceProfile:
    """The profile stored under ``key``, or ``measure()``'s (always, with ``refresh``), stored when the file is
    repfx's own."""
    path = cache_dir() / FILE_NAME
    entries, ours = _read(path)
    if key in entries and not refresh:
        try:
            return DeviceProfile.from_dict(entries[key])
        except ValueError as error:
            warnings.warn(f"repfx: ignoring the cached profile in {path} ({error}); measuring again", stacklevel=3)
    profile = measure()
    if profile.busy:
        warnings.warn(f"repfx: {profile.name}: {profile.source}; the merge decisions use that estimate and it is "
                      "not cached (python -m repfx.targets --measure on a quiet machine stores a true profile)",
                      stacklevel=3)
    elif ours:
        entries[key] = profile.to_dict()
        _write(path, entries)
    return profile


def _read(path: Path) -> tuple[dict, bool]:
    """The entries of ``path`` and whether repfx may write it (absent, or written by repfx)."""
    if not path.exists():
        return {}, True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        warnings.warn(f"repfx: cannot read {path} ({error}); the profile is measured and not stored", stacklevel=4)
        return {}, False
    if not isinstance(data, dict) or data.get("written_by") != MARK or not isinstance(data.get("profiles"), dict):
        warnings.warn(f"repfx: {path} was not written by repfx; the profile is measured and not stored", stacklevel=4)
        return {}, False
    return data["profiles"], True


def _write(path: Path, entries: dict) -> None:
    """Write atomically (a temporary file renamed over the old one); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps({"written_by": MARK, "profiles": entries}, indent=1), encoding="utf-8")
        os.replace(staging, path)
    except OSError as error:
        warnings.warn(f"repfx: cannot store the device profile in {path} ({error})", stacklevel=4)
