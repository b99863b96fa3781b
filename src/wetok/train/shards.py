"""WebDataset-style tar shards as a seeded, exactly resumable training stream.

A shard is a tar file whose members are named ``<key>.<ext>`` (the WebDataset convention: the key is the member
path up to the first dot of its file name); the first member of each key with an image extension is its image,
other members (captions, JSON) are ignored.

Hand-written rather than with the ``webdataset`` package because training must resume at the exact sample after
a kill, with the same order, which webdataset's shuffle buffers do not offer. The order here is a pure function of
(seed, epoch, stream):

* with P processes and W DataLoader workers each there are S = P * W streams; in epoch e the shards are
  permuted by (seed, e) and stream s reads every S-th of them, starting at s;
* each shard's samples are visited in a permutation seeded by (seed, e, shard);
* every sample carries its stream and cursor (epoch, shard slot, sample slot); the training loop records the
  last consumed cursor per stream, and a resumed stream starts right after it. Worker ids are rotated so that
  the DataLoader's round-robin over workers continues where it stopped. Resuming exactly needs the same number
  of processes and workers; otherwise the stream restarts at the next epoch (with a warning).

Local (seekable) files only: the member list of each shard is read before its samples are shuffled.
"""

from __future__ import annotations

import glob
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import IMAGE_EXTENSIONS, decode_image
from ..errors import InputError
from .data import CropSpec, FilteredOut, collate, sample_rng

__all__ = ["ShardStream", "build_shard_loader", "expand_shards", "is_shard_source", "read_shard_index"]

log = logging.getLogger(__name__)

#: Largest image member of a tar shard read (bytes); a larger one is skipped as a bad image.
MAX_MEMBER_BYTES = 256 << 20

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


#: The most shards a ``{lo..hi}`` range may name.
MAX_SHARDS = 1_000_000


def is_shard_source(source: str) -> bool:
    """A ``.tar`` path or pattern, or a folder whose files are ``.tar`` shards."""
    if source.rstrip("/").endswith(".tar"):
        return True
    path = Path(source)
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix == ".tar" for p in files)


def expand_shards(source: str) -> list[str]:
    """``a-{000..099}.tar`` (zero-padded numeric range), a glob, a single tar, or a folder of tars -> sorted list."""
    path = Path(source)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    else:
        match = _BRACES.search(source)
        if match:
            lo, hi = match.group(1), match.group(2)
            if len(hi) > 12 or len(lo) > 12 or int(hi) - int(lo) >= MAX_SHARDS:
                raise InputError(source, f"the range names more than {MAX_SHARDS} shards")
            width = len(lo)
            names = [source[: match.start()] + str(i).zfill(width) + source[match.end() :]
                     for i in range(int(lo), int(hi) + 1)]
            shards = [n for name in names for n in (sorted(glob.glob(name)) if glob.has_magic(name) else [name])]
        else:
            shards = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise InputError(missing[0] if missing else source, "no such tar shard")
    return shards


def read_shard_index(shard: str) -> list[tuple[str, tarfile.TarInfo]]:
    """(key, image member) pairs of one shard, in tar order."""
    seen: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(shard, "r:") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS:
                seen.setdefault(f"{folder}/{stem}" if folder else stem, member)
    return list(seen.items())


def _perm(n: int, *key: int) -> list[int]:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**62)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class ShardStream(IterableDataset):
    """Endless samples of tar shards for one process; see the module docstring.

    ``cursors`` maps a stream id to the last consumed (epoch, shard slot, sample slot); ``rotation`` is the number
    of batches this process has consumed (mod the worker count).
    """

    def __init__(self, shards: Sequence[str], spec: CropSpec, *, seed: int, rank: int, world: int,
                 num_workers: int, cursors: dict[int, tuple[int, int, int]] | None = None,
                 rotation: int = 0) -> None:
        self.shards, self.spec, self.seed = list(shards), spec, seed
        self.rank, self.world, self.workers = rank, world, max(1, num_workers)
        self.cursors = dict(cursors or {})
        self.rotation = rotation
        if len(self.shards) < self.world * self.workers:
            raise InputError(self.shards[0], f"{len(self.shards)} shards cannot feed {self.world} processes x "
                             f"{self.workers} workers; use fewer workers or more shards")

    @property
    def n_streams(self) -> int:
        return self.world * self.workers

    def _stream_id(self) -> int:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return self.rank * self.workers + (physical + self.rotation) % self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._stream_id()
        epoch, slot, sample = self.cursors.get(stream, (0, 0, -1))
        sample += 1
        skipped = 0
        while True:
            order = _perm(len(self.shards), self.seed, epoch)[stream :: self.n_streams]
            while slot < len(order):
                shard_index = order[slot]
                shard = self.shards[shard_index]
                try:
                    index = read_shard_index(shard)
                    tar = tarfile.open(shard, "r:")
                except (OSError, tarfile.TarError) as err:
                    log.warning("skipping unreadable shard %s: %s", shard, err)
                    skipped += 1
                    slot, sample = slot + 1, 0
                    continue
                with tar:
                    visit = _perm(len(index), self.seed, epoch, shard_index)
                    while sample < len(visit):
                        key, member = index[visit[sample]]
                        rng = sample_rng(self.seed, f"{shard_index}:{key}:{epoch}")
                        try:
                            if member.size > MAX_MEMBER_BYTES:  # (a sparse member can claim any size)
                                raise InputError(member.name, f"{member.size} bytes, over the limit of "
                                                              f"{MAX_MEMBER_BYTES} for one image")
                            image = self.spec(decode_image(tar.extractfile(member).read(), member.name), rng)
                        except (OSError, ValueError, FilteredOut, tarfile.TarError, InputError) as err:
                            log.warning("skipping %s in %s: %s", member.name, shard, err)
                            skipped += 1
                            sample += 1
                            continue
                        yield {"image": image, "stream": stream, "epoch": epoch, "slot": slot, "sample": sample,
                               "skipped": skipped}
                        skipped = 0
                        sample += 1
                slot, sample = slot + 1, 0
            epoch, slot = epoch + 1, 0


def build_shard_loader(shards: Sequence[str], spec: CropSpec, *, micro_batch: int, seed: int, rank: int,
                       world: int, num_workers: int, cursors: dict[int, tuple[int, int, int]] | None = None,
                       rotation: int = 0) -> DataLoader:
    """An endless DataLoader over tar shards for one process (each batch comes from one worker's stream)."""
    dataset = ShardStream(shards, spec, seed=seed, rank=rank, world=world, num_workers=num_workers,
                          cursors=cursors, rotation=rotation)
    return DataLoader(dataset, batch_size=micro_batch, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
