"""Encode a class-labelled image set once into token shards (:mod:`wetok.token_shards`): ``wetok tokenize``.

Sources: a folder per class (ImageNet ``train/<wnid>/*.JPEG``: label = index of the folder name in sorted order,
as in the official loader) or a file list (``path<TAB>label`` or ``path,label`` per line, relative paths taken
from the list's folder; integer labels are used as they are, other labels are class names numbered in sorted
order; one list holds one kind).

Preprocessing is deterministic (the official AR training draws a random 256 crop per step instead). Views:

* ``center``: resize the short side to ``size`` (bilinear with antialiasing; the long side becomes
  ``int(size * long / short)``) and take the centre ``size`` x ``size`` crop (offsets ``round((H - size) / 2)``),
  i.e. torchvision ``Resize(size) + CenterCrop(size)``, the evaluation transform of :mod:`wetok.data`;
* ``center-flip`` (``flip``): the same, mirrored left-right;
* ten crops (``ten_crop``, the LlamaGen idea): resize the short side to ``round(size * crop_scale)`` and take the
  four corner crops and the centre crop (``tl``, ``tr``, ``bl``, ``br``, ``mid``), then the same five crops of the
  mirrored image (``tl-flip`` is the top-left crop of the mirrored image): torchvision ``TenCrop``.

Work is split in shards of ``shard_size`` consecutive images; with P processes, rank r encodes shards r, r + P, ...
and batches never cross a shard, so the shards do not depend on the number of processes. A shard is written
atomically when it is complete; a rerun keeps the finished shards (after checking that they belong to the same
run) and encodes the others. Rank 0 writes ``images.txt`` and, last, ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._files import atomic_write, regular_file_size
from .data import BadImage, find_images, folder_labels, load_rgb, short_side_resize_check
from .errors import InputError
from .image import pil_to_tensor
from .token_shards import (
    FORMAT,
    INDEX_NAME,
    ShardIndex,
    check_shard,
    index_dtype,
    read_index,
    shard_name,
    shown,
    write_index,
    write_shard,
)

__all__ = ["LabelledImages", "ViewSpec", "list_labelled_images", "make_views", "read_file_list", "tokenize_dataset"]

log = logging.getLogger(__name__)
LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
TEN_CROP_VIEWS = ("tl", "tr", "bl", "br", "mid")

# Limits, each checked before the memory it bounds is allocated.
#: A file list or class-name file: bytes, and characters per line.
MAX_LIST_BYTES = 1 << 30
MAX_LINE_CHARS = 8192
#: Most classes (integer labels are class numbers below it; ImageNet-21k has 21841).
MAX_CLASSES = 1 << 20
#: Largest --size and --crop-scale (a resized image is held in memory).
MAX_SIZE = 4096
MAX_CROP_SCALE = 4.0
#: Most bytes of one encoder batch's float32 pixels, and of one shard's tokens (held until the shard is written).
MAX_BATCH_BYTES = 1 << 30
MAX_SHARD_BYTES = 2 << 30


# ------------------------------------------------------------------------------------------------------ sources
@dataclass
class LabelledImages:
    """Image paths in a fixed order, each with a class label (an index into ``class_names``).

    ``names`` are the paths as the source spells them (relative to the class tree, or as written in the list):
    they identify the run, so a resumed run may name the source by another path.
    """

    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    source: str
    names: list[str]


def read_file_list(path: str | Path, class_names: Sequence[str] | None = None) -> LabelledImages:
    """``path<TAB>label`` or ``path,label`` lines (blank lines, ``#`` comments and a ``path,label`` header skipped).

    Integer labels are class indices, named by ``class_names`` if given (else "0", "1", ...); other labels are
    names, numbered in sorted order (or by their position in ``class_names``).
    """
    path = Path(path)
    rows: list[tuple[str, str]] = []
    for number, line in read_lines(path, "file list"):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = "\t" if "\t" in line else ","
        if sep not in line:
            raise InputError(path, f"line {number} has no label (expected path<TAB>label or path,label)")
        name, label = (part.strip() for part in line.rsplit(sep, 1))
        if not rows and name.lower() in ("path", "file", "filename", "image") and not _is_number(label):
            continue  # a CSV header
        if not name or not label:
            raise InputError(path, f"line {number}: empty path or label")
        if "\0" in name:
            raise InputError(path, f"line {number}: the path holds a NUL character")
        rows.append((name, label))
    if not rows:
        raise InputError(path, "the file list names no image")
    labels = [label for _, label in rows]
    numeric = [_is_number(label) for label in labels]
    if any(numeric) and not all(numeric):  # e.g. "-1" among class numbers: renumbering them all would be silent
        odd = labels[numeric.index(False)] if numeric[0] else labels[numeric.index(True)]
        raise InputError(path, f"labels mix class numbers and class names (e.g. {shown(repr(odd))}); use one kind")
    if all(numeric):
        numbers = [int(label) for label in labels]
        if max(numbers) >= MAX_CLASSES:
            raise InputError(path, f"label {max(numbers)} is over the limit of {MAX_CLASSES} classes")
        names = list(class_names) if class_names is not None else [str(i) for i in range(max(numbers) + 1)]
        if max(numbers) >= len(names):
            raise InputError(path, f"label {max(numbers)} is beyond the {len(names)} class names")
    else:
        names = list(class_names) if class_names is not None else sorted(set(labels))
        if len(names) > MAX_CLASSES:
            raise InputError(path, f"{len(names)} distinct labels, over the limit of {MAX_CLASSES} classes")
        number = {n: i for i, n in enumerate(names)}
        unknown = [label for label in labels if label not in number]
        if unknown:
            raise InputError(path, f"label {shown(repr(unknown[0]))} is not among the class names")
        numbers = [number[label] for label in labels]
    paths = [Path(n) if Path(n).is_absolute() else path.parent / n for n, _ in rows]
    return LabelledImages(paths, numbers, names, str(path.resolve()), [n for n, _ in rows])


def _is_number(label: str) -> bool:
    """A class number: ASCII digits, short enough for int() (which refuses over 4300 digits)."""
    return label.isascii() and label.isdigit() and len(label) <= 18


def read_lines(path: str | Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, refusing files over :data:`MAX_LIST_BYTES` and lines over
    :data:`MAX_LINE_CHARS` before reading them whole."""
    path = Path(path)
    try:
        if regular_file_size(path, what) > MAX_LIST_BYTES:
            raise InputError(path, f"the {what} is larger than the {MAX_LIST_BYTES}-byte limit")
        with open(path, encoding="utf-8", newline=None) as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 1), ""), 1):
                if len(line) > MAX_LINE_CHARS:
                    raise InputError(path, f"line {number} of the {what} is longer than {MAX_LINE_CHARS} characters")
                yield number, line.rstrip("\n")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)[:200]
        raise InputError(path, f"cannot read the {what} ({reason})") from None


