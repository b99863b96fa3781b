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
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from ._limits import DEFAULT_MAX_PIXELS
from .errors import InputError, describe_error

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadImage",
    "ImageDataset",
    "collate_skip_bad",
    "decode_image",
    "eval_transform",
    "find_images",
    "folder_labels",
    "is_image_name",
    "load_rgb",
    "max_pixels",
    "check_pixels",
    "set_max_pixels",
    "short_side_resize_check",
    "to_model_range",
    "to_rgb",
    "to_tensor_transform",
    "train_transform",
    "walk_files",
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


_max_pixels: int | None = DEFAULT_MAX_PIXELS
_PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS


def max_pixels() -> int | None:
    """The current image size limit in pixels, None for none (:func:`set_max_pixels`; default
    :data:`DEFAULT_MAX_PIXELS`)."""
    return _max_pixels


def set_max_pixels(limit: int | None) -> None:
    """Refuse images of more than ``limit`` pixels from now on (None or 0: no limit): files (checked from their
    header, before decoding them) and the sizes that resizing or padding would produce (:func:`check_pixels`).
    The ``wetok`` commands' ``--max-pixels``. Pillow's own decompression-bomb limit follows: raised to ``limit``
    when that is larger, off with no limit."""
    global _max_pixels
    if limit is not None and limit < 0:
        raise ValueError(f"the pixel limit must be positive (or 0 = none), got {limit}")
    _max_pixels = int(limit) if limit else None
    if _max_pixels is None or _PILLOW_LIMIT is None:
        Image.MAX_IMAGE_PIXELS = None
    else:
        Image.MAX_IMAGE_PIXELS = max(_PILLOW_LIMIT, _max_pixels)


def check_pixels(name: object, height: int, width: int, what: str = "image is") -> None:
    """Raise :class:`InputError` naming ``name`` if ``height`` x ``width`` is over :func:`max_pixels`; the reason
    reads "{what} W x H = N pixels, over the limit of M (--max-pixels)"."""
    if _max_pixels is not None and height * width > _max_pixels:
        raise InputError(name, f"{what} {width} x {height} = {height * width} pixels, over the limit of "
                               f"{_max_pixels} (--max-pixels; 0 = no limit)")


# ------------------------------------------------------------------------------------------------ listing files
def is_image_name(name: str) -> bool:
    """Whether a file name has an image ending (and is not hidden)."""
    # Names starting with "." are skipped: macOS "._x.jpg" resource forks are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _raise(err: OSError) -> None:
    raise InputError(err.filename, f"cannot list this folder: {(err.strerror or str(err)).lower()}")


def walk_files(root: str | Path, on_error: Callable[[OSError], object] | None = None) -> Iterator[Path]:
    """Every file under the folder ``root``, following symlinked folders (ImageNet copies are often links) but
    entering no folder twice, so symlink loops end. Hidden files and folders (names starting with ".") are
    skipped. Order: folder by folder, unsorted. A folder that cannot be listed calls ``on_error(OSError)``
    (default: raise :class:`InputError` naming it).

    Written here because :func:`os.walk` with ``followlinks`` and :func:`glob.glob` with ``**`` both loop forever
    on a link to a parent folder.
    """
    on_error = on_error or _raise
    seen: set[tuple[int, int]] = set()

    def enter(folder: str) -> bool:
        try:
            st = os.stat(folder)
        except OSError as err:
            on_error(err)
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        return True

    if not enter(str(root)):
        return
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and enter(os.path.join(folder, d)))
        yield from (Path(folder) / name for name in files if not name.startswith("."))


def find_images(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` (or ``root`` itself if it is an image file), sorted by relative path.

    Recursion follows symlinked folders (ImageNet copies are often links) but never visits a folder twice
    (:func:`walk_files`). Raises :class:`InputError` if ``root`` does not exist, cannot be read, or holds no image
    file.
    """
    root = Path(root)
    try:
        if not root.exists():
            raise InputError(root, "does not exist")
        if root.is_file():
            if not is_image_name(root.name):
                raise InputError(root, f"not an image file (known endings: {' '.join(IMAGE_EXTENSIONS)})")
            return [root]
        if recursive:
            found = [p for p in walk_files(root) if is_image_name(p.name)]
        else:
            found = [p for p in root.iterdir() if p.is_file() and is_image_name(p.name)]
    except OSError as err:
        raise InputError(root, (err.strerror or str(err)).lower()) from err
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
        # float32 is exact enough: x * 255 / 65535 = x / 257 is never within 0.002 of a rounding boundary.
        array = np.asarray(image, dtype=np.float32) * np.float32(255.0 / 65535.0)
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
    try:
        if not path.is_file():
            raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    except OSError as err:
        raise InputError(path, (err.strerror or str(err)).lower()) from err
    return decode_image(path)


def decode_image(source: str | Path | bytes, name: str | Path | None = None) -> Image.Image:
    """Decode an image file, or its bytes, to an RGB PIL image, applying its EXIF orientation.

    Raises :class:`InputError` naming ``name`` (default: the path, or "<bytes>") if it is not an image, corrupt,
    truncated, or has more pixels than :func:`max_pixels` (checked from the header, before decoding; the default
    is Pillow's decompression-bomb threshold). Animated images give their first frame. See :func:`to_rgb` for how
    other modes become RGB.
    """
    if isinstance(source, bytes):
        name, source = name or "<bytes>", io.BytesIO(source)
    else:
        name = name or source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(source) as opened:
                check_pixels(name, opened.height, opened.width)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return to_rgb(image)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(name, f"image too large to decode safely ({err})") from err
    except OSError as err:
        if isinstance(source, Path | str) and err.filename is not None:  # the file itself, not its content
            raise InputError(name, (err.strerror or str(err)).lower()) from err
        raise InputError(name, f"cannot decode image: {err or type(err).__name__}") from err
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


def short_side_resize_check(size: int) -> Callable[[Image.Image], Image.Image]:
    """A transform step that lets an image through unchanged, or raises :class:`InputError` if resizing its short
    side to ``size`` would give more than :func:`max_pixels` pixels (a 1 x 40000 strip: 256 x 10 million)."""
    def check(image: Image.Image) -> Image.Image:
        short, long = sorted(image.size)
        what = f"with its short side resized to {size}, this {image.width} x {image.height} image would be"
        check_pixels("image", size, size * long // max(short, 1), what)
        return image

    return check


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
            short_side_resize_check(size),
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
        short_side_resize_check(size),
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
            image = self.transform(load_rgb(path))
        except Exception as err:  # noqa: BLE001  a bad file never stops an epoch, whatever it raises
            reason = err.reason if isinstance(err, InputError) else describe_error(err)
            log.warning("skipping unreadable image %s: %s", path, reason)
            return BadImage(index=int(index), path=str(path), reason=reason)
        return {"image": image, "index": int(index), "path": str(path)}


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
