"""Pre-tokenized data sets for generator training: safetensors token shards plus a JSON index.

A data set is a folder::

    index.json                 what every shard shares (below) and the list of shards with their sample counts
    shard-00000.safetensors    one file per shard of consecutive source images
    images.txt                 the source images in order, "absolute path<TAB>label" (a file list ``wetok tokenize`` reads)

Each shard holds, for its N samples (one per image and view, views of an image consecutive):

    ``indices``  (N, h, w, g), the smallest unsigned type that holds 2^d' values (uint8 for d' <= 8, uint16 for
                 d' <= 16, uint32 for d' <= 32, else int64); sub-token i is quantizer group i's index, as in
                 ``WeTok.encode(...).indices``
    ``labels``   int64 (N,), the class index into ``class_names``
    ``images``   int64 (N,), the position of the source image in ``images.txt``
    ``views``    uint8 (N,), the preprocessing view (index into ``views``: "center", "center-flip", ...)

and, in its safetensors metadata, the run key of the data set it belongs to, its shard number and the images it
could not read. safetensors was chosen because it is pickle-free, its header (dtype, shape, byte range of every
tensor) is checked before anything is allocated, and its tensors sit at fixed offsets that numpy memory-maps.

``index.json`` fields: ``format`` ("wetok-token-shards"), ``version`` (1), ``run`` (hash of tokenizer, settings
and image list; every shard carries it), ``tokenizer`` (``id``: :attr:`WeTok.model_id`, the architecture;
``weights_id``: :attr:`WeTok.weights_id`, the encoder and quantizer weights; ``name``: the ``--model`` given;
``downsample_factor``; ``dtype`` it ran in), ``groups``, ``bits_per_group``, ``grid`` [h, w], ``image_size`` [H, W],
``dtype`` (of ``indices``), ``class_names`` (label -> name: ImageNet wnid, folder name, or the list's label),
``views`` (view names), ``preprocessing`` (how each view was made), ``source``, ``num_images``, ``shards``
([{"file", "count"}]), ``num_samples``, ``bad_images`` ([{"path", "reason"}]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._files import atomic_write, read_limited, regular_file_size
from ._json import parse_json
from .errors import InputError, ModelMismatchError, printable

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "VERSION",
    "ShardIndex",
    "TokenDataset",
    "index_dtype",
    "read_index",
    "read_shard_header",
    "shard_name",
    "write_index",
    "write_shard",
]

FORMAT = "wetok-token-shards"
VERSION = 1
INDEX_NAME = "index.json"
#: Largest index.json / shard header read (bytes): checked before reading, so a lying file cannot exhaust memory
#: (parsed JSON takes up to ~20 times its size). An ImageNet index is ~100 KB, a 5000-image shard header ~1 KB.
MAX_INDEX_BYTES = 32 << 20
MAX_HEADER_BYTES = 32 << 20
#: Most samples of a data set: its labels, views and source ids (17 bytes a sample) are held in memory.
MAX_SAMPLES = 1 << 27

# safetensors dtype names <-> little-endian numpy dtypes
_ST_DTYPES = {"U8": "<u1", "U16": "<u2", "U32": "<u4", "I32": "<i4", "I64": "<i8"}
_NP_TO_ST = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}
#: Every shard tensor and its dtype ("indices": the data set's dtype).
SHARD_TENSORS = ("indices", "labels", "images", "views")


def shown(value: object, limit: int = 80) -> str:
    """``value`` as text fit for a one-line message: control and other non-printable characters escaped (a name
    read from a file cannot forge log lines or move the cursor), cut to ``limit`` characters."""
    text = printable(str(value)[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def index_dtype(bits_per_group: int) -> np.dtype:
    """The smallest unsigned integer type that holds 2^bits_per_group values (int64 beyond 32 bits)."""
    if not 1 <= bits_per_group <= 62:
        raise ValueError(f"bits_per_group must be in 1..62, got {bits_per_group}")
    for bits, name in ((8, "uint8"), (16, "uint16"), (32, "uint32")):
        if bits_per_group <= bits:
            return np.dtype(name)
    return np.dtype("int64")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


# -------------------------------------------------------------------------------------------------------- index
@dataclass
class ShardIndex:
    """The content of ``index.json`` (see the module docstring for each field)."""

    run: str
    tokenizer: dict[str, Any]
    groups: int
    bits_per_group: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    class_names: list[str]
    views: list[str]
    preprocessing: dict[str, Any]
    source: str
    num_images: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    bad_images: list[dict[str, str]] = field(default_factory=list)

    @property
    def dtype(self) -> np.dtype:
        return index_dtype(self.bits_per_group)

    @property
    def num_samples(self) -> int:
        return sum(int(s["count"]) for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        data["grid"], data["image_size"] = list(self.grid), list(self.image_size)
        data["dtype"] = self.dtype.name
        data["num_samples"] = self.num_samples
        return data


def write_index(folder: str | Path, index: ShardIndex) -> Path:
    """Write ``folder/index.json`` atomically."""
    text = json.dumps(index.to_json(), indent=1)
    return atomic_write(Path(folder) / INDEX_NAME, lambda tmp: tmp.write_text(text + "\n"))


def _need(path: Path, data: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InputError(path, f"not a wetok token-shard index: field {key!r} is missing or has the wrong type")
    return value


def _int_pair(path: Path, data: dict, key: str) -> tuple[int, int]:
    value = _need(path, data, key, list)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise InputError(path, f"field {key!r} must be two positive integers, got {shown(repr(value))}")
    return int(value[0]), int(value[1])


def read_index(path: str | Path) -> ShardIndex:
    """Read and check ``index.json`` (or the folder holding it); :class:`InputError` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        raise InputError(path, "no token-shard index here (made by `wetok tokenize`; an interrupted run has none: "
                               "run it again to finish)")
    raw = read_limited(path, MAX_INDEX_BYTES, "token-shard index")
    data = parse_json(path, raw, "wetok token-shard index: invalid JSON")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(path, f"not a wetok token-shard index (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise InputError(path, f"token-shard index version {shown(repr(data.get('version')))}; this wetok reads "
                               f"{VERSION}")
    groups = _need(path, data, "groups", int)
    bits = _need(path, data, "bits_per_group", int)
    if groups < 1 or not 1 <= bits <= 62:
        raise InputError(path, f"groups {groups} / bits_per_group {bits} out of range")
    if data.get("dtype") != index_dtype(bits).name:
        raise InputError(path, f"dtype {shown(repr(data.get('dtype')))} does not match bits_per_group {bits}")
    names = _need(path, data, "class_names", list)
    views = _need(path, data, "views", list)
    if not names or not all(isinstance(n, str) for n in names):
        raise InputError(path, "class_names must be a non-empty list of strings")
    if not views or len(views) > 255 or not all(isinstance(v, str) for v in views):
        raise InputError(path, "views must be a list of 1 to 255 strings")
    tokenizer = _need(path, data, "tokenizer", dict)
    if not isinstance(tokenizer.get("id"), str) or not isinstance(tokenizer.get("weights_id", ""), str):
        raise InputError(path, "tokenizer.id is missing (or tokenizer.weights_id is not a string)")
    if not isinstance(tokenizer.get("name", ""), str):
        raise InputError(path, "tokenizer.name is not a string")
    shards = _need(path, data, "shards", list)
    for s in shards:
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int)
        ok = ok and not isinstance(s["count"], bool) and s["count"] >= 0
        # a plain file name inside the folder: no folder part, no absolute path, nothing unprintable
        if not ok or Path(s["file"]).name != s["file"] or not s["file"].endswith(".safetensors") \
                or not s["file"].isprintable() or "\\" in s["file"]:
            raise InputError(path, f"bad shard entry {shown(repr(s))}")
    bad = _need(path, data, "bad_images", list)
    if not all(isinstance(b, dict) and all(isinstance(v, str) for v in b.values()) for b in bad):
        raise InputError(path, "bad_images must be a list of {\"path\", \"reason\"} strings")
    total = sum(s["count"] for s in shards)
    if total > MAX_SAMPLES:
        raise InputError(path, f"{total} samples in all, over the limit of {MAX_SAMPLES} per data set")
    num_images = _need(path, data, "num_images", int)
    if num_images < 0:
        raise InputError(path, f"num_images is negative ({num_images})")
    return ShardIndex(
        run=_need(path, data, "run", str),
        tokenizer=tokenizer,
        groups=groups,
        bits_per_group=bits,
        grid=_int_pair(path, data, "grid"),
        image_size=_int_pair(path, data, "image_size"),
        class_names=list(names),
        views=list(views),
        preprocessing=_need(path, data, "preprocessing", dict),
        source=_need(path, data, "source", str),
        num_images=num_images,
        shards=shards,
        bad_images=bad,
    )


