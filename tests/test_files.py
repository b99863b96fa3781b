"""wetok._files: atomic writes of files and folders leave either the whole result or nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wetok._files import atomic_folder, atomic_write
from wetok.errors import InputError


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


# ------------------------------------------------------------------------------------------------ files that never end
def test_read_limited_refuses_pipes_devices_folders_and_oversized_files_before_reading(tmp_path):
    from wetok._files import read_limited

    fifo = tmp_path / "pipe.wtok"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came: must be refused from stat alone
    (tmp_path / "big.json").write_bytes(b"x" * 101)
    (tmp_path / "ok.json").write_bytes(b"x" * 100)
    cases = {fifo: "is not a regular file", Path("/dev/zero"): "is not a regular file",
             tmp_path: "is a directory", tmp_path / "big.json": "101 bytes is larger than the limit of 100",
             tmp_path / "missing": "no such file"}
    for path, reason in cases.items():
        with pytest.raises(InputError, match=reason):
            read_limited(path, 100, "token file")
    assert read_limited(tmp_path / "ok.json", 100) == b"x" * 100


def test_token_and_config_readers_refuse_dev_zero_and_pipes_in_one_line(tmp_path):
    from hostile import assert_refused, run_wetok

    os.mkfifo(tmp_path / "pipe.wtok")
    (tmp_path / "model").mkdir()
    os.mkfifo(tmp_path / "model" / "config.json")
    result = run_wetok("decode", "/dev/zero", "pipe.wtok", "-o", "out", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line.split(": error: ")[1].split(":")[0] for line in result.lines[:2]] == ["/dev/zero", "pipe.wtok"]
    assert all("is not a regular file" in line for line in result.lines[:2]) and len(result.lines) == 3
    assert not (tmp_path / "out").exists() and result.peak_mib < 1500
    assert_refused(run_wetok("inspect", "/dev/zero", "-o", "map.png", cwd=tmp_path, timeout=120),
                   contains="is not a regular file", output=tmp_path / "map.png")
    assert_refused(run_wetok("encode", "/dev/zero", "-o", "t.json", "--model", "model", cwd=tmp_path, timeout=120),
                   contains="config.json: is not a regular file", output=tmp_path / "t.json")
