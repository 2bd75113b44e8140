"""The installed package is the checkout: every package folder is listed in pyproject.toml, and imports from anywhere.

setuptools takes the package list as written (``passes/`` and ``samples/`` are in the package
through the links ``repfx/passes`` and ``repfx/samples``), so a new folder that is not listed
installs without its files and fails only outside an editable install, for users. This test
compares the list with the folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _package_folders() -> set[str]:
    found = set()
    for folder, _, files in os.walk(ROOT / "repfx", followlinks=True):
        if "__init__.py" in files:
            found.add(".".join(Path(folder).relative_to(ROOT).parts))
    return found


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert _package_folders() == set(config["packages"])


def test_import_works_from_the_folder_that_holds_a_clone_named_repfx(tmp_path):
    """A folder named ``repfx`` in the working directory (the clone itself) is an empty namespace package that
    outranks an import hook; the installed package must still be the one imported."""
    (tmp_path / "repfx").symlink_to(ROOT, target_is_directory=True)
    run = subprocess.run([sys.executable, "-c", "import repfx; print(repfx.reparameterize.__module__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "repfx.api", run.stderr[-2000:]
