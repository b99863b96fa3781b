"""``wetok sample`` end to end, in a subprocess, with a tiny random generator and tokenizer."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, REPO
from wetok import WeTok
from wetok.cli.sample import parse_classes, parse_scales
from wetok.errors import InputError
from wetok.generation import WeTokAR
from wetok.image import to_uint8

SRC = REPO / "src"


def wetok(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "wetok.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2 x 2-position generator over 4 x 4-bit tokens, saved with a tiny-f8 tokenizer (16 x 16 images)."""
    torch.manual_seed(0)
    model = WeTokAR.from_preset("ar-tiny", grid_height=2, grid_width=2, num_classes=5).eval()
    for head in model.head:
        torch.nn.init.normal_(head.weight, std=0.5)
    model.tokenizer = WeTok.from_preset("tiny-f8").eval()
    folder = tmp_path_factory.mktemp("ar") / "model"
    model.save_pretrained(folder)
    return model, folder


def test_sample_writes_pngs_grid_and_npz(saved, tmp_path):
    model, folder = saved
    out, npz = tmp_path / "out", tmp_path / "samples.npz"
    cfg = [1.5, 1.0, 2.0, 0.5]
    result = wetok("sample", "0", "2-3", "--per-class", "2", "--model", str(folder), "-o", str(out), "--cfg",
                   ",".join(map(str, cfg)), "--seed", "1", "--batch-size", "4", "--grid", "--npz", str(npz), "-q")
    assert result.returncode == 0, result.stderr
    labels = [0, 0, 2, 2, 3, 3]
    names = ["0_0.png", "0_1.png", "2_0.png", "2_1.png", "3_0.png", "3_1.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "grid.png"])
    with np.load(npz) as data:
        arr = data["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(out / name)), arr[i])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (3 * 16, 2 * 16, 3)
    assert np.array_equal(grid[16:32, 16:32], arr[3])  # row 1 = class 2, column 1 = its second image
    # The same draws in process: one generator seeded with --seed, batches of --batch-size, decoded in float32.
    gen = torch.Generator().manual_seed(1)
    expected = []
    with torch.no_grad():
        for start in range(0, 6, 4):
            indices = model.generate(labels[start:start + 4], cfg_scale=cfg, generator=gen)
            expected.append(to_uint8(model.tokenizer.decode(indices)).permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.concatenate(expected), arr)


@pytest.mark.shared(FIXTURES / "tiny_ar_g4b8.ckpt", FIXTURES / "tiny_ds16_g4.ckpt")
def test_sample_official_checkpoint_with_official_tokenizer(tmp_path):
    """An official AR checkpoint (the fixture, 8 x 8 positions) decoded by the official tokenizer fixture."""
    out = tmp_path / "official"
    result = wetok("sample", "1", "4", "--model", str(FIXTURES / "tiny_ar_g4b8.ckpt"), "--config",
                   str(FIXTURES / "tiny_ar_g4b8.yaml"), "--tokenizer", str(FIXTURES / "tiny_ds16_g4.ckpt"),
                   "--tokenizer-config", str(FIXTURES / "tiny_ds16_g4.yaml"), "--cfg", "1.75,1.8,2,2",
                   "--top-k", "1", "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["1_0.png", "4_0.png"]
    assert Image.open(out / "1_0.png").size == (128, 128)  # 8 x 8 positions, f = 16


def test_sample_random_init_presets(tmp_path):
    out = tmp_path / "random"
    result = wetok("sample", "0", "9", "--model", "ar-tiny", "--random-init", "--tokenizer", "tiny-f8",
                   "--tokenizer-random-init", "--top-k", "1", "--dtype", "bfloat16", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0_0.png", "9_0.png"]
    assert Image.open(out / "0_0.png").size == (64, 64)  # ar-tiny: 8 x 8 positions; tiny-f8: f = 8
    assert result.stderr.count("randomly initialised") == 2  # both models announced


@pytest.mark.parametrize("case", ["unknown class", "tokenizer mismatch", "corrupt weights", "preset without flag",
                                  "bad cfg", "grid type"])
def test_sample_bad_input_one_line_exit_2_nothing_written(saved, tmp_path, case):
    _, folder = saved
    model = ["--model", str(folder)]
    extra: list[str] = []
    classes = ["1"]
    if case == "unknown class":
        classes = ["3-5"]  # the model has classes 0-4
    elif case == "tokenizer mismatch":
        extra = ["--tokenizer", "small-f8", "--tokenizer-random-init"]  # 4 x 8 bits; the generator has 4 x 4
    elif case == "corrupt weights":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text((folder / "config.json").read_text())
        (broken / "model.safetensors").write_bytes(b"\0" * 64)
        model = ["--model", str(broken)]
    elif case == "preset without flag":
        model = ["--model", "ar-tiny", "--tokenizer", "tiny-f8", "--tokenizer-random-init"]
    elif case == "bad cfg":
        extra = ["--cfg", "1.5,2"]  # neither one value nor one per sub-token (4)
    elif case == "grid type":
        extra = ["--grid", str(tmp_path / "grid.xyz")]  # refused before sampling, not after
    out, npz = tmp_path / "out", tmp_path / "x.npz"
    result = wetok("sample", *classes, *model, *extra, "-o", str(out), "--npz", str(npz), "-q")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wetok sample: error:"), result.stderr
    assert not out.exists() and not npz.exists()


def test_argument_parsing():
    assert parse_classes(["3", "7,10-12"], 20) == [3, 7, 10, 11, 12]
    assert parse_classes([], 3) == [0, 1, 2]
    for bad in (["x"], ["5-2"], ["20"]):
        with pytest.raises(InputError):
            parse_classes(bad, 20)
    assert parse_scales("2", 4) == [2.0] * 4
    assert parse_scales("1,2,3,4", 4) == [1.0, 2.0, 3.0, 4.0]


def test_generate_images_checks_the_tokenizer(saved):
    from wetok.generation import generate_images

    model, _ = saved
    images = generate_images(model, [1, 2, 3], batch_size=2, cfg_scale=2.0, top_k=1)
    assert images.shape == (3, 16, 16, 3) and images.dtype == torch.uint8
    with torch.no_grad():
        expected = to_uint8(model.tokenizer.decode(model.generate([1, 2, 3], cfg_scale=2.0, top_k=1)))
    assert torch.equal(images, expected.permute(0, 2, 3, 1))  # greedy: batches do not change the draws
    with pytest.raises(ValueError, match="groups"):
        generate_images(model, [0], tokenizer=WeTok.from_preset("small-f8"))
