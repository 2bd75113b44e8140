"""``repfx.deploy.staging``: a commit that fails half-way puts the directory back (what ``repfx.export`` relies on).

The write rules themselves (claims, conflicts, Ctrl-C) are tested in ``test_no_data_loss.py``.
"""

from __future__ import annotations

import pytest


def test_commit_puts_the_directory_back_when_a_move_fails(tmp_path):
    from repfx.deploy.staging import staged

    (tmp_path / "model.pt2").write_text("old")
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(ValueError, match="in the way"), staged(tmp_path) as staging:
        staging.file("model.pt2").write_text("new")
        staging.file("model.onnx").write_text("new")
        staging.commit()
    assert (tmp_path / "model.pt2").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]
