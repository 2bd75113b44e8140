"""The installed package is the checkout: every package folder is listed in pyproject.toml.

setuptools takes the package list as written (``passes/`` and ``samples/`` are mapped
under ``repfx``), so a new folder that is not listed installs without its files and
fails only outside an editable install, for users. This test compares the list with
the folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _package_folders() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in config["package-dir"].items()}  # "passes" -> "repfx.passes"
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        relative = init.parent.relative_to(ROOT)
        top = relative.parts[0]
        if top not in mapped and top != "repfx":
            continue  # tests, bench, scripts, build folders
        prefix = [mapped[top]] if top in mapped else ["repfx"]
        found.add(".".join(prefix + list(relative.parts[1:])))
    return found


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert _package_folders() == set(config["packages"])
