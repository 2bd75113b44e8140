"""``repfx.deploy.staging``: a commit that fails half-way puts every destination back (what ``repfx.export`` relies on).

The write rules as users meet them (claims, conflicts, Ctrl-C) are tested in ``test_no_data_loss.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from repfx.deploy.staging import Refused, RollbackFailed, Transaction


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden staging directories too) -> the file's bytes, or None for a directory."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
            for path in sorted(root.rglob("*"))}


def mine(target: Path) -> None:
    """A rule that lets repfx replace ``target`` (as if its record listed it)."""
    return None


def failing_replace(monkeypatch, fails: Path) -> None:
    """A move (``os.replace`` or ``os.rename``) into ``fails`` raises, as a full disk would."""
    def guarded(real):
        def move(source, destination):
            if Path(destination) == fails:
                raise OSError(28, "No space left on device", str(destination))
            return real(source, destination)
        return move

    monkeypatch.setattr(os, "replace", guarded(os.replace))
    monkeypatch.setattr(os, "rename", guarded(os.rename))


def test_existing_file_in_the_way_is_refused_when_claimed(tmp_path):
    (tmp_path / "model.pt2").write_text("old")
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(Refused, match="model.pt2 is in the way"), Transaction() as transaction:
        transaction.claim_file(tmp_path / "model.pt2")
    with pytest.raises(Refused, match="model.onnx is a directory in the way"), Transaction() as transaction:
        transaction.claim_file(tmp_path / "model.onnx", mine)
    assert sorted(tree(tmp_path)) == ["model.onnx", "model.pt2"], "no staging directory left"
    assert (tmp_path / "model.pt2").read_text() == "old"


def test_symbolic_link_in_the_way_is_refused_even_where_a_file_may_be_replaced(tmp_path):
    (tmp_path / "theirs.txt").write_text("theirs")
    (tmp_path / "model.pt2").symlink_to(tmp_path / "theirs.txt")
    with pytest.raises(Refused, match="model.pt2 is a symbolic link in the way"), Transaction() as transaction:
        transaction.claim_file(tmp_path / "model.pt2", mine)
    assert (tmp_path / "model.pt2").is_symlink() and (tmp_path / "theirs.txt").read_text() == "theirs"


def test_commit_puts_every_destination_back_when_a_move_fails(tmp_path, monkeypatch):
    out, repo = tmp_path / "out", tmp_path / "repo"
    out.mkdir()
    (out / "model.pt2").write_text("old")
    (out / "notes.txt").write_text("the user's")
    before = tree(tmp_path)
    with pytest.raises(OSError, match="No space left"), Transaction() as transaction:
        transaction.claim_file(out / "model.pt2", mine).staged.write_text("new")
        transaction.claim_file(out / "model.onnx").staged.write_text("new")
        version = transaction.claim_directory(repo / "m" / "1")
        (version.staged / "model.onnx").write_text("new")
        failing_replace(monkeypatch, repo / "m" / "1")
        transaction.commit()
    assert tree(tmp_path) == before, "model.pt2 old again, no model.onnx, repo/ (created by the run) removed"


def test_commit_publishes_every_file_and_keeps_no_staging(tmp_path):
    (tmp_path / "model.pt2").write_text("old")
    with Transaction() as transaction:
        transaction.claim_file(tmp_path / "model.pt2", mine).staged.write_text("new")
        version = transaction.claim_directory(tmp_path / "repo" / "m")
        (version.staged / "config.pbtxt").write_text("config")
        transaction.commit()
    assert tree(tmp_path) == {"model.pt2": b"new", "repo": None, "repo/m": None, "repo/m/config.pbtxt": b"config"}


def test_a_file_that_changed_while_the_model_was_rewritten_is_refused_at_commit(tmp_path):
    (tmp_path / "model.pt2").write_text("repfx's")
    rule = lambda target: None if target.read_text() == "repfx's" else f"{target} changed"  # noqa: E731
    with pytest.raises(Refused, match="model.pt2 changed"), Transaction() as transaction:
        transaction.claim_file(tmp_path / "model.pt2", rule).staged.write_text("new")
        transaction.claim_file(tmp_path / "model.onnx").staged.write_text("new")
        (tmp_path / "model.pt2").write_text("the user's")
        transaction.commit()
    assert tree(tmp_path) == {"model.pt2": b"the user's"}


def test_a_directory_that_appeared_while_the_model_was_rewritten_is_refused_at_commit(tmp_path):
    with pytest.raises(Refused, match="appeared while repfx was working"), Transaction() as transaction:
        transaction.claim_directory(tmp_path / "m")
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "theirs").write_text("theirs")
        transaction.commit()
    assert tree(tmp_path) == {"m": None, "m/theirs": b"theirs"}


def test_the_input_model_is_never_claimed(tmp_path):
    (tmp_path / "net.pt2").write_text("model")
    protected = [tmp_path / "net.pt2"]
    with pytest.raises(Refused, match="it is the input model"), Transaction(protected) as transaction:
        transaction.claim_file(tmp_path / "net.pt2", mine)
    assert tree(tmp_path) == {"net.pt2": b"model"}


def test_a_rollback_that_cannot_restore_keeps_the_previous_file_in_staging_and_says_where(tmp_path, monkeypatch):
    (tmp_path / "model.pt2").write_text("old")
    real = os.replace
    calls = []

    def replace(source, destination):  # the second move fails, and so does every move back
        calls.append(destination)
        if len(calls) >= 2:
            raise OSError(5, "Input/output error", str(destination))
        return real(source, destination)

    with pytest.raises(RollbackFailed, match="could not put .*model.pt2 back.*previous files are in"), \
            Transaction() as transaction:
        transaction.claim_file(tmp_path / "model.pt2", mine).staged.write_text("new")
        monkeypatch.setattr(os, "replace", replace)
        transaction.commit()
    monkeypatch.undo()
    kept = [(tmp_path / path).read_text() for path in tree(tmp_path) if path.endswith("/model.pt2")]
    assert "old" in kept, "the previous file survives in the staging directory"
