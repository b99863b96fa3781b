"""``wetok tokenize``: shards equal WeTok.encode of torchvision-preprocessed views; labels and class tables for a
class tree and file lists; bad images; resume after SIGKILL; two processes = one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from conftest import SHARED
from train_helpers import run_cli
from wetok import WeTok
from wetok.cli.main import main
from wetok.data import to_model_range
from wetok.token_shards import INDEX_NAME, TokenDataset

SIZE = 32
CIFAR = SHARED / "data" / "cifar10" / "train"  # noise images where it is missing
# (class, stored size (w, h)): non-square, so resizing and cropping matter
SIZES = [(45, 37), (37, 60), (33, 33), (80, 41)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 4 PNG images (CIFAR-10 pictures resized to non-square sizes, or noise) plus one bad file."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["bird", "cat", "ship"]):
        (root / name).mkdir()
        sources = sorted((CIFAR / name).glob("*"))[:4] if (CIFAR / name).is_dir() else []
        for i, size in enumerate(SIZES):
            if sources:
                image = Image.open(sources[i]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
            else:
                image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            image.save(root / name / f"{c}{i}.png")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return WeTok.from_preset("tiny-f8").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def expected_views(path: Path, model: WeTok, *, flip: bool, ten_crop: bool) -> np.ndarray:
    """Indices (V, h, w, g) of the views computed with torchvision's transforms and WeTok.encode."""
    from torchvision.transforms import v2

    image = Image.open(path).convert("RGB")
    center = v2.CenterCrop(SIZE)(v2.Resize(SIZE)(image))
    views = [center] + ([v2.functional.horizontal_flip(center)] if flip else [])
    if ten_crop:
        views += list(v2.TenCrop(SIZE)(v2.Resize(round(SIZE * 1.1))(image)))
    pixels = torch.stack([to_model_range(v2.functional.pil_to_tensor(v)) for v in views])
    with torch.no_grad():
        return model.encode(pixels).indices.numpy()


def tokenize(*args: str) -> int:
    return main(["tokenize", *args, "--num-workers", "0", "-q"])


