"""Image folders (any folder, the ImageNet ``val/<wnid>/*.JPEG`` layout, COCO ``val2017/``), decoding, transforms.

Used by evaluation (:mod:`wetok.evaluate`) and training (``wetok.train.data`` builds on it), so the API here is
kept stable:

* :func:`find_images` lists image files under a root in a deterministic (sorted relative path) order, which for
  ImageNet is the order of the official ``filelist.txt``;
* :func:`load_rgb` decodes one file (:func:`decode_image` a file or its bytes) to an RGB PIL image, or raises
  :class:`~wetok.errors.InputError`;
* :func:`eval_transform` / :func:`train_transform` give float (3, H, W) tensors in [-1, 1];
* :class:`ImageDataset` never crashes on a bad file: it returns a :class:`BadImage` marker that
  :func:`collate_skip_bad` drops and counts.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from .errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImage",
    "ImageDataset",
    "collate_skip_bad",
    "decode_image",
    "eval_transform",
    "find_images",
    "folder_labels",
    "load_rgb",
    "to_model_range",
    "to_rgb",
    "to_tensor_transform",
    "train_transform",
]

log = logging.getLogger(__name__)

#: File name endings recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".gif",
)


# ------------------------------------------------------------------------------------------------ listing files
def _is_image_name(name: str) -> bool:
    # Names starting with "." are skipped: macOS "._x.jpg" resource forks are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` (or ``root`` itself if it is an image file), sorted by relative path.

    Recursion follows symlinked folders (ImageNet copies are often links) but never visits a folder twice.
    Raises :class:`InputError` if ``root`` does not exist or holds no image file.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "does not exist")
    if root.is_file():
        if not _is_image_name(root.name):
            raise InputError(root, f"not an image file (known endings: {' '.join(IMAGE_EXTENSIONS)})")
        return [root]
    found: list[Path] = []
    if recursive:
        seen: set[str] = set()
        for folder, dirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(Path(folder) / name for name in files if _is_image_name(name))
    else:
        found = [p for p in root.iterdir() if p.is_file() and _is_image_name(p.name)]
    if not found:
        where = "under" if recursive else "directly in"
        raise InputError(
            root, f"no image files {where} this folder (known endings: {' '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def folder_labels(paths: Sequence[str | Path], root: str | Path) -> tuple[list[int], list[str]]:
    """Class labels from the first folder level under ``root`` (ImageNet: the synset ``n01440764``).

    Returns (label per path, class names); label = index of the folder name in sorted order, as in the official
    ImageNet loader. Files directly in ``root`` raise :class:`InputError`.
    """
    root = Path(root)
    names = []
    for p in paths:
        parts = Path(p).relative_to(root).parts
        if len(parts) < 2:
            raise InputError(p, f"is not inside a class folder of {root}")
        names.append(parts[0])
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return [index[n] for n in names], classes


# ---------------------------------------------------------------------------------------------------- decoding
def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB.

    * 16/32-bit integer greyscale ("I", "I;16*") is taken as 16-bit and scaled by 255/65535 with rounding;
    * float greyscale ("F") is taken to be in [0, 1];
    * images with transparency (RGBA, LA, PA, palette with a transparent colour) are composited on white
      (the official loader's ``convert("RGB")`` drops alpha instead; ImageNet and COCO have no alpha);
    * everything else (L, 1, P, CMYK, YCbCr, ...) goes through Pillow's ``convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64) * 255.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to an RGB PIL image, applying its EXIF orientation (see :func:`decode_image`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    return decode_image(path)


def decode_image(source: str | Path | bytes, name: str | Path | None = None) -> Image.Image:
    """Decode an image file, or its bytes, to an RGB PIL image, applying its EXIF orientation.

    Raises :class:`InputError` naming ``name`` (default: the path, or "<bytes>") if it is not an image, corrupt,
    truncated, or larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, left at its
    default here). Animated images give their first frame. See :func:`to_rgb` for how other modes become RGB.
    """
    if isinstance(source, bytes):
        name, source = name or "<bytes>", io.BytesIO(source)
    else:
        name = name or source
    try:
        with Image.open(source) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise InputError(name, f"image too large to decode safely ({err})") from err
    except Exception as err:  # noqa: BLE001  Pillow plugins raise many types on corrupt data; all mean "unreadable"
        reason = str(err) or type(err).__name__
        raise InputError(name, f"cannot decode image: {reason}") from err


# -------------------------------------------------------------------------------------------------- transforms
def to_model_range(images: Tensor) -> Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1] as ``uint8 / 127.5 - 1``.

    Computed in float64 and rounded once to float32, which is what the official loader does (numpy float64, then
    ``astype(float32)``); this matters for ``official_compat`` truncation, which is sensitive to the last bit.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8, got {images.dtype}")
    return (images.to(torch.float64) / 127.5 - 1.0).to(torch.float32)


def _v2():
    """torchvision's transforms, imported on first use: the import costs ~2 s, which every CLI call would pay."""
    from torchvision.transforms import InterpolationMode, v2

    return v2, InterpolationMode