# ------------------------------------------------------------------------------------------------------- shards
def write_shard(
    path: str | Path,
    *,
    indices: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    views: np.ndarray,
    metadata: dict[str, str],
) -> Path:
    """Write one shard atomically (temporary file, then rename): a killed writer leaves no shard behind."""
    from safetensors.numpy import save_file

    n = len(labels)
    if indices.ndim != 4 or len(indices) != n or len(images) != n or len(views) != n:
        raise ValueError(f"shard arrays disagree: indices {indices.shape}, {n} labels, {len(images)} images, "
                         f"{len(views)} views")
    tensors = {
        "indices": np.ascontiguousarray(indices),
        "labels": np.ascontiguousarray(labels, dtype=np.int64),
        "images": np.ascontiguousarray(images, dtype=np.int64),
        "views": np.ascontiguousarray(views, dtype=np.uint8),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor of a shard lies: numpy dtype, shape and absolute byte offset in the file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def read_shard_header(path: str | Path) -> tuple[dict[str, str], dict[str, TensorSpan]]:
    """Parse and check a safetensors header without reading the tensors: (metadata, tensor spans).

    Every size is checked against the file's size before it is used; the tensors must tile the data area exactly.
    """
    path = Path(path)
    try:
        size = regular_file_size(path, "token shard")  # not a pipe: opening one would block
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(path, f"truncated token shard ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InputError(path, f"not a token shard: header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise InputError(path, f"cannot read token shard ({err.strerror or err})") from None
    header = parse_json(path, raw, "token shard: its header is not JSON (corrupt or not safetensors)")
    if not isinstance(header, dict):
        raise InputError(path, "not a token shard: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, "not a token shard: bad __metadata__")
    base, data_size = 8 + n, size - 8 - n
    spans: dict[str, TensorSpan] = {}
    ends = []
    for name, info in header.items():
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _ST_DTYPES
        ok = ok and isinstance(info.get("shape"), list)
        offsets = info.get("data_offsets") if ok else None
        ok = ok and all(isinstance(d, int) and d >= 0 for d in info["shape"])
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok:
            raise InputError(path, f"not a token shard: bad header entry for {shown(repr(name))}")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        start, end = offsets
        nbytes = math.prod(info["shape"]) * dtype.itemsize
        if not 0 <= start <= end <= data_size or end - start != nbytes:
            raise InputError(path, f"corrupt or truncated token shard: tensor {shown(repr(name))} claims bytes {start}..{end} "
                                   f"({nbytes} needed) of a {data_size}-byte data area")
        spans[name] = TensorSpan(dtype, tuple(info["shape"]), base + start)
        ends.append((start, end))
    ends.sort()
    covered = 0
    for start, end in ends:
        if start != covered:
            raise InputError(path, "corrupt token shard: tensors overlap or leave gaps")
        covered = end
    if covered != data_size:
        raise InputError(path, f"corrupt token shard: {data_size - covered} bytes beyond the tensors "
                               "(truncated or appended to)")
    return metadata, spans


def check_shard(path: str | Path, index: ShardIndex, number: int, count: int | None = None) -> tuple[
        dict[str, str], dict[str, TensorSpan]]:
    """Header of shard ``number`` checked against ``index``: tensors, dtypes, shapes, run key, sample count."""
    path = Path(path)
    metadata, spans = read_shard_header(path)
    if metadata.get("format") != FORMAT:
        raise InputError(path, "not a wetok token shard (no wetok metadata)")
    if metadata.get("run") != index.run:
        raise InputError(path, f"belongs to another tokenize run (run {shown(repr(metadata.get('run')))}, this "
                               f"data set is {shown(repr(index.run))}: another tokenizer, data or settings)")
    if metadata.get("shard") != str(number):
        raise InputError(path, f"holds shard {shown(repr(metadata.get('shard')))}, expected {number}")
    missing = [t for t in SHARD_TENSORS if t not in spans]
    if missing:
        raise InputError(path, f"not a token shard: no tensor {missing[0]!r}")
    n = spans["labels"].shape[0] if len(spans["labels"].shape) == 1 else -1
    expect = {
        "indices": (index.dtype, (n, *index.grid, index.groups)),
        "labels": (np.dtype("<i8"), (n,)),
        "images": (np.dtype("<i8"), (n,)),
        "views": (np.dtype("u1"), (n,)),
    }
    for name, (dtype, shape) in expect.items():
        got = spans[name]
        if got.dtype != dtype or got.shape != shape:
            raise InputError(path, f"tensor {name!r} is {got.dtype.name} {list(got.shape)}, expected "
                                   f"{dtype.name} {list(shape)}")
    if count is not None and n != count:
        raise InputError(path, f"holds {n} samples, the index says {count}")
    return metadata, spans


def _memmap(path: Path, span: TensorSpan) -> np.ndarray:
    if math.prod(span.shape) == 0:
        return np.zeros(span.shape, span.dtype)
    # a plain ndarray view: indexing np.memmap itself costs several times more per sample
    return np.memmap(path, dtype=span.dtype, mode="r", offset=span.offset, shape=span.shape).view(np.ndarray)


# ------------------------------------------------------------------------------------------------------- reader
class TokenDataset(Dataset):
    """A token data set written by ``wetok tokenize``, as a map-style dataset for generator training.

    ``dataset[i]`` is ``(indices, label)``: int64 (h, w, g) and an int64 scalar tensor. Shards are memory-mapped
    (opened once; nothing is read until a sample is asked for), so any number of DataLoader workers share the page
    cache. ``views`` keeps only samples of those view names (e.g. ``["center"]``). Everything read is checked:
    the index, every shard header (sizes before allocation, dtypes, shapes, the run key that ties it to this data
    set), labels and views at opening, each sample's index range when it is read; a bad file gives one
    :class:`InputError` naming it.
    """

    def __init__(self, path: str | Path, *, views: Sequence[str] | None = None) -> None:
        path = Path(path)
        self.root = path if path.is_dir() else path.parent
        self.index = read_index(path)
        idx = self.index
        self._files: list[Path] = []
        self._spans: list[TensorSpan] = []
        labels, view_ids, images = [], [], []
        for number, entry in enumerate(idx.shards):
            file = self.root / entry["file"]
            if not file.is_file():
                raise InputError(file, "token shard listed in index.json is missing")
            _, spans = check_shard(file, idx, number, entry["count"])
            shard_labels = np.asarray(_memmap(file, spans["labels"]))
            shard_views = np.asarray(_memmap(file, spans["views"]))
            if len(shard_labels) and not (0 <= shard_labels.min() and shard_labels.max() < len(idx.class_names)):
                raise InputError(file, f"labels outside 0..{len(idx.class_names) - 1}")
            if len(shard_views) and shard_views.max() >= len(idx.views):
                raise InputError(file, f"view ids outside 0..{len(idx.views) - 1}")
            self._files.append(file)
            self._spans.append(spans["indices"])
            labels.append(shard_labels)
            view_ids.append(shard_views)
            images.append(np.asarray(_memmap(file, spans["images"])))
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        self._all_labels = cat(labels, np.int64)
        self._all_views = cat(view_ids, np.uint8)
        self._all_images = cat(images, np.int64)
        self._ends = np.cumsum([len(x) for x in labels], dtype=np.int64)
        if views is None:
            self._select: np.ndarray | None = None
        else:
            unknown = [v for v in views if v not in idx.views]
            if unknown:
                raise InputError(self.root, f"no view {shown(repr(unknown[0]))} in this data set (it has "
                                            f"{shown(', '.join(idx.views))})")
            keep = np.isin(self._all_views, [idx.views.index(v) for v in views])
            self._select = np.flatnonzero(keep)
        self._maps: list[np.ndarray] | None = None
        # signed int64 (over 32 bits) may also hold negative values
        self._limit = (1 << idx.bits_per_group) if idx.dtype.itemsize * 8 > idx.bits_per_group else None

    # ------------------------------------------------------------------------------------------- metadata
    @property
    def groups(self) -> int:
        return self.index.groups

    @property
    def bits_per_group(self) -> int:
        return self.index.bits_per_group

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w)."""
        return self.index.grid

    @property
    def image_size(self) -> tuple[int, int]:
        return self.index.image_size

    @property
    def num_classes(self) -> int:
        return len(self.index.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)

    @property
    def tokenizer_id(self) -> str:
        """:attr:`WeTok.model_id` (architecture and token layout) of the tokenizer that made the tokens."""
        return self.index.tokenizer["id"]

    @property
    def tokenizer_weights_id(self) -> str | None:
        """:attr:`WeTok.weights_id` (its encoder and quantizer weights) of that tokenizer, where recorded."""
        return self.index.tokenizer.get("weights_id")

    @property
    def tokenizer_name(self) -> str:
        return str(self.index.tokenizer.get("name", ""))

    @property
    def view_names(self) -> list[str]:
        return list(self.index.views)

    @property
    def labels(self) -> np.ndarray:
        """int64 (len(self),): every sample's label (e.g. for class-balanced sampling)."""
        return self._all_labels if self._select is None else self._all_labels[self._select]

    @property
    def views(self) -> np.ndarray:
        """uint8 (len(self),): every sample's view, an index into :attr:`view_names`."""
        return self._all_views if self._select is None else self._all_views[self._select]

    @property
    def image_ids(self) -> np.ndarray:
        """int64 (len(self),): every sample's source image (line of ``images.txt``); views of one image share it."""
        return self._all_images if self._select is None else self._all_images[self._select]

    def check_tokenizer(self, model: Any) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` (a WeTok) is the tokenizer these tokens came from:
        the same architecture (:attr:`WeTok.model_id`) and, where recorded, the same weights (``weights_id``)."""
        if model.model_id != self.tokenizer_id:
            raise ModelMismatchError(f"{self.root}: tokens were made by tokenizer {shown(self.tokenizer_id)}, "
                                     f"the given one is {model.model_id}")
        if self.tokenizer_weights_id is not None and model.weights_id != self.tokenizer_weights_id:
            raise ModelMismatchError(f"{self.root}: tokens were made by tokenizer weights "
                                     f"{shown(self.tokenizer_weights_id)}"
                                     f", the given tokenizer has weights {model.weights_id}")

    # -------------------------------------------------------------------------------------------- samples
    def __len__(self) -> int:
        return len(self._all_labels) if self._select is None else len(self._select)

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [_memmap(f, s) for f, s in zip(self._files, self._spans, strict=True)]
        return self._maps

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i = int(i) % n
        if self._select is not None:
            i = int(self._select[i])
        shard = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[shard - 1]) if shard else 0
        tokens = np.asarray(self._open()[shard][i - start], dtype=np.int64)
        if self._limit is not None and (tokens.max() >= self._limit or tokens.min() < 0):
            raise InputError(self._files[shard], f"sample {i - start} has an index >= 2^{self.bits_per_group}")
        return torch.from_numpy(tokens), torch.tensor(int(self._all_labels[i]), dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in each DataLoader worker rather than pickled (which would copy their data)
        return {**self.__dict__, "_maps": None}

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.root)!r}: {len(self)} samples, {self.num_classes} classes, grid "
                f"{self.grid[0]}x{self.grid[1]}, {self.groups} x {self.bits_per_group} bits, tokenizer "
                f"{self.tokenizer_id})")
