"""wetok.data: listing, decoding (modes, EXIF, corrupt files), transforms, the bad-file-tolerant dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import PHOTOS, VAL
from wetok.data import (
    BadImage,
    ImageDataset,
    collate_skip_bad,
    decode_image,
    eval_transform,
    find_images,
    folder_labels,
    load_rgb,
    to_model_range,
    train_transform,
)
from wetok.errors import InputError


def _rgb(h: int = 12, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- find_images
def test_find_images_real_folder_sorted():
    paths = find_images(PHOTOS)
    names = sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert [p.name for p in paths] == names
    assert len(paths) == len(names) > (10 if PHOTOS == VAL else 3)  # 100 shared photographs, or 4 examples


def test_find_images_imagenet_layout(tmp_path):
    for wnid, names in {"n02": ["b.JPEG", "a.jpeg"], "n01": ["z.PNG", ".hidden.jpg", "notes.txt"]}.items():
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for name in names:
            Image.fromarray(_rgb()).save(tmp_path / "val" / wnid / name, format="PNG")
    (tmp_path / "val" / "top.bmp").write_bytes(b"")
    paths = find_images(tmp_path / "val")
    rel = [p.relative_to(tmp_path / "val").as_posix() for p in paths]
    assert rel == ["n01/z.PNG", "n02/a.jpeg", "n02/b.JPEG", "top.bmp"]
    assert [p.name for p in find_images(tmp_path / "val", recursive=False)] == ["top.bmp"]
    labels, classes = folder_labels(paths[:3], tmp_path / "val")
    assert labels == [0, 1, 1] and classes == ["n01", "n02"]
    with pytest.raises(InputError, match="class folder"):
        folder_labels(paths, tmp_path / "val")


def test_find_images_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist") as info:
        find_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no image files"):
        find_images(tmp_path / "empty")
    single = tmp_path / "one.png"
    Image.fromarray(_rgb()).save(single)
    assert find_images(single) == [single]


# ------------------------------------------------------------------------------------------------- load_rgb
def test_load_rgb_matches_pillow_on_real_jpeg():
    path = find_images(PHOTOS)[0]
    ref = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(path)), ref)


def test_load_rgb_modes(tmp_path):
    rgb = _rgb()
    # RGBA composited on white: out = a * c + (1 - a) * 255, rounded (Pillow's integer blend, within 1)
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png")).astype(float)
    a = alpha[..., None] / 255.0
    expected = a * rgb + (1 - a) * 255
    assert np.abs(out - expected).max() <= 1.0
    assert (out[0, 0] == 255).all() and (out[0, 1] == rgb[0, 1]).all()
    # greyscale -> three equal channels
    grey = rgb[..., 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "l.png")), np.repeat(grey[..., None], 3, -1))
    # 16-bit greyscale scaled by 255 / 65535 with rounding
    grey16 = np.random.default_rng(2).integers(0, 65536, (9, 7)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    expected16 = np.rint(grey16 / 65535.0 * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g16.png"))[..., 1], expected16)
    # palette
    pal = Image.fromarray(rgb).quantize(colors=8)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p.png")), np.asarray(pal.convert("RGB")))


def test_load_rgb_applies_exif_orientation(tmp_path):
    rgb = _rgb(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation 3: rotated 180 degrees
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "o.png")), rgb[::-1, ::-1])
    exif[0x0112] = 6  # orientation 6: rotate 90 clockwise to display
    Image.fromarray(rgb).save(tmp_path / "o6.png", exif=exif)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "o6.png")), np.rot90(rgb, k=-1))


def test_load_rgb_bad_files(tmp_path, monkeypatch):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="cannot decode") as info:
        load_rgb(junk)
    assert str(junk) in str(info.value)
    real = find_images(PHOTOS)[0].read_bytes()
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(real[: len(real) // 3])
    with pytest.raises(InputError, match="trunc.jpg"):
        load_rgb(truncated)
    with pytest.raises(InputError, match="does not exist"):
        load_rgb(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    Image.fromarray(_rgb(64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 * 1000: Pillow's bomb error
    with pytest.raises(InputError, match="too large"):
        load_rgb(big)


# ----------------------------------------------------------------------------------------------- transforms
def test_to_model_range_is_the_official_float64_formula():
    levels = torch.arange(256, dtype=torch.uint8)
    expected = (np.arange(256) / 127.5 - 1.0).astype(np.float32)
    assert np.array_equal(to_model_range(levels).numpy(), expected)
    with pytest.raises(TypeError):
        to_model_range(levels.float())


def test_eval_transform_matches_pil_resize_and_center_crop():
    path = find_images(PHOTOS)[3]
    image = load_rgb(path)
    w, h = image.size
    size = 64
    if w < h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    resized = np.asarray(image.resize(new, Image.BILINEAR))
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    crop = resized[top : top + size, left : left + size]
    expected = (crop.astype(np.float64) / 127.5 - 1).astype(np.float32).transpose(2, 0, 1)
    out = eval_transform(size)(image)
    assert out.dtype == torch.float32 and out.shape == (3, size, size)
    assert np.array_equal(out.numpy(), expected)


def test_train_transform_is_a_crop_of_the_resized_image():
    image = load_rgb(find_images(PHOTOS)[0])
    full = eval_transform(48)  # reference for the resize: short side 48
    w, h = image.size
    resized = np.asarray(
        image.resize((48, int(48 * h / w)) if w < h else (int(48 * w / h), 48), Image.BILINEAR)
    )
    torch.manual_seed(0)
    crop = ((train_transform(48)(image).numpy() + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    windows = np.lib.stride_tricks.sliding_window_view(resized, (48, 48, 3)).reshape(-1, 48, 48, 3)
    assert any(np.array_equal(crop, win) for win in windows)
    assert full(image).shape == (3, 48, 48)
    torch.manual_seed(0)
    flipped = train_transform(48, hflip=True)(image)
    assert flipped.shape == (3, 48, 48)


# ---------------------------------------------------------------------------------------------------- dataset
def test_dataset_skips_and_counts_bad_files(tmp_path):
    good = find_images(PHOTOS)[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    paths = [good[0], bad, good[1], good[2]]
    dataset = ImageDataset(paths, transform=eval_transform(32))
    assert isinstance(dataset[1], BadImage) and dataset[1].path == str(bad)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert [b["n_bad"] for b in batches] == [1, 0]
    assert batches[0]["bad_files"][0][0] == str(bad)
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 2, 3]
    assert batches[0]["path"] == [str(good[0])]
    expected = eval_transform(32)(load_rgb(good[1]))
    assert torch.equal(batches[1]["image"][0], expected)
    only_bad = collate_skip_bad([dataset[1]])
    assert only_bad["image"] is None and only_bad["n_bad"] == 1 and only_bad["index"].numel() == 0


def test_dataset_from_folder_default_transform_keeps_size():
    dataset = ImageDataset(PHOTOS)
    item = dataset[0]
    w, h = Image.open(dataset.paths[0]).size
    assert item["image"].shape == (3, h, w) and item["index"] == 0
    ref = np.asarray(Image.open(dataset.paths[0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(((item["image"].numpy() + 1) * 127.5).round().astype(np.uint8), ref)
    with pytest.raises(ValueError, match="different sizes"):
        collate_skip_bad(
            [
                {"image": torch.zeros(3, 4, 4), "index": 0, "path": "a"},
                {"image": torch.zeros(3, 4, 8), "index": 1, "path": "b"},
            ]
        )


def test_decode_image_takes_bytes_like_files(tmp_path):
    path = find_images(PHOTOS)[0]
    assert np.array_equal(np.asarray(decode_image(path.read_bytes())), np.asarray(load_rgb(path)))
    with pytest.raises(InputError, match="shard.tar:x.jpg: cannot decode"):
        decode_image(b"not an image", "shard.tar:x.jpg")
