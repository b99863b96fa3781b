"""Hostile input to the command line as a whole (issue 14, items 6-8, 11-13, 15, 16): batches that meet
unexpected failures, file-system errors, SIGTERM while saving, out-of-range options, image bombs and strips,
symlink loops and names that try to forge log lines. Each hostile file is built here; commands run in child
interpreters through :mod:`hostile` (exit 2, one line per bad input, no traceback, nothing left, peak memory)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hostile import DEFAULT_PEAK_MIB, assert_refused, run_wetok
from wetok.cli import common
from wetok.cli.main import main
from wetok.data import find_images, walk_files
from wetok.errors import InputError, describe_error, printable
from wetok.metrics import psnr_uint8

TINY = ["--model", "tiny-f8", "--random-init"]
SRC = Path(__file__).resolve().parents[1] / "src"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _image(path: Path, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _errors(result, command: str) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return [line for line in result.lines if line.startswith(f"wetok {command}: error: ")]


# ------------------------------------------------------------------------------------- messages (items 6, 16)
def test_printable_escapes_control_characters_and_keeps_the_rest():
    assert printable("a b.png") == "a b.png"
    assert printable("évian ☃.png") == "évian ☃.png"
    assert printable("x\nwetok: ok\x1b[2K\r\t\u202e") == "x\\nwetok: ok\\x1b[2K\\r\\t\\u202e"


def test_describe_error_gives_one_line_naming_the_file():
    assert describe_error(PermissionError(13, "Permission denied", "in/a.png")) == "in/a.png: permission denied"
    assert describe_error(OSError(28, "No space left on device"), "out") == "out: no space left on device"
    assert describe_error(InputError("a\nb", "bad")) == "a\\nb: bad"
    assert describe_error(MemoryError(), "big.png") == "big.png: out of memory"
    assert describe_error(TypeError("list\nx"), "t.json") == "t.json: unexpected TypeError: list\\nx"


def test_run_batch_reports_every_failure_and_goes_on(capsys):
    done: list[str] = []

    def work(item: common.Item) -> None:
        if item.name == "type":
            raise TypeError("'list' object cannot be interpreted as an integer")
        if item.name == "memory":
            raise MemoryError
        if item.name == "denied":
            raise PermissionError(13, "Permission denied", str(item.path))
        if item.name == "input":
            raise InputError(item.path, "cannot decode image")
        done.append(item.name)

    names = ["type", "good1", "memory", "denied", "input", "good2"]
    items = [common.Item(Path(f"in/{n}.png"), n) for n in names]
    args = argparse.Namespace(command="encode", quiet=False)
    code = common.run_batch(args, items, ["glob*: no file matches this pattern"], work)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and done == ["good1", "good2"]
    assert lines == [
        "wetok encode: error: glob*: no file matches this pattern",
        "wetok encode: error: in/type.png: unexpected TypeError: 'list' object cannot be interpreted as an integer",
        "wetok encode: error: in/memory.png: out of memory",
        "wetok encode: error: in/denied.png: permission denied",
        "wetok encode: error: in/input.png: cannot decode image",
        "wetok encode: 5 of 7 inputs failed",
    ]


def test_a_forged_model_name_cannot_add_lines(tmp_path):
    from wetok.tokens import Tokens, save_tokens

    evil = "evil\nwetok decode: all good\x1b[2K\x1b[1A"
    tokens = Tokens(torch.zeros(1, 6, 5, 4, dtype=torch.int64), (48, 40), bits_per_group=4, model_id="x\ny",
                    model=evil)
    save_tokens(tmp_path / "evil.json", tokens)
    result = run_wetok("decode", "evil.json", "-o", "out.png", *TINY, cwd=tmp_path)
    assert_refused(result, contains=("evil.json: ", "evil\\nwetok decode: all good\\x1b[2K"),
                   output=tmp_path / "out.png")
    assert "\x1b" not in result.stderr


# ------------------------------------------------------------------------------------------------ options (11)
@pytest.mark.parametrize(("argv", "expected"), [
    (["encode", "a.png", "-o", "x.json", "--size", "100000"], "argument --size: must be at least 1 and at most"),
    (["encode", "a.png", "-o", "x.json", "--size", "0"], "argument --size: must be at least 1"),
    (["reconstruct", "a.png", "-o", "r", "--seed", "99999999999999999999999"], "argument --seed: must be at"),
    (["reconstruct", "a.png", "-o", "r", "--seed", "-1"], "argument --seed: must be at least 0"),
    (["encode", "a.png", "-o", "x.json", "--device", "meta"], "argument --device: cannot run on device 'meta'"),
    (["encode", "a.png", "-o", "x.json", "--device", "nonsense"], "argument --device: unknown device"),
    (["eval", "data", "--out", "r.json", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["eval", "data", "--out", "r.json", "--limit", "1e3"], "argument --limit: expected an integer, got '1e3'"),
    (["reconstruct", "a.png", "-o", "r", "--tile", "-5"], "argument --tile: must be at least 0"),
    (["encode", "a.png", "-o", "x.json", "--max-pixels", "-1"], "argument --max-pixels: must be at least 0"),
    (["encode", "a.png", "-o", "x.json", "--bogus"], "unrecognized arguments: --bogus"),
    (["encode"], "the following arguments are required"),
])
def test_bad_options_give_one_usage_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"wetok {argv[0]}: error: ") and expected in err, err
    assert err.rstrip().endswith(f"(see wetok {argv[0]} --help)")


def test_cuda_device_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["encode", "a.png", "-o", "x.json", "--device", "cuda:0"])
    assert "cuda:0 requested but cuda is not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ images (12, 13, 6)
def test_image_bombs_strips_and_oversized_resizes_are_refused_from_the_header(tmp_path):
    Image.new("1", (9500, 9500)).save(tmp_path / "near_bomb.png")  # 90 Mpx (just over Pillow's limit), a few KB
    Image.new("L", (1, 40000)).save(tmp_path / "strip.png")  # 1 x 40000: x 4000 on the short side = 640 Gpx
    assert (tmp_path / "near_bomb.png").stat().st_size < 100_000
    result = run_wetok("reconstruct", "near_bomb.png", "strip.png", "--size", "4000", "-o", "out", *TINY,
                       cwd=tmp_path)
    lines = _errors(result, "reconstruct")
    assert result.returncode == 2 and "DecompressionBomb" not in result.stderr
    assert lines[0].startswith("wetok reconstruct: error: near_bomb.png: image is 9500 x 9500 = 90250000 pixels, "
                               "over the limit of 89478485 (--max-pixels; 0 = no limit)")
    assert lines[1].startswith("wetok reconstruct: error: strip.png: --size: 4000 makes this 1 x 40000 image "
                               "4000 x 160000000 = 640000000000 pixels, over the limit")
    assert result.lines == [*lines, "wetok reconstruct: 2 of 2 inputs failed"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not result.peak_mib > DEFAULT_PEAK_MIB, result.peak_mib


def test_eval_reports_bad_images_one_line_each_and_exits_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _image(data / "a.png")
    _image(data / "b.png", seed=1)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("L", (1, 40000)).save(data / "strip.png")  # crop256 would resize it to 256 x 10 million
    result = run_wetok("eval", "data", "--out", "report.json", "--metrics", "psnr", *TINY, cwd=tmp_path)
    lines = _errors(result, "eval")
    assert result.returncode == 2, result.stderr
    assert [line.split(": ")[2] for line in lines] == ["data/corrupt.png", "data/strip.png"]
    assert "over the limit of 89478485" in lines[1]
    assert "wetok eval: 2 of 4 inputs failed; the report report.json lists them" in result.lines
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["n_images"] == 2 and report["data"]["n_bad"] == 2
    assert not result.peak_mib > DEFAULT_PEAK_MIB, result.peak_mib

    skipped = run_wetok("eval", "data", "--out", "r2.json", "--metrics", "psnr", "--skip-bad", "-q", *TINY,
                        cwd=tmp_path)
    assert skipped.returncode == 0 and len(_errors(skipped, "eval")) == 2


def test_psnr_and_error_map_in_chunks_match_the_whole_image_formulas():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert psnr_uint8(a, b, rows=5) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
    assert psnr_uint8(a, a) == float("inf")
    chunked = np.asarray(common.abs_error_map(Image.fromarray(a), Image.fromarray(b), rows=4))
    whole = common.colorize(np.clip(np.abs(a.astype(np.float64) - b).mean(-1) / 64.0, 0, 1))
    np.testing.assert_array_equal(chunked, whole)


# ---------------------------------------------------------------------------------------------- symlinks (15)
def _looped_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    _image(root / "top.png")
    _image(root / "sub" / "deeper" / "low.png", seed=1)
    os.symlink("..", root / "sub" / "back")  # sub/back -> root: a loop
    os.symlink("../..", root / "sub" / "deeper" / "up")  # another loop, two levels
    os.symlink("deeper", root / "sub" / "alias")  # a second name for a folder seen anyway
    return root


def test_walks_and_globs_end_on_symlink_loops(tmp_path):
    root = _looped_tree(tmp_path / "tree")
    walked = sorted(p.relative_to(root).as_posix() for p in walk_files(root))
    assert len(walked) == 2 and walked[0].endswith("low.png") and walked[1] == "top.png"
    assert [p.name for p in find_images(root)] == [Path(w).name for w in walked]
    globbed = common.glob_files(f"{root}/**/*.png")
    assert sorted(p.name for p in globbed) == ["low.png", "top.png"]
    assert [p.name for p in common.glob_files(f"{root}/sub/**/l?w.[op]ng")] == ["low.png"]


def test_encode_of_a_recursive_glob_through_a_loop_finishes(tmp_path):
    _looped_tree(tmp_path / "tree")
    result = run_wetok("encode", "tree/**/*.png", "-o", "out", "-q", *TINY, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["low.json", "top.json"]


# ------------------------------------------------------------------------------------------- file system (7)
def test_pixel_limit_and_unwritable_output_give_one_line_each(tmp_path):
    _image(tmp_path / "a.png")  # 40 x 48 = 1920 pixels: over --max-pixels 1000
    _image(tmp_path / "b.png", size=(16, 16))  # under it, but -o is inside a file
    (tmp_path / "afile").write_text("not a folder")
    result = run_wetok("reconstruct", "a.png", "b.png", "-o", "afile/out", "--max-pixels", "1000", *TINY,
                       cwd=tmp_path)
    assert _errors(result, "reconstruct") == [
        "wetok reconstruct: error: a.png: image is 40 x 48 = 1920 pixels, over the limit of 1000 (--max-pixels; 0 = no limit)",
        "wetok reconstruct: error: b.png: afile/out/b.png: cannot write: not a directory",
    ]
    assert result.returncode == 2 and result.lines[-1] == "wetok reconstruct: 2 of 2 inputs failed"
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
def test_permission_errors_give_one_line_per_input(tmp_path):
    _image(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    _image(locked / "b.png")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    locked.chmod(0)
    readonly.chmod(0o555)
    try:
        result = run_wetok("encode", "a.png", "locked/b.png", "locked", "-o", "ro", *TINY, cwd=tmp_path)
        assert _errors(result, "encode") == [  # the inputs that cannot be listed, then the runs
            "wetok encode: error: locked/b.png: permission denied",
            "wetok encode: error: locked: permission denied",
            "wetok encode: error: a.png: ro/a.json: cannot write: permission denied",
        ]
        assert result.lines[-1] == "wetok encode: 3 of 3 inputs failed" and result.returncode == 2
        report = run_wetok("eval", "locked", "--out", "r.json", "--metrics", "psnr", *TINY, cwd=tmp_path)
        assert report.returncode == 2
        assert report.lines == ["wetok eval: error: locked: cannot list this folder: permission denied"]
        assert list(readonly.iterdir()) == []
    finally:
        locked.chmod(0o755)
        readonly.chmod(0o755)


# ------------------------------------------------------------------------------------------------ SIGTERM (8)
_SLOW_SAVE = r"""
import sys, time
from PIL import Image
real_save = Image.Image.save