def list_labelled_images(data: str | Path, class_names: Sequence[str] | None = None) -> LabelledImages:
    """A folder per class (labels from the folder names) or a file list (see :func:`read_file_list`)."""
    data = Path(data)
    if data.is_file():
        if data.suffix.lower() not in LIST_SUFFIXES:
            raise InputError(data, f"a file list must end in one of {' '.join(LIST_SUFFIXES)}")
        return read_file_list(data, class_names)
    if class_names is not None:
        raise InputError("--class-names", "is for file lists; a class tree's names are its folder names")
    paths = find_images(data)
    labels, names = folder_labels(paths, data)
    return LabelledImages(paths, labels, names, str(data.resolve()),
                          [p.relative_to(data).as_posix() for p in paths])


# ------------------------------------------------------------------------------------------------------- views
@dataclass(frozen=True)
class ViewSpec:
    """Which deterministic views of each image are encoded (see the module docstring)."""

    size: int = 256
    flip: bool = False
    ten_crop: bool = False
    crop_scale: float = 1.1

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_SIZE:
            raise InputError("--size", f"must be from 1 to {MAX_SIZE}, got {self.size}")
        if self.ten_crop and not 1.0 <= self.crop_scale <= MAX_CROP_SCALE:
            raise InputError("--crop-scale", f"must be from 1 to {MAX_CROP_SCALE:g}, got {self.crop_scale}")

    @property
    def names(self) -> list[str]:
        names = ["center"] + (["center-flip"] if self.flip else [])
        if self.ten_crop:
            names += [*TEN_CROP_VIEWS, *(f"{v}-flip" for v in TEN_CROP_VIEWS)]
        return names

    def describe(self) -> dict[str, Any]:
        return {
            "size": self.size, "flip": self.flip, "ten_crop": self.ten_crop,
            "crop_scale": self.crop_scale if self.ten_crop else None,
            "resize": "short side to size (ten crops: round(size * crop_scale)), bilinear with antialiasing, "
                      "long side int(size * long / short)",
            "crop": "center: offsets round((H - size) / 2); ten crops: torchvision TenCrop (corners, centre, "
                    "then the same of the left-right mirrored image)",
        }


