"""Training data: a seeded, resumable stream of random crops from image folders, file lists or tar shards.

Map-style sources (a folder, recursive: any folder, ImageNet ``train/<wnid>/*``, COCO ``train2017/``; or a
``.txt`` list of paths) are read through :mod:`wetok.data` and consumed as one global stream of samples:

* epoch e visits the files in ``randperm(n)`` seeded by (seed, e); stream position p is file
  ``perm_{p // n}[p % n]``, and its crop (and flip) come from a generator seeded by (seed, p). A sample is thus a
  pure function of (seed, p): the result does not depend on the number of processes or DataLoader workers.
* every forward pass consumes ``world * micro_batch`` consecutive positions, process r taking the r-th slice,
  so N processes see exactly the samples that one process with the same global batch sees.
* the data position saved in a checkpoint is the number of positions consumed; resuming starts there.
* an unreadable file is replaced by another file chosen by the sample's own generator (so batches keep their
  size and processes stay in step); each sample reports how many files it skipped.

Tar shards (WebDataset layout) are streamed by :mod:`wetok.train.shards`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data import find_images, load_rgb, short_side_resize_check, to_model_range
from ..errors import InputError

__all__ = [
    "CropSpec",
    "FilteredOut",
    "RandomCropStream",
    "StreamBatchSampler",
    "build_train_loader",
    "crop_sample",
    "list_files",
]

log = logging.getLogger(__name__)

_MAX_REPLACEMENTS = 20


def sample_rng(seed: int, position: object) -> random.Random:
    """The generator of one stream position (string seeds are hashed with SHA-512: stable across runs)."""
    return random.Random(f"wetok:{seed}:{position}")


class CropSpec:
    """How a training image becomes a crop: resize the short side to ``size`` (bilinear, antialias), then a
    ``random`` or ``center`` crop, an optional flip; images whose short side is below ``min_side`` or whose
    aspect ratio exceeds ``max_aspect`` are rejected (:class:`FilteredOut`)."""

    def __init__(self, size: int, crop: str = "random", hflip: bool = False, min_side: int = 0,
                 max_aspect: float | None = None, resize: int | None = None) -> None:
        if resize is not None and resize < size:
            raise ValueError(f"the resize side ({resize}) must be at least the crop size ({size})")
        self.size, self.crop, self.hflip, self.resize = size, crop, hflip, resize
        self.min_side, self.max_aspect = min_side, max_aspect

    def __call__(self, image: Image.Image, rng: random.Random) -> Tensor:
        width, height = image.size
        if min(width, height) < self.min_side:
            raise FilteredOut(f"short side {min(width, height)} < {self.min_side}")
        if self.max_aspect is not None and max(width, height) > self.max_aspect * min(width, height):
            raise FilteredOut(f"aspect ratio above {self.max_aspect}")
        return crop_sample(image, self.size, rng, self.hflip, center=self.crop == "center", resize=self.resize)


class FilteredOut(Exception):
    """An image rejected by the size / aspect filter of :class:`CropSpec`."""


def crop_sample(image: Image.Image, size: int, rng: random.Random, hflip: bool = False, *,
                center: bool = False, resize: int | None = None) -> Tensor:
    """Resize the short side to ``resize`` (default ``size``; bilinear, antialias), crop ``size`` x ``size`` at an
    offset drawn from ``rng`` (or centred), optionally flip; float (3, size, size) in [-1, 1] (with the default
    ``resize``, the official transforms, spec §5.1)."""
    side = size if resize is None else resize
    image = short_side_resize_check(side)(image)  # a 1 x 40000 strip would become 256 x 10 million: InputError
    image = TF.resize(image, side, interpolation=InterpolationMode.BILINEAR, antialias=True)
    width, height = image.size
    if center:  # torchvision CenterCrop's rounding
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    image = image.crop((left, top, left + size, top + size))
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_model_range(TF.pil_to_tensor(image))


def list_files(source: str | Path) -> list[Path]:
    """Image files of a folder (recursive, sorted) or of a ``.txt`` list (one path per line, relative paths
    resolved against the list's folder; blank lines and ``#`` comments ignored)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".txt":
        try:
            lines = source.read_text().splitlines()
        except OSError as err:
            raise InputError(source, f"cannot read file list: {err.strerror or err}") from err
        paths = [source.parent / line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not paths:
            raise InputError(source, "the file list is empty")
        return paths
    return find_images(source)


class RandomCropStream(Dataset):
    """Map-style dataset indexed by (file index, stream position): see the module docstring."""

    def __init__(self, paths: Sequence[str | Path], spec: CropSpec, seed: int) -> None:
        self.paths = [str(p) for p in paths]
        self.spec = spec
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, position = key
        rng = sample_rng(self.seed, position)
        skipped = 0
        for _ in range(_MAX_REPLACEMENTS):
            try:
                image = self.spec(load_rgb(self.paths[index]), rng)
                return {"image": image, "index": index, "position": position, "skipped": skipped}
            except (InputError, FilteredOut) as err:
                log.warning("skipping training image %s: %s", self.paths[index], err)
                skipped += 1
                index = rng.randrange(len(self.paths))
        raise InputError(self.paths[index], f"{_MAX_REPLACEMENTS} unusable files in a row; is the data corrupt "
                         "or the size filter too strict?")


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of epoch ``epoch`` (a seeded torch.randperm, independent of global RNG state)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (file index, stream position) keys for one process.

    Forward pass k (counted from position ``start``) covers positions ``start + k * world * micro_batch`` onward;
    process ``rank`` takes the ``rank``-th ``micro_batch`` of them.
    """

    def __init__(self, n: int, micro_batch: int, *, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self.start, self.rank, self.world = start, rank, world
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self._perm[1][position % self.n]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.world * self.micro_batch
        first = self.start + self.rank * self.micro_batch
        k = 0
        while True:
            base = first + k * step
            yield [(self._index(p), p) for p in range(base, base + self.micro_batch)]
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader), which we never call
        return 2**62


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; other per-sample fields become tensors; ``skipped`` is summed."""
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key not in ("image", "skipped"):
            out[key] = torch.tensor([it[key] for it in items])
    out["skipped"] = sum(int(it["skipped"]) for it in items)
    return out


def build_train_loader(
    files: Sequence[str | Path],
    spec: CropSpec,
    *,
    micro_batch: int,
    seed: int,
    start: int,
    rank: int,
    world: int,
    num_workers: int,
) -> DataLoader:
    """An endless DataLoader over map-style ``files`` for one process, starting at stream position ``start``."""
    dataset = RandomCropStream(files, spec, seed)
    sampler = StreamBatchSampler(len(dataset), micro_batch, seed=seed, start=start, rank=rank, world=world)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        # the loader's own generator: creating an iterator must not consume the global torch RNG
        generator=torch.Generator().manual_seed(seed),
    )
