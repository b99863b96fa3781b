"""wetok._files: atomic writes of files and folders leave either the whole result or nothing."""

from __future__ import annotations

import os

import pytest

from wetok._files import atomic_folder, atomic_write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "sub" / "r.json"
    atomic_write(target, lambda tmp: tmp.write_text("first"))
    assert target.read_text() == "first" and target.stat().st_mode & 0o777 == 0o666 & ~_umask()

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["r.json"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    def write(folder):
        (folder / "a.txt").write_text("a")
        (folder / "b.txt").write_text("b")

    out = atomic_folder(tmp_path / "model", write)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    (tmp_path / "empty").mkdir()
    atomic_folder(tmp_path / "empty", write)  # an empty folder may be replaced
    assert (tmp_path / "empty" / "b.txt").read_text() == "b"

    def fail(folder):
        (folder / "a.txt").write_text("a")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_folder(tmp_path / "broken", fail)
    with pytest.raises(OSError):
        atomic_folder(tmp_path / "model", write)  # a folder with files is never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]