def _resize_short(image: Image.Image, short: int) -> Image.Image:
    short_side_resize_check(short)(image)  # refuse (InputError) what would exceed the pixel limit once resized
    w, h = image.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    return image if new == image.size else image.resize(new, Image.Resampling.BILINEAR)


def _crop(image: Image.Image, size: int, top: int, left: int) -> Image.Image:
    return image.crop((left, top, left + size, top + size))


def _center(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    return _crop(image, size, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))


def _five(image: Image.Image, size: int) -> list[Image.Image]:
    w, h = image.size
    return [_crop(image, size, 0, 0), _crop(image, size, 0, w - size), _crop(image, size, h - size, 0),
            _crop(image, size, h - size, w - size), _center(image, size)]


def make_views(image: Image.Image, spec: ViewSpec) -> Tensor:
    """An RGB PIL image -> float (V, 3, size, size) in [-1, 1], one row per name of ``spec.names``."""
    center = _center(_resize_short(image, spec.size), spec.size)
    views = [center] + ([center.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if spec.flip else [])
    if spec.ten_crop:
        larger = _resize_short(image, max(spec.size, round(spec.size * spec.crop_scale)))
        views += _five(larger, spec.size) + _five(larger.transpose(Image.Transpose.FLIP_LEFT_RIGHT), spec.size)
    return torch.stack([pil_to_tensor(v) for v in views])


class _Views(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], spec: ViewSpec) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor] | BadImage:
        try:
            return i, make_views(load_rgb(self.paths[i]), self.spec)
        except InputError as err:
            return BadImage(index=i, path=str(self.paths[i]), reason=err.reason)


def _collate(items: list) -> list:
    return items


# ---------------------------------------------------------------------------------------------------- the run
def _run_key(tokenizer: dict[str, Any], spec: ViewSpec, shard_size: int, images: LabelledImages) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([tokenizer["id"], tokenizer["weights_id"], tokenizer["dtype"], spec.describe(), shard_size,
                         images.class_names]).encode())
    for p, label in zip(images.names, images.labels, strict=True):
        h.update(f"{p}\t{label}\n".encode())
    return h.hexdigest()[:16]


def _existing_shard(path: Path, index: ShardIndex, number: int) -> bool:
    """True if shard ``number`` is finished (checked), False if absent; stale temporaries of it are removed."""
    for stale in path.parent.glob(f".{path.stem}.*.tmp"):
        stale.unlink(missing_ok=True)
    if not path.exists():
        return False
    check_shard(path, index, number)
    return True