def to_tensor_transform() -> Callable[[Image.Image], Tensor]:
    """PIL RGB image -> float (3, H, W) in [-1, 1], no resizing (the ``original`` evaluation protocol)."""
    v2, _ = _v2()
    return v2.Compose([v2.PILToTensor(), to_model_range])


def eval_transform(size: int) -> Callable[[Image.Image], Tensor]:
    """Resize the short side to ``size`` (PIL bilinear with antialias) and center-crop ``size`` x ``size``.

    This is torchvision ``Resize(size) + CenterCrop(size)`` on the PIL image, as in the official evaluation;
    the result is float (3, size, size) in [-1, 1].
    """
    v2, InterpolationMode = _v2()
    return v2.Compose(
        [
            v2.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
            v2.PILToTensor(),
            to_model_range,
        ]
    )


def train_transform(size: int, *, hflip: bool = False) -> Callable[[Image.Image], Tensor]:
    """Resize the short side to ``size``, random ``size`` crop (the official training recipe), optional flip.

    Randomness comes from torch's global generator (seeded per DataLoader worker by PyTorch).
    """
    v2, InterpolationMode = _v2()
    steps: list[Callable] = [
        v2.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
        v2.RandomCrop(size),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.PILToTensor(), to_model_range]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class BadImage:
    """What :class:`ImageDataset` returns for a file that cannot be decoded (dropped by :func:`collate_skip_bad`)."""

    index: int
    path: str
    reason: str


class ImageDataset(Dataset):
    """Images of a folder (see :func:`find_images`) or of a list of paths, in a fixed order.

    ``dataset[i]`` is ``{"image": float (3, H, W) in [-1, 1], "index": i, "path": str}``, or a
    :class:`BadImage` if the file cannot be decoded: a bad file never stops an epoch. Use
    :func:`collate_skip_bad` as the DataLoader's ``collate_fn`` to drop and count them. ``transform`` maps an
    RGB PIL image to the tensor; the default keeps the original size (:func:`to_tensor_transform`).
    """

    def __init__(
        self,
        root_or_paths: str | Path | Sequence[str | Path],
        transform: Callable[[Image.Image], Tensor] | None = None,
        *,
        recursive: bool = True,
    ) -> None:
        if isinstance(root_or_paths, (str, Path)):
            self.root: Path | None = Path(root_or_paths)
            self.paths = find_images(self.root, recursive=recursive)
        else:
            self.root = None
            self.paths = [Path(p) for p in root_or_paths]
        self.transform = transform if transform is not None else to_tensor_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        path = self.paths[index]
        try:
            image = load_rgb(path)
        except InputError as err:
            log.warning("skipping unreadable image %s", err)
            return BadImage(index=int(index), path=str(path), reason=err.reason)
        return {"image": self.transform(image), "index": int(index), "path": str(path)}


def collate_skip_bad(items: Sequence[dict[str, Any] | BadImage]) -> dict[str, Any]:
    """Collate :class:`ImageDataset` items, dropping :class:`BadImage` markers.

    Returns ``{"image": (B, 3, H, W) or None if every item was bad, "index": int64 (B,), "path": [str],
    "n_bad": int, "bad_files": [(path, reason)]}``. All images of a batch must have the same size.
    """
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [it for it in items if isinstance(it, BadImage)]
    sizes = {tuple(it["image"].shape) for it in good}
    if len(sizes) > 1:
        raise ValueError(
            f"images of different sizes in one batch: {sorted(sizes)}; use batch size 1 or a crop"
        )
    return {
        "image": torch.stack([it["image"] for it in good]) if good else None,
        "index": torch.tensor([it["index"] for it in good], dtype=torch.int64),
        "path": [it["path"] for it in good],
        "n_bad": len(bad),
        "bad_files": [(b.path, b.reason) for b in bad],
    }