def slow_save(self, fp, *args, **kwargs):  # the real save, then a long flush: SIGTERM arrives in between
    real_save(self, fp, *args, **kwargs)
    for _ in range(600):
        time.sleep(0.05)

Image.Image.save = slow_save
from wetok.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_saving_leaves_no_temporary_file(tmp_path):
    _image(tmp_path / "a.png")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, "reconstruct", "a.png", "-o", "out", "-q", *TINY],
                             cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while child.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and any(p.name.startswith(".a.") for p in out.iterdir()):
            break
        time.sleep(0.01)
    assert child.poll() is None, child.stderr.read()
    child.send_signal(signal.SIGTERM)  # once: a second one during the exit would kill the interpreter outright
    stderr = child.communicate(timeout=120)[1]
    assert child.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if "randomly initialised" not in line] == [
        "wetok reconstruct: terminated"]
    assert list(out.iterdir()) == []


def test_pixel_limit_can_be_raised_or_removed(tmp_path):
    from wetok.data import DEFAULT_MAX_PIXELS, load_rgb, max_pixels, set_max_pixels

    Image.new("1", (60, 50)).save(tmp_path / "a.png")
    try:
        set_max_pixels(2999)
        with pytest.raises(InputError, match=r"a.png: image is 60 x 50 = 3000 pixels, over the limit of 2999"):
            load_rgb(tmp_path / "a.png")
        set_max_pixels(0)
        assert max_pixels() is None and Image.MAX_IMAGE_PIXELS is None and load_rgb(tmp_path / "a.png").size == (60, 50)
        set_max_pixels(3 * DEFAULT_MAX_PIXELS)
        assert Image.MAX_IMAGE_PIXELS == 3 * DEFAULT_MAX_PIXELS  # Pillow's own check would refuse between 2x and 3x
    finally:
        set_max_pixels(DEFAULT_MAX_PIXELS)
    assert max_pixels() == DEFAULT_MAX_PIXELS and Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS
