"""Sets of images to measure: a folder, or a NumPy ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3), read in batches.

The ``.npz`` layout is the one of the ADM evaluation suite (``VIRTUAL_imagenet256_labeled.npz`` and the sample
batches of most class-conditional generators): ``arr_0`` images, optionally ``mu`` / ``sigma`` Inception
statistics. Every member's ``.npy`` header (dtype, shape, byte count) is checked before any array data is read,
object (pickled) arrays are refused, and images are streamed in batches, so a 10 GB sample file needs memory for
one batch only. Batches are sharded over ``torch.distributed`` ranks like :func:`wetok.evaluate.evaluate` does
(rank r of W takes images r, r + W, ...), each image keeping its global index.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from .data import BadImage, ImageDataset, eval_transform, find_images, to_model_range, to_tensor_transform
from .errors import InputError
from .token_shards import shown

__all__ = ["FolderImages", "NpyHeader", "NpzImages", "npz_headers", "open_images"]

#: Largest ``mu`` / ``sigma`` dimension accepted from a statistics file (sigma is D x D float64: 128 MiB; the FID
#: Inception's features have 2048).
MAX_STATS_DIM = 4096
#: Largest ``.npz`` image (pixels: 4096 x 4096), most members of an ``.npz``, and most bytes of one batch's float
#: pixels (a batch of large images is cut to fit; the features do not depend on the batch).
MAX_NPZ_IMAGE_PIXELS = 4096 * 4096
MAX_NPZ_MEMBERS = 1024
MAX_BATCH_BYTES = 1 << 30
#: What a damaged or foreign zip member raises while it is read.
_ZIP_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class NpyHeader:
    """What an ``.npz`` member's header declares, read without loading the data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_bytes: int  # bytes the member holds after its header


def _read_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``fp``, leaving it at the first data byte."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f".npy format version {version} is not supported")


def npz_headers(path: str | Path) -> dict[str, NpyHeader]:
    """The headers of every array in an ``.npz`` (key -> :class:`NpyHeader`), checked against the member sizes.

    Raises :class:`InputError` naming the file if it is not a zip archive, a member is not an ``.npy`` array,
    holds pickled objects, or its header declares more or fewer bytes than the member has.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(path, f"not an .npz file (not a zip archive: {err})") from err
    headers: dict[str, NpyHeader] = {}
    with archive:
        if len(archive.infolist()) > MAX_NPZ_MEMBERS:
            raise InputError(path, f"has {len(archive.infolist())} members, over the limit of {MAX_NPZ_MEMBERS}")
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as fp:
                    shape, fortran, dtype = _read_header(fp)
                    offset = fp.tell()
            except _ZIP_ERRORS as err:  # encrypted or unknown compression: RuntimeError, NotImplementedError
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                raise InputError(path, f"member {shown(repr(key))} is not a readable .npy array ({reason})") from None
            if dtype.hasobject:
                raise InputError(
                    path, f"{shown(repr(key))} holds pickled Python objects, which are not read (allow_pickle=False)"
                )
            header = NpyHeader(tuple(int(s) for s in shape), dtype, bool(fortran), info.file_size - offset)
            expected = int(np.prod(header.shape, dtype=np.int64)) * dtype.itemsize
            if expected != header.data_bytes:
                raise InputError(
                    path,
                    f"{shown(repr(key))} is truncated or corrupt: its header declares {shown(header.shape)} "
                    f"{dtype} ({expected} bytes), the file holds {header.data_bytes}",
                )
            headers[key] = header
    return headers


def check_image_array(path: str | Path, key: str, header: NpyHeader) -> None:
    """Refuse anything but C-ordered uint8 (N, H, W, 3) with N, H, W >= 1 and H x W within Pillow's size limit."""
    what = f"{key!r} is {header.dtype} {shown(header.shape)}; expected uint8 images of shape (N, H, W, 3)"
    if header.dtype != np.uint8 or len(header.shape) != 4 or header.shape[-1] != 3:
        raise InputError(path, what)
    n, h, w, _ = header.shape
    if min(n, h, w) < 1:
        raise InputError(path, f"{key!r} holds no image: shape {shown(header.shape)}")
    limit = min(MAX_NPZ_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_NPZ_IMAGE_PIXELS)
    if h * w > limit:
        raise InputError(path, f"{key!r} images are {h} x {w}, over the {limit}-pixel limit")
    if header.fortran_order:
        raise InputError(path, f"{key!r} is stored in Fortran order; save it with np.ascontiguousarray")