def read_all(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ds = TokenDataset(out)
    tokens = np.stack([ds[i][0].numpy() for i in range(len(ds))]) if len(ds) else np.zeros(0)
    return tokens, ds.labels.copy(), ds.views.copy(), ds.image_ids.copy()


def test_class_tree_views_equal_encode(tree: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = tokenize(str(tree), "-o", str(out), "--model", str(model_dir), "--no-fast", "--size", str(SIZE), "--flip",
                  "--ten-crop", "--shard-size", "5", "--batch-size", "3")
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and "broken.png" in err
    model = WeTok.from_pretrained(model_dir).eval()
    ds = TokenDataset(out)
    index = json.loads((out / INDEX_NAME).read_text())
    assert ds.class_names == ["bird", "cat", "ship"] and ds.num_classes == 3
    assert ds.tokenizer_id == model.model_id and ds.tokenizer_name == str(model_dir)
    assert ds.tokenizer_weights_id == model.weights_id
    ds.check_tokenizer(model)
    assert (ds.groups, ds.bits_per_group, ds.grid, ds.image_size) == (4, 4, (4, 4), (SIZE, SIZE))
    assert ds.view_names == ["center", "center-flip", "tl", "tr", "bl", "br", "mid", "tl-flip", "tr-flip",
                             "bl-flip", "br-flip", "mid-flip"]
    assert [b["path"] for b in index["bad_images"]] == [str(tree / "cat" / "broken.png")]
    assert load_file(str(out / "shard-00000.safetensors"))["indices"].dtype == np.uint8
    listed = [line.split("\t") for line in (out / "images.txt").read_text().splitlines()]
    assert len(listed) == 13 and index["num_images"] == 13
    tokens, labels, views, image_ids = read_all(out)
    assert len(tokens) == 12 * 12 and np.array_equal(views, np.tile(np.arange(12), 12))
    for image_id in np.unique(image_ids):
        path, label = listed[image_id]
        rows = image_ids == image_id
        assert np.all(labels[rows] == int(label)) and int(label) == ["bird", "cat", "ship"].index(Path(path).parent.name)
        np.testing.assert_array_equal(tokens[rows], expected_views(Path(path), model, flip=True, ten_crop=True))
    # the flipped view is not the centre view (the test could not pass by accident)
    assert not np.array_equal(tokens[0], tokens[1])
    # only-centre selection
    centre = TokenDataset(out, views=["center"])
    assert len(centre) == 12 and np.array_equal(centre[0][0].numpy(), tokens[0])


def test_file_lists_labels_and_class_table(tree: Path, model_dir: Path, tmp_path: Path) -> None:
    files = [tree / "ship" / "20.png", tree / "bird" / "01.png", tree / "cat" / "12.png"]
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p.relative_to(tree)},{p.parent.name}\n" for p in files))
    shutil.copy(csv, tree / "names.csv")
    tsv = tree / "numbers.tsv"
    tsv.write_text("# comment\n" + "".join(f"{p}\t{k * 3}\n" for k, p in enumerate(files)))
    names_file = tmp_path / "names.txt"
    names_file.write_text("".join(f"c{i}\n" for i in range(7)))
    model = WeTok.from_pretrained(model_dir).eval()
    for k, (listing, names, labels, extra) in enumerate([
        (tree / "names.csv", ["bird", "cat", "ship"], [2, 0, 1], []),
        (tsv, [str(i) for i in range(7)], [0, 3, 6], []),
        (tsv, [f"c{i}" for i in range(7)], [0, 3, 6], ["--class-names", str(names_file)]),
    ]):
        out = tmp_path / f"out{k}"
        assert tokenize(str(listing), "-o", str(out), "--model", str(model_dir), "--no-fast", "--size", "32",
                        *extra) == 0
        tokens, got_labels, _, image_ids = read_all(out)
        ds = TokenDataset(out)
        assert ds.class_names == names and got_labels.tolist() == labels and image_ids.tolist() == [0, 1, 2]
        for k, p in enumerate(files):
            np.testing.assert_array_equal(tokens[k], expected_views(p, model, flip=False, ten_crop=False)[0])


def test_bad_inputs(tree: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    common = ["--model", str(model_dir), "--size", "32"]
    out = tmp_path / "strict"
    assert tokenize(str(tree), "-o", str(out), *common, "--strict") == 2
    assert "broken.png" in capsys.readouterr().err and not (out / INDEX_NAME).exists()
    bad_only = tmp_path / "bad"
    (bad_only / "x").mkdir(parents=True)
    (bad_only / "x" / "a.jpg").write_text("no")
    assert tokenize(str(bad_only), "-o", str(tmp_path / "o2"), *common) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
    assert tokenize(str(tree), "-o", str(tmp_path / "o3"), "--model", str(model_dir), "--size", "36") == 2
    assert "multiple of the tokenizer's downsampling factor 8" in capsys.readouterr().err
    listing = tmp_path / "l.txt"
    listing.write_text("a.png\n")
    assert tokenize(str(listing), "-o", str(tmp_path / "o4"), *common) == 2
    assert "line 1 has no label" in capsys.readouterr().err
    listing.write_text(f"{tree / 'cat' / '10.png'}\t5\n")
    (tmp_path / "two.txt").write_text("a\nb\n")
    assert tokenize(str(listing), "-o", str(tmp_path / "o5"), *common, "--class-names", str(tmp_path / "two.txt")) == 2
    assert "label 5 is beyond the 2 class names" in capsys.readouterr().err
    # a folder holding another run's data set (here: another size) is refused
    done = tmp_path / "done"
    assert tokenize(str(tree / "ship"), "-o", str(done), *common) == 2  # files not in class folders
    capsys.readouterr()
    assert tokenize(str(tree), "-o", str(done), *common, "--shard-size", "100") == 0
    assert tokenize(str(tree), "-o", str(done), *common, "--shard-size", "100", "--flip") == 2
    assert "another run" in capsys.readouterr().err
    # ... and so is the same architecture with other weights
    torch.manual_seed(1)
    other = WeTok.from_preset("tiny-f8").save_pretrained(tmp_path / "other")
    assert tokenize(str(tree), "-o", str(done), "--model", str(other), "--size", "32", "--shard-size", "100") == 2
    assert "another run" in capsys.readouterr().err


def test_resume_after_sigkill_equals_uninterrupted(tree: Path, model_dir: Path, tmp_path: Path) -> None:
    args = [str(tree), "--model", str(model_dir), "--size", "32", "--flip", "--shard-size", "1", "--batch-size", "1",
            "--num-workers", "0", "-q"]
    full = tmp_path / "full"
    run_cli(["tokenize", *args, "-o", str(full)], cwd=tmp_path)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "wetok.cli.main", "tokenize", *args, "-o", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(killed.glob("shard-*.safetensors"))
    assert 3 <= len(written) < 13 and not (killed / INDEX_NAME).exists()
    # a stale temporary of an unfinished shard, as a kill during a write leaves, is cleaned up
    (killed / ".shard-00012.abc.tmp").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in written}
    run_cli(["tokenize", *args, "-o", str(killed)], cwd=tmp_path)
    assert all((killed / name).stat().st_mtime_ns == t for name, t in before.items())  # kept, not redone
    assert not list(killed.glob(".*.tmp"))
    for a, b in zip(read_all(full), read_all(killed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert json.loads((full / INDEX_NAME).read_text()) | {"source": ""} == \
        json.loads((killed / INDEX_NAME).read_text()) | {"source": ""}


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not available")
def test_two_processes_equal_one(tree: Path, model_dir: Path, tmp_path: Path) -> None:
    args = [str(tree), "--model", str(model_dir), "--size", "32", "--flip", "--shard-size", "3", "--batch-size",
            "2", "--num-workers", "0", "-q"]
    run_cli(["tokenize", *args, "-o", str(tmp_path / "one")], cwd=tmp_path)
    run_cli(["tokenize", *args, "-o", str(tmp_path / "two")], cwd=tmp_path, torchrun=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for shard in one.glob("shard-*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(two / shard.name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (one / INDEX_NAME).read_text() == (two / INDEX_NAME).read_text()