def tokenize_dataset(
    model: Any,
    images: LabelledImages,
    output: str | Path,
    *,
    spec: ViewSpec = ViewSpec(),  # noqa: B008  frozen dataclass
    shard_size: int = 5000,
    batch_size: int = 32,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    strict: bool = False,
    tokenizer_name: str = "",
    progress: bool = False,
    on_bad: Callable[[str, str], None] | None = None,
    barrier: Callable[[], None] | None = None,
) -> ShardIndex | None:
    """Encode every view of every image with ``model`` (a :class:`~wetok.WeTok` in eval mode) into shards.

    This process (``rank`` of ``world_size``) encodes its unfinished shards; then, after ``barrier()`` (needed when
    ``world_size > 1``), rank 0 checks every shard, writes the index and returns it (other ranks return None).
    A bad image is skipped and passed to ``on_bad(path, reason)``, or raises :class:`InputError` with ``strict``.
    """
    if shard_size < 1 or batch_size < 1:
        raise InputError("--shard-size/--batch-size", "must be at least 1")
    if not images.paths:
        raise InputError(images.source, "no images")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(output, "exists and is not a folder")
    index = _plan(model, images, spec, shard_size, tokenizer_name)
    views = len(spec.names)
    if batch_size * views * 3 * spec.size**2 * 4 > MAX_BATCH_BYTES:
        raise InputError("--batch-size", f"{batch_size} images of {views} views at {spec.size} pixels are over "
                                         f"the {MAX_BATCH_BYTES >> 20} MiB limit of one batch; lower it")
    h, w = index.grid
    if shard_size * views * h * w * index.groups * index.dtype.itemsize > MAX_SHARD_BYTES:
        raise InputError("--shard-size", f"{shard_size} images' tokens are over the {MAX_SHARD_BYTES >> 20} MiB "
                                         "limit of one shard (held in memory until written); lower it")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(output, f"cannot create the output folder ({err.strerror or err})") from None
    if (output / INDEX_NAME).is_file() and rank == 0:
        old = read_index(output)
        if old.run != index.run:
            raise InputError(output, f"already holds a token data set of another run ({old.run}; this is "
                                     f"{index.run}: another tokenizer, data or settings); use another folder")
    n_shards = -(-len(images.paths) // shard_size)
    mine = [k for k in range(rank, n_shards, world_size)
            if not _existing_shard(output / shard_name(k), index, k)]
    log.info("rank %d: %d of its %d shards to encode (the others are finished)", rank, len(mine),
             len(range(rank, n_shards, world_size)))
    spans = {k: (k * shard_size, min(len(images.paths), (k + 1) * shard_size)) for k in mine}
    try:
        for number, parts, bad in _encode_shards(model, images, spec, spans, batch_size, num_workers, strict,
                                                 on_bad, progress and rank == 0):
            _write(output, number, index, images, spec, parts, bad)
    except OSError as err:  # a full disk, a folder made read-only meanwhile: finished shards are kept
        raise InputError(err.filename or output, f"cannot write a token shard ({err.strerror or err})") from None
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return _finish(output, index, images, n_shards)


def _plan(model: Any, images: LabelledImages, spec: ViewSpec, shard_size: int, name: str) -> ShardIndex:
    """The index of the data set (without its shards) and the run key that ties the shards to it."""
    f = model.downsample_factor
    if spec.size % f:
        raise InputError("--size", f"{spec.size} is not a multiple of the tokenizer's downsampling factor {f}")
    tokenizer = {"id": model.model_id, "weights_id": model.weights_id, "name": name, "downsample_factor": f,
                 "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return ShardIndex(
        run=_run_key(tokenizer, spec, shard_size, images),
        tokenizer=tokenizer,
        groups=model.config.groups, bits_per_group=model.config.bits_per_group, grid=(spec.size // f, spec.size // f),
        image_size=(spec.size, spec.size), class_names=list(images.class_names), views=spec.names,
        preprocessing=spec.describe(), source=images.source, num_images=len(images.paths),
    )


def _encode_shards(model: Any, images: LabelledImages, spec: ViewSpec, spans: dict[int, tuple[int, int]],
                   batch_size: int, num_workers: int, strict: bool, on_bad: Callable[[str, str], None] | None,
                   progress: bool) -> Iterator[tuple[int, list[tuple[np.ndarray, np.ndarray]], list[dict[str, str]]]]:
    """For each shard of ``spans`` yield (its number, [(indices (n, h, w, g), source image ids (n,)) per batch],
    its bad images).

    Batches never cross a shard boundary, so a shard's tokens do not depend on which process encoded it.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    dtype = index_dtype(model.config.bits_per_group)
    batches = [list(range(a, min(end, a + batch_size))) for start, end in spans.values()
               for a in range(start, end, batch_size)]
    loader = torch.utils.data.DataLoader(_Views(images.paths, spec), batch_sampler=batches, collate_fn=_collate,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=sum(b - a for a, b in spans.values()), desc="wetok tokenize", unit="image",
               disable=not progress)
    pending = iter(spans)
    current, parts, bad = next(pending, None), [], []
    with torch.inference_mode():
        for batch in loader:
            good = [item for item in batch if not isinstance(item, BadImage)]
            for item in batch:
                if isinstance(item, BadImage):
                    if strict:
                        raise InputError(item.path, item.reason)
                    bad.append({"path": item.path, "reason": item.reason})
                    if on_bad is not None:
                        on_bad(item.path, item.reason)
            if good:
                pixels = torch.cat([views for _, views in good]).to(device, non_blocking=True)
                tokens = model.encode(pixels).indices.cpu().numpy().astype(dtype)
                parts.append((tokens, np.repeat(np.array([i for i, _ in good], np.int64), len(spec.names))))
            bar.update(len(batch))
            last = batch[-1].index if isinstance(batch[-1], BadImage) else batch[-1][0]
            if current is not None and last + 1 == spans[current][1]:
                yield current, parts, bad
                current, parts, bad = next(pending, None), [], []
    bar.close()


def _write(output: Path, number: int, index: ShardIndex, images: LabelledImages, spec: ViewSpec,
           parts: list[tuple[np.ndarray, np.ndarray]], bad: list[dict[str, str]]) -> None:
    groups, (h, w) = index.groups, index.grid
    tokens = np.concatenate([t for t, _ in parts]) if parts else np.zeros((0, h, w, groups), index.dtype)
    ids = np.concatenate([i for _, i in parts]) if parts else np.zeros(0, np.int64)
    labels = np.asarray(images.labels, dtype=np.int64)[ids]
    views = np.tile(np.arange(len(spec.names), dtype=np.uint8), len(ids) // len(spec.names))
    metadata = {"format": FORMAT, "run": index.run, "shard": str(number), "bad": json.dumps(bad)}
    write_shard(output / shard_name(number), indices=tokens, labels=labels, images=ids, views=views,
                metadata=metadata)


def _finish(output: Path, index: ShardIndex, images: LabelledImages, n_shards: int) -> ShardIndex:
    """Check every shard, then write images.txt and, last, index.json. A data set without any sample is not
    written: its (empty) shards are removed and InputError raised."""
    for k in range(n_shards):
        path = output / shard_name(k)
        if not path.is_file():
            raise InputError(path, "missing: a process did not finish its shards; run the command again")
        metadata, spans = check_shard(path, index, k)
        index.shards.append({"file": path.name, "count": int(spans["labels"].shape[0])})
        try:
            index.bad_images += json.loads(metadata.get("bad", "[]"))
        except json.JSONDecodeError:
            raise InputError(path, "corrupt list of bad images in its metadata") from None
    if index.num_samples == 0:
        for k in range(n_shards):
            (output / shard_name(k)).unlink(missing_ok=True)
        if not any(output.iterdir()):
            output.rmdir()
        raise InputError(images.source, f"none of the {len(images.paths)} images could be read")
    text = "".join(f"{os.path.abspath(p)}\t{label}\n" for p, label in zip(images.paths, images.labels, strict=True))
    try:
        atomic_write(output / "images.txt", lambda tmp: tmp.write_text(text))
        write_index(output, index)
    except OSError as err:
        raise InputError(err.filename or output, f"cannot write the index ({err.strerror or err})") from None
    return index