def read_stats(path: str | Path, headers: dict[str, NpyHeader]) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (D,) and ``sigma`` (D, D) of an ``.npz`` whose headers were checked by :func:`npz_headers`."""
    mu_h, sigma_h = headers["mu"], headers["sigma"]
    dim = mu_h.shape[0] if len(mu_h.shape) == 1 else -1
    if dim < 1 or sigma_h.shape != (dim, dim) or dim > MAX_STATS_DIM:
        raise InputError(
            path, f"mu {shown(mu_h.shape)} and sigma {shown(sigma_h.shape)} are not (D,) and (D, D) statistics "
            f"with D <= {MAX_STATS_DIM}"
        )
    if mu_h.dtype.kind != "f" or sigma_h.dtype.kind != "f":
        raise InputError(path, f"mu / sigma are {mu_h.dtype} / {sigma_h.dtype}; expected floating point")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except _ZIP_ERRORS as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise InputError(path, f"mu / sigma cannot be read ({reason})") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(path, "mu / sigma hold NaN or infinite values")
    return mu, sigma


# ------------------------------------------------------------------------------------------------- image sets
@dataclass
class Batch:
    """Images of one rank's batch: float (B, 3, H, W) in [-1, 1] and their global indices (int64 (B,))."""

    images: Tensor
    index: Tensor


class NpzImages:
    """The ``arr_0`` images of an ``.npz`` (validated on construction), streamed in batches."""

    key = "arr_0"

    def __init__(self, path: str | Path, headers: dict[str, NpyHeader] | None = None) -> None:
        self.path = Path(path)
        headers = npz_headers(self.path) if headers is None else headers
        if self.key not in headers:
            raise InputError(
                self.path, f"has no {self.key!r} images (arrays: {shown(', '.join(headers) or 'none')})"
            )
        check_image_array(self.path, self.key, headers[self.key])
        self.shape = headers[self.key].shape

    def __len__(self) -> int:
        return self.shape[0]

    def describe(self) -> dict[str, object]:
        return {
            "source": str(self.path),
            "kind": "npz",
            "n_images": len(self),
            "image_size": list(self.shape[1:3]),
        }

    def batches(
        self, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0
    ) -> Iterator[Batch]:
        """Read ``batch_size * world`` images at a time (fewer where their float pixels would pass
        :data:`MAX_BATCH_BYTES`); this rank keeps every ``world``-th from ``rank``."""
        n, h, w, c = self.shape
        image_bytes = h * w * c
        batch_size = max(1, min(batch_size, MAX_BATCH_BYTES // (4 * image_bytes * world)))
        try:
            yield from self._read(batch_size, rank, world)
        except _ZIP_ERRORS as err:  # a bad CRC or a damaged stream found while reading
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise InputError(self.path, f"{self.key!r} cannot be read ({reason})") from None

    def _read(self, batch_size: int, rank: int, world: int) -> Iterator[Batch]:
        n, h, w, c = self.shape
        image_bytes = h * w * c
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as fp:
            _read_header(fp)
            for start in range(0, n, batch_size * world):
                count = min(batch_size * world, n - start)
                data = fp.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise InputError(
                        self.path, f"{self.key!r} ends early, at image {start + len(data) // image_bytes}"
                    )
                chunk = np.frombuffer(data, np.uint8).reshape(count, h, w, c)[rank::world]
                if len(chunk):
                    images = to_model_range(torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2).contiguous())
                    yield Batch(images, torch.arange(start + rank, start + count, world, dtype=torch.int64))


class FolderImages:
    """The images under a folder (:func:`wetok.data.find_images` order), decoded with the project's loader.

    ``crop`` applies :func:`wetok.data.eval_transform` (short side to ``crop``, center crop); without it images
    keep their size. Images of different sizes are measured one size at a time (the feature network resizes
    each image on its own, so grouping does not change a feature).
    """

    def __init__(self, path: str | Path, crop: int | None = None) -> None:
        self.path = Path(path)
        self.paths = find_images(self.path)
        self.crop = crop
        self.bad_files: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict[str, object]:
        size = [self.crop, self.crop] if self.crop else "as stored"
        return {"source": str(self.path), "kind": "folder", "n_images": len(self), "image_size": size}

    def batches(
        self, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0
    ) -> Iterator[Batch]:
        """Batches of same-sized images; undecodable files are collected in :attr:`bad_files`, not yielded."""
        self.bad_files = []
        transform = eval_transform(self.crop) if self.crop else to_tensor_transform()
        loader = DataLoader(
            ImageDataset(self.paths, transform=transform),
            batch_size=batch_size,
            sampler=list(range(rank, len(self.paths), world)),
            num_workers=num_workers,
            collate_fn=list,
        )
        for items in loader:
            good = [it for it in items if not isinstance(it, BadImage)]
            self.bad_files += [(it.path, it.reason) for it in items if isinstance(it, BadImage)]
            for shape in dict.fromkeys(tuple(it["image"].shape) for it in good):
                same = [it for it in good if tuple(it["image"].shape) == shape]
                yield Batch(
                    torch.stack([it["image"] for it in same]),
                    torch.tensor([it["index"] for it in same], dtype=torch.int64),
                )


def open_images(path: str | Path, crop: int | None = None) -> NpzImages | FolderImages:
    """A folder (or one image file) -> :class:`FolderImages`; an ``.npz`` -> :class:`NpzImages`."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and not path.is_dir():
        return NpzImages(path)
    return FolderImages(path, crop)
