"""End-to-end tests of the ``wetok`` command: every subcommand and every kind of bad input, in subprocesses.

All runs are started at once by one module fixture (a decode starts as soon as the encode it needs is done), and
the bad inputs share two batch runs plus one single-file run, so the file costs about two rounds of interpreter +
torch start-up rather than one per test.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTO
from wetok import WeTok, get_config
from wetok.image import pad_to_multiple, pil_to_tensor, to_uint8
from wetok.tokens import Tokens, load_tokens, save_tokens

TINY = ["--model", "tiny-f8", "--random-init"]  # a configuration without published weights
# (name, stored size (w, h), size as displayed (h, w))
IMAGES = {
    "photo.jpg": (44, 60),
    "gray16.png": (29, 37),
    "rgba.png": (24, 40),
    "palette.png": (21, 33),
    "cmyk.jpg": (40, 24),
    "rotated.jpg": (48, 32),  # stored 48 wide x 32 high with EXIF orientation 6: displayed 32 x 48
}


def _make_images(root: Path) -> None:
    photo = Image.open(PHOTO).convert("RGB").resize((60, 44), Image.Resampling.BICUBIC)
    photo.save(root / "photo.jpg", quality=95)
    ramp = (np.arange(29 * 37, dtype=np.uint32).reshape(29, 37) * 61).astype(np.uint16)
    Image.fromarray(ramp).save(root / "gray16.png")  # mode I;16
    rgba = np.asarray(photo.resize((40, 24)).convert("RGBA")).copy()
    rgba[:, :10, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    photo.resize((33, 21)).quantize(16).save(root / "palette.png")
    photo.resize((24, 40)).convert("CMYK").save(root / "cmyk.jpg")
    rotated = photo.resize((48, 32))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "rotated.jpg", exif=exif)


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side pixels (beyond Pillow's bomb limit) in ~50 kB: all-zero rows compress."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _run_all(commands: dict[str, tuple], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run ``name -> (args, [names it needs], setup or None)`` concurrently, each once its inputs exist."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    futures: dict = {}

    def one(args: list[str], needs: list[str], setup) -> subprocess.CompletedProcess:
        for name in needs:
            futures[name].result()
        if setup is not None:
            setup()
        return subprocess.run([sys.executable, "-m", "wetok.cli.main", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:  # one thread each: waiting cannot deadlock
        for name, (args, needs, setup) in commands.items():
            futures[name] = pool.submit(one, args, needs, setup)
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "imgs").mkdir()
    _make_images(root / "imgs")
    (root / "same").mkdir()  # three inputs whose outputs would all be called "a"
    for name, size in {"a.png": (16, 8), "a.PNG": (24, 8), "a.jpg": (8, 24)}.items():
        photo = Image.open(root / "imgs" / "photo.jpg").resize(size)
        photo.save(root / "same" / name, format="JPEG" if name.endswith("jpg") else "PNG")
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    jpeg = (root / "imgs" / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "zero.png").write_bytes(b"")
    (root / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    _bomb_png(root / "bomb.png")
    # a token file written by hand in the fork's schema (spec section 8): f8, 4 groups, 32x48 -> 4x6x4 uint8
    flat = np.random.default_rng(0).integers(0, 16, 4 * 6 * 4).astype(np.uint8)
    (root / "fork.json").write_text(json.dumps({
        "wetok": {"data": base64.b64encode(flat.tobytes()).decode(), "dtype": "uint8", "shape": [96]},
        "config": "GeneralDomain_compratio48.yaml", "ckpt": "WeTok.ckpt", "image_size": 32,
        "height": 32, "width": 48, "original_height": 30, "original_width": 50}))
    np.save(root / "fork_flat.npy", flat)
    small = get_config("small-f8")  # tokens of another model
    save_tokens(root / "other.wtok", Tokens(indices=torch.zeros(1, 4, 6, 4, dtype=torch.int64), bits_per_group=8,
                                            image_size=(32, 48), original_size=(32, 48),
                                            model_id=small.identity(), model="small-f8"))
    return root


BAD_IMAGES = {  # file -> what its error line must say
    "empty": "no image files",
    "missing.png": "does not exist",
    "corrupt.png": "cannot decode",
    "truncated.jpg": "truncated",
    "zero.png": "cannot decode",
    "bomb.png": "too large",
    "drawing.svg": "cannot decode",
}
BAD_TOKENS = {"other.wtok": "small-f8", "tampered.wtok": "checksum"}


@pytest.fixture(scope="module")
def runs(work) -> dict[str, subprocess.CompletedProcess]:
    def tamper() -> None:
        data = bytearray((work / "photo.wtok").read_bytes())
        data[10] ^= 0x02  # h: 6 -> 4
        (work / "tampered.wtok").write_bytes(bytes(data))

    return _run_all({
        "encode_dir": (["encode", "imgs", "-o", "toks", *TINY], [], None),
        "encode_wtok": (["encode", "imgs/photo.jpg", "-o", "photo.wtok", *TINY], [], None),
        "encode_size": (["encode", "imgs/photo.jpg", "-o", "sized.json", "--size", "24", "--tile", "16", *TINY],
                        [], None),
        "reconstruct": (["reconstruct", "imgs/photo.jpg", "imgs/rgba.png", "-o", "rec", "--grid", *TINY], [], None),
        "encode_same": (["encode", "same", "-o", "same_toks", *TINY], [], None),
        "info": (["info", "ImageNet_downsample16"], [], None),
        # every kind of bad image in one batch (with one good image first), and one bad image alone
        "bad_images": (["encode", "imgs/photo.jpg", *BAD_IMAGES, "-o", "bad_images", *TINY], [], None),
        "bad_single": (["encode", "truncated.jpg", "-o", "bad_single.json", *TINY], [], None),
        "decode_dir": (["decode", "toks", "-o", "dec", *TINY], ["encode_dir"], None),
        # good files (ours in both formats, the fork's) and bad ones (another model, a tampered header)
        "decode_files": (["decode", "photo.wtok", "sized.json", "fork.json", *BAD_TOKENS, "-o", "decoded", *TINY],
                         ["encode_wtok", "encode_size"], tamper),
        "inspect": (["inspect", "photo.wtok", "-o", "map.png"], ["encode_wtok"], None),
    }, work)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def tiny() -> WeTok:
    with torch.random.fork_rng():  # the CLI seeds preset initialisation with 0
        torch.manual_seed(0)
        return WeTok.from_preset("tiny-f8").eval()


# ------------------------------------------------------------------------------------------------ encode / decode
def test_encode_folder_of_any_mode_and_decode_back(runs, work):
    _ok(runs["encode_dir"])
    _ok(runs["decode_dir"])
    for name, (h, w) in IMAGES.items():
        stem = Path(name).stem
        obj = json.loads((work / "toks" / f"{stem}.json").read_text())
        assert (obj["original_height"], obj["original_width"]) == (h, w), name
        assert (obj["height"], obj["width"]) == (8 * math.ceil(h / 8), 8 * math.ceil(w / 8)), name
        assert obj["wetok"]["shape"] == [obj["height"] // 8 * obj["width"] // 8 * 4]
        decoded = Image.open(work / "dec" / f"{stem}.png")
        assert decoded.size == (w, h) and decoded.mode == "RGB", name


def test_json_and_wtok_agree_and_match_the_library(runs, work, tiny):
    _ok(runs["encode_wtok"])
    from_json = load_tokens(work / "toks" / "photo.json", tiny.config)
    from_wtok = load_tokens(work / "photo.wtok", tiny.config)
    assert torch.equal(from_json.indices, from_wtok.indices)
    assert from_wtok.padding == from_json.padding == (2, 2, 2, 2)  # 60x44 -> 64x48, split evenly
    # the same image through the library in this process (thread counts differ: allow rare sign flips at 0)
    pixels, _ = pad_to_multiple(pil_to_tensor(Image.open(work / "imgs" / "photo.jpg"))[None], 8)
    with torch.no_grad():
        expected = tiny.encode(pixels).indices
    assert (expected == from_wtok.indices).float().mean() > 0.99
    # .wtok size: 43-byte header + identity (16-digit architecture id, ":", 16-digit weights id) + name "tiny-f8"
    # with its length + ceil(6*8*4*4/8) + CRC
    assert (work / "photo.wtok").stat().st_size == 43 + 33 + 1 + 7 + math.ceil(6 * 8 * 4 * 4 / 8) + 4
    assert from_wtok.weights_id == tiny.weights_id
    # decoding either file gives the same image, equal to the library's decode cropped back
    a = np.asarray(Image.open(work / "decoded" / "photo.png"))
    assert np.array_equal(a, np.asarray(Image.open(work / "dec" / "photo.png")))
    with torch.no_grad():
        ref = to_uint8(tiny.decode(from_wtok.indices))[0, :, 2:46, 2:62].permute(1, 2, 0).numpy()
    assert np.abs(a.astype(int) - ref).max() <= 1


def test_size_option_resizes_and_decode_restores_the_original_size(runs, work):
    _ok(runs["encode_size"])
    obj = json.loads((work / "sized.json").read_text())
    # short side 44 -> 24, long side 60 * 24 / 44 = 32.7 -> 33; padded to 24 x 40
    assert (obj["height"], obj["width"], obj["image_size"]) == (24, 40, 24)
    assert obj["wetok_meta"]["padding"] == [3, 4, 0, 0]
    assert Image.open(work / "decoded" / "sized.png").size == (60, 44)


def test_hand_written_fork_json_decodes(runs, work, tiny):
    flat = np.load(work / "fork_flat.npy")
    indices = torch.from_numpy(flat.astype(np.int64)).reshape(1, 4, 6, 4)  # (b, h, w, g), group fastest
    with torch.no_grad():
        ref = Image.fromarray(to_uint8(tiny.decode(indices))[0].permute(1, 2, 0).numpy())
    ref = np.asarray(ref.resize((50, 30), Image.Resampling.BICUBIC)).astype(int)
    out = np.asarray(Image.open(work / "decoded" / "fork.png")).astype(int)
    assert out.shape == (30, 50, 3) and np.abs(out - ref).max() <= 1


def test_reconstruct_writes_grids_and_prints_psnr(runs, work):
    _ok(runs["reconstruct"])
    printed = {}
    for line in runs["reconstruct"].stdout.splitlines():
        if "\tPSNR" in line:
            path, value = line.split("\tPSNR ")
            printed[Path(path).name] = float(value.split()[0])
    for name in ("photo.jpg", "rgba.png"):
        stem = Path(name).stem
        rec = np.asarray(Image.open(work / "rec" / f"{stem}.png")).astype(np.float64)
        grid = np.asarray(Image.open(work / "rec" / f"{stem}_grid.png"))
        from wetok.data import load_rgb

        original = np.asarray(load_rgb(work / "imgs" / name))
        h, w, _ = original.shape
        assert grid.shape == (h, 3 * w + 8, 3)
        assert np.array_equal(grid[:, :w], original) and np.array_equal(grid[:, w + 4 : 2 * w + 4], rec)
        assert (grid[:, w : w + 4] == 255).all()
        error = grid[:, 2 * w + 8 :].astype(int)
        exact = np.abs(original - rec).mean(-1) == 0
        assert (error[exact] == (0, 0, 4)).all()  # the ramp's dark end where nothing changed
        mse = ((original - rec) ** 2).mean()
        assert printed[name] == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)


def test_info_matches_the_official_model(runs):
    _ok(runs["info"])
    out = runs["info"].stdout
    assert "460,294,179" in out  # spec section 1.2: encoder 198,935,328 + decoder 261,358,851
    assert "198,935,328" in out and "261,358,851" in out
    assert "192x" in out and "1024 group indices" in out and "32 per position" in out


def test_inspect_draws_one_panel_per_group(runs, work):
    _ok(runs["inspect"])
    from wetok.cli.common import colorize

    record = load_tokens(work / "photo.wtok")
    _, h, w, g = record.indices.shape  # 6 x 8 tokens, upscaled by ceil(256 / 8) = 32
    image = np.asarray(Image.open(work / "map.png"))
    assert image.shape == (16 + h * 32, g * w * 32 + (g - 1) * 6, 3)
    for k in range(g):
        for r, c in [(0, 0), (h - 1, w - 1), (2, 5)]:
            pixel = image[16 + r * 32 + 16, k * (w * 32 + 6) + c * 32 + 16]
            assert tuple(pixel) == tuple(colorize(np.array(int(record.indices[0, r, c, k]) / 15))), (k, r, c)
    assert "group 3" in runs["inspect"].stdout


def test_inputs_with_the_same_name_get_distinct_outputs(runs, work):
    _ok(runs["encode_same"])
    # sorted input order a.PNG, a.jpg, a.png: each keeps its ending; a.png and a.PNG differ only in case
    written = {p.name: json.loads(p.read_text()) for p in (work / "same_toks").iterdir()}
    assert sorted(written) == ["a.PNG.json", "a.jpg.json", "a.png-2.json"]
    for output, source in [("a.PNG.json", "a.PNG"), ("a.jpg.json", "a.jpg"), ("a.png-2.json", "a.png")]:
        width, height = Image.open(work / "same" / source).size
        assert (written[output]["original_height"], written[output]["original_width"]) == (height, width)


def test_distinct_names_covers_every_output_of_an_item(tmp_path):
    from wetok.cli.common import Item, distinct_names

    items = [Item(Path("x.png"), "x"), Item(Path("x_grid.jpg"), "x_grid"), Item(Path("y.png"), "y")]
    assert [i.name for i in distinct_names(items)] == ["x", "x_grid", "y"]
    renamed = distinct_names(items, ("", "_grid"))  # x's grid would overwrite x_grid's reconstruction
    assert [i.name for i in renamed] == ["x.png", "x_grid.jpg", "y"]
    assert [i.path for i in renamed] == [i.path for i in items]
    clash = [Item(Path("d1/a.png"), "a"), Item(Path("d2/a.png"), "a"), Item(Path("A.png"), "A")]
    assert [i.name for i in distinct_names(clash)] == ["a.png", "a.png-2", "A.png-3"]


# ------------------------------------------------------------------------------------------------ bad input
def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    return [line for line in lines if not line.startswith("note: tiny-f8 is randomly initialised")]


def _no_temporary_files(folder: Path) -> None:
    assert [p.name for p in folder.rglob(".*")] == []


def test_one_bad_image_gives_one_line_exit_2_and_no_output(runs, work):
    lines = _error_lines(runs["bad_single"])
    assert lines == [lines[0]] and lines[0].startswith("wetok encode: error: truncated.jpg: ")
    assert not (work / "bad_single.json").exists()
    _no_temporary_files(work)


def test_every_bad_image_is_reported_and_the_batch_goes_on(runs, work):
    lines = _error_lines(runs["bad_images"])
    assert len(lines) == len(BAD_IMAGES) + 1
    for name, reason in BAD_IMAGES.items():
        mine = [line for line in lines if line.startswith(f"wetok encode: error: {name}: ")]
        assert len(mine) == 1 and reason in mine[0], (name, lines)
    assert lines[-1] == f"wetok encode: {len(BAD_IMAGES)} of {len(BAD_IMAGES) + 1} inputs failed"
    assert [p.name for p in (work / "bad_images").iterdir()] == ["photo.json"]  # the good one, nothing else


def test_bad_token_files_are_reported_and_the_batch_goes_on(runs, work):
    lines = _error_lines(runs["decode_files"])
    assert len(lines) == len(BAD_TOKENS) + 1
    for name, reason in BAD_TOKENS.items():
        mine = [line for line in lines if line.startswith(f"wetok decode: error: {name}: ")]
        assert len(mine) == 1 and reason in mine[0], (name, lines)
    assert sorted(p.name for p in (work / "decoded").iterdir()) == ["fork.png", "photo.png", "sized.png"]


# ------------------------------------------------------------------------------------------------ helpers, in process
def test_default_model_falls_back_to_a_seeded_preset_with_a_note(capsys):
    import argparse

    from wetok.checkpoints import CONFIG_NAME, DEFAULT_MODEL_DIR
    from wetok.cli.common import FALLBACK_MODEL, model_spec

    spec = model_spec(argparse.Namespace(model=None, quiet=False))
    if (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file():
        assert spec == "default" and capsys.readouterr().err == ""
    else:
        assert spec == FALLBACK_MODEL and "randomly initialised" in capsys.readouterr().err
    assert model_spec(argparse.Namespace(model="small-f8", quiet=False)) == "small-f8"


def test_one_output_file_for_several_inputs_is_refused(tmp_path):
    from wetok.cli.common import TOKEN_SUFFIXES, check_output
    from wetok.errors import InputError

    check_output(tmp_path / "a.json", 1, TOKEN_SUFFIXES)
    check_output(tmp_path / "folder", 3, TOKEN_SUFFIXES)
    with pytest.raises(InputError, match="a.json: names one file, but there are 2 inputs"):
        check_output(tmp_path / "a.json", 2, TOKEN_SUFFIXES)


# ------------------------------------------------------------------------------------------------ fast path
def test_commands_run_the_fast_path_by_default_and_the_plain_model_with_no_fast(tiny):
    """In process: the model the image commands load goes through wetok.fast.optimize unless --no-fast, and the
    two give the same tokens and reconstructions within 1e-4 (the plain one is the library's own model)."""
    from wetok.cli import common
    from wetok.cli.main import build_parser
    from wetok.fast import StableGroupNorm

    parser = build_parser()
    fast, _ = common.load_model_from_args(parser.parse_args(["reconstruct", "x", "-o", "y", *TINY]))
    plain, _ = common.load_model_from_args(parser.parse_args(["reconstruct", "x", "-o", "y", *TINY, "--no-fast"]))
    assert fast.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(m, StableGroupNorm) for m in fast.modules())
    assert plain.encoder.conv_in.weight.is_contiguous()
    assert not any(isinstance(m, StableGroupNorm) for m in plain.modules())
    pixels = pil_to_tensor(Image.open(PHOTO).convert("RGB").crop((0, 0, 96, 64)))[None]
    with torch.inference_mode():
        tokens_fast, tokens_plain, tokens_lib = fast.encode(pixels), plain.encode(pixels), tiny.encode(pixels)
        assert torch.equal(tokens_plain.indices, tokens_lib.indices)
        assert torch.equal(tokens_fast.indices, tokens_plain.indices)
        difference = (fast.decode(tokens_plain) - plain.decode(tokens_plain)).abs().max().item()
    assert 0 < difference < 1e-4  # a different (channels_last) arithmetic, not the same code path
    auto = parser.parse_args(["encode", "x", "-o", "y", "--dtype", "auto"])
    assert auto.dtype == "auto" and not auto.compile
    with pytest.raises(SystemExit):  # info builds nothing to run, so it has no speed options
        parser.parse_args(["info", "--compile"])
